"""Ray job entrypoint for annotation (Ray Data over CLIP / LLaVA actors).

    ray job submit --working-dir . -- python jobs/annotate.py \
        --images s3://bucket/train.parquet --annotator clip:ViT-B-32/openai \
        --output s3://bucket/ann.parquet --report s3://bucket/ann-report

Forwards to `coreg-ray annotate` when the CLI has that command; otherwise calls
`coreg_ray.annotate.pipeline.run_annotation` directly with the arguments below.
"""
import argparse
import sys

from _entry import run


def _cli_has(command: str) -> bool:
    from coreg_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return command in sub.choices


def main(argv) -> int:
    if _cli_has("annotate"):
        return run("annotate", argv)
    try:
        from coreg_ray.annotate.pipeline import run_annotation
    except ImportError as exc:
        print(f"jobs/annotate.py: error: the annotation pipeline is not available "
              f"(coreg_ray.annotate.pipeline.run_annotation: {exc})", file=sys.stderr)
        return 2
    from coreg_ray.errors import CoregError

    ap = argparse.ArgumentParser(prog="jobs/annotate.py")
    ap.add_argument("--images", required=True)
    ap.add_argument("--annotator", action="append", required=True, help="e.g. clip:ViT-B-32/openai")
    ap.add_argument("--output", required=True)
    ap.add_argument("--report", default=None)
    ap.add_argument("--templates", default=None)
    ap.add_argument("--num-actors", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        rep = run_annotation(args.images, args.annotator, args.output, args.report,
                             templates=args.templates, num_actors=args.num_actors)
    except CoregError as exc:
        print(f"jobs/annotate.py: error: {exc}", file=sys.stderr)
        return 2
    import json

    print(json.dumps({k: v for k, v in rep.items() if not isinstance(v, (dict, list))}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

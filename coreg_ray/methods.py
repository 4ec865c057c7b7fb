"""Every method of the paper's comparisons behind one function: `run_method(name, ...)`.

- `zero_shot`: no training; the annotator's own accuracy on the test images (vote ensemble and
  per template), read from the test split's annotation table.
- `coreg` and its ablations (paper Table V) and `warmup_only`: the Co-Reg trainer with switches.
- `true_labels`: the ceiling row of every table: the same student, loss (the warm-up loss, all
  epochs), schedule and images as `warmup_only`, trained on the TRUE labels (one-element
  candidate sets; needs labelled training images). How much of it a method reaches is what the
  annotator's noise cost it.
- `dividemix` (Li et al., ICLR 2020) on the single noisy label (the annotator's ensemble argmax):
  the Co-Reg loop with one-hot "candidate sets", which is exactly DivideMix's co-divide (GMM on
  the per-sample CE, each net split by its peer), label refinement on the labelled split
  (w*y + (1-w)*own, sharpened), co-guessing on the unlabelled split (mean of both nets' weak-view
  predictions, sharpened), MixMatch with lam' = max(lam, 1-lam), MSE on U ramped over 16 epochs,
  plus DivideMix's uniform-prior penalty; no prototypes, no contrastive term, no distribution
  alignment. lambda_u = 25 (DivideMix's CIFAR-10 value for 50 % noise).
  A variant's switches override the shared config; change them per run with `params`, dotted
  config keys applied last (`run_method("dividemix", ..., params={"coreg.lambda_u": 10})`).
- the baselines of `coreg_ray.baselines.METHODS` (PLL losses, PiCO family, ALIM, KD).
- `coop` / `lora`: few-shot fine-tuning of the annotator itself.

Every name is registered once, with its table label and description, in
`coreg_ray.method_registry` (`register_method`); `method_names()`, `describe()` and
`method_info()` read it, and `run_method` dispatches on the registration's kind.

Each returns a dict with at least `method`, `test_accuracy`, `seconds`, `epochs`, `history`.
"""
from __future__ import annotations

import numpy as np
import yaml

from coreg_ray.config import Config
from coreg_ray.data.annotations import AnnotationTable, annotation_stats, ensemble_prediction
from coreg_ray.errors import CoregError
from coreg_ray.method_registry import MethodInfo, MethodView, lookup, register_method, registered

# Every method is registered once (label, description, kind) in `coreg_ray.method_registry`:
# zero_shot (below, on its function), the Co-Reg variants and the few-shot methods here, the
# baselines where they are defined (`coreg_ray.baselines.pll` / `pico`).
# A Co-Reg variant's target: its Co-Reg config overrides (None: warm-up loss only, all epochs).
for _name, _label, _description, _overrides in (
    ("coreg", "Co-Reg", "Co-Reg (paper)", []),
    ("coreg_balanced", "Co-Reg, class-balanced split", "Co-Reg, class-balanced GMM split (ours)",
     ["coreg.class_balanced_split=true"]),
    ("coreg_no_copl", "Co-Reg w/o co-pseudo-labels", "Co-Reg w/o co-pseudo-labeling (self labels)",
     ["coreg.co_pseudo_labels=false"]),
    ("coreg_supcon", "Co-Reg, plain SupCon", "Co-Reg, plain SupCon instead of noisy contrastive",
     ["coreg.noisy_contrastive=false"]),
    ("coreg_no_proto", "Co-Reg w/o prototypes", "Co-Reg w/o prototype alignment",
     ["coreg.prototypes=false"]),
    ("coreg_no_u", "Co-Reg w/o U", "Co-Reg w/o the unlabeled split U", ["coreg.use_unlabeled=false"]),
    ("warmup_only", "Warm-up loss only", "warm-up loss only (partial CE + neg. entropy), all epochs",
     None),
    ("true_labels", "True labels (ceiling)",
     "the ceiling: warm-up loss only, all epochs, on the TRUE labels (one-element sets)", None),
    ("dividemix", "DivideMix (ensemble label)", "DivideMix on the ensemble label", [
        "coreg.prototypes=false", "coreg.contrastive=false", "coreg.distribution_alignment=false",
        "coreg.class_balanced_split=false", "coreg.prior_penalty=true", "coreg.lambda_u=25"]),
):
    register_method(_name, label=_label, description=_description, kind="coreg", target=_overrides)
del _name, _label, _description, _overrides

# The paper's few-shot comparators: they fine-tune the annotator itself on k labelled images
# per class (fewshot.shots); `params: {coop: {model: "clip:ViT-B-32/openai"}}` names the model.
register_method("coop", label="CoOp", kind="fewshot",
                description="CoOp: learned prompt context for the CLIP annotator (k shots per class)")
register_method("lora", label="LoRA", kind="fewshot",
                description="LoRA fine-tuning of the LLaVA annotator (k shots per class)")

# The old tables, as live views of the registry: name -> (description, overrides) / description.
COREG_VARIANTS = MethodView(lambda i: (i.description, i.target), kind="coreg")
FEWSHOT = MethodView(lambda i: i.description, kind="fewshot")


def load_methods() -> None:
    """Import the modules that register methods outside this one (the baselines)."""
    import coreg_ray.baselines  # noqa: F401


def method_info(name: str) -> MethodInfo:
    """The registration of `name` (label, description, kind, target); unknown: CoregError."""
    load_methods()
    info = lookup(name)
    if info is None:
        raise CoregError(f"unknown method '{name}'; known: {', '.join(method_names())}")
    return info


def apply_variant_params(cfg: Config, params: dict | None, where: str) -> Config:
    """A Co-Reg variant's params are dotted config keys, set on `cfg` (in place); errors name
    `where` (the method, or the experiment's params entry)."""
    for key, value in (params or {}).items():
        if "." not in str(key):
            raise CoregError(f"{where}: Co-Reg variants take dotted config keys "
                             f"(e.g. coreg.lambda_u), got '{key}'")
        try:
            cfg.set(str(key), value)
        except CoregError as exc:
            raise CoregError(f"{where}: {exc}") from None
    return cfg


def method_names() -> list[str]:
    load_methods()
    return [i.name for i in registered()]


def describe(name: str) -> str:
    return method_info(name).description


@register_method("zero_shot", label="Zero-shot (annotator, test)", kind="annotator",
                 description="zero-shot: the annotator's own vote-ensemble accuracy")
def zero_shot(test_annotations: AnnotationTable | None, test) -> dict:
    if test_annotations is None or test is None or test.labels is None:
        raise CoregError("zero_shot needs the test images' annotation table (with --test-images "
                         "labels): it measures the annotator itself")
    ann = test_annotations.align_to(test.ids, "test annotations")
    if ann.votes is None and ann.probs is None:
        from coreg_ray.errors import NotApplicable
        # synthetic sets: there is no annotator whose prediction could be measured
        raise NotApplicable("zero_shot measures an annotator's votes/probabilities; this table "
                            "has candidate sets only (synthetic?)")
    stats = annotation_stats(ann, test.labels)
    return {"method": "zero_shot", "test_accuracy": stats["ensemble_accuracy"], "seconds": 0.0,
            "epochs": 0, "history": [], "template_accuracy": stats.get("template_accuracy"),
            "vote_accuracy": stats.get("vote_accuracy"),
            "partial_accuracy": stats.get("partial_accuracy"),
            "avg_candidates": stats["avg_candidates"]}


def onehot_ensemble(ann: AnnotationTable, seed: int = 0) -> AnnotationTable:
    """The single noisy label as a one-element candidate set: the ensemble argmax, or, for
    tables with neither probabilities nor votes (synthetic sets), one candidate drawn uniformly
    (seeded) — the first candidate would bias every label towards low class indices."""
    if ann.probs is None and ann.votes is None:
        # a stream of its own: default_rng(seed) would replay the draws that built the sets
        rng = np.random.default_rng([seed, 0x1AB1E])
        keys = rng.random(ann.candidates.shape) * ann.candidates
        pred = keys.argmax(1)
    else:
        pred = ensemble_prediction(ann)
    cand = np.zeros_like(ann.candidates)
    cand[np.arange(len(pred)), pred] = True
    return AnnotationTable(ann.ids, cand, ann.votes, ann.probs,
                           {**ann.meta, "derived": "ensemble argmax (single label)"})


def fewshot_method(name: str, cfg: Config, train, test, params: dict | None) -> dict:
    """CoOp / LoRA on `fewshot.shots` labelled images per class (the same images Co-Reg's
    few-shot run trusts: `few_shot_indices(labels, shots, fewshot.seed)`)."""
    from coreg_ray.errors import NotApplicable

    p = dict(params or {})
    model = p.pop("model", None)
    if not model:
        what = "a clip:MODEL/PRETRAINED spec" if name == "coop" else "a LLaVA folder or llava:PATH"
        raise CoregError(f"{name}: set params.{name}.model ({what})")
    shots = cfg.fewshot.shots
    if shots < 1:
        raise NotApplicable(f"{name} fine-tunes on labelled shots: it needs fewshot.shots >= 1")
    if name == "coop":
        from coreg_ray.fewshot.coop import train_coop
        res = train_coop(model, train, test, shots=shots, seed=cfg.fewshot.seed, **p)
    else:
        from coreg_ray.fewshot.lora import train_lora_llava
        res = train_lora_llava(model, train, test, shots=shots, seed=cfg.fewshot.seed, **p)
    return {"method": name, "test_accuracy": res.get("test_accuracy"), "seconds": res.get("seconds"),
            "epochs": res.get("epochs"), "history": [], "shots": shots}


def run_method(name: str, cfg: Config, train, annotations: AnnotationTable, test=None,
               test_annotations: AnnotationTable | None = None, params: dict | None = None,
               callbacks=(), progress: bool = False, model_path=None, *, output_dir=None,
               resume: bool = False, initial_state: dict | None = None, comm=None,
               shard=None) -> dict:
    """Train (or, for zero_shot, just measure) one method; see the module doc. This is what
    every run does once its inputs are loaded (`coreg_ray.runs.execute`, an experiment's task,
    a Ray Train worker, a Tune trial); what a caller adds goes in `callbacks`
    (`callback(epoch, stats, trainer)` after every epoch). `model_path`: where to save the
    trained model (model.pt; Co-Reg variants only, the others have none). `output_dir`
    (checkpoints), `resume`, `initial_state`, `comm` (DDP) and `shard` (this rank's rows,
    `coreg_ray.data.shards.Shard`) go to the Co-Reg trainer
    (`CoReg.fit`); a baseline refuses to resume, zero-shot and few-shot take none of them."""
    from coreg_ray.baselines import BaselineTrainer
    from coreg_ray.coreg.trainer import CoReg

    info = method_info(name)  # unknown: one line naming the known ones
    if info.kind in ("annotator", "fewshot") and (resume or initial_state is not None or comm):
        raise CoregError(f"{name} trains no Co-Reg model: nothing to resume or distribute")
    if info.kind == "annotator":
        return zero_shot(test_annotations, test)
    if info.kind == "fewshot":
        return fewshot_method(name, cfg, train, test, params)
    if info.kind == "coreg":
        cfg = Config.from_dict(cfg.to_dict())  # never mutate the caller's config
        overrides = info.target
        if overrides is None:  # warm-up only
            cfg.set("train.warmup_epochs", cfg.train.epochs)
        else:
            for o in overrides:
                key, value = o.split("=", 1)
                cfg.set(key, yaml.safe_load(value))
        # The variant's switches define it, so they override the shared config; a run changes
        # them through its params, applied last (e.g. params: {dividemix: {coreg.lambda_u: 10}}).
        apply_variant_params(cfg, params, name)
        if name == "dividemix":
            ann = onehot_ensemble(annotations, cfg.train.seed)
        elif name == "true_labels":  # the ceiling: the setting's annotations are not used
            from coreg_ray.data.noise import true_label_annotations
            ann = true_label_annotations(train.ids, train.labels, train.num_classes, train.source)
        else:
            ann = annotations
        trainer = CoReg(cfg, comm=comm, callbacks=callbacks, progress=progress, shard=shard)
    else:  # a baseline: its Method class
        if comm is not None:
            raise CoregError(f"{name}: baselines train in one process (no comm)")
        ann = annotations
        trainer = BaselineTrainer(info.target, cfg, params, callbacks=callbacks, progress=progress)
    final = trainer.fit(train, ann, test, output_dir, resume=resume, initial_state=initial_state)
    if model_path is not None and hasattr(trainer, "save_model"):
        trainer.save_model(model_path)
    return {"method": name, "test_accuracy": final.get("test_accuracy"),
            "seconds": final.get("seconds"), "epochs": cfg.train.epochs,
            "history": trainer.history}

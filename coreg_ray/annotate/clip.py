"""CLIP annotator (open_clip): one vote per prompt template, candidate set = union of the votes.

Annotator spec: ``clip:MODEL[/PRETRAINED]``

- MODEL: an open_clip model name (``open_clip.list_models()``), e.g. ``ViT-B-32``.
- PRETRAINED, one of
  - an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...); left out: ``openai`` where the
    model has it, else its first tag. A tag trained with QuickGELU switches it on by itself.
  - a checkpoint file (``.bin``, ``.pt``, ``.pth``, ``.safetensors``), e.g.
    ``clip:ViT-B-32-quickgelu//models/vit-b-32-openai.bin`` (MODEL must match the weights);
  - ``local-dir:DIR``: a folder holding ``open_clip_config.json`` (with ``model_cfg``) and the
    weights; MODEL is then informational (``clip:local-dir:DIR`` works too);
  - ``hf-hub:ORG/REPO``: a Hugging Face repository (read from the local HF cache unless
    downloads are allowed; ``clip:hf-hub:ORG/REPO`` works too);
  - ``random`` or ``random:SEED``: random weights (tests, benchmarks); the seed (default 0)
    makes every actor build the same model.

Downloads are off unless ``COREG_RAY_ALLOW_DOWNLOAD=1`` (or ``allow_download=True``): the
annotator sets ``HF_HUB_OFFLINE=1`` so that missing weights fail at once (open_clip otherwise
retries for ~45 s) with a `CoregError` saying how to provide them.

Batch format of `ClipAnnotator` (a callable class for ``Dataset.map_batches``; also usable
directly): a dict of NumPy arrays with
  - ``id``: int64 [B];
  - ``pixels``: uint8 [B, H, W, 3] RGB images already resized to the model's input size by
    `prepare_image` (what the pipeline's CPU decode step emits), or, instead,
    ``image``: encoded image bytes (decoded and resized inside the actor);
  - optional ``error``: str [B]; rows with a non-empty error are passed through unannotated.
It returns ``id`` int64 [B], ``votes`` int64 [B, K] (template argmax; -1 on error rows),
``candidates`` bool [B, C] (dense mask; all False on error rows), ``probs`` float32 [B, C]
(template mean; zeros on error rows) and ``error`` str [B].
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coreg_ray.annotate import logic
from coreg_ray.annotate.imageio import (annotator_batch, decode_batch_bytes, decode_image,  # noqa: F401
                                      prepare_image)
from coreg_ray.annotate.protocol import ModelAnnotator
from coreg_ray.annotate.templates import build_prompts, resolve_classes, resolve_templates
from coreg_ray.errors import CoregError, require

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
ALLOW_DOWNLOAD_ENV = "COREG_RAY_ALLOW_DOWNLOAD"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():
    return require("open_clip", "clip")


def downloads_allowed(allow_download: bool | None = None) -> bool:
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def hub_offline(offline: bool = True):
    """Make Hugging Face Hub calls fail at once instead of retrying (env var for new imports,
    the already-imported constant for this process)."""
    if not offline:
        yield
        return
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    consts, old_const = None, None
    try:
        import huggingface_hub.constants as consts  # noqa: F811
        old_const = consts.HF_HUB_OFFLINE
        consts.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - open_clip depends on it
        consts = None
    try:
        yield
    finally:
        if consts is not None:
            consts.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ClipSpec:
    spec: str  # as given
    model: str | None  # open_clip model name (None when a schema source defines it)
    kind: str  # "tag" | "file" | "local-dir" | "hf-hub" | "random"
    source: str | None  # tag, file path, directory, hub id; None for random
    seed: int = 0

    @property
    def open_clip_name(self) -> str:
        if self.kind in ("local-dir", "hf-hub"):
            return f"{self.kind}:{self.source}"
        return self.model

    @property
    def label(self) -> str:
        return self.spec


def _how_to_provide(model: str | None) -> str:
    m = model or "MODEL"
    return (f"provide weights offline: clip:{m}/PATH/TO/WEIGHTS.bin (a checkpoint file), "
            f"clip:local-dir:DIR (open_clip_config.json + weights), or a pre-filled Hugging Face "
            f"cache (HF_HOME) for tags and hf-hub:; set {ALLOW_DOWNLOAD_ENV}=1 to allow downloads; "
            f"clip:{m}/random for random weights")


def _check_model_name(model: str, spec: str) -> None:
    oc = _open_clip()
    names = oc.list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else \
            " (open_clip.list_models() lists them)"
        raise CoregError(f"annotator {spec!r}: unknown open_clip model {model!r}{hint}; a model "
                         "of your own: clip:local-dir:DIR (open_clip_config.json + weights)")


def parse_clip_spec(spec: str) -> ClipSpec:
    """Parse ``clip:MODEL[/PRETRAINED]`` (module doc); checks names and paths, loads nothing."""
    s = str(spec).strip()
    if not s.startswith("clip:"):
        raise CoregError(f"annotator {spec!r}: a CLIP annotator is written clip:MODEL[/PRETRAINED], "
                         "e.g. clip:ViT-B-32/openai")
    rest = s[len("clip:"):]
    if not rest:
        raise CoregError(f"annotator {spec!r}: no model after 'clip:'")
    for schema in ("local-dir", "hf-hub"):
        if rest.startswith(schema + ":"):
            return _schema_spec(s, None, schema, rest[len(schema) + 1:])
    model, sep, pre = rest.partition("/")
    if not model:
        raise CoregError(f"annotator {spec!r}: no model name before '/'")
    _check_model_name(model, s)
    oc = _open_clip()
    tags = oc.list_pretrained_tags_by_model(model)
    if not sep:
        if not tags:
            raise CoregError(f"annotator {spec!r}: open_clip knows no pretrained weights for {model}; "
                             f"{_how_to_provide(model)}")
        return ClipSpec(s, model, "tag", "openai" if "openai" in tags else tags[0])
    if not pre:
        raise CoregError(f"annotator {spec!r}: nothing after '/' (want a tag, a weights file, "
                         "local-dir:DIR, hf-hub:ORG/REPO or random)")
    for schema in ("local-dir", "hf-hub"):
        if pre.startswith(schema + ":"):
            return _schema_spec(s, model, schema, pre[len(schema) + 1:])
    if pre == "random" or pre.startswith("random:"):
        seed = 0
        if pre != "random":
            try:
                seed = int(pre.split(":", 1)[1])
            except ValueError:
                raise CoregError(f"annotator {spec!r}: random:SEED needs a whole number") from None
        return ClipSpec(s, model, "random", None, seed)
    if oc.is_pretrained_cfg(model, pre):
        return ClipSpec(s, model, "tag", pre)
    path = Path(pre).expanduser()
    if path.is_file():
        return ClipSpec(s, model, "file", str(path))
    if path.suffix in WEIGHT_SUFFIXES or "/" in pre or os.sep in pre:
        raise CoregError(f"annotator {spec!r}: weights file not found: {path}")
    known = ", ".join(tags[:8]) + (f", ... ({len(tags)} in all)" if len(tags) > 8 else "")
    raise CoregError(f"annotator {spec!r}: {pre!r} is neither an open_clip tag of {model} "
                     f"(known: {known or 'none'}) nor an existing weights file")


def _schema_spec(spec: str, model: str | None, schema: str, ident: str) -> ClipSpec:
    if not ident:
        raise CoregError(f"annotator {spec!r}: nothing after '{schema}:'")
    if schema == "local-dir":
        d = Path(ident).expanduser()
        if not d.is_dir():
            raise CoregError(f"annotator {spec!r}: folder not found: {d}")
        if not (d / "open_clip_config.json").is_file():
            raise CoregError(f"annotator {spec!r}: {d} has no open_clip_config.json "
                             "(it needs {\"model_cfg\": ...} and the weights beside it)")
        ident = str(d)
    return ClipSpec(spec, model, schema, ident)


def _hf_cached(repo_id: str, filenames) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    for f in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, f), str):
                return True
        except Exception:
            pass
    return False


def check_weights_available(spec: str | ClipSpec, allow_download: bool | None = None) -> ClipSpec:
    """Cheap pre-flight (driver side, nothing loaded): fail at once with a `CoregError` when the
    weights a spec needs are neither on disk nor in the local caches and downloads are off."""
    cs = spec if isinstance(spec, ClipSpec) else parse_clip_spec(spec)
    if downloads_allowed(allow_download) or cs.kind in ("random", "file", "local-dir"):
        return cs
    if cs.kind == "hf-hub":
        ok = _hf_cached(cs.source, ["open_clip_config.json"])
        what = f"hf-hub:{cs.source}"
    else:
        oc = _open_clip()
        cfg = oc.get_pretrained_cfg(cs.model, cs.source) or {}
        ok = False
        if cfg.get("file"):
            ok = Path(cfg["file"]).is_file()
        if not ok and cfg.get("hf_hub"):
            hub = cfg["hf_hub"]
            repo, fname = (hub[:-1], "open_clip_pytorch_model.bin") if hub.endswith("/") \
                else os.path.split(hub)
            alts = [fname]
            if fname.endswith((".bin", ".pth")):
                alts.insert(0, fname[:-4] + ".safetensors")
            if fname == "open_clip_pytorch_model.bin":
                alts.insert(0, "open_clip_model.safetensors")
            ok = _hf_cached(repo, alts)
        if not ok and cfg.get("url") and not cfg.get("hf_hub"):  # open_clip prefers the hub
            ok = (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])).is_file()
        what = f"open_clip tag {cs.source!r}"
    if not ok:
        raise CoregError(f"annotator {cs.spec!r}: the weights of {what} are not on this machine and "
                         f"downloads are off; {_how_to_provide(cs.model)}")
    return cs


# ----------------------------------------------------------------------------- preprocessing
def resolve_preprocess(spec: str | ClipSpec, image_size: int | None = None) -> dict:
    """The input geometry a spec's model expects, without loading weights:
    {size, mean, std, interpolation, resize_mode, fill_color}. Used by the CPU decode step; the
    actor re-checks against the loaded model (and resizes on the device if they differ)."""
    cs = spec if isinstance(spec, ClipSpec) else parse_clip_spec(spec)
    oc = _open_clip()
    cfg = {"size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
           "resize_mode": "shortest", "fill_color": 0}
    model_cfg, pre_cfg = None, {}
    if cs.kind == "local-dir":
        import json
        raw = json.loads((Path(cs.source) / "open_clip_config.json").read_text())
        model_cfg, pre_cfg = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
    elif cs.kind == "hf-hub":
        try:
            with hub_offline(not downloads_allowed()):
                from open_clip.factory import _get_hf_config
                raw = _get_hf_config(cs.source)
            model_cfg, pre_cfg = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
        except Exception as exc:
            raise CoregError(f"annotator {cs.spec!r}: cannot read open_clip_config.json of "
                             f"hf-hub:{cs.source} ({type(exc).__name__}); {_how_to_provide(cs.model)}")
    else:
        model_cfg = oc.get_model_config(cs.model)
        if cs.kind == "tag":
            pre_cfg = oc.get_pretrained_cfg(cs.model, cs.source) or {}
    if model_cfg:
        cfg["size"] = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    for k in ("mean", "std", "interpolation", "resize_mode", "fill_color"):
        if k in pre_cfg and pre_cfg[k] is not None:
            cfg[k] = pre_cfg[k]
    if "size" in pre_cfg and pre_cfg["size"]:
        cfg["size"] = pre_cfg["size"]
    if image_size is not None:
        cfg["size"] = int(image_size)
    cfg["size"] = _square(cfg["size"], cs.spec)
    cfg["mean"], cfg["std"] = tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    return cfg


def _square(size, what) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise CoregError(f"{what}: non-square model input {tuple(size)} is not supported")
        size = size[0]
    return int(size)


# ----------------------------------------------------------------------------- model
@contextlib.contextmanager
def _init_skipped():
    """`torch.nn.init`'s in-place initialisers do nothing while a model whose weights are loaded
    right after is built: an open_clip tag or a weights file, which open_clip loads strictly
    (every parameter is overwritten, or it raises). The random init it skips is most of the
    build time (ViT-B-32 on one CPU thread: 0.97 s vs 0.16 s, then 0.59 s to load), paid again
    by every annotation actor."""
    import torch.nn.init as init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    for n in names:
        setattr(init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def load_clip_model(spec: str | ClipSpec, device="cpu", image_size: int | None = None,
                    allow_download: bool | None = None):
    """Build the open_clip model and tokenizer for a spec -> (model, tokenizer, preprocess_cfg).
    Failures (unknown model, missing weights, no network) raise `CoregError`."""
    cs = spec if isinstance(spec, ClipSpec) else parse_clip_spec(spec)
    oc = _open_clip()
    offline = not downloads_allowed(allow_download)
    kwargs = {}
    if image_size is not None:
        kwargs["force_image_size"] = int(image_size)
    try:
        with hub_offline(offline):
            if cs.kind == "random":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cs.seed)
                    model = oc.create_model(cs.model, pretrained=None, **kwargs)
            elif cs.kind in ("tag", "file"):
                if cs.kind == "tag":
                    tag_cfg = oc.get_pretrained_cfg(cs.model, cs.source) or {}
                    model_cfg = oc.get_model_config(cs.model) or {}
                    if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
                        kwargs["force_quick_gelu"] = True
                with _init_skipped():
                    model = oc.create_model(cs.model, pretrained=cs.source, **kwargs)
            else:  # local-dir / hf-hub: open_clip goes on without weights if it finds none,
                model = oc.create_model(cs.open_clip_name, **kwargs)  # so keep the init
            tokenizer = oc.get_tokenizer(cs.open_clip_name if cs.kind in ("local-dir", "hf-hub")
                                         else cs.model)
    except CoregError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        where = {"tag": f"open_clip tag {cs.source!r}", "file": f"weights file {cs.source}",
                 "local-dir": f"folder {cs.source}", "hf-hub": f"hf-hub:{cs.source}",
                 "random": "random weights"}[cs.kind]
        if offline and cs.kind in ("tag", "hf-hub"):
            raise CoregError(f"annotator {cs.spec!r}: the weights of {where} are not on this machine "
                             f"and downloads are off ({msg}); {_how_to_provide(cs.model)}") from None
        raise CoregError(f"annotator {cs.spec!r}: cannot build the model from {where} "
                         f"({type(exc).__name__}: {msg})") from None
    model = model.to(device).eval()
    prep = dict(oc.get_model_preprocess_cfg(model))
    prep["size"] = _square(prep.get("size", 224), cs.spec)
    return model, tokenizer, prep


def _trimmed_text_ok(model) -> bool:
    """Trailing padding can be cut off exactly for open_clip's own CLIP text tower: its
    attention is causal, so tokens before the end-of-text token never see the padding."""
    try:
        from open_clip.model import CLIP
    except ImportError:  # pragma: no cover
        return False
    return (type(model) is CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax")


def _encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    from open_clip.transformer import text_global_pool

    n = int((tokens != 0).sum(1).max())
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection
    return x


def encode_prompts(model, tokenizer, prompts: list[list[str]], device="cpu",
                   chunk: int = 1024, autocast_dtype=None) -> torch.Tensor:
    """prompts[k][c] -> unit-norm text embeddings float32 [K, C, D] (computed once)."""
    k, c = len(prompts), len(prompts[0])
    flat = [p for row in prompts for p in row]
    trim = _trimmed_text_ok(model)
    outs = []
    with torch.inference_mode(), _autocast(device, autocast_dtype):
        if trim:  # check once that trimming is exact for this model (else fall back)
            probe = tokenizer(flat[:4]).to(device)
            a, b = model.encode_text(probe).float(), _encode_text_trimmed(model, probe).float()
            trim = torch.allclose(a, b, atol=1e-3 * max(1.0, float(a.abs().max())))
        for i in range(0, len(flat), chunk):
            tok = tokenizer(flat[i:i + chunk]).to(device)
            e = _encode_text_trimmed(model, tok) if trim else model.encode_text(tok)
            outs.append(e.float())
    emb = torch.cat(outs).reshape(k, c, -1)
    return logic.normalize(emb)


def _autocast(device, dtype):
    dev = torch.device(device)
    if dtype is None or dev.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


class ClipAnnotator(ModelAnnotator):
    """One per Ray Data actor: loads the model once, embeds every template x class prompt once,
    then annotates batches (see the module doc for the batch format)."""

    def __init__(self, spec: str, classes, templates=None, candidate_mode: str = "union",
                 image_size: int | None = None, device: str | None = None,
                 precision: str = "auto", logit_scale: float = logic.DEFAULT_LOGIT_SCALE,
                 num_threads: int | None = None, allow_download: bool | None = None):
        self.spec = parse_clip_spec(spec)
        self.classes = resolve_classes(classes)
        self.templates = resolve_templates(templates)
        logic.parse_candidate_mode(candidate_mode)
        self.candidate_mode = candidate_mode
        self.logit_scale = float(logit_scale)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise CoregError(f"precision {precision!r}: use auto, fp32, fp16 or bf16")
        if self.device.type == "cpu" or precision == "fp32":
            self.autocast_dtype = None
        else:
            self.autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.model, tokenizer, self.prep = load_clip_model(self.spec, self.device, image_size,
                                                           allow_download)
        self.size = self.prep["size"]
        self.mean = torch.tensor(self.prep["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.prep["std"], device=self.device).view(1, 3, 1, 1)
        self.text = encode_prompts(self.model, tokenizer, build_prompts(self.templates, self.classes),
                                   self.device, autocast_dtype=self.autocast_dtype)

    def preprocess_cfg(self) -> dict:
        return dict(self.prep)

    def encode_images(self, pixels) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> unit-norm image embeddings float32 [B, D]."""
        x = torch.as_tensor(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise CoregError(f"pixels must be uint8 [B,H,W,3], got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic",
                                                align_corners=False, antialias=True).clamp_(0, 1)
        x = (x - self.mean) / self.std
        with torch.inference_mode(), _autocast(self.device, self.autocast_dtype):
            feats = self.model.encode_image(x)
        return logic.normalize(feats.float())

    def annotate_pixels(self, pixels) -> dict:
        """uint8 [B,H,W,3] -> {votes, candidates, probs} as NumPy (see `logic.annotate_probs`)."""
        emb = self.encode_images(pixels)
        probs = logic.template_probs(emb, self.text, self.logit_scale).cpu()
        return logic.annotate_probs(probs, self.candidate_mode)

    def annotate_batch(self, pixels, **_) -> dict:
        """The `Annotator` protocol (`annotate.protocol`): uint8 [B,H,W,3] -> `annotate_pixels`."""
        return self.annotate_pixels(pixels)

    def __call__(self, batch: dict) -> dict:
        pixels, out, ok = annotator_batch(batch, self.prep, "ClipAnnotator", self.num_templates,
                                          self.num_classes)
        if len(ok):
            res = self.annotate_pixels(np.asarray(pixels)[ok])
            out["votes"][ok] = res["votes"]
            out["candidates"][ok] = res["candidates"]
            out["probs"][ok] = res["probs"]
        return out


# ----------------------------------------------------------------------------- no-Ray path
def annotate_table(table, spec: str, classes=None, templates=None, batch_size: int = 64,
                   candidate_mode: str = "union", image_size: int | None = None,
                   device: str | None = None, precision: str = "auto",
                   logit_scale: float = logic.DEFAULT_LOGIT_SCALE, progress: bool = False,
                   annotator: ClipAnnotator | None = None):
    """Annotate an `ImageTable` (or anything `load_image_table` reads) in this process, without
    Ray -> `AnnotationTable` (ids in the table's order). Images are resized exactly as the Ray
    pipeline's decode step does, so both give the same annotations."""
    from PIL import Image

    from coreg_ray.data.annotations import AnnotationTable
    from coreg_ray.data.tables import ImageTable, load_image_table

    if not isinstance(table, ImageTable):
        table = load_image_table(table)
    classes = resolve_classes(classes, table.classes)
    if len(classes) != table.num_classes and table.labels is not None:
        raise CoregError(f"{len(classes)} class names for a table with {table.num_classes} classes")
    ann = annotator or ClipAnnotator(spec, classes, templates, candidate_mode, image_size, device,
                                     precision, logit_scale)
    prep = ann.prep
    n = len(table)
    votes = np.zeros((n, ann.num_templates), np.int64)
    cand = np.zeros((n, ann.num_classes), bool)
    probs = np.zeros((n, ann.num_classes), np.float32)
    hwc = table.images.permute(0, 2, 3, 1).numpy()
    steps = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"annotate {ann.spec.label}", unit="batch")
    for s in steps:
        sl = slice(s, min(n, s + batch_size))
        px = np.stack([prepare_image(Image.fromarray(a), prep["size"], prep["resize_mode"],
                                     prep["interpolation"], prep["fill_color"]) for a in hwc[sl]])
        res = ann.annotate_pixels(px)
        votes[sl], cand[sl], probs[sl] = res["votes"], res["candidates"], res["probs"]
    meta = {"annotator": ann.spec.label, "classes": list(ann.classes),
            "templates": list(ann.templates), "candidate_mode": candidate_mode,
            "image_size": ann.size, "source": table.source}
    return AnnotationTable(table.ids.copy(), cand, votes, probs, meta)

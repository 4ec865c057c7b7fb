"""LLaVA annotator through vLLM: one answer per prompt template, candidate set = union of answers.

Annotator spec: ``llava:PATH_OR_HF_ID``

- PATH: a folder holding a Hugging Face model that vLLM can serve (``config.json``, weights,
  tokenizer, ``preprocessor_config.json``), e.g. ``llava:/models/llava-1.5-7b-hf``;
- HF_ID: ``ORG/NAME`` (e.g. ``llava:llava-hf/llava-1.5-7b-hf``), resolved from the local
  Hugging Face cache only (``HF_HOME``); a model missing from the cache raises a `CoregError`
  saying how to provide it offline (``COREG_RAY_ALLOW_DOWNLOAD=1`` lets vLLM download it).

What it asks (paper §III): K prompt templates, each listing *all* class names as choices
(``{choices}``); one answer per (image, template); the answer's class is the template's vote;
the union of the votes is the candidate set. An answer that names no class (or, by default,
more than one) is no vote (-1). With ``structured_outputs=True`` (default) vLLM restricts every
answer to exactly one class name (``StructuredOutputsParams(choice=class_names)``), so every
answer is a vote; with it off, `AnswerParser` maps free text onto the class list (case,
punctuation, articles, plurals, a common class-name prefix, user synonyms). ``probs`` in the
table is the share of the votes each class got (one-hot mean over templates).

Requests are image-major: the K prompts of one image are adjacent and the image comes first in
every prompt (``USER: <image>\\n<question> ASSISTANT:``), so vLLM's prefix cache (and its
encoder cache) reuse the image tokens across the K templates.

Engine route -- a vLLM engine held in a Ray actor (chosen over ``ray.data.llm``):
`LlavaAnnotator` is a callable class for ``Dataset.map_batches`` on an actor pool, exactly
where the pipeline puts `ClipAnnotator`; each actor owns one ``vllm.LLM``
(``tensor_parallel_size`` GPUs per actor; ``replicas`` actors) and answers a batch of images
with one ``LLM.generate`` call of B x K requests (vLLM batches them continuously up to
``max_num_seqs``). Why not ``ray.data.llm.build_processor``:
(1) it emits one row per *request* (no order guarantee across replicas), so the K answers of an
    image would have to be regrouped on the driver before the resumable shard writer could use
    them; the actor returns finished per-image rows, and the pipeline's sharding / resume /
    merge / report code stays one code path for CLIP and LLaVA;
(2) with Ray 2.60 + vLLM 0.32 on CPU it needs three workarounds (CPU placement-group bundles,
    ``log_engine_metrics=False``, chat-template/tokenize stages off because its OpenAI-messages
    route imports a vLLM module that moved): an adapter pinned to matching releases of two
    fast-moving packages, whereas the actor uses only ``vllm.LLM``, ``SamplingParams`` and
    ``StructuredOutputsParams``;
(3) start-up failures surface as the same one-line `CoregError` as CLIP's;
(4) measured here (2 shared cores, 16 CIFAR images x 5 templates, tiny model): the
    ``ray.data.llm`` route with those workarounds works (every answer a class name) but took
    191 s end to end, mostly engine start-up in its own processes; this route 45 s through
    `run_annotation` (benchmarks/annotate_llava_cpu.md).
What it gives up: a batch is one synchronous ``generate`` call (no overlap between consecutive
batches of one actor: use batches of many images), and tensor parallelism stays inside one node
(vLLM's own multiprocessing executor; pass ``engine_kwargs`` for anything else).

On CPU the engine core and the model worker run in the caller's own process by default
(``in_process``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor), with torch
threads = usable cores - 1 as vLLM's own CPU worker binds them: one process imports torch +
vLLM instead of three (engine start here 9 s instead of 49-150 s, same prompts/s), and no engine
process can outlive a killed Ray actor. On GPUs vLLM's defaults stay.

vLLM is imported lazily (only `LlavaAnnotator` needs it); a missing vLLM gives a one-line
`CoregError` naming the separate environment (``bash .ci/vllm-env.sh`` on CPU machines; the
``vllm`` extra in its own virtual environment on GPUs). Everything else here -- templates,
prompts, request order, answer parsing, votes, options (`coreg_ray.annotate.llava_prompts`,
re-exported here) -- is pure Python and runs without vLLM.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coreg_ray.annotate.llava_prompts import (DEFAULT_IMAGE_TOKEN, DEFAULT_PROMPT_FORMAT,  # noqa: F401
                                              LLAVA_TEMPLATES, AnswerParser, LlavaOptions,
                                              build_llava_prompts, build_requests, choices_text,
                                              normalize_tokens, resolve_llava_templates,
                                              validate_llava_templates, votes_to_rows, word_forms)
from coreg_ray.annotate.protocol import ModelAnnotator
from coreg_ray.annotate.templates import resolve_classes
from coreg_ray.errors import CoregError

ALLOW_DOWNLOAD_ENV = "COREG_RAY_ALLOW_DOWNLOAD"
DEFAULT_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336 when preprocessor_config.json is silent
VLLM_ENV_HINT = ("the LLaVA annotator runs in a separate vLLM environment: on CPU machines "
                 "`bash .ci/vllm-env.sh` creates .venv-vllm (run with .venv-vllm/bin/python); "
                 "on GPUs install coreg-ray[vllm] into its own virtual environment")


# ============================================================================= engine settings
def engine_args(model_path: str, opts: LlavaOptions, on_cpu: bool) -> dict:
    """Keyword arguments for ``vllm.LLM`` (pure; no vLLM needed)."""
    kw = {"model": str(model_path), "tokenizer": str(model_path), "dtype": opts.dtype,
          "tensor_parallel_size": int(opts.tensor_parallel_size), "seed": int(opts.seed),
          "limit_mm_per_prompt": {"image": 1},
          "enable_prefix_caching": bool(opts.enable_prefix_caching)}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                 "kv_cache_memory_bytes", "gpu_memory_utilization"):
        v = getattr(opts, name)
        if v is not None:
            kw[name] = v
    if on_cpu:
        kw.setdefault("kv_cache_memory_bytes", 1 << 30)  # else vLLM takes ~90 % of the RAM
        kw["enforce_eager"] = True if opts.enforce_eager is None else bool(opts.enforce_eager)
        if in_process(opts, on_cpu) and opts.tensor_parallel_size == 1:
            kw["distributed_executor_backend"] = "uni"  # vLLM on CPU else spawns a worker
    elif opts.enforce_eager is not None:
        kw["enforce_eager"] = bool(opts.enforce_eager)
    kw.update(opts.engine_kwargs)
    return kw


def in_process(opts: LlavaOptions, on_cpu: bool) -> bool:
    return on_cpu if opts.in_process is None else bool(opts.in_process)


def sampling_kwargs(opts: LlavaOptions, classes) -> dict:
    """Keyword arguments for ``vllm.SamplingParams`` except `structured_outputs` (a
    ``StructuredOutputsParams(choice=classes)`` object, added by `make_sampling_params`)."""
    return {"temperature": float(opts.temperature), "max_tokens": int(opts.max_tokens),
            "seed": int(opts.seed), "n": 1}


# ============================================================================= spec, weights
@dataclass(frozen=True)
class LlavaSpec:
    spec: str  # as given
    source: str  # the path or HF id after "llava:"
    path: str  # local folder (or the HF id itself when downloads are allowed and it's not cached)
    kind: str  # "dir" | "hf-cache" | "hf-download"

    @property
    def label(self) -> str:
        return self.spec


def downloads_allowed(allow_download: bool | None = None) -> bool:
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def _how_to_provide(source: str) -> str:
    return (f"provide the weights offline: save the model to a folder (config.json, weights, "
            f"tokenizer, preprocessor_config.json) and pass llava:/path/to/folder, or fill the "
            f"Hugging Face cache on a machine with internet (huggingface-cli download {source}) "
            f"and copy it here (HF_HOME); {ALLOW_DOWNLOAD_ENV}=1 lets vLLM download it")


def _hf_cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers/open_clip bring it
        return None
    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None
    return path if (Path(path) / "config.json").is_file() else None


def parse_llava_spec(spec: str, allow_download: bool | None = None) -> LlavaSpec:
    """Parse ``llava:PATH_OR_HF_ID`` and find the weights on this machine (module doc)."""
    s = str(spec).strip()
    if not s.startswith("llava:"):
        raise CoregError(f"annotator {spec!r}: a LLaVA annotator is written llava:PATH_OR_HF_ID, "
                         "e.g. llava:llava-hf/llava-1.5-7b-hf")
    src = s[len("llava:"):].strip()
    if not src:
        raise CoregError(f"annotator {spec!r}: nothing after 'llava:' (a model folder or a "
                         "Hugging Face id)")
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CoregError(f"annotator {spec!r}: {p} has no config.json (want a Hugging Face "
                             "model folder, as written by save_pretrained)")
        return LlavaSpec(s, src, str(p.resolve()), "dir")
    looks_like_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", src) is not None and not src.startswith(".")
    if not looks_like_id:
        raise CoregError(f"annotator {spec!r}: folder not found: {p}")
    snap = _hf_cached_snapshot(src)
    if snap is not None:
        return LlavaSpec(s, src, snap, "hf-cache")
    if downloads_allowed(allow_download):
        return LlavaSpec(s, src, src, "hf-download")
    raise CoregError(f"annotator {spec!r}: {src} is not a folder and not in the local Hugging Face "
                     f"cache, and downloads are off; {_how_to_provide(src)}")


def resolve_llava_preprocess(spec: str | LlavaSpec, image_size: int | None = None) -> dict:
    """Square size the pipeline's CPU decode step resizes images to: the model's processor
    input (``preprocessor_config.json``: crop_size when it centre-crops, else size), so the
    engine's own resize is a no-op for LLaVA-1.5; `image_size` overrides it."""
    ls = spec if isinstance(spec, LlavaSpec) else parse_llava_spec(spec)
    size = DEFAULT_IMAGE_SIZE
    cfg = None
    for name in ("preprocessor_config.json", "processor_config.json"):  # transformers 4 / 5
        cfg_file = Path(ls.path) / name
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as exc:
                raise CoregError(f"{cfg_file}: not valid JSON ({exc})")
            cfg = cfg.get("image_processor", cfg)
            break
    if cfg is not None:
        pick = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
        pick = pick if pick is not None else cfg.get("size")
        if isinstance(pick, dict):
            pick = pick.get("shortest_edge") or pick.get("height") or pick.get("width")
        if isinstance(pick, (int, float)) and pick > 0:
            size = int(pick)
    if image_size is not None:
        size = int(image_size)
    return {"size": size, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm():
    """Import vllm or fail with one line naming the separate environment."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise CoregError(f"'vllm' is not installed in this Python ({exc.__class__.__name__}); "
                         f"{VLLM_ENV_HINT}") from None
    return vllm


def check_llava_available(spec: str, allow_download: bool | None = None) -> LlavaSpec:
    """Driver pre-flight: the spec parses, the weights are here, vLLM is importable."""
    ls = parse_llava_spec(spec, allow_download)
    if not vllm_available():
        raise CoregError(f"annotator {spec!r}: 'vllm' is not installed in this Python; {VLLM_ENV_HINT}")
    return ls


# ============================================================================= engine (needs vLLM)
_ENGINES: dict[str, object] = {}


def cpu_threads() -> int:
    """Threads for an in-process CPU engine: the usable cores but one, as vLLM's own CPU worker
    binds them (one core stays free for the engine loop and input processing; OpenMP threads
    that outnumber free cores spin-wait: 2 threads on 2 busy cores ran at half the speed)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, n - 1)


def _on_cpu() -> bool:
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def get_engine(model_path: str, opts: LlavaOptions, on_cpu: bool | None = None):
    """A ``vllm.LLM`` for these engine settings, started once per process and reused (so
    re-running the local pipeline in a notebook does not restart vLLM); `shutdown_engines`
    stops them."""
    on_cpu = _on_cpu() if on_cpu is None else on_cpu
    kw = engine_args(model_path, opts, on_cpu)
    key = json.dumps(kw, sort_keys=True, default=str)
    if key in _ENGINES:
        return _ENGINES[key]
    vllm = require_vllm()
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if in_process(opts, on_cpu):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read while the engine starts
    try:
        llm = vllm.LLM(**kw)
    except CoregError:
        raise
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise CoregError(f"vLLM could not start {model_path} ({type(exc).__name__}: {msg})") from None
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    _ENGINES[key] = llm
    return llm


def shutdown_engine(llm) -> None:
    try:
        core = llm.llm_engine.engine_core
        core.shutdown()
    except Exception:
        pass


def shutdown_engines() -> None:
    """Stop every engine `get_engine` started in this process."""
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        shutdown_engine(llm)


def make_sampling_params(opts: LlavaOptions, classes):
    require_vllm()
    from vllm import SamplingParams

    kw = sampling_kwargs(opts, classes)
    if opts.structured_outputs:
        from vllm.sampling_params import StructuredOutputsParams
        kw["structured_outputs"] = StructuredOutputsParams(choice=list(classes))
    return SamplingParams(**kw)


class LlavaAnnotator(ModelAnnotator):
    """One per Ray Data actor (or in-process): holds one vLLM engine; annotates batches.

    Batch format as `ClipAnnotator`: ``id`` int64 [B]; ``pixels`` uint8 [B, S, S, 3] (the decode
    step's output) or ``image`` encoded bytes; optional ``error`` str [B]. Returns ``id``,
    ``votes`` int64 [B, K] (-1: no vote), ``candidates`` bool [B, C], ``probs`` float32 [B, C]
    (vote shares), ``error`` str [B] (and ``answers`` str [B, K] with return_answers=True).
    """

    def __init__(self, spec: str, classes, options=None, candidate_mode: str = "union",
                 image_size: int | None = None, allow_download: bool | None = None,
                 num_threads: int | None = None, llm=None, return_answers: bool = False):
        from coreg_ray.annotate.logic import parse_candidate_mode

        parse_candidate_mode(candidate_mode)
        self.candidate_mode = candidate_mode
        self.spec = parse_llava_spec(spec, allow_download)
        self.classes = resolve_classes(classes)
        self.opts = LlavaOptions.coerce(options)
        self.templates = resolve_llava_templates(self.opts.templates)
        self.prompts = build_llava_prompts(self.templates, self.classes, self.opts.prompt_format,
                                           self.opts.image_token, self.opts.choice_separator)
        self.parser = AnswerParser(self.classes, self.opts.synonyms, self.opts.ambiguous)
        self.prep = resolve_llava_preprocess(self.spec, image_size)
        self.return_answers = return_answers
        if num_threads is None and llm is None and _on_cpu() and in_process(self.opts, True):
            num_threads = cpu_threads()
        if num_threads:
            try:
                import torch
                torch.set_num_threads(int(num_threads))
            except ImportError:  # pragma: no cover
                pass
        self.llm = llm if llm is not None else get_engine(self.spec.path, self.opts)
        self.sampling = make_sampling_params(self.opts, self.classes)

    def answer(self, images) -> list[list[str]]:
        """PIL images -> answers [B][K] (one vLLM call, image-major requests)."""
        images = list(images)
        if not images:
            return []
        try:
            outs = self.llm.generate(build_requests(images, self.prompts), self.sampling,
                                     use_tqdm=False)
        except (ValueError, TypeError) as exc:  # vLLM's request validation (e.g. prompt length)
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CoregError(f"annotator {self.spec.spec!r}: vLLM refused the requests ({msg}); "
                             "a long class list may need a larger max_model_len") from None
        k = len(self.prompts)
        texts = [o.outputs[0].text if o.outputs else "" for o in outs]
        return [texts[i * k:(i + 1) * k] for i in range(len(images))]

    def annotate_images(self, images) -> dict:
        answers = self.answer(images)
        votes = self.parser.parse_many(answers) if answers else \
            np.zeros((0, self.num_templates), np.int64)
        rows = votes_to_rows(votes, self.num_classes, self.opts.no_answer, self.candidate_mode)
        rows.update(votes=votes, answers=answers)
        return rows

    def annotate_batch(self, pixels, **_) -> dict:
        """The `Annotator` protocol (`annotate.protocol`): uint8 [B,H,W,3] -> `annotate_images`."""
        from PIL import Image
        return self.annotate_images([Image.fromarray(p) for p in pixels])

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from coreg_ray.annotate.imageio import annotator_batch

        k = self.num_templates
        pixels, out, ok = annotator_batch(batch, self.prep, "LlavaAnnotator", k, self.num_classes)
        n = len(out["id"])
        answers = np.full((n, k), "", dtype=object)
        if len(ok):
            res = self.annotate_images([Image.fromarray(pixels[i]) for i in ok])
            out["votes"][ok] = res["votes"]
            out["candidates"][ok] = res["candidates"]
            out["probs"][ok] = res["probs"]
            answers[ok] = np.asarray(res["answers"], dtype=object).reshape(len(ok), k)
            if self.opts.no_answer == "skip":
                for i in ok[res["unanswered"]]:
                    out["error"][i] = f"no answer of the {k} templates names a class"
        if self.return_answers:
            out["answers"] = answers
        return out

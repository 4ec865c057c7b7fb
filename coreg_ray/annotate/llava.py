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
prompts, request order, answer parsing, votes -- is pure Python and runs without vLLM.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coreg_ray.annotate.protocol import ModelAnnotator
from coreg_ray.annotate.templates import resolve_classes, template_list
from coreg_ray.errors import CoregError

ALLOW_DOWNLOAD_ENV = "COREG_RAY_ALLOW_DOWNLOAD"
DEFAULT_PROMPT_FORMAT = "USER: <image>\n{question} ASSISTANT:"
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336 when preprocessor_config.json is silent
VLLM_ENV_HINT = ("the LLaVA annotator runs in a separate vLLM environment: on CPU machines "
                 "`bash .ci/vllm-env.sh` creates .venv-vllm (run with .venv-vllm/bin/python); "
                 "on GPUs install coreg-ray[vllm] into its own virtual environment")

# Each lists every class name as a choice ({choices}) and asks for one of them.
LLAVA_TEMPLATES: list[str] = [
    "Which of these is shown in the image: {choices}? Answer with one of them.",
    "What is the main object in this photo? Choose one of: {choices}. Answer with the name only.",
    "Classify the image into one of these categories: {choices}. Reply with the category name.",
    "Look at the picture. Which one of the following does it show: {choices}? "
    "Answer in one or two words.",
    "Question: what is in this image? Options: {choices}. Answer with one option.",
]


# ============================================================================= templates, prompts
def _format_fields(t: str, source: str, i: int) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
    except ValueError as exc:
        raise CoregError(f"{source}: template {i} {t!r} is not a valid format string ({exc})")


def validate_llava_templates(templates, source: str = "llava templates") -> list[str]:
    """Every template must contain exactly one "{choices}" (where the class list goes) and no
    other format field (write literal braces as {{ }})."""
    templates = template_list(templates, source)
    for i, t in enumerate(templates, 1):
        if not isinstance(t, str) or not t.strip():
            raise CoregError(f"{source}: template {i} is empty or not a string ({t!r})")
        fields = _format_fields(t, source, i)
        if fields != ["choices"]:
            raise CoregError(f"{source}: template {i} {t!r} must contain exactly one '{{choices}}' "
                             f"(the class list) and no other field (has: "
                             f"{', '.join('{' + f + '}' for f in fields) or 'none'})")
    return templates


def resolve_llava_templates(spec=None) -> list[str]:
    """None/"default" -> `LLAVA_TEMPLATES`; a list; or a text file, one template per line
    (blank lines and '#' comments skipped; write a line break inside a template as \\n)."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("default", "llava")):
        return list(LLAVA_TEMPLATES)
    if isinstance(spec, (list, tuple)):
        return validate_llava_templates(spec)
    path = Path(str(spec))
    if not path.is_file():
        raise CoregError(f"llava templates {str(spec)!r}: not a file and not 'default'")
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    lines = [s.replace("\\n", "\n") for s in lines if s and not s.startswith("#")]
    if not lines:
        raise CoregError(f"{path}: no templates (one per line, '{{choices}}' marks the class list)")
    return validate_llava_templates(lines, str(path))


def choices_text(classes, separator: str = ", ") -> str:
    return separator.join(classes)


def build_llava_prompts(templates, classes, prompt_format: str = DEFAULT_PROMPT_FORMAT,
                        image_token: str | None = DEFAULT_IMAGE_TOKEN,
                        choice_separator: str = ", ") -> list[str]:
    """The K full prompts (the same for every image): template k with the class list filled in,
    wrapped in `prompt_format` ("{question}" marks the template). A template that already
    contains `image_token` is used as the whole prompt. The image must come before the question
    (so the K prompts of one image share the image tokens as a prefix)."""
    templates = validate_llava_templates(templates)
    classes = resolve_classes(list(classes))
    if _format_fields(prompt_format, "prompt_format", 1) != ["question"]:
        raise CoregError(f"prompt_format {prompt_format!r} must contain exactly one '{{question}}' "
                         "and no other field")
    choices = choices_text(classes, choice_separator)
    out = []
    for t in templates:
        q = t.format(choices=choices)
        p = q if (image_token and image_token in t) else prompt_format.format(question=q)
        if image_token:
            n = p.count(image_token)
            if n != 1:
                raise CoregError(f"prompt {p[:60]!r}...: needs exactly one image token "
                                 f"{image_token!r}, has {n} (set image_token for your model)")
            if p.index(image_token) > p.index(choices):
                raise CoregError(f"prompt_format {prompt_format!r}: put the image token before "
                                 "{question} (the templates then share the image as a prefix)")
        out.append(p)
    return out


def build_requests(images, prompts) -> list[dict]:
    """vLLM requests, image-major: for image i, its K prompts are adjacent (request i*K + k)."""
    return [{"prompt": p, "multi_modal_data": {"image": img}} for img in images for p in prompts]


# ============================================================================= answer parsing
_ARTICLES = frozenset({"a", "an", "the"})
_IRREGULAR = {"mice": "mouse", "men": "man", "women": "woman", "children": "child",
              "people": "person", "geese": "goose", "teeth": "tooth", "feet": "foot",
              "oxen": "ox", "dice": "die", "cacti": "cactus", "fungi": "fungus",
              "indices": "index", "lice": "louse"}


def normalize_tokens(text: str) -> list[str]:
    """Lower-case words of `text`: Unicode NFKC + casefold, punctuation/underscores -> spaces."""
    s = unicodedata.normalize("NFKC", str(text)).casefold()
    s = re.sub(r"[\W_]+", " ", s)
    return s.split()


@functools.lru_cache(maxsize=65536)
def word_forms(w: str) -> frozenset:
    """A word and its possible singulars ("buses" -> bus, "flies" -> fly, "knives" -> knife)."""
    forms = {w}
    if w in _IRREGULAR:
        forms.add(_IRREGULAR[w])
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
        if w.endswith("es"):
            forms.add(w[:-2])
        if w.endswith("ies"):
            forms.add(w[:-3] + "y")
        if w.endswith("ves"):
            forms.update((w[:-3] + "f", w[:-3] + "fe"))
    return frozenset(forms)


def _content(tokens: list[str]) -> list[str]:
    kept = [t for t in tokens if t not in _ARTICLES]
    return kept or tokens


def _common_prefix(token_lists: list[list[str]]) -> int:
    n = min(len(t) for t in token_lists)
    k = 0
    while k < n and len({tuple(t[:k + 1]) for t in token_lists}) == 1:
        k += 1
    return k


class AnswerParser:
    """Maps a free-text answer onto a class index, or -1 (no vote).

    The answer and every class name (plus its synonyms) are compared as word sequences after
    Unicode/case folding, punctuation removal, dropping the articles a/an/the, and allowing
    plurals ("two cats" names "cat"). An answer equal to a name is that class; otherwise every
    name occurring in the answer as a whole-word phrase counts (a name inside a longer matched
    name, "car" in "race car", does not). One class named -> that class; several ->
    `ambiguous`: "none" (default, no vote) or "first" (the earliest mention). When all class
    names share a leading phrase ("number 0".."number 9", "German Traffic Sign: ..."), the rest
    of each name is accepted as a synonym.

    synonyms: {class name or index: "alias" | ["alias", ...]}; an alias that would name two
    classes is refused.
    """

    def __init__(self, classes, synonyms: dict | None = None, ambiguous: str = "none"):
        self.classes = resolve_classes(list(classes))
        if ambiguous not in ("none", "first"):
            raise CoregError(f"ambiguous {ambiguous!r}: use 'none' or 'first'")
        self.ambiguous = ambiguous
        self.exact: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        aliases: list[tuple[int, list[str], str]] = []  # (class, tokens, origin)
        names = [normalize_tokens(c) for c in self.classes]
        for i, (c, toks) in enumerate(zip(self.classes, names)):
            if not toks:
                raise CoregError(f"class name {c!r} has no letters or digits to match answers on")
            aliases.append((i, _content(toks), f"class {c!r}"))
        k = _common_prefix(names) if len(names) > 1 else 0
        if k and all(len(t) > k for t in names):
            rests = [_content(t[k:]) for t in names]
            if len({tuple(r) for r in rests}) == len(rests):
                aliases += [(i, r, f"class {self.classes[i]!r}") for i, r in enumerate(rests)]
        for key, syns in (synonyms or {}).items():
            i = self._class_index(key)
            for s in ([syns] if isinstance(syns, str) else list(syns)):
                toks = normalize_tokens(s) if isinstance(s, str) else []
                if not toks:
                    raise CoregError(f"synonym {s!r} of class {self.classes[i]!r} is empty")
                aliases.append((i, _content(toks), f"synonym {s!r}"))
        # one alias, one class
        owner: dict[tuple, tuple[int, str]] = {}
        for i, toks, origin in aliases:
            key = tuple(toks)
            if key in owner and owner[key][0] != i:
                j, other = owner[key]
                raise CoregError(f"{origin} of class {self.classes[i]!r} reads the same as {other} "
                                 f"of class {self.classes[j]!r}; an answer could not tell them apart")
            owner.setdefault(key, (i, origin))
        self.aliases = [(i, list(key)) for key, (i, _) in owner.items()]
        self.index: dict[str, list[int]] = {}  # word form -> aliases starting with it
        for a, (_, toks) in enumerate(self.aliases):
            for f in word_forms(toks[0]):
                self.index.setdefault(f, []).append(a)
        self._cache: dict[str, int] = {}

    def _class_index(self, key) -> int:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if 0 <= int(key) < len(self.classes):
                return int(key)
            raise CoregError(f"synonyms: class index {key} outside 0..{len(self.classes) - 1}")
        if key in self.exact:
            return self.exact[key]
        raise CoregError(f"synonyms: {key!r} is not one of the class names")

    @staticmethod
    def _same(a: str, b: str) -> bool:
        return a == b or not word_forms(a).isdisjoint(word_forms(b))

    def matches(self, text: str) -> list[tuple[int, int, int]]:
        """All (start, end, class) phrase matches in the answer's content words, longest kept."""
        toks = _content(normalize_tokens(text))
        found = []
        for s, w in enumerate(toks):
            seen = set()
            for f in word_forms(w):
                for a in self.index.get(f, ()):
                    if a in seen:
                        continue
                    seen.add(a)
                    cls, name = self.aliases[a]
                    e = s + len(name)
                    if e <= len(toks) and all(self._same(x, y) for x, y in zip(toks[s + 1:e], name[1:])):
                        found.append((s, e, cls))
        # drop matches lying inside a longer match ("car" inside "race car")
        return sorted(m for m in found
                      if not any(o[0] <= m[0] and m[1] <= o[1] and (o[1] - o[0]) > (m[1] - m[0])
                                 for o in found))

    def parse(self, text) -> int:
        """The class an answer names, or -1."""
        if text is None:
            return -1
        text = str(text)
        hit = self.exact.get(text.strip())
        if hit is not None:
            return hit
        if text in self._cache:
            return self._cache[text]
        ms = self.matches(text)
        classes = list(dict.fromkeys(c for _, _, c in ms))
        if not classes:
            out = -1
        elif len(classes) == 1 or self.ambiguous == "first":
            out = classes[0]
        else:
            out = -1
        if len(self._cache) < 100_000:
            self._cache[text] = out
        return out

    def parse_many(self, answers) -> np.ndarray:
        """answers [B][K] (nested lists of str) -> int64 votes [B, K]."""
        rows = [[self.parse(a) for a in row] for row in answers]
        if not rows:
            return np.zeros((0, 0), np.int64)
        return np.asarray(rows, np.int64)


# ============================================================================= votes -> table rows
def votes_to_rows(votes, num_classes: int, no_answer: str = "all",
                  candidate_mode: str = "union") -> dict:
    """votes int64 [B, K] (-1 = no vote) -> {candidates bool [B, C], probs float32 [B, C]
    (share of the votes), unanswered bool [B] (no vote at all)}.

    candidates: the union of the votes (paper; candidate_mode "union"), or a rule on the vote
    shares as for CLIP's template mean ("topk:K", "threshold:P" = at least a share P of the
    templates, "ratio:R"). An image without any vote gets every class as candidates (no
    information) and uniform probs with no_answer="all"; with "skip" the caller leaves it out."""
    if no_answer not in ("all", "skip"):
        raise CoregError(f"no_answer {no_answer!r}: use 'all' or 'skip'")
    v = np.asarray(votes, np.int64)
    if v.ndim != 2:
        raise CoregError(f"votes must be [B, K], got shape {v.shape}")
    if v.size and (v.max() >= num_classes or v.min() < -1):
        raise CoregError(f"votes outside -1..{num_classes - 1}")
    b = v.shape[0]
    counts = np.zeros((b, num_classes + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(b), v.shape[1]), np.where(v < 0, num_classes, v).ravel()), 1)
    counts = counts[:, :num_classes]
    total = counts.sum(1, keepdims=True)
    unanswered = total[:, 0] == 0
    probs = np.where(total > 0, counts / np.maximum(total, 1), 1.0 / num_classes).astype(np.float32)
    from coreg_ray.annotate import logic

    name, value = logic.parse_candidate_mode(candidate_mode)
    if name == "union" or b == 0:
        cand = counts > 0
    elif name == "topk":
        cand = logic.topk_candidates(probs, int(value)).numpy()
    elif name == "threshold":
        cand = logic.threshold_candidates(probs, value).numpy()
    else:
        cand = logic.ratio_candidates(probs, value).numpy()
    cand[unanswered] = False
    if no_answer == "all":
        cand[unanswered] = True
    return {"candidates": cand, "probs": probs, "unanswered": unanswered}


# ============================================================================= options
_RESULT_FIELDS = ("templates", "prompt_format", "image_token", "choice_separator",
                  "structured_outputs", "synonyms", "ambiguous", "no_answer", "max_tokens",
                  "temperature", "seed", "dtype")


@dataclass
class LlavaOptions:
    """Settings of the LLaVA annotator. Those in `_RESULT_FIELDS` change the answers (they are
    part of the resume fingerprint); the engine/throughput ones do not."""
    # prompting and parsing
    templates: object = None  # None -> LLAVA_TEMPLATES | list | file
    prompt_format: str = DEFAULT_PROMPT_FORMAT
    image_token: str | None = DEFAULT_IMAGE_TOKEN
    choice_separator: str = ", "
    structured_outputs: bool = True  # restrict answers to the class names (vLLM choice)
    synonyms: dict | None = None
    ambiguous: str = "none"  # "none" | "first"
    no_answer: str = "all"  # "all" (every class) | "skip" (leave the image out)
    max_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    # engine
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None  # None: vLLM's default on GPU, 1 GiB on CPU
    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None  # None: True on CPU, vLLM's default on GPU
    enable_prefix_caching: bool = True
    # None: True on CPU. True: vLLM's engine core (and, at tensor_parallel_size 1 on CPU, the
    # model worker) run in the calling process -- one process per engine instead of three;
    # start-up here 27 s instead of 150 s, and nothing outlives a killed Ray actor.
    in_process: bool | None = None
    engine_kwargs: dict = field(default_factory=dict)  # anything else for vllm.LLM(...)
    # Ray
    replicas: int | None = None  # engine actors (default: GPUs // tensor_parallel_size, CPU 1)
    batch_size: int | None = None  # images per engine call (default 64 GPU, 16 CPU)
    actor_cpus: float | None = None

    @classmethod
    def coerce(cls, options) -> "LlavaOptions":
        if options is None:
            opts = cls()
        elif isinstance(options, cls):
            opts = dataclasses.replace(options)
        elif isinstance(options, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(options) - names)
            if bad:
                raise CoregError(f"llava options: unknown key(s) {', '.join(bad)} "
                                 f"(known: {', '.join(sorted(names))})")
            opts = cls(**options)
        else:
            raise CoregError(f"llava options: expected a dict, got {type(options).__name__}")
        opts.check()
        return opts

    def check(self) -> None:
        for name in ("tensor_parallel_size", "max_tokens"):
            if int(getattr(self, name)) < 1:
                raise CoregError(f"llava options: {name} must be >= 1")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "replicas",
                     "batch_size", "kv_cache_memory_bytes"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise CoregError(f"llava options: {name} must be >= 1 (or unset)")
        if self.temperature < 0:
            raise CoregError("llava options: temperature must be >= 0")
        if self.ambiguous not in ("none", "first"):
            raise CoregError(f"llava options: ambiguous {self.ambiguous!r}: use 'none' or 'first'")
        if self.no_answer not in ("all", "skip"):
            raise CoregError(f"llava options: no_answer {self.no_answer!r}: use 'all' or 'skip'")
        if not isinstance(self.engine_kwargs, dict):
            raise CoregError("llava options: engine_kwargs must be a dict")

    def result_settings(self) -> dict:
        """The settings that change answers (JSON-safe; part of the resume fingerprint)."""
        out = {k: getattr(self, k) for k in _RESULT_FIELDS}
        out["templates"] = resolve_llava_templates(self.templates)
        if out["synonyms"] is not None:
            out["synonyms"] = {str(k): ([v] if isinstance(v, str) else list(v))
                               for k, v in out["synonyms"].items()}
        return json.loads(json.dumps(out))


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

"""LLaVA annotator, the pure parts (no vLLM, no model): prompt templates, the K prompts and the
image-major request order, answer parsing (`AnswerParser`), votes -> table rows, and the
annotator's options (`LlavaOptions`). `coreg_ray.annotate.llava` (the engine and the annotator)
re-exports every name here; its module docstring says what is asked and why.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coreg_ray.annotate.templates import resolve_classes, template_list
from coreg_ray.errors import CoregError

DEFAULT_PROMPT_FORMAT = "USER: <image>\n{question} ASSISTANT:"
DEFAULT_IMAGE_TOKEN = "<image>"

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

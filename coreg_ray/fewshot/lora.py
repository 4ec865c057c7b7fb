"""LoRA few-shot fine-tuning of the LLaVA annotator, the paper's few-shot comparator for LLaVA-1.5.

Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022. The paper (Co-Reg,
§IV, Tables I-II) fine-tunes LLaVA-1.5 with LoRA on 1, 2, 4, 8 and 16 labelled images per class
and compares its test accuracy with Co-Reg's few-shot variant.

Here (transformers ``LlavaForConditionalGeneration`` + peft):
- data: `few_shot_indices(labels, shots, seed)` of the train table; each image becomes the
  annotator's own prompt (`coreg_ray.annotate.llava`: template ``template`` of
  ``LLAVA_TEMPLATES``, default 0, with the full class list as choices, wrapped in
  ``USER: <image>\\n{question} ASSISTANT:``) followed by `` <class name></s>``; the loss is
  the cross-entropy of the answer tokens only (the class name and the end-of-sequence token;
  prompt and image positions are masked with -100);
- adapter: LoRA r=8, alpha=16, dropout 0.05 on the *language model's* attention q/v
  projections (``model.language_model.layers.*.self_attn.{q,v}_proj``; the CLIP vision tower's
  q/v and the projector stay frozen), every base weight frozen (the paper gives no LoRA
  settings; these are Hu et al.'s q/v placement with a common small rank);
- optimiser: AdamW lr 2e-4 (LLaVA-1.5's LoRA learning rate), no weight decay, cosine decay,
  batch size 4, 3 epochs (configurable: the paper gives no LoRA schedule);
- evaluation: for every test image, the log-likelihood of each class name (+ ``</s>``) as the
  answer to the prompt, summed over its tokens; prediction = argmax. The prompt (with the
  image) is run once per image and its KV cache is shared by all class continuations
  (`score_classes`; `score_classes_naive` is the plain full-sequence reference);
- output: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, peft format) and
  ``coreg_lora.json`` (classes, prompt, shots, seed) in ``save_dir``; `load_lora_llava` reloads.

Environment: transformers + peft + the project's torch, i.e. the separate vLLM environment
(``.ci/vllm-env.sh`` installs ``peft`` there; it already carries transformers 5 and torch)
or any environment with ``pip install 'coreg-ray[lora]'``. Not the main .venv (no transformers).

Weights: users pass a real LLaVA-1.5 folder in Hugging Face format, e.g.
``train_lora_llava("/models/llava-1.5-7b-hf", "torchvision:CIFAR10:/data",
"torchvision:CIFAR10:/data:test", None, shots=16, seed=1, save_dir="runs/lora-k16-s1")``
(``llava:ORG/NAME`` from the local HF cache works too, as for the annotator; a GPU and bf16 are
assumed for 7B: ``dtype="auto"`` picks bf16 on CUDA, float32 on CPU; ``gradient_checkpointing``
saves memory). The tests use a tiny random LLaVA built locally (tests/vllm/tiny_llava.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coreg_ray.errors import CoregError
from coreg_ray.fewshot.common import EpochLosses, few_shot_inputs, load_table

PAPER_SHOTS = (1, 2, 4, 8, 16)
LORA_TARGET = r".*language_model.*\.(q_proj|v_proj)"  # peft: re.fullmatch on module names
LORA_HINT = ("LoRA needs transformers and peft: run it in the vLLM environment "
             "(`bash .ci/vllm-env.sh`, then .venv-vllm/bin/python) or pip install 'coreg-ray[lora]'")


def require_lora():
    """Import transformers and peft, or fail with one line saying where they live."""
    try:
        import peft
        import transformers
    except ImportError as exc:
        raise CoregError(f"{exc.name or 'transformers/peft'} is not installed in this Python; "
                         f"{LORA_HINT}") from None
    return transformers, peft


def _resolve_path(model_path) -> str:
    s = str(model_path)
    if s.startswith("llava:"):
        from coreg_ray.annotate.llava import parse_llava_spec
        return parse_llava_spec(s).path
    p = Path(s).expanduser()
    if p.is_dir():
        return str(p)
    from coreg_ray.annotate.llava import parse_llava_spec
    return parse_llava_spec(f"llava:{s}").path


def _dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    except KeyError:
        raise CoregError(f"dtype {dtype!r}: use auto, fp32, bf16 or fp16") from None


def load_llava(model_path, device=None, dtype="auto"):
    """-> (LlavaForConditionalGeneration in eval mode, its processor), from a local folder."""
    transformers, _ = require_lora()
    path = _resolve_path(model_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            path, dtype=_dtype(dtype, device))
        processor = transformers.AutoProcessor.from_pretrained(path)
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CoregError(f"cannot load LLaVA from {path} ({type(exc).__name__}: {msg})") from None
    return model.to(device).eval(), processor


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05, target: str = LORA_TARGET):
    _, peft = require_lora()
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                           bias="none")


def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target: str = LORA_TARGET, seed: int = 0):
    """Wrap `model` in a peft LoRA model (base weights frozen); LoRA A init seeded."""
    _, peft = require_lora()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, lora_config(r, alpha, dropout, target))
    if not any("lora_" in n for n, p in pm.named_parameters() if p.requires_grad):
        raise CoregError(f"LoRA: target {target!r} matched no module of the model")
    return pm


def load_lora_llava(model_path, adapter_dir, device=None, dtype="auto"):
    """Base LLaVA + a saved adapter -> (PeftModel in eval mode, processor, coreg_lora.json dict)."""
    _, peft = require_lora()
    model, processor = load_llava(model_path, device, dtype)
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise CoregError(f"{d}: no adapter_config.json (not a saved LoRA adapter)")
    pm = peft.PeftModel.from_pretrained(model, str(d)).eval()
    meta_f = d / "coreg_lora.json"
    meta = json.loads(meta_f.read_text()) if meta_f.is_file() else {}
    return pm, processor, meta


# ============================================================================= prompts, batches
def lora_prompt(classes, template=0, prompt_format: str | None = None,
                image_token: str | None = None) -> str:
    """The annotator's prompt for LoRA: template index (of LLAVA_TEMPLATES) or a template string
    with ``{choices}``."""
    from coreg_ray.annotate.llava import (DEFAULT_IMAGE_TOKEN, DEFAULT_PROMPT_FORMAT,
                                          LLAVA_TEMPLATES, build_llava_prompts)

    if isinstance(template, int):
        if not 0 <= template < len(LLAVA_TEMPLATES):
            raise CoregError(f"template {template}: use 0..{len(LLAVA_TEMPLATES) - 1} or a string")
        template = LLAVA_TEMPLATES[template]
    return build_llava_prompts([template], classes, prompt_format or DEFAULT_PROMPT_FORMAT,
                               image_token or DEFAULT_IMAGE_TOKEN)[0]


def answer_token_ids(tokenizer, prompt: str, classes) -> list[list[int]]:
    """Token ids of " <class name>" as the continuation of `prompt` (tokenised together, so
    merges at the boundary match what the model sees), + the end-of-sequence token."""
    p_ids = tokenizer(prompt).input_ids
    eos = tokenizer.eos_token_id
    out = []
    for c in classes:
        f_ids = tokenizer(f"{prompt} {c}").input_ids
        if f_ids[:len(p_ids)] == p_ids and len(f_ids) > len(p_ids):
            ids = f_ids[len(p_ids):]
        else:
            ids = tokenizer(f" {c}", add_special_tokens=False).input_ids
        if not ids:
            raise CoregError(f"class name {c!r} tokenises to nothing")
        out.append(list(ids) + ([eos] if eos is not None else []))
    return out


def _pil(table, i):
    from PIL import Image

    return Image.fromarray(table.images[i].permute(1, 2, 0).numpy())


def encode_prompt(processor, image, prompt: str) -> dict:
    enc = processor(images=image, text=prompt, return_tensors="pt")
    return {k: v for k, v in enc.items()}


def build_batch(processor, images, prompt: str, answers: list[list[int]], pad_id: int) -> dict:
    """Images + their answer token ids -> a right-padded training batch with labels -100
    everywhere but on the answer tokens."""
    rows, pix = [], []
    for img, ans in zip(images, answers):
        enc = encode_prompt(processor, img, prompt)
        p = enc["input_ids"][0].tolist()
        rows.append((p + ans, [-100] * len(p) + ans))
        pix.append(enc["pixel_values"])
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(b)] = torch.tensor(b)
        mask[i, :len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.cat(pix)}


def answer_loss(model, batch: dict, device) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch (labels shifted by one)."""
    b = {k: v.to(device) for k, v in batch.items()}
    labels = b.pop("labels")
    b["pixel_values"] = b["pixel_values"].to(model.dtype)
    logits = model(**b).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


# ============================================================================= scoring
@torch.no_grad()
def score_classes(model, processor, images, prompt: str, answers: list[list[int]], device,
                  class_batch: int = 64) -> torch.Tensor:
    """log p(answer_c | image, prompt) summed over answer tokens -> float32 [N, C]. The prompt
    runs once per image; its KV cache is copied for each chunk of class continuations."""
    pad = 0
    c = len(answers)
    out = torch.zeros(len(images), c)
    for i, img in enumerate(images):
        enc = {k: v.to(device) for k, v in encode_prompt(processor, img, prompt).items()}
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        po = model(**enc, use_cache=True)
        first = F.log_softmax(po.logits[0, -1].float(), -1)
        plen = enc["input_ids"].shape[1]
        for s in range(0, c, class_batch):
            chunk = answers[s:s + class_batch]
            m = len(chunk)
            L = max(len(a) for a in chunk)
            ids = torch.full((m, L), pad, dtype=torch.long)
            valid = torch.zeros((m, L), dtype=torch.bool)
            for j, a in enumerate(chunk):
                ids[j, :len(a)] = torch.tensor(a)
                valid[j, :len(a)] = True
            ids, valid = ids.to(device), valid.to(device)
            total = first[ids[:, 0]]
            if L > 1:
                cache = copy.deepcopy(po.past_key_values)
                cache.batch_repeat_interleave(m)
                mask = torch.ones((m, plen + L - 1), dtype=torch.long, device=device)
                lo = model(input_ids=ids[:, :-1], attention_mask=mask, past_key_values=cache,
                           use_cache=True).logits.float()
                lp = F.log_softmax(lo, -1).gather(-1, ids[:, 1:, None])[..., 0]
                total = total + (lp * valid[:, 1:]).sum(1)
            out[i, s:s + m] = total.cpu()
    return out


@torch.no_grad()
def score_classes_naive(model, processor, images, prompt: str, answers, device) -> torch.Tensor:
    """Reference for `score_classes`: one full forward per (image, class)."""
    out = torch.zeros(len(images), len(answers))
    for i, img in enumerate(images):
        for j, a in enumerate(answers):
            b = build_batch(processor, [img], prompt, [a], 0)
            bb = {k: v.to(device) for k, v in b.items() if k != "labels"}
            bb["pixel_values"] = bb["pixel_values"].to(model.dtype)
            lo = F.log_softmax(model(**bb).logits.float(), -1)[0]
            n = b["input_ids"].shape[1]
            k = len(a)
            pos = torch.arange(n - k, n, device=device)
            out[i, j] = lo[pos - 1, torch.tensor(a, device=device)].sum().cpu()
    return out


@torch.no_grad()
def _mean_answer_loss(model, processor, table, idx, prompt, answers, pad_id, device, bs) -> float:
    tot, n = 0.0, 0
    for s in range(0, len(idx), bs):
        sel = idx[s:s + bs]
        b = build_batch(processor, [_pil(table, i) for i in sel], prompt,
                        [answers[int(table.labels[i])] for i in sel], pad_id)
        tot += float(answer_loss(model, b, device)) * len(sel)
        n += len(sel)
    return tot / max(1, n)


# ============================================================================= training
def train_lora_llava(model_path, train_table, test_table=None, classes=None, shots: int = 16,
                     seed: int = 1, epochs: int = 3, lr: float = 2e-4, batch_size: int = 4,
                     r: int = 8, alpha: int = 16, dropout: float = 0.05, target: str = LORA_TARGET,
                     template=0, prompt_format: str | None = None, image_token: str | None = None,
                     save_dir: str | None = None, device: str | None = None, dtype="auto",
                     gradient_checkpointing: bool = False, class_batch: int = 64,
                     max_steps: int | None = None, eval_train_loss: bool = True,
                     model=None, processor=None, log_every: int = 0) -> dict:
    """LoRA on `shots` labelled images per class of `train_table`, evaluated on `test_table`.

    model_path: a LLaVA folder (HF format) or ``llava:PATH_OR_HF_ID``; `model`/`processor`
    (from `load_llava`, without an adapter) skip loading -- the adapter is then added to that
    model in place (peft), so pass a fresh one per run. classes: prompt class names (default
    the train table's). Returns {"method": "lora", "test_accuracy" (None without a test table),
    "train_loss_before"/"train_loss_after" (answer loss on the k-shot set, eval mode),
    "losses" (mean per epoch, train mode), "seconds", "steps", "trainable_params",
    "adapter_dir", "predictions" (test argmax), "model_obj" (the trained PeftModel, eval
    mode), ...}; `run_lora_sweep` drops the last two.
    """
    from coreg_ray.data import few_shot_indices

    require_lora()
    t0 = time.time()
    shots, seed, train, test, classes = few_shot_inputs("LoRA", shots, seed, train_table,
                                                        test_table, classes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model, processor = load_llava(model_path, device, dtype)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prompt = lora_prompt(classes, template, prompt_format, image_token)
    answers = answer_token_ids(tok, prompt, classes)

    idx = few_shot_indices(train.labels, shots, seed)
    pm = add_lora(model, r, alpha, dropout, target, seed)
    if gradient_checkpointing:
        pm.gradient_checkpointing_enable()
        pm.enable_input_require_grads()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    before = _mean_answer_loss(pm.eval(), processor, train, idx, prompt, answers, pad_id,
                               device, batch_size) if eval_train_loss else None
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(idx) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total))))
    rng = np.random.default_rng(seed)
    log = EpochLosses("lora", epochs, log_every)
    t_train = time.time()
    pm.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA dropout
        for ep in range(epochs):
            if log.steps >= total:
                break
            order = rng.permutation(idx)
            for s in range(0, len(order), batch_size):
                if log.steps >= total:
                    break
                sel = order[s:s + batch_size]
                b = build_batch(processor, [_pil(train, i) for i in sel], prompt,
                                [answers[int(train.labels[i])] for i in sel], pad_id)
                log.step(opt, answer_loss(pm, b, device), len(sel), sched)
            log.end_epoch(ep)
    losses, step = log.losses, log.steps
    train_seconds = time.time() - t_train
    pm.eval()
    after = _mean_answer_loss(pm, processor, train, idx, prompt, answers, pad_id, device,
                              batch_size) if eval_train_loss else None
    test_acc, preds = None, None
    if test is not None:
        scores = score_classes(pm, processor, [_pil(test, i) for i in range(len(test))], prompt,
                               answers, device, class_batch)
        preds = scores.argmax(1).numpy()
        test_acc = float((preds == test.labels).mean()) if len(test) else float("nan")
    result = {"method": "lora", "model": str(model_path), "shots": shots, "seed": seed,
              "epochs": epochs, "steps": step, "lr": lr, "r": r, "alpha": alpha,
              "num_train": int(len(idx)), "num_test": 0 if test is None else len(test),
              "trainable_params": int(sum(p.numel() for p in trainable)),
              "train_loss_before": before, "train_loss_after": after, "losses": losses,
              "test_accuracy": test_acc, "train_seconds": train_seconds, "prompt": prompt,
              "adapter_dir": None, "seconds": None, "predictions": preds, "model_obj": pm}
    if save_dir:
        d = Path(save_dir)
        d.mkdir(parents=True, exist_ok=True)
        pm.save_pretrained(str(d))
        (d / "coreg_lora.json").write_text(json.dumps(
            {"base_model": str(model_path), "classes": classes, "prompt": prompt,
             "template": template, "shots": shots, "seed": seed, "epochs": epochs, "lr": lr,
             "r": r, "alpha": alpha, "target": target}, indent=1))
        result["adapter_dir"] = str(d)
    result["seconds"] = time.time() - t0
    return result


def run_lora_sweep(model_path, train_table, test_table, shots=PAPER_SHOTS, seeds=(1, 2, 3),
                   save_root: str | None = None, **kwargs) -> list[dict]:
    """The paper's few-shot grid for LLaVA: LoRA for every k in `shots` and every seed -> one
    row per run (no model objects). Each run starts from a freshly loaded base model;
    adapters go to ``save_root/k{shots}-s{seed}`` when `save_root` is set."""
    train, test = load_table(train_table), load_table(test_table)
    rows = []
    for k in shots:
        for s in seeds:
            sd = str(Path(save_root) / f"k{k}-s{s}") if save_root else None
            r = train_lora_llava(model_path, train, test, shots=k, seed=s, save_dir=sd, **kwargs)
            r.pop("model_obj", None)
            p = r.pop("predictions", None)
            r["num_predictions"] = 0 if p is None else int(len(p))
            rows.append(r)
            with contextlib.suppress(Exception):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows

"""CoOp: context optimisation for CLIP, the paper's few-shot comparator for CLIP annotators.

Zhou, Yang, Loy, Liu, "Learning to prompt for vision-language models", IJCV 2022. The paper
(Co-Reg, §IV "few-shot fine-tuning") trains CoOp on CLIP ViT-B/32 and ViT-B/16 with 1, 2, 4, 8
and 16 labelled images per class and compares its test accuracy with Co-Reg's few-shot variant.

What it learns: M context vectors [V]_1..[V]_M (``n_ctx``, default 16; one set shared by all
classes, or one per class with ``class_specific=True``), in the text tower's token-embedding
space. The prompt of class c is ``[SOT] [V]_1 .. [V]_M <class name> . [EOT]``; it is passed as
*embeddings* through the frozen open_clip text transformer (the same steps as open_clip 3.3's
``CLIP.encode_text``: + positional embedding, transformer with its causal attention mask,
``ln_final``, pooling at the end-of-text position, ``text_projection``). The image encoder is
frozen too; logits = logit_scale.exp() * cos(image, text_c), cross-entropy on the k-shot set.
Only the context vectors are trained.

Defaults (CoOp's published recipe): context initialised from N(0, 0.02²) (``ctx_init`` =
"a photo of a" instead initialises M=4 vectors from that phrase's token embeddings), SGD
lr 0.002, momentum 0.9, weight decay 5e-4, cosine schedule after one warm-up epoch at a
constant 1e-5, batch size 32, epochs by shots as CoOp: 50 for 1 shot, 100 for 2-4 shots, 200
for 8-16 shots (``epochs`` overrides); random resized crop (scale 0.08-1) + horizontal flip
(``augment=False`` encodes each training image once and trains on cached features, much faster).
On CUDA the towers run under bf16 autocast (``precision="auto"``; ``fp32``/``fp16`` on request),
the context and the loss stay float32.

Models: any ``clip:MODEL[/PRETRAINED]`` spec the CLIP annotator accepts (same loader,
`coreg_ray.annotate.clip.load_clip_model`): real weights for users, e.g.
``train_coop("clip:ViT-B-32/openai", "torchvision:CIFAR10:/data", "torchvision:CIFAR10:/data:test",
shots=16, seed=1)`` (tables: anything `load_image_table` reads)
(weights from local files / the HF cache, see that module), random weights in the tests
(``clip:ViT-S-32-alt/random``). Supported text towers: open_clip's ``CLIP`` and a
``TextTransformer`` text tower without a CoCa class token, with open_clip's BPE tokenizer.

Entry points: `train_coop` (one run -> a result dict), `run_coop_sweep` (shots x seeds -> rows,
what an experiment job calls), `PromptLearner` (the module itself).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coreg_ray.errors import CoregError
from coreg_ray.fewshot.common import EpochLosses, few_shot_inputs, load_table

PAPER_SHOTS = (1, 2, 4, 8, 16)


def coop_default_epochs(shots: int) -> int:
    """CoOp's schedule: 50 epochs for 1 shot, 100 for 2-4, 200 for 8-16 (and more)."""
    return 50 if shots <= 1 else (100 if shots <= 4 else 200)


# ============================================================================= text tower
class _TextTower:
    """The pieces of an open_clip text tower that `encode_text` uses, wherever they live."""

    def __init__(self, model):
        from open_clip.model import CLIP

        if isinstance(model, CLIP):
            t, self.pool_type, self.eos_id = model, model.text_pool_type, \
                getattr(model, "text_eos_id", None)
            self.attn_mask = model.attn_mask
        else:
            t = getattr(model, "text", None)
            if t is None or not hasattr(t, "token_embedding") or getattr(t, "cls_emb", None) is not None:
                raise CoregError(f"CoOp: unsupported open_clip text tower ({type(model).__name__}); "
                                 "it needs a CLIP-style TextTransformer without a class token")
            self.pool_type, self.eos_id = t.pool_type, getattr(t, "eos_id", None)
            self.attn_mask = getattr(t, "attn_mask", None)
            if getattr(t, "use_pad_mask", False):  # as TextTransformer._embeds
                self._pad_mask_of = t._build_additive_mask
        self._pad_mask_of = getattr(self, "_pad_mask_of", None)
        self.token_embedding = t.token_embedding
        self.positional_embedding = t.positional_embedding
        self.transformer = t.transformer
        self.ln_final = t.ln_final
        self.text_projection = t.text_projection

    def encode_embeddings(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, W] (L = context length) -> text features [B, D]; `tokens`
        [B, L] only says where to pool (the end-of-text position)."""
        from open_clip.transformer import text_global_pool

        cast = self.transformer.get_cast_dtype()
        n = x.shape[1]
        x = x.to(cast) + self.positional_embedding[:n].to(cast)
        attn_mask = self.attn_mask
        if self._pad_mask_of is not None:
            pad = self._pad_mask_of(tokens, n, x.dtype)
            attn_mask = pad if attn_mask is None else attn_mask[:n, :n].unsqueeze(0) + pad
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) \
                else x @ self.text_projection
        return x


class PromptLearner(nn.Module):
    """CoOp's learnable context (class token at the end). ``forward()`` -> unnormalised text
    features [C, D] of the C class prompts; only ``ctx`` is a parameter of this module (the
    CLIP model is held outside the module tree, so ``parameters()`` is just the context)."""

    def __init__(self, clip_model, tokenizer, classnames, n_ctx: int = 16,
                 ctx_init: str | None = None, class_specific: bool = False,
                 init_std: float = 0.02, generator: torch.Generator | None = None):
        super().__init__()
        self._clip = [clip_model]  # not a submodule: stays frozen and out of state_dict
        self.tower = _TextTower(clip_model)
        if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "sot_token_id"):
            raise CoregError("CoOp needs open_clip's CLIP BPE tokenizer (SimpleTokenizer), got "
                             f"{type(tokenizer).__name__}")
        classnames = [str(c).replace("_", " ") for c in classnames]
        emb = self.tower.token_embedding
        dev = emb.weight.device
        if ctx_init:
            ctx_init = " ".join(ctx_init.replace("_", " ").split())
            init_ids = tokenizer.encode(ctx_init)
            n_ctx = len(init_ids)
            prefix = ctx_init
        else:
            if n_ctx < 1:
                raise CoregError(f"CoOp: n_ctx must be at least 1, got {n_ctx}")
            prefix = " ".join(["X"] * n_ctx)
        self.n_ctx, self.ctx_init, self.class_specific = int(n_ctx), ctx_init, bool(class_specific)
        self.classnames = classnames
        self.prompts = [f"{prefix} {name}." for name in classnames]
        tokens = tokenizer(self.prompts).to(dev)  # [C, L]
        ctx_len = tokens.shape[1]
        for name, prompt in zip(classnames, self.prompts):
            if len(tokenizer.encode(prompt)) + 2 > ctx_len:  # + SOT, EOT
                raise CoregError(f"CoOp: the prompt of class {name!r} is longer than the text "
                                 f"context ({ctx_len} tokens with {self.n_ctx} context vectors)")
        with torch.no_grad():
            embedding = emb(tokens).float()  # [C, L, W]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:].clone(),
                             persistent=False)  # class name, '.', EOT, padding
        width = embedding.shape[-1]
        c = len(classnames)
        if ctx_init:
            vec = embedding[0, 1:1 + self.n_ctx].clone()
            ctx = vec.unsqueeze(0).repeat(c, 1, 1) if class_specific else vec
        else:
            shape = (c, self.n_ctx, width) if class_specific else (self.n_ctx, width)
            ctx = torch.empty(shape, device=dev).normal_(0.0, init_std, generator=generator)
        self.ctx = nn.Parameter(ctx)

    @property
    def clip(self):
        return self._clip[0]

    def prompt_embeddings(self) -> torch.Tensor:
        ctx = self.ctx
        c = self.token_prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix],
                         dim=1)

    def forward(self) -> torch.Tensor:
        return self.tower.encode_embeddings(self.prompt_embeddings(), self.tokens)


# ============================================================================= images
class _ImageFeeder:
    """uint8 [N,3,H,W] table images -> normalised model inputs, as the CLIP annotator does
    (open_clip's eval resize + crop), with CoOp's train-time augmentation on request."""

    def __init__(self, prep: dict, device):
        self.prep, self.device = prep, torch.device(device)
        self.size = int(prep["size"])
        self.mean = torch.tensor(prep["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(prep["std"], device=self.device).view(1, 3, 1, 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """-> uint8 [N, 3, S, S] at the model's input size (CPU)."""
        from PIL import Image

        from coreg_ray.annotate.imageio import prepare_image

        if images.shape[-1] == self.size and images.shape[-2] == self.size:
            return images
        hwc = images.permute(0, 2, 3, 1).numpy()
        p = self.prep
        out = np.stack([prepare_image(Image.fromarray(a), self.size, p.get("resize_mode", "shortest"),
                                      p.get("interpolation", "bicubic"), p.get("fill_color", 0))
                        for a in hwc])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """CoOp's train transform on prepared images: random resized crop (scale 0.08-1, ratio
        3/4-4/3, bicubic) back to S x S, then a random horizontal flip."""
        n, _, h, w = x.shape
        out = torch.empty_like(x, dtype=torch.float32)
        for i in range(n):
            for _ in range(10):
                area = h * w * float(torch.empty(1).uniform_(0.08, 1.0, generator=generator))
                logr = float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                     generator=generator))
                r = math.exp(logr)
                cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
                if 0 < cw <= w and 0 < ch <= h:
                    break
            else:
                cw, ch = w, h
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            crop = x[i:i + 1, :, top:top + ch, left:left + cw].float()
            crop = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False,
                                 antialias=True).clamp_(0, 255)
            if bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(-1)
            out[i] = crop[0]
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) / self.std


def _autocast(device, dtype):
    import contextlib

    if dtype is None or torch.device(device).type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def encode_image_table(model, feeder: _ImageFeeder, images: torch.Tensor, batch_size: int = 256,
                       autocast_dtype=None) -> torch.Tensor:
    """Frozen image features (unit norm, float32) of uint8 [N,3,H,W] images."""
    outs = []
    for s in range(0, len(images), batch_size):
        x = feeder.normalize(feeder.prepare(images[s:s + batch_size]))
        with _autocast(feeder.device, autocast_dtype):
            outs.append(F.normalize(model.encode_image(x).float(), dim=-1))
    d = model.text_projection.shape[-1] if isinstance(model.text_projection, torch.Tensor) else 0
    return torch.cat(outs) if outs else torch.zeros(0, d, device=feeder.device)


# ============================================================================= training
def _lr_at(step: int, steps_per_epoch: int, epochs: int, lr: float, warmup_epochs: int,
           warmup_lr: float) -> float:
    """CoOp's schedule: constant warm-up lr for `warmup_epochs`, then cosine from lr over all
    `epochs` (stepped per epoch, as Dassl's CosineAnnealingLR with a constant warm-up)."""
    epoch = step // max(1, steps_per_epoch)
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))


def train_coop(model_spec: str, train_table, test_table=None, shots: int = 16, seed: int = 1,
               epochs: int | None = None, n_ctx: int = 16, ctx_init: str | None = None,
               class_specific: bool = False, batch_size: int = 32, lr: float = 0.002,
               momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
               warmup_lr: float = 1e-5, augment: bool = True, classes=None,
               device: str | None = None, precision: str = "auto", image_size: int | None = None,
               eval_batch_size: int = 256, save_path: str | None = None,
               allow_download: bool | None = None, model=None, tokenizer=None, prep=None,
               log_every: int = 0) -> dict:
    """Train CoOp on `shots` labelled images per class of `train_table` (chosen by
    `few_shot_indices(labels, shots, seed)`), evaluate on `test_table`.

    model_spec: ``clip:MODEL[/PRETRAINED]`` (the ``clip:`` may be left out); `model`,
    `tokenizer`, `prep` (from `load_clip_model`) skip loading. classes: prompt class names
    (default: the train table's). Returns {"method": "coop", "test_accuracy" (None without a
    test table), "train_accuracy", "seconds", "train_seconds", "losses" (mean per epoch),
    "epochs", "shots", "seed", "num_train", "num_test", "n_ctx", "model", "ctx" (the learned
    context as a CPU tensor)}; `save_path` also writes the context (torch.save).
    """
    from coreg_ray.annotate.clip import load_clip_model
    from coreg_ray.data import few_shot_indices

    t0 = time.time()
    spec = model_spec if str(model_spec).startswith("clip:") else f"clip:{model_spec}"
    shots, seed, train, test, classnames = few_shot_inputs("CoOp", shots, seed, train_table,
                                                           test_table, classes)
    if test is not None and test.num_classes != train.num_classes:
        raise CoregError(f"CoOp: test table has {test.num_classes} classes, train table "
                         f"{train.num_classes}")
    epochs = coop_default_epochs(shots) if epochs is None else int(epochs)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise CoregError(f"precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "auto":  # bf16 needs no loss scaling; fp16 only when asked
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    amp = None if (dev.type == "cpu" or precision == "fp32") else \
        (torch.bfloat16 if precision == "bf16" else torch.float16)

    if model is None:
        model, tokenizer, prep = load_clip_model(spec, dev, image_size, allow_download)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    feeder = _ImageFeeder(prep, dev)

    idx = few_shot_indices(train.labels, shots, seed)
    x_train = feeder.prepare(train.images[torch.as_tensor(idx)])
    y_train = torch.as_tensor(train.labels[idx], dtype=torch.long, device=dev)
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device=dev).manual_seed(seed) if dev.type != "cpu" else gen
    learner = PromptLearner(model, tokenizer, classnames, n_ctx, ctx_init, class_specific,
                            generator=dgen).to(dev)
    opt = torch.optim.SGD(learner.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    scale = model.logit_scale.exp().detach().float()
    bias = getattr(model, "logit_bias", None)
    feats_cache = None if augment else encode_image_table(model, feeder, x_train, eval_batch_size, amp)
    n = len(idx)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    log = EpochLosses("coop", epochs, log_every)
    t_train = time.time()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            b = perm[s:s + batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(log.steps, steps_per_epoch, epochs, lr, warmup_epochs, warmup_lr)
            if feats_cache is not None:
                img = feats_cache[b.to(dev)]
            else:
                with torch.no_grad(), _autocast(dev, amp):
                    xb = feeder.normalize(feeder.augment(x_train[b], gen))
                    img = F.normalize(model.encode_image(xb).float(), dim=-1)
            with _autocast(dev, amp):
                txt = F.normalize(learner().float(), dim=-1)
            logits = scale * img @ txt.t()
            if bias is not None:
                logits = logits + bias.float()
            log.step(opt, F.cross_entropy(logits, y_train[b.to(dev)]), len(b))
        log.end_epoch(ep)
    losses = log.losses
    train_seconds = time.time() - t_train

    with torch.no_grad(), _autocast(dev, amp):
        txt = F.normalize(learner().float(), dim=-1)
    train_acc = _accuracy(model, feeder, x_train, y_train, txt, scale, eval_batch_size, amp)
    test_acc = None
    if test is not None:
        y_test = torch.as_tensor(test.labels, dtype=torch.long, device=dev)
        test_acc = _accuracy(model, feeder, test.images, y_test, txt, scale, eval_batch_size, amp)
    ctx = learner.ctx.detach().cpu()
    result = {"method": "coop", "model": spec, "shots": shots, "seed": seed, "epochs": epochs,
              "n_ctx": learner.n_ctx, "ctx_init": ctx_init, "class_specific": class_specific,
              "num_train": int(n), "num_test": 0 if test is None else len(test),
              "train_accuracy": train_acc, "test_accuracy": test_acc, "losses": losses,
              "train_seconds": train_seconds, "seconds": time.time() - t0, "ctx": ctx}
    if save_path:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ctx": ctx, "classnames": classnames, "model": spec, "n_ctx": learner.n_ctx,
                    "ctx_init": ctx_init, "class_specific": class_specific}, save_path)
    return result


@torch.no_grad()
def _accuracy(model, feeder, images, labels, txt, scale, batch_size, amp) -> float:
    if len(images) == 0:
        return float("nan")
    correct = 0
    for s in range(0, len(images), batch_size):
        f = encode_image_table(model, feeder, images[s:s + batch_size], batch_size, amp)
        correct += int(((f @ txt.t()).argmax(1) == labels[s:s + batch_size]).sum())
    return correct / len(images)


def run_coop_sweep(model_spec: str, train_table, test_table, shots=PAPER_SHOTS, seeds=(1, 2, 3),
                   **kwargs) -> list[dict]:
    """The paper's few-shot grid for one CLIP model: CoOp for every k in `shots` and every seed
    -> one row per run (the `train_coop` dict without the context tensor). Loads the model and
    the tables once."""
    from coreg_ray.annotate.clip import load_clip_model

    spec = model_spec if str(model_spec).startswith("clip:") else f"clip:{model_spec}"
    dev = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    train, test = load_table(train_table), load_table(test_table)
    model, tok, prep = load_clip_model(spec, dev, kwargs.pop("image_size", None),
                                       kwargs.pop("allow_download", None))
    rows = []
    for k in shots:
        for s in seeds:
            r = train_coop(spec, train, test, shots=k, seed=s, device=dev, model=model,
                           tokenizer=tok, prep=prep, **kwargs)
            r.pop("ctx", None)
            rows.append(r)
    return rows

"""What a sharded run needs per worker, before anything is loaded (`coreg-ray train --plan`),
and the refusal of a run that cannot fit.

Per worker, with N training rows (T test rows), W workers, S x S working images, C classes and
the global batch B (docs/scale.md works one example through):

- images: ceil(N / W) + ceil(T / W) rows x 3 S^2 bytes (uint8), on the device (placement
  device) or in host memory (placement host);
- per-sample state on the device, 24 C + 17 bytes a row: candidates, the annotator's
  probabilities, both nets' alignment table and divide-pass scores (float32 [rows, C] each),
  both split weights, the few-shot flag, the label; in host memory 8 H bytes a row (both nets'
  last H = coreg.division_history division losses);
- the GMM's input: all N averaged division losses, gathered on every rank, and the fit's
  float64 copies: 36 N bytes of host memory (every rank; the only O(N) term);
- the networks: 2 nets + 2 momentum (key) nets + gradients + SGD momentum = 8 x 4 P bytes;
- activations: the mixed batch of 4 B / W views through the net with gradients, measured from
  the model itself (the sum of its layers' outputs for one S x S image, 4 bytes each), x 2 for
  what autograd keeps besides;
- loading: while a worker reads and decodes its rows, LOAD_FACTOR x its images of host memory
  (plus the fixed cost); the host need is the larger of that and the training terms;
- a fixed cost: on a CPU worker FIXED_CPU_HOST_GB (what the measured peak RSS of CPU workers
  holds besides the terms above: the Ray worker, PyTorch, decoding buffers; see the constant);
  on a GPU worker FIXED_HOST_GB of host memory (the whole RSS of a CPU worker on 1,000 CIFAR
  images, 3.6 and 4.0 GB: not measured on a GPU) and FIXED_DEVICE_GB of device memory (CUDA
  context and workspaces: an assumption, not measured here).
"""
from __future__ import annotations

import math

from coreg_ray.errors import CoregError

# CPU worker, calibrated on benchmarks/results/scale_cpu.jsonl (2 CPU workers, PreAct
# ResNet-18, 32 px, 43 classes, 128 images per worker and step): the workers' peak RSS was
# 6,035-7,247 MiB (6.3-7.6 GB) at 100k-300k rows, of which images are 0.15-0.46 GB and this
# plan's other terms (activations 5.03 GB, networks 0.37 GB, per-sample state, GMM input)
# 5.6-6.0 GB; the rest, 0.7-1.6 GB, is this constant (the largest, rounded up). Peak minus
# images alone (6.2-7.1 GB) would count the activations twice: they are measured from the model.
FIXED_CPU_HOST_GB = 1.6
# While a worker reads and decodes its rows (`shards.ParquetRows.read_rows`, decoding a chunk of
# rows at a time into one preallocated table, then the trainer's device data) its host memory
# holds about LOAD_FACTOR x its images at once: measured with the MLP (whose training adds
# little) at 32 px, 2 CPU workers, 50k / 150k / 500k rows each, peak RSS 1.70 / 2.13 / 3.22 GB:
# +3.2 KB a row from 50k to 500k (1.05 x the 3,072 bytes of an image), +4.3 KB (1.4 x) from 50k
# to 150k; 1.5 keeps the plan above each (scale_cpu.jsonl, rows with "reader": "chunked").
# The reader before it (a list of decoded arrays, then stacked and permuted copies) held 4.5 x.
# The host need is the larger of that loading peak and the training terms. 32 px only.
LOAD_FACTOR = 1.5
FIXED_HOST_GB = 4.0  # GPU worker's host: the 3.6 / 4.0 GB RSS of a whole CPU worker (1k CIFAR)
FIXED_DEVICE_GB = 1.5  # assumed: CUDA context, cuDNN / allocator workspaces
GB = 1e9


def activation_bytes(backbone: str, num_classes: int, size: int, proj_dim: int) -> tuple[int, int]:
    """(bytes of all layer outputs for one image, parameter count) of the model, measured by a
    forward pass of two blank images."""
    import torch

    from coreg_ray.coreg.models import build_model

    net = build_model(backbone, num_classes, size, proj_dim)
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    hooks = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(2, 3, size, size))
    for h in hooks:
        h.remove()
    return total[0] * 4 // 2, sum(p.numel() for p in net.parameters())


def worker_plan(rows: int, test_rows: int, size: int, classes: int, workers: int,
                gpus_per_worker: float, batch: int, history: int, act_per_image: int,
                params: int, placement: str = "auto", gpu_memory_gb: float = 80.0) -> dict:
    """The memory each worker needs (GB) and where the images go; `fits` says whether it fits
    `gpu_memory_gb` (GPU workers; CPU workers are not checked: their host is not known here)."""
    per = math.ceil(rows / workers)
    bytes_per_image = 3 * size * size
    images = (per + math.ceil(test_rows / workers)) * bytes_per_image / GB
    state = per * (24 * classes + 17) / GB
    host_state = per * 8 * history / GB
    gmm = 36 * rows / GB
    nets = 8 * 4 * params / GB
    acts = 2 * act_per_image * 4 * max(1, batch // workers) / GB
    gpu = gpus_per_worker > 0
    device_fixed = state + nets + acts + (FIXED_DEVICE_GB if gpu else 0.0)
    capacity = gpu_memory_gb * min(gpus_per_worker, 1.0) if gpu else None
    where = placement
    if placement == "auto":
        where = "device" if not gpu or device_fixed + images <= 0.9 * capacity else "host"
    device = device_fixed + (images if where == "device" and gpu else 0.0)
    fixed = FIXED_HOST_GB if gpu else FIXED_CPU_HOST_GB
    host = fixed + host_state + gmm + (images if where == "host" or not gpu else 0.0)
    if not gpu:  # one memory: the process holds everything
        host += state + nets + acts
        device = None
    loading = fixed + LOAD_FACTOR * images  # the peak while the rows are read and decoded
    host = max(host, loading)
    return {"rows": rows, "test_rows": test_rows, "image_size": size,
            "bytes_per_image": bytes_per_image, "workers": workers, "rows_per_worker": per,
            "placement": where, "images_gb": images, "per_sample_state_gb": state + host_state,
            "state_bytes_per_row": 24 * classes + 17 + 8 * history, "gmm_gb": gmm,
            "networks_gb": nets, "activations_gb": acts,
            "device_gb": device, "host_gb": host, "loading_gb": loading,
            "gpu_memory_gb": capacity,
            "fits": capacity is None or device <= 0.9 * capacity}


def describe(p: dict) -> list[str]:
    """The plan as printed lines."""
    lines = [f"rows {p['rows']:,} (test {p['test_rows']:,}); working images "
             f"{p['image_size']}x{p['image_size']}: {p['bytes_per_image']:,} bytes each (uint8)",
             f"{p['workers']} workers: {p['rows_per_worker']:,} training rows each; images on "
             f"the {p['placement']}",
             f"per worker: images {p['images_gb']:.2f} GB, per-sample state "
             f"{p['per_sample_state_gb']:.2f} GB ({p['state_bytes_per_row']} bytes a row), GMM "
             f"input {p['gmm_gb']:.2f} GB, networks {p['networks_gb']:.2f} GB, activations "
             f"{p['activations_gb']:.2f} GB; reading and decoding its rows "
             f"{p['loading_gb']:.2f} GB"]
    if p["device_gb"] is not None:
        lines.append(f"each worker needs {p['device_gb']:.1f} GB of its GPU's "
                     f"{p['gpu_memory_gb']:.0f} GB and {p['host_gb']:.1f} GB of host memory "
                     f"(incl. {FIXED_HOST_GB} GB fixed)")
    else:
        lines.append(f"each worker needs {p['host_gb']:.1f} GB of host memory (incl. "
                     f"{FIXED_CPU_HOST_GB} GB fixed, measured: PreAct ResNet-18 CPU workers)")
    return lines


def plan_run(cfg, rows: int, test_rows: int, size: int, classes: int, workers: int,
             gpus_per_worker: float, gpu_memory_gb: float = 80.0) -> dict:
    """`worker_plan` for a run's config; one line if it cannot fit, naming what would."""
    act, params = activation_bytes(cfg.model.backbone, classes, size, cfg.model.proj_dim)
    args = dict(rows=rows, test_rows=test_rows, size=size, classes=classes,
                gpus_per_worker=gpus_per_worker, batch=cfg.train.batch_size,
                history=cfg.coreg.division_history, act_per_image=act, params=params,
                gpu_memory_gb=gpu_memory_gb)
    p = worker_plan(workers=workers, placement=cfg.data.placement, **args)
    if not p["fits"]:
        need = next((w for w in range(workers + 1, rows + 1)
                     if worker_plan(workers=w, placement="device", **args)["fits"]), None)
        host = worker_plan(workers=workers, placement="host", **args)
        options = ([f"needs >= {need} workers with {p['gpu_memory_gb']:.0f} GB"] if need else [])
        if host["fits"] and p["placement"] != "host":
            options.append("data.placement=host")
        raise CoregError(f"does not fit: each of {workers} workers needs {p['device_gb']:.1f} GB "
                         f"of its GPU's {p['gpu_memory_gb']:.0f} GB ({rows:,} rows of "
                         f"{size}x{size}, images {p['images_gb']:.1f} GB each): "
                         + (" or ".join(options) if options else "a smaller model or batch"))
    return p

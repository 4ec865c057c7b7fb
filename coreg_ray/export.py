"""`coreg-ray export`: a trained `model.pt` as one self-contained ONNX or TorchScript file.

The exported graph is the student exactly as `Classifier` runs it (`coreg_ray.coreg.trainer`):
both networks, their logits summed, with the input normalisation inside, so a service or a device
needs nothing but the file:

- input  `images`: uint8, NCHW, RGB, values 0-255, shape [batch, 3, S, S] with S the model's
  image size (resize before; the batch size is dynamic);
- output `logits`: float32, [batch, num_classes] (the sum of both networks' logits; argmax is
  the class, softmax the probabilities).

The class names, image size, mean/std and backbone travel inside the file: ONNX metadata
(`coreg_ray`: JSON) or a TorchScript extra file (`coreg_ray.json`).

ONNX is written by torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`,
opset 17): it needs only the `onnx` package, works offline and exports these static CNN/MLP
graphs exactly. The torch.export-based ("dynamo") exporter that torch >= 2.9 defaults to needs
`onnxscript` in addition and gains nothing here. After writing, the file is loaded back (by
onnxruntime / `torch.jit.load`) and compared with the PyTorch model on random images, so a
broken export is never reported as a success.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from coreg_ray.errors import CoregError, require

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 17
METADATA_KEY = "coreg_ray"  # ONNX metadata_props key / TorchScript extra file stem


def _module(clf):
    """`clf`'s nets wrapped as one `nn.Module`: uint8 NCHW RGB -> summed logits (fp32)."""
    import torch
    from torch import nn

    class Student(nn.Module):
        def __init__(self, nets, mean, std):
            super().__init__()
            self.nets = nn.ModuleList(nets)
            self.register_buffer("mean", mean.detach().clone().float().cpu())
            self.register_buffer("std", std.detach().clone().float().cpu())

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # the same arithmetic, in the same order, as Classifier.logits
            x = (images.float() / 255.0 - self.mean) / self.std
            out = self.nets[0](x).float()
            for net in self.nets[1:]:
                out = out + net(x).float()
            return out

    return Student([n.cpu().eval() for n in clf.nets], clf.mean, clf.std).eval()


def metadata(clf) -> dict:
    s = clf.state
    return {"format": "coreg-ray student", "classes": list(clf.classes),
            "num_classes": int(s["num_classes"]), "image_size": int(clf.image_size),
            "backbone": s["backbone"], "mean": [float(v) for v in s["mean"]],
            "std": [float(v) for v in s["std"]], "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_layout": "uint8 NCHW RGB 0-255", "output_kind": "logits (sum of both networks)"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise CoregError(f"--format: {fmt!r} is not valid (valid: one of {', '.join(FORMATS)})")
    return fmt


def export_model(model_path, fmt: str, output, check_images: int = 7) -> dict:
    """Write `model_path` (a `model.pt`) as `fmt` to `output`; returns what was written.

    Checks first (format, output location, the model file: each a `CoregError` line), then
    writes atomically (`output.tmp` renamed over `output`), then loads the file back and
    compares it with the PyTorch `Classifier` on `check_images` random images (batch sizes 1
    and `check_images`): the result holds `max_abs_diff` and the input/output names, dtypes and
    shapes read from the exported file."""
    import numpy as np
    import torch

    from coreg_ray.coreg.trainer import Classifier
    from coreg_ray.outputs import atomic_path, check_output_file

    check_format(fmt)
    out = check_output_file(output, "--output", " (give the exported file's name)")
    if fmt == "onnx":  # the extras, before any work
        require("onnx", "export")
        require("onnxruntime", "export")
    clf = Classifier.load(model_path, "cpu")
    module = _module(clf)
    meta = metadata(clf)
    size = clf.image_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with atomic_path(out) as tmp, torch.no_grad():
        if fmt == "onnx":
            _write_onnx(module, example, tmp, meta)
        else:
            _write_torchscript(module, example, tmp, meta)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (check_images, 3, size, size), dtype=torch.uint8, generator=gen)
    ref = clf.logits(probe).numpy()
    run = load_exported(out, fmt)
    got = np.concatenate([run(probe[:1].numpy()), run(probe.numpy())[1:]])
    if got.shape != ref.shape:
        raise CoregError(f"{out}: the exported model returns shape {list(got.shape)}, "
                         f"expected {list(ref.shape)}")
    diff = float(np.abs(got - ref).max())
    if not np.isfinite(diff) or diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
        from coreg_ray.errors import note

        note(f"{out}: the export differs from the PyTorch model by up to {diff:.3g} in a logit "
             "(more than float32 rounding): check it before use")
    info = {"model": str(model_path), "output": str(out), "format": fmt,
            "bytes": out.stat().st_size, "classes": meta["classes"],
            "image_size": size, "backbone": meta["backbone"], "max_abs_diff": diff,
            "check_images": int(check_images), **describe_io(out, fmt, meta)}
    if fmt == "onnx":
        info["exporter"] = f"torch.onnx.export (TorchScript-based, dynamo=False), opset {OPSET}"
    else:
        info["exporter"] = "torch.jit.trace"
    return info


def _write_onnx(module, example, path: Path, meta: dict) -> None:
    import torch

    onnx = require("onnx", "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, tracer notes
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.doc_string = ("coreg-ray student: uint8 NCHW RGB images in, logits out "
                        "(normalisation inside)")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(module, example, path: Path, meta: dict) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notes
        traced = torch.jit.trace(module, (example,), check_trace=True)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def load_exported(path, fmt: str):
    """A function uint8 NCHW array -> logits array running the exported file (1 thread)."""
    import numpy as np

    if fmt == "onnx":
        ort = require("onnxruntime", "export")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise CoregError(f"{path}: onnxruntime cannot load it ({' '.join(str(exc).split())[:200]})") from None
        return lambda x: sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0]
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return mod(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def describe_io(path, fmt: str, meta: dict) -> dict:
    """Input/output names, dtypes and shapes as the exported file declares them."""
    if fmt == "onnx":
        onnx = require("onnx", "export")
        graph = onnx.load(str(path), load_external_data=False).graph

        def one(v):
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            return {"name": v.name, "dtype": dtype,
                    "shape": dims}

        return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}
    s = meta["image_size"]
    return {"inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, s, s]}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32",
                         "shape": ["batch", meta["num_classes"]]}]}


def read_metadata(path, fmt: str) -> dict:
    """The `metadata` stored in an exported file."""
    if fmt == "onnx":
        onnx = require("onnx", "export")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    import torch

    extra = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[f"{METADATA_KEY}.json"])


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"


def summary_lines(info: dict) -> list[str]:
    def shape(v):
        return "[" + ", ".join(str(d) for d in v["shape"]) + "]"

    lines = [f"exported {info['model']} -> {info['output']} ({info['format']}, "
             f"{_size(info['bytes'])}; {info['exporter']})"]
    for v in info["inputs"]:
        lines.append(f"input  {v['name']}: {v['dtype']} {shape(v)}  "
                     f"(NCHW, RGB, 0-255; normalisation inside)")
    for v in info["outputs"]:
        lines.append(f"output {v['name']}: {v['dtype']} {shape(v)}  "
                     f"(logits, sum of both networks; {len(info['classes'])} classes)")
    lines.append(f"check: loaded back, max |delta logit| vs PyTorch on {info['check_images']} "
                 f"random images (batch 1 and {info['check_images']}): {info['max_abs_diff']:.2e}")
    return lines

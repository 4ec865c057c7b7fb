"""`coreg-ray export`: a trained student as ONNX / TorchScript, loaded in a fresh process and
compared with the PyTorch `Classifier` on real images (digits), batch sizes 1 and 7."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from coreg_ray.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4  # max |delta logit| in fp32

# runs in a fresh interpreter: only onnxruntime / torch.jit, no coreg_ray import
FRESH = r"""
import sys, numpy as np
fmt, model, images, out = sys.argv[1:]
x = np.load(images)
if fmt == "onnx":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["images"] and ins[0].type == "tensor(uint8)", ins
    assert [o.name for o in outs] == ["logits"], outs
    run = lambda a: sess.run(["logits"], {"images": a})[0]
else:
    import torch
    torch.set_num_threads(1)
    mod = torch.jit.load(model, map_location="cpu").eval()
    run = lambda a: mod(torch.from_numpy(a)).detach().numpy()
    assert "coreg_ray" not in sys.modules
np.savez(out, b1=run(x[:1]), b7=run(x[:7]))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits, tiny_student):
    """A folder with the tiny trained student's model.pt (conftest), and the digits test images."""
    d = tmp_path_factory.mktemp("export")
    shutil.copy(tiny_student, d / "model.pt")
    return d, digits[1]


@pytest.mark.parametrize("fmt,name", [("onnx", "student.onnx"), ("torchscript", "student.pt")])
def test_export_matches_pytorch_in_a_fresh_process(trained, fmt, name, capsys):
    from coreg_ray.coreg.trainer import Classifier
    from coreg_ray.export import read_metadata

    d, test = trained
    out = d / "exported" / name
    assert main(["export", "--model", str(d / "model.pt"), "--format", fmt,
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input  images: uint8 [batch, 3, 8, 8]" in printed, printed
    assert "output logits: float" in printed and "[batch, 10]" in printed, printed
    assert "KB" in printed or "MB" in printed
    assert out.is_file() and not (out.parent / (name + ".tmp")).exists()
    meta = read_metadata(out, fmt)
    assert meta["classes"] == test.classes and meta["image_size"] == 8

    images = np.ascontiguousarray(test.images[:7].numpy())  # real digits, uint8 NCHW RGB
    assert images.dtype == np.uint8 and images.shape == (7, 3, 8, 8)
    np.save(d / "images.npy", images)
    res = d / f"{fmt}-logits.npz"
    subprocess.run([sys.executable, "-c", FRESH, fmt, str(out), str(d / "images.npy"), str(res)],
                   check=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = np.load(res)
    ref = Classifier.load(d / "model.pt", "cpu").logits(test.images[:7]).numpy()
    assert got["b1"].shape == (1, 10) and got["b7"].shape == (7, 10)
    diff = max(float(np.abs(got["b1"] - ref[:1]).max()), float(np.abs(got["b7"] - ref).max()))
    print(f"{fmt}: max |delta logit| vs PyTorch on 7 digits images (batch 1 and 7): {diff:.2e}")
    assert diff < TOLERANCE
    assert (got["b7"].argmax(1) == ref.argmax(1)).all()


def test_export_bad_inputs_are_one_line_exit_2(trained, tmp_path, capsys):
    d, _ = trained
    model = str(d / "model.pt")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    cases = [
        (["--model", model, "--format", "tflite", "--output", str(tmp_path / "m.x")], "--format"),
        (["--model", str(tmp_path / "missing.pt"), "--format", "onnx",
          "--output", str(tmp_path / "m.onnx")], "not found"),
        (["--model", str(not_a_model), "--format", "torchscript",
          "--output", str(tmp_path / "m.pt")], "notes.pt"),
        (["--model", model, "--format", "onnx", "--output", str(blocker / "m.onnx")],
         "is a file"),
        (["--model", model, "--format", "torchscript", "--output", str(tmp_path)], "is a folder"),
    ]
    for argv, words in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (argv, err)
        assert err.startswith("coreg-ray: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes.pt"]  # nothing written

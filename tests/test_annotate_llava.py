"""LLaVA annotation without vLLM: templates, prompts, request order, answer parsing, votes,
options, spec parsing and the pipeline's refusals. The real engine is exercised by
tests/vllm/ inside the separate .venv-vllm environment."""
from __future__ import annotations

import json

import numpy as np
import pytest

from coreg_ray.annotate import llava
from coreg_ray.annotate.llava import (LLAVA_TEMPLATES, AnswerParser, LlavaOptions,
                                      build_llava_prompts, build_requests, engine_args,
                                      normalize_tokens, parse_llava_spec,
                                      resolve_llava_preprocess, resolve_llava_templates,
                                      validate_llava_templates, votes_to_rows, word_forms)
from coreg_ray.errors import CoregError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


# ============================================================================= templates / prompts
def test_default_templates_list_every_class():
    assert len(LLAVA_TEMPLATES) >= 4 and len(set(LLAVA_TEMPLATES)) == len(LLAVA_TEMPLATES)
    prompts = build_llava_prompts(LLAVA_TEMPLATES, CIFAR10)
    assert len(prompts) == len(LLAVA_TEMPLATES)
    for p in prompts:
        assert p.startswith("USER: <image>\n") and p.endswith(" ASSISTANT:")
        assert "airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck" in p
        assert p.count("<image>") == 1
    assert prompts[0] == ("USER: <image>\nWhich of these is shown in the image: airplane, "
                          "automobile, bird, cat, deer, dog, frog, horse, ship, truck? "
                          "Answer with one of them. ASSISTANT:")


def test_prompt_format_options_and_full_prompt_templates():
    p = build_llava_prompts(["Pick: {choices}."], ["a", "b"], prompt_format="<img>Q: {question}\nA:",
                            image_token="<img>", choice_separator=" | ")
    assert p == ["<img>Q: Pick: a | b.\nA:"]
    # a template that carries the image token is the whole prompt
    full = "USER: <image>\nIs it {choices}? ASSISTANT:"
    assert build_llava_prompts([full], ["x", "y"]) == ["USER: <image>\nIs it x, y? ASSISTANT:"]
    with pytest.raises(CoregError, match="before"):
        build_llava_prompts(["{choices}"], ["x"], prompt_format="{question} <image>")
    with pytest.raises(CoregError, match="image token"):
        build_llava_prompts(["{choices}"], ["x"], prompt_format="USER: {question}")
    assert build_llava_prompts(["{choices}"], ["x"], prompt_format="USER: {question}",
                               image_token=None) == ["USER: x"]
    with pytest.raises(CoregError, match="question"):
        build_llava_prompts(["{choices}"], ["x"], prompt_format="USER: <image>")


@pytest.mark.parametrize("bad", [["no field"], ["{choices} {choices}"], ["{} {choices}"],
                                 ["{choices"], [""], []])
def test_bad_llava_templates(bad):
    with pytest.raises(CoregError):
        validate_llava_templates(bad)


def test_template_file_and_literal_braces(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\n\nWhich one: {choices}?\nLine one\\nthen {choices} {{x}}\n")
    ts = resolve_llava_templates(str(f))
    assert ts == ["Which one: {choices}?", "Line one\nthen {choices} {{x}}"]
    assert build_llava_prompts(ts, ["a"], image_token=None, prompt_format="{question}")[1] == \
        "Line one\nthen a {x}"
    assert resolve_llava_templates(None) == LLAVA_TEMPLATES == resolve_llava_templates("default")
    with pytest.raises(CoregError, match="not a file"):
        resolve_llava_templates(str(tmp_path / "missing.txt"))


def test_requests_are_image_major_with_the_image_first():
    prompts = build_llava_prompts(LLAVA_TEMPLATES[:3], CIFAR10)
    images = ["img0", "img1"]  # stand-ins for PIL images
    reqs = build_requests(images, prompts)
    assert len(reqs) == 6
    assert [r["multi_modal_data"]["image"] for r in reqs] == ["img0"] * 3 + ["img1"] * 3
    assert [r["prompt"] for r in reqs] == prompts * 2
    # the K prompts of one image share everything up to the end of the image token
    for r in reqs:
        assert r["prompt"].index("<image>") < r["prompt"].index("airplane")


# ============================================================================= parsing
def test_normalize_and_word_forms():
    assert normalize_tokens("  The T-Shirt/Top!! ") == ["the", "t", "shirt", "top"]
    assert normalize_tokens("aquarium_fish") == ["aquarium", "fish"]
    assert normalize_tokens("Ｃａｔ") == ["cat"]  # full-width -> NFKC
    assert "bus" in word_forms("buses") and "fly" in word_forms("flies")
    assert "knife" in word_forms("knives") and "mouse" in word_forms("mice")
    assert "glass" in word_forms("glasses") and word_forms("glass") == {"glass"}
    assert word_forms("bus") == {"bus"}  # short words are left alone


@pytest.mark.parametrize("answer,want", [
    ("cat", 3), ("Cat", 3), ("CAT.", 3), (" cat\n", 3), ("A cat", 3), ("the dog!", 5),
    ("An airplane.", 0), ("Cats", 3), ("two horses", 7), ("It is a ship.", 8),
    ("The image shows a truck", 9), ("automobile", 1), ("Answer: frog", 6), ("deer", 4),
    ("dogs and cats", -1),  # two classes: no vote by default
    ("a lion", -1), ("", -1), ("   ", -1), ("...", -1), (None, -1),
    ("catalog", -1),  # whole words only
])
def test_parser_free_text(answer, want):
    assert AnswerParser(CIFAR10).parse(answer) == want


def test_parser_ambiguity_longest_match_and_synonyms():
    p = AnswerParser(CIFAR10, ambiguous="first")
    assert p.parse("a dog, or maybe a cat") == 5
    names = ["car", "race car", "maple", "maple tree"]
    q = AnswerParser(names)
    assert q.parse("a red race car") == 1  # "car" inside "race car" does not count
    assert q.parse("Maple trees in autumn") == 3
    assert q.parse("a car next to a maple tree") == -1  # two classes
    s = AnswerParser(CIFAR10, synonyms={"automobile": ["car", "sedan"], 0: "plane", "ship": "boat"})
    assert s.parse("A car.") == 1 and s.parse("sedans") == 1 and s.parse("a plane") == 0
    assert s.parse("boat") == 8 and s.parse("a small boat on water") == 8
    with pytest.raises(CoregError, match="not one of the class names"):
        AnswerParser(CIFAR10, synonyms={"lion": "big cat"})
    with pytest.raises(CoregError, match="outside"):
        AnswerParser(CIFAR10, synonyms={10: "x"})
    with pytest.raises(CoregError, match="tell them apart"):
        AnswerParser(CIFAR10, synonyms={"dog": "cat"})
    with pytest.raises(CoregError, match="empty"):
        AnswerParser(CIFAR10, synonyms={"dog": "!!"})


def test_parser_common_prefix_names():
    svhn = [f"number {d}" for d in range(10)]
    p = AnswerParser(svhn)
    assert p.parse("number 7") == 7 and p.parse("7") == 7 and p.parse("It is 3.") == 3
    assert p.parse("Number 12") == -1
    gtsrb = ["German Traffic Sign: Stop", "German Traffic Sign: Give way", "German Traffic Sign: No entry"]
    g = AnswerParser(gtsrb)
    assert g.parse("German Traffic Sign: Give way") == 1  # exact (structured outputs)
    assert g.parse("a stop sign") == 0 and g.parse("No entry.") == 2


def test_parse_many_shapes():
    p = AnswerParser(CIFAR10)
    v = p.parse_many([["cat", "a cat", "dog"], ["lion", "ship", "ships"]])
    assert v.dtype == np.int64 and v.tolist() == [[3, 3, 5], [-1, 8, 8]]
    assert p.parse_many([]).shape == (0, 0)


# ============================================================================= votes
def test_votes_to_rows_union_and_shares():
    votes = np.array([[3, 3, 5, -1], [-1, -1, -1, -1], [0, 1, 2, 0]])
    r = votes_to_rows(votes, 10)
    assert r["candidates"][0].nonzero()[0].tolist() == [3, 5]
    assert np.allclose(r["probs"][0, [3, 5]], [2 / 3, 1 / 3]) and r["probs"][0].sum() == \
        pytest.approx(1)
    assert r["unanswered"].tolist() == [False, True, False]
    assert r["candidates"][1].all() and np.allclose(r["probs"][1], 0.1)  # no vote: every class
    assert r["candidates"][2].nonzero()[0].tolist() == [0, 1, 2]
    assert r["probs"][2].argmax() == 0
    skip = votes_to_rows(votes, 10, no_answer="skip")
    assert not skip["candidates"][1].any()
    # same union as the CLIP logic
    from coreg_ray.annotate.logic import union_candidates
    assert np.array_equal(skip["candidates"], union_candidates(votes, 10).numpy())
    with pytest.raises(CoregError):
        votes_to_rows(np.array([[10]]), 10)
    with pytest.raises(CoregError):
        votes_to_rows(votes, 10, no_answer="drop")


# ============================================================================= options / engine args
def test_options_and_engine_args():
    o = LlavaOptions.coerce({"tensor_parallel_size": 2, "max_model_len": 2048, "max_num_seqs": 64,
                             "dtype": "bfloat16", "kv_cache_memory_bytes": 1 << 28,
                             "engine_kwargs": {"swap_space": 0}})
    kw = engine_args("/m", o, on_cpu=False)
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 2048
    assert kw["max_num_seqs"] == 64 and kw["dtype"] == "bfloat16" and kw["swap_space"] == 0
    assert kw["limit_mm_per_prompt"] == {"image": 1} and kw["enable_prefix_caching"]
    assert "enforce_eager" not in kw
    cpu = engine_args("/m", LlavaOptions(), on_cpu=True)
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 1 << 30
    assert cpu["distributed_executor_backend"] == "uni"  # in-process worker on CPU
    sub = engine_args("/m", LlavaOptions(in_process=False), on_cpu=True)
    assert "distributed_executor_backend" not in sub
    assert "distributed_executor_backend" not in engine_args("/m", LlavaOptions(), on_cpu=False)
    with pytest.raises(CoregError, match="unknown key"):
        LlavaOptions.coerce({"tp": 2})
    with pytest.raises(CoregError, match="max_num_seqs"):
        LlavaOptions.coerce({"max_num_seqs": 0})
    with pytest.raises(CoregError):
        LlavaOptions.coerce("fast")
    # only answer-changing settings are fingerprinted
    a = LlavaOptions(max_num_seqs=4).result_settings()
    b = LlavaOptions(max_num_seqs=64, replicas=3, batch_size=8).result_settings()
    assert a == b and a["templates"] == LLAVA_TEMPLATES
    assert LlavaOptions(structured_outputs=False).result_settings() != a
    assert LlavaOptions(synonyms={0: "plane"}).result_settings()["synonyms"] == {"0": ["plane"]}
    json.dumps(a)


# ============================================================================= spec / preprocess
def _model_dir(tmp_path, pre=None):
    d = tmp_path / "tiny-llava"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    if pre is not None:
        (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


def test_parse_spec_folder_and_preprocess(tmp_path):
    d = _model_dir(tmp_path, {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                              "size": {"shortest_edge": 224}})
    ls = parse_llava_spec(f"llava:{d}")
    assert ls.kind == "dir" and ls.path == str(d.resolve())
    assert resolve_llava_preprocess(ls)["size"] == 224
    assert resolve_llava_preprocess(ls, image_size=64)["size"] == 64
    (d / "preprocessor_config.json").unlink()
    assert resolve_llava_preprocess(ls)["size"] == 336
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CoregError, match="config.json"):
        parse_llava_spec(f"llava:{empty}")
    with pytest.raises(CoregError, match="folder not found"):
        parse_llava_spec(f"llava:{tmp_path / 'nope' / 'x' / 'y'}")
    with pytest.raises(CoregError, match="nothing after"):
        parse_llava_spec("llava:")
    with pytest.raises(CoregError, match="llava:PATH_OR_HF_ID"):
        parse_llava_spec("clip:ViT-B-32")


def test_hf_id_from_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(llava.ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CoregError, match="not in the local Hugging Face cache.*huggingface-cli "
                                         "download org/model"):
        parse_llava_spec("llava:org/model")
    assert parse_llava_spec("llava:org/model", allow_download=True).kind == "hf-download"
    # a cached snapshot is found without any network
    snap = tmp_path / "hub" / "models--org--model" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("a" * 40)
    ls = parse_llava_spec("llava:org/model")
    assert ls.kind == "hf-cache" and ls.path == str(snap)


def test_missing_vllm_is_one_line(monkeypatch, tmp_path):
    d = _model_dir(tmp_path)
    monkeypatch.setattr(llava, "vllm_available", lambda: False)
    with pytest.raises(CoregError) as e:
        llava.check_llava_available(f"llava:{d}")
    assert "\n" not in str(e.value) and ".venv-vllm" in str(e.value)
    import builtins
    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(CoregError, match="separate vLLM environment") as e:
        llava.require_vllm()
    assert "\n" not in str(e.value)


class FakeOutput:
    def __init__(self, text):
        self.outputs = [type("C", (), {"text": text})()]


class FakeLLM:
    """Answers by template index, so the image-major order is checked end to end."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, requests, sampling, use_tqdm=False):
        self.calls.append(requests)
        k = len(self.script)
        return [FakeOutput(self.script[i % k]) for i in range(len(requests))]


def test_annotator_with_a_fake_engine(tmp_path, monkeypatch):
    d = _model_dir(tmp_path, {"crop_size": 16, "do_center_crop": True})
    monkeypatch.setattr(llava, "make_sampling_params", lambda opts, classes: None)
    fake = FakeLLM(["cat", "A dog.", "lion", "cats"])
    ann = llava.LlavaAnnotator(f"llava:{d}", CIFAR10,
                               {"templates": LLAVA_TEMPLATES[:4], "structured_outputs": False},
                               llm=fake, return_answers=True)
    assert ann.prep["size"] == 16
    batch = {"id": np.array([5, 6, 7]), "pixels": np.zeros((3, 16, 16, 3), np.uint8),
             "error": np.array(["", "broken", ""], dtype=object)}
    out = ann(batch)
    assert len(fake.calls[0]) == 2 * 4  # only readable images, K requests each
    assert out["votes"].tolist() == [[3, 5, -1, 3], [-1] * 4, [3, 5, -1, 3]]
    assert out["candidates"][0].nonzero()[0].tolist() == [3, 5]
    assert not out["candidates"][1].any() and out["error"][1] == "broken"
    assert out["answers"][2].tolist() == ["cat", "A dog.", "lion", "cats"]
    # no_answer="skip": an image without any vote becomes an error row
    ann2 = llava.LlavaAnnotator(f"llava:{d}", CIFAR10,
                                {"templates": LLAVA_TEMPLATES[:2], "no_answer": "skip"},
                                llm=FakeLLM(["lion", "tiger"]))
    out2 = ann2({"id": np.array([1]), "pixels": np.zeros((1, 16, 16, 3), np.uint8)})
    assert out2["error"][0].startswith("no answer")


# ============================================================================= pipeline
def test_pipeline_refuses_unknown_and_vllm_less_llava(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    import pyarrow as pa
    from PIL import Image

    from coreg_ray.annotate.pipeline import run_annotation

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    pq.write_table(pa.table({"id": [1, 2], "image": [buf.getvalue()] * 2, "label": [0, 1]}),
                   tmp_path / "img.parquet")
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    with pytest.raises(CoregError, match="clip:MODEL.*llava:PATH_OR_HF_ID"):
        run_annotation(tmp_path / "img.parquet", ["blip:x"], tmp_path / "out.parquet")
    d = _model_dir(tmp_path)
    monkeypatch.setattr(llava, "vllm_available", lambda: False)
    with pytest.raises(CoregError, match="vllm.*not installed"):
        run_annotation(tmp_path / "img.parquet", [f"llava:{d}"], tmp_path / "out.parquet")
    with pytest.raises(CoregError, match="unknown key"):
        run_annotation(tmp_path / "img.parquet", [f"llava:{d}"], tmp_path / "out.parquet",
                       llava={"bogus": 1})


def test_pipeline_llava_resources():
    from coreg_ray.annotate.pipeline import _llava_resources

    class FakeRay:
        def __init__(self, res):
            self.res = res

        def cluster_resources(self):
            return self.res

    r = _llava_resources(FakeRay({"CPU": 2.0}), LlavaOptions(), None, None, None)
    assert (r["gpu"], r["num_actors"], r["num_gpus"], r["actor_cpus"]) == (False, 1, 0, 1.0)
    r = _llava_resources(FakeRay({"CPU": 32.0, "GPU": 8.0}), LlavaOptions(tensor_parallel_size=2),
                         None, None, None)
    assert (r["gpu"], r["num_actors"], r["num_gpus"]) == (True, 4, 2)
    r = _llava_resources(FakeRay({"CPU": 32.0, "GPU": 8.0}), LlavaOptions(replicas=3), None, None,
                         None)
    assert r["num_actors"] == 3 and r["num_gpus"] == 1
    with pytest.raises(CoregError, match="GPU"):
        _llava_resources(FakeRay({"CPU": 32.0, "GPU": 2.0}), LlavaOptions(tensor_parallel_size=4),
                         None, None, None)
    with pytest.raises(CoregError, match="GPU"):
        _llava_resources(FakeRay({"CPU": 32.0, "GPU": 4.0}),
                         LlavaOptions(tensor_parallel_size=2, replicas=3), None, None, None)


def test_engine_refusal_is_one_line(tmp_path, monkeypatch):
    d = _model_dir(tmp_path)
    monkeypatch.setattr(llava, "make_sampling_params", lambda opts, classes: None)

    class Refuses:
        def generate(self, *a, **k):
            raise ValueError("The decoder prompt (length 5000) is longer than the maximum model "
                             "length of 4096.\nmore")

    ann = llava.LlavaAnnotator(f"llava:{d}", CIFAR10, llm=Refuses())
    with pytest.raises(CoregError, match="max_model_len") as e:
        ann({"id": np.array([1]), "pixels": np.zeros((1, 8, 8, 3), np.uint8)})
    assert "\n" not in str(e.value) and "length 5000" in str(e.value)

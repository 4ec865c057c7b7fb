"""LoRA few-shot fine-tuning of LLaVA (coreg_ray.fewshot.lora) with transformers + peft on a
tiny random LLaVA built here (tests/vllm/tiny_llava.py). Needs no vLLM engine, only the
packages of the vLLM environment (transformers 5, peft from .ci/vllm-env.sh):
    .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm/test_lora.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft", reason="peft is installed by .ci/vllm-env.sh (or coreg-ray[lora])")

from coreg_ray.data import table_from_arrays  # noqa: E402
from coreg_ray.fewshot import lora  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from tests.vllm.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-lora"))


def _table(n_per_class, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    imgs = rng.integers(0, 255, size=(len(labels), 32, 32, 3)).astype(np.uint8)
    return table_from_arrays(imgs, labels, CLASSES)


def test_only_lora_parameters_get_gradients(tiny_llava):
    model, proc = lora.load_llava(tiny_llava, "cpu")
    pm = lora.add_lora(model, seed=0)
    prompt = lora.lora_prompt(CLASSES)
    answers = lora.answer_token_ids(proc.tokenizer, prompt, CLASSES)
    assert all(a[-1] == proc.tokenizer.eos_token_id for a in answers)
    t = _table(1, 0)
    b = lora.build_batch(proc, [lora._pil(t, i) for i in range(3)], prompt, answers, 3)
    assert int((b["labels"] != -100).sum()) == sum(len(a) for a in answers)
    pm.train()
    lora.answer_loss(pm, b, "cpu").backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    lora_names = {n for n, _ in pm.named_parameters() if "lora_" in n}
    assert with_grad == lora_names and len(lora_names) == 8  # 2 layers x q,v x A,B
    assert all(".language_model." in n and ("q_proj" in n or "v_proj" in n) for n in lora_names)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_train_lowers_answer_loss_and_adapter_reloads(tiny_llava, tmp_path):
    train, test = _table(2, 1), _table(1, 2)
    res = lora.train_lora_llava(tiny_llava, train, test, CLASSES, shots=2, seed=0, epochs=4,
                                lr=5e-3, batch_size=3, device="cpu", save_dir=tmp_path / "ad")
    assert res["num_train"] == 6 and res["steps"] == 8 and res["num_test"] == 3
    assert res["train_loss_after"] < res["train_loss_before"] - 0.1
    assert 0.0 <= res["test_accuracy"] <= 1.0
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    prompt = res["prompt"]
    images = [lora._pil(test, i) for i in range(len(test))]
    trained = res["model_obj"]
    _, proc = lora.load_llava(tiny_llava, "cpu")
    answers = lora.answer_token_ids(proc.tokenizer, prompt, CLASSES)
    s1 = lora.score_classes(trained, proc, images, prompt, answers, "cpu")
    assert np.array_equal(s1.argmax(1).numpy(), res["predictions"])
    # the KV-cache scorer agrees with one full forward per (image, class)
    s_naive = lora.score_classes_naive(trained, proc, images[:1], prompt, answers, "cpu")
    torch.testing.assert_close(s1[:1], s_naive, rtol=1e-4, atol=1e-4)
    # the saved adapter reloads onto a fresh base model and gives the same scores
    pm2, proc2, meta = lora.load_lora_llava(tiny_llava, tmp_path / "ad", "cpu")
    assert meta["classes"] == CLASSES and meta["shots"] == 2
    s2 = lora.score_classes(pm2, proc2, images, prompt, answers, "cpu")
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    # and differs from the base model's
    base, _ = lora.load_llava(tiny_llava, "cpu")
    s0 = lora.score_classes(base, proc, images, prompt, answers, "cpu")
    assert not torch.allclose(s0, s1, atol=1e-3)

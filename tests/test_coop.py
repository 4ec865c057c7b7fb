"""CoOp (coreg_ray.fewshot.coop) on a tiny random-weight open_clip model (ViT-S-32-alt at 32 px):
the embedding path reproduces open_clip's encode_text exactly, training moves only the context
and lowers the loss, and train_coop runs end to end on a few random images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from coreg_ray.annotate.clip import load_clip_model  # noqa: E402
from coreg_ray.data import table_from_arrays  # noqa: E402
from coreg_ray.errors import CoregError  # noqa: E402
from coreg_ray.fewshot.coop import PromptLearner, train_coop  # noqa: E402

SPEC = "clip:ViT-S-32-alt/random"
CLASSES = ["cat", "dog", "traffic light"]


@pytest.fixture(scope="module")
def clip_model():
    return load_clip_model(SPEC, "cpu")


def _tables(n_per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    c = len(CLASSES)
    labels = np.repeat(np.arange(c), n_per_class)
    # class-dependent colour so the task is learnable even with random towers
    base = rng.integers(0, 255, size=(c, 1, 1, 3))
    imgs = np.clip(base[labels] + rng.integers(-20, 20, size=(len(labels), 32, 32, 3)), 0, 255)
    t = table_from_arrays(imgs.astype(np.uint8), labels, CLASSES)
    return t


def test_context_from_prompt_reproduces_encode_text(clip_model):
    model, tok, _ = clip_model
    pl = PromptLearner(model, tok, CLASSES, ctx_init="a photo of a")
    assert pl.n_ctx == 4 and pl.prompts[2] == "a photo of a traffic light."
    with torch.no_grad():
        ours = pl()
        ref = model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the context is the only parameter; random init has the requested size
    assert [n for n, _ in pl.named_parameters()] == ["ctx"]
    pl16 = PromptLearner(model, tok, CLASSES, n_ctx=16, generator=torch.Generator().manual_seed(0))
    assert pl16.ctx.shape == (16, model.token_embedding.weight.shape[1])
    assert 0.01 < float(pl16.ctx.detach().std()) < 0.03
    csc = PromptLearner(model, tok, CLASSES, n_ctx=2, class_specific=True)
    assert csc.ctx.shape[:2] == (3, 2) and csc().shape == ref.shape
    with pytest.raises(CoregError, match="longer than the text context"):
        PromptLearner(model, tok, ["word " * 80], n_ctx=4)


def test_training_lowers_loss_and_moves_only_the_context(clip_model):
    model, tok, prep = clip_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = _tables()
    res = train_coop(SPEC, table, table, shots=2, seed=0, epochs=8, n_ctx=4, batch_size=6,
                     lr=0.5, warmup_epochs=0, augment=False, model=model, tokenizer=tok, prep=prep)
    assert res["num_train"] == 6 and res["num_test"] == 9 and len(res["losses"]) == 8
    assert res["losses"][-1] < res["losses"][0]
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["seconds"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # both towers frozen
    assert all(not p.requires_grad for p in model.parameters())
    # the context did move away from its random init
    init = PromptLearner(model, tok, CLASSES, n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(init.ctx, res["ctx"])


def test_train_coop_with_augmentation_and_saving(clip_model, tmp_path):
    model, tok, prep = clip_model
    table = _tables(n_per_class=2)
    res = train_coop(SPEC, table, None, shots=1, seed=3, epochs=1, n_ctx=2, augment=True,
                     model=model, tokenizer=tok, prep=prep, save_path=str(tmp_path / "ctx.pt"))
    assert res["test_accuracy"] is None and res["num_train"] == 3
    saved = torch.load(tmp_path / "ctx.pt")
    assert saved["ctx"].shape == res["ctx"].shape and saved["classnames"] == CLASSES
    with pytest.raises(CoregError, match="shots"):
        train_coop(SPEC, table, None, shots=0, seed=0, model=model, tokenizer=tok, prep=prep)


@pytest.mark.parametrize("pad_mask", [False, True])
def test_custom_text_tower_reproduces_encode_text(pad_mask):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    torch.manual_seed(0)
    model = CustomTextCLIP(
        32, CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=1,
                    no_causal_mask=pad_mask)).eval()
    if pad_mask:
        model.text.use_pad_mask = True
    tok = open_clip.get_tokenizer("ViT-S-32-alt")
    pl = PromptLearner(model, tok, CLASSES, ctx_init="a photo of a")
    with torch.no_grad():
        ref = model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]))
        torch.testing.assert_close(pl(), ref, rtol=1e-5, atol=1e-5)


def test_sweep_rows_through_run_fewshot():
    from coreg_ray.fewshot import run_fewshot

    table = _tables(n_per_class=2)
    rows = run_fewshot("coop", SPEC, table, table, shots=(1, 2), seeds=(0,), epochs=1, n_ctx=2,
                       augment=False)
    assert [(r["shots"], r["seed"], r["num_train"]) for r in rows] == [(1, 0, 3), (2, 0, 6)]
    assert all("ctx" not in r and 0 <= r["test_accuracy"] <= 1 for r in rows)
    with pytest.raises(CoregError, match="coop, lora"):
        run_fewshot("adapter", SPEC, table, table)


def test_coop_through_run_method_uses_the_fewshot_config():
    from coreg_ray.errors import NotApplicable
    from coreg_ray.methods import run_method
    from tests.conftest import tiny_config

    table = _tables(n_per_class=2)
    cfg = tiny_config(**{"fewshot.shots": 2, "fewshot.seed": 0})
    out = run_method("coop", cfg, table, None, table,
                     params={"model": SPEC, "epochs": 1, "n_ctx": 2, "augment": False})
    assert out["method"] == "coop" and out["shots"] == 2 and 0 <= out["test_accuracy"] <= 1
    with pytest.raises(CoregError, match="params.coop.model"):
        run_method("coop", cfg, table, None, table, params={"epochs": 1})
    with pytest.raises(NotApplicable, match="fewshot.shots >= 1"):
        run_method("coop", tiny_config(), table, None, table, params={"model": SPEC})

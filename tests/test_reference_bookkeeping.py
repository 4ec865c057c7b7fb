"""Co-Reg's bookkeeping pinned to the authors' code (Portugas0807/Co-Reg, train.py / model.py):
per-view BatchNorm forwards, the contrastive branch run from the first post-warm-up epoch,
per-net warm-up passes that keep the last partial batch, and the per-sample prediction table
behind distribution alignment."""
import numpy as np
import torch

from coreg_ray.coreg.labels import distribution_alignment
from coreg_ray.coreg.trainer import CoReg
from coreg_ray.data import synthetic_annotations
from tests.conftest import tiny_config


def _bn_updates(net) -> int:
    """Train-mode forwards seen by the first BatchNorm layer (its num_batches_tracked)."""
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    return int(bn.num_batches_tracked)


def _setup(digits, n=300, **over):
    train, _ = digits
    train = train.subset(np.arange(n))
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.2, eta=0.1, seed=0)
    cfg = tiny_config(**{"train.epochs": 3, "train.warmup_epochs": 1, "coreg.feature_delay": 5,
                         **over})
    trainer = CoReg(cfg, progress=False)
    trainer._prepare(train, ann, None)
    return trainer


def test_warmup_each_net_own_shuffle_and_last_partial_batch_kept(digits):
    trainer = _setup(digits, n=300, **{"train.warmup_batch_size": 128})
    b0 = trainer._shard(0, 128, stream=0, keep_last=True)
    b1 = trainer._shard(0, 128, stream=1, keep_last=True)
    # 300 = 128 + 128 + 44: every sample once per net, the partial batch kept
    assert [len(b) for b in b0] == [128, 128, 44]
    assert sorted(torch.cat(b0).tolist()) == list(range(300))
    assert sorted(torch.cat(b1).tolist()) == list(range(300))
    assert not torch.equal(torch.cat(b0), torch.cat(b1))  # each net its own shuffle
    before = [_bn_updates(n) for n in trainer.raw_nets]
    trainer.warmup_epoch(0)
    assert [_bn_updates(n) - b for n, b in zip(trainer.raw_nets, before)] == [3, 3]


def test_warmup_fills_the_prediction_table(digits):
    trainer = _setup(digits)
    uniform = torch.full_like(trainer.pred_table[0], 0.1)
    assert torch.equal(trainer.pred_table[0], uniform)
    trainer.warmup_epoch(0)
    for table in trainer.pred_table:
        assert not torch.isclose(table, uniform).all(1).any()  # every row written
        assert torch.allclose(table.sum(1), torch.ones(len(table)))


def test_alignment_divides_each_chunk_by_the_table_mean_so_far(digits):
    trainer = _setup(digits, n=300, **{"train.eval_batch_size": 100})
    old = torch.softmax(torch.randn(300, 10), 1)
    new = torch.softmax(torch.randn(300, 10), 1)
    trainer.pred_table[0] = old.clone()
    out = trainer._align(0, new)
    # chunk 2 (rows 100-199) sees rows 0-199 new and rows 200-299 still old
    table = torch.cat([new[:200], old[200:]])
    assert torch.allclose(out[100:200], distribution_alignment(new[100:200], table.mean(0)))
    assert torch.allclose(out[200:], distribution_alignment(new[200:], new.mean(0)))
    assert torch.equal(trainer.pred_table[0], new)


def test_coreg_step_forwards_each_view_and_the_contrastive_branch(digits):
    """Per step the trained net runs in train mode: 4 weak views one by one, the mixed batch,
    the unmixed strong query views = 6 BatchNorm updates; the key net runs once. Also in the
    first post-warm-up epoch, before the feature terms are switched on (feature_delay 5)."""
    trainer = _setup(digits, n=300)
    trainer.warmup_epoch(0)
    trainer.divide(1)
    for key, raw in zip(trainer.key_nets, trainer.raw_nets):
        key.load_state_dict(raw.state_dict())
    is_p = trainer.split_w[1] > trainer.cfg.coreg.p_threshold
    steps = len(trainer._split_batches(1, 0, is_p))
    assert steps >= 1
    before, key_before = _bn_updates(trainer.raw_nets[0]), _bn_updates(trainer.key_nets[0])
    queue = trainer.queues[0]
    assert (queue.labels == -1).all()
    acc = trainer.train_net(1, 0, 1)
    assert int(acc["steps"]) == steps
    assert _bn_updates(trainer.raw_nets[0]) - before == 6 * steps
    assert _bn_updates(trainer.key_nets[0]) - key_before == steps
    # the queue fills and the loss terms stay off while epoch <= warm-up + feature_delay
    assert (queue.labels >= 0).sum() > 0
    assert float(acc["loss_cont"]) == 0.0 and float(acc["loss_prot"]) == 0.0
    assert trainer.prototypes.abs().sum() > 0  # prototypes follow P's weak features already


def test_dividemix_runs_no_contrastive_branch(digits):
    trainer = _setup(digits, n=300, **{"coreg.contrastive": False, "coreg.prototypes": False})
    trainer.warmup_epoch(0)
    trainer.divide(1)
    is_p = trainer.split_w[1] > trainer.cfg.coreg.p_threshold
    steps = len(trainer._split_batches(1, 0, is_p))
    before = _bn_updates(trainer.raw_nets[0])
    trainer.train_net(1, 0, 1)
    assert _bn_updates(trainer.raw_nets[0]) - before == 5 * steps  # 4 weak + mixed
    assert (trainer.queues[0].labels == -1).all()

"""Co-Reg's bookkeeping pinned to the authors' code (Portugas0807/Co-Reg, train.py / model.py /
datasets): per-view BatchNorm forwards, the contrastive branch run from the first post-warm-up
epoch, per-net warm-up passes that keep the last partial batch, the per-sample prediction table
behind distribution alignment (in chunks of one training batch), P passes that train their last
partial batch, U from a shuffled loader iterated again when it runs out, prototypes updated
before the step's prototype loss, MoCo queues that start random."""
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
    """Chunks of one training batch (the reference's eval loader has the training batch size);
    the forward's own chunk size (train.eval_batch_size) changes nothing."""
    trainer = _setup(digits, n=300, **{"train.batch_size": 100, "train.eval_batch_size": 64})
    old = torch.softmax(torch.randn(300, 10), 1)
    new = torch.softmax(torch.randn(300, 10), 1)
    trainer.pred_table[0] = old.clone()
    out = trainer._align(0, new)
    # chunk 2 (rows 100-199) sees rows 0-199 new and rows 200-299 still old
    table = torch.cat([new[:200], old[200:]])
    assert torch.allclose(out[100:200], distribution_alignment(new[100:200], table.mean(0)))
    assert torch.allclose(out[200:], distribution_alignment(new[200:], new.mean(0)))
    assert torch.allclose(out[:100], distribution_alignment(
        new[:100], torch.cat([new[:100], old[100:]]).mean(0)))
    assert torch.equal(trainer.pred_table[0], new)


def test_p_pass_trains_its_last_partial_batch_and_u_is_reshuffled_when_used_up(digits):
    """300 rows, 130 in P, batch 64: P batches 64, 64, 2 (every P row once); U (170 rows) comes
    as the reference's loader gives it: 64, 64, 42 (one shuffled pass, its last batch smaller),
    then a new shuffle. No batch of one row (BatchNorm cannot train on it)."""
    trainer = _setup(digits, n=300)
    is_p = torch.zeros(300, dtype=torch.bool)
    is_p[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:130]] = True
    batches = trainer._split_batches(1, 0, is_p)
    assert [len(ix) for ix, _ in batches] == [64, 64, 2]
    p_rows = torch.cat([ix for ix, _ in batches])
    assert sorted(p_rows.tolist()) == torch.nonzero(is_p).view(-1).tolist()
    assert [len(iu) for _, iu in batches] == [64, 64, 42]
    assert sorted(torch.cat([iu for _, iu in batches]).tolist()) == \
        torch.nonzero(~is_p).view(-1).tolist()  # one whole U pass, every U row once
    # more P steps than one U pass holds: the U loader starts a new shuffle
    is_p[:] = False
    is_p[:250] = True
    batches = trainer._split_batches(1, 0, is_p)
    assert [len(ix) for ix, _ in batches] == [64, 64, 64, 58]
    us = [iu for _, iu in batches]
    assert [len(iu) for iu in us] == [50, 50, 50, 50]  # 50 U rows: a full pass per step
    assert all(sorted(iu.tolist()) == list(range(250, 300)) for iu in us)
    assert not all(torch.equal(us[0], iu) for iu in us[1:])  # each pass its own shuffle
    # a last P batch of one row is dropped; a U pass's last row is left for the next shuffle
    is_p[:] = False
    is_p[:129] = True
    assert [len(ix) for ix, _ in trainer._split_batches(1, 0, is_p)] == [64, 64]
    is_p[:] = False
    is_p[:200] = True  # 100 U rows: 64, then 36
    assert [len(iu) for _, iu in trainer._split_batches(1, 0, is_p)] == [64, 36, 64, 36]
    is_p[:] = True
    is_p[-65:] = False  # 65 U rows: 64, then a single row -> skipped
    assert [len(iu) for _, iu in trainer._split_batches(1, 0, is_p)] == [64, 64, 64, 64]


def test_prototypes_are_updated_before_the_prototype_loss(digits, monkeypatch):
    """The reference calls update_proto on P's weak features, then the prototype loss: the
    loss of a step sees the prototypes that step's update made."""
    import coreg_ray.coreg.trainer as mod

    trainer = _setup(digits, n=300, **{"coreg.feature_delay": 0})
    trainer.warmup_epoch(0)
    trainer.divide(1)
    events, real_update, real_loss = [], mod.update_prototypes, mod.prototype_alignment_loss

    def update(*a, **k):
        out = real_update(*a, **k)
        events.append(("update", out.clone()))
        return out

    def loss(z, prototypes, *a, **k):
        events.append(("loss", prototypes.clone()))
        return real_loss(z, prototypes, *a, **k)

    monkeypatch.setattr(mod, "update_prototypes", update)
    monkeypatch.setattr(mod, "prototype_alignment_loss", loss)
    acc = trainer.train_net(2, 0, 1)  # epoch 2 > warm-up 1 + delay 0: the loss is on
    steps = int(acc["steps"])
    assert steps >= 2 and [e[0] for e in events] == ["update", "loss"] * steps
    for (_, made), (_, seen) in zip(events[::2], events[1::2]):
        assert torch.equal(made, seen)


def test_queue_starts_random_and_matters_only_until_keys_overwrite_it(digits, monkeypatch):
    """The reference's start: random labels and flags, column-normalised Gaussian features.
    Once the keys of the epochs before the contrastive loss fill the queue, a random and an
    empty start give the same run bit for bit; with the loss on at once they do not."""
    import coreg_ray.coreg.trainer as mod
    from coreg_ray.coreg.moco import MoCoQueue

    trainer = _setup(digits, n=300, **{"coreg.queue_size": 64})
    q = trainer.queues[0]
    assert q.ptr == 0 and (q.labels >= 0).all() and (q.labels < 10).all()
    assert q.labels.unique().numel() == 10 and 0 < int(q.is_p.sum()) < 64
    assert torch.allclose(q.feats.norm(dim=0), torch.ones(q.feats.shape[1]))
    assert not torch.equal(trainer.queues[0].feats, trainer.queues[1].feats)

    def history(delay, start, size=64):
        if start == "empty":
            monkeypatch.setattr(mod.MoCoQueue, "random", lambda size, dim, c, dev, seed:
                                MoCoQueue.empty(size, dim, dev))
        else:
            monkeypatch.undo()
        train, test = digits
        train = train.subset(np.arange(300))
        ann = synthetic_annotations(train.ids, train.labels, 10, q=0.2, eta=0.1, seed=0)
        t = CoReg(tiny_config(**{"train.epochs": 4, "train.warmup_epochs": 1,
                                 "coreg.feature_delay": delay, "coreg.queue_size": size}),
                  progress=False)
        t.fit(train, ann, test.subset(np.arange(100)))
        return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in t.history]

    # the loss is on from epoch 2 + delay; every post-warm-up epoch pushes >= 64 keys per queue
    assert history(1, "random") == history(1, "empty")
    assert history(1, "random", size=4096) != history(1, "empty", size=4096)


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
    start = queue.feats.clone()
    assert queue.ptr == 0
    acc = trainer.train_net(1, 0, 1)
    assert int(acc["steps"]) == steps
    assert _bn_updates(trainer.raw_nets[0]) - before == 6 * steps
    assert _bn_updates(trainer.key_nets[0]) - key_before == steps
    # the queue fills and the loss terms stay off while epoch <= warm-up + feature_delay
    assert queue.ptr > 0 and not torch.equal(queue.feats, start)
    assert float(acc["loss_cont"]) == 0.0 and float(acc["loss_prot"]) == 0.0
    assert trainer.prototypes.abs().sum() > 0  # prototypes follow P's weak features already


def test_dividemix_runs_no_contrastive_branch(digits):
    trainer = _setup(digits, n=300, **{"coreg.contrastive": False, "coreg.prototypes": False})
    trainer.warmup_epoch(0)
    trainer.divide(1)
    is_p = trainer.split_w[1] > trainer.cfg.coreg.p_threshold
    steps = len(trainer._split_batches(1, 0, is_p))
    before = _bn_updates(trainer.raw_nets[0])
    start = trainer.queues[0].feats.clone()
    trainer.train_net(1, 0, 1)
    assert _bn_updates(trainer.raw_nets[0]) - before == 5 * steps  # 4 weak + mixed
    assert trainer.queues[0].ptr == 0 and torch.equal(trainer.queues[0].feats, start)


def test_queue_push_of_more_keys_than_slots_keeps_the_last_as_sequential_writes_would():
    from coreg_ray.coreg.moco import MoCoQueue

    q = MoCoQueue.empty(3, 2, torch.device("cpu"))
    q.push(torch.zeros(1, 2), torch.tensor([9]), torch.tensor([False]))  # ptr -> 1
    keys = torch.arange(10.0).view(5, 2)  # keys 0..4 into slots 1, 2, 0, 1, 2
    q.push(keys, torch.arange(5), torch.tensor([True, False, True, False, True]))
    assert q.labels.tolist() == [2, 3, 4] and q.ptr == 0
    assert torch.equal(q.feats, keys[[2, 3, 4]]) and q.is_p.tolist() == [True, False, True]

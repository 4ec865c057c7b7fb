"""Two gloo ranks, each owning half the table, train the model one process trains: with the
random views switched off and one process given the union of the two ranks' batches, a
warm-up epoch ends with the same weights and BatchNorm statistics, the divide that follows
finds the same P/U split, and a Co-Reg epoch (both nets' passes, the prototypes, the MoCo
queues) ends with the same weights again (BatchNorm over every rank's rows, gradients averaged
by DDP, the divide's collectives in one process's order, the gathered features). What is left
to differ between the paths is the random draws."""
import numpy as np
import pytest
import torch

from tests.conftest import run_gloo_ranks

N = 384  # rows (192 a rank): 3 warm-up batches of 128 (64 a rank)


def _inputs():
    from coreg_ray.data import load_image_table, synthetic_annotations

    train = load_image_table("digits:train").subset(np.arange(N))
    return train, synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)


def _config():
    from tests.conftest import tiny_config

    # MixUp's lambda ~ Beta(1e-3, 1e-3), kept >= 0.5: 1 up to ~1e-300, so that one process's
    # single lambda per step and the ranks' own lambdas mix alike (not at all)
    return tiny_config(**{"model.backbone": "small_cnn", "train.warmup_batch_size": 128,
                          "train.batch_size": 64, "train.epochs": 4, "train.warmup_epochs": 1,
                          "coreg.mixup_alpha": 0.001, "coreg.queue_size": 4096})


def _no_views(trainer):
    trainer.aug.strong = trainer.aug.weak = trainer.aug.plain  # no random draws in the views


def _weights():
    """Clean probabilities set by hand before the Co-Reg epoch: P rows in both halves (after
    one warm-up epoch the divide's alignment, in row order as the reference runs it, can put
    every P row in the first half, and a pass with no P rows on a rank trains nothing)."""
    return [torch.rand(N, generator=torch.Generator().manual_seed(5 + k)) for k in range(2)]


def _state(trainer):
    """Both networks' weights and BatchNorm statistics (the key networks' too)."""
    return {f"net{k}.{name}": v.detach().clone() for k, net in enumerate(trainer.raw_nets)
            for name, v in net.state_dict().items()} | {
            f"key{k}.{name}": v.detach().clone() for k, net in enumerate(trainer.key_nets)
            for name, v in net.state_dict().items()}


def _rank(rank, store, out):
    import torch.distributed as dist

    from coreg_ray.coreg.comm import TorchDistComm
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data.shards import Shard

    import coreg_ray.coreg.trainer as trainer_module

    trainer_module.ALIGN_BLOCK_ROWS = 96  # one 64-row chunk a collective: blocks cross the ranks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    train, ann = _inputs()
    shard = Shard(rank, 2, N)
    rows = np.arange(*shard.bounds)
    trainer = CoReg(_config(), comm=TorchDistComm(), shard=shard, progress=False)
    trainer._prepare(train.subset(rows), ann.subset(rows), None)
    _no_views(trainer)
    trainer.warmup_epoch(0)
    state = _state(trainer)
    trainer.divide(1)
    split = [w.clone() for w in trainer.split_w]
    trainer.split_w = [w[slice(*shard.bounds)] for w in _weights()]
    trainer.coreg_epoch(1)
    torch.save((state, split, _state(trainer), trainer.prototypes.clone(),
                [q.feats.clone() for q in trainer.queues]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_and_divide_as_one_process(tmp_path, monkeypatch):
    import coreg_ray.coreg.trainer as trainer_module
    from coreg_ray.coreg.sampling import shard as rank_batches
    from coreg_ray.coreg.sampling import split_batches
    from coreg_ray.coreg.trainer import CoReg

    run_gloo_ranks(_rank, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    class Rank:  # the batches rank r draws (each rank shuffles its own rows)
        world_size = 2
        all_reduce_min = staticmethod(lambda t: t)

        def __init__(self, r):
            self.rank = r

    def union(n, seed, batch, comm, device, keep_last=False):
        half = [rank_batches(n // 2, seed, batch, Rank(r), device, keep_last) for r in range(2)]
        return [torch.cat([a, b + n // 2]) for a, b in zip(*half)]

    def union_split(is_p, seed, batch, comm, device, use_unlabeled=True):
        """The (P, U) batches the two ranks draw from their halves of `is_p`, side by side."""
        halves = is_p.view(2, -1)
        counts = [(int(h.sum()), int((~h).sum())) for h in halves]

        class Both(Rank):  # split_batches reduces [P, U, -P] with one min
            def all_reduce_min(self, t):
                return torch.tensor([[p, u, -p] for p, u in counts]).min(0).values

        parts = [split_batches(h, seed, batch, Both(r), device, use_unlabeled)
                 for r, h in enumerate(halves)]
        off = len(is_p) // 2
        return [(torch.cat([p0, p1 + off]), torch.cat([u0, u1 + off]))
                for (p0, u0), (p1, u1) in zip(*parts)]

    monkeypatch.setattr(trainer_module, "shard", union)
    monkeypatch.setattr(trainer_module, "split_batches", union_split)
    train, ann = _inputs()
    one = CoReg(_config(), progress=False)
    one._prepare(train, ann, None)
    _no_views(one)
    one.warmup_epoch(0)
    _same(_state(one), ranks, 0)  # every rank holds one process's weights and statistics
    one.divide(1)
    for k in range(2):  # the same split (alignment in one process's chunk order)
        split = torch.cat([ranks[0][1][k], ranks[1][1][k]])
        assert torch.equal(split > 0.5, one.split_w[k] > 0.5)
        torch.testing.assert_close(split, one.split_w[k], rtol=0, atol=1e-4)
    warm = _state(one)
    one.split_w = _weights()
    stats = one.coreg_epoch(1)  # a Co-Reg epoch: both nets' passes, prototypes, MoCo queues
    after = _state(one)
    assert stats["loss_x"] > 0 and not torch.equal(after["net0.backbone.net.0.weight"],
                                                   warm["net0.backbone.net.0.weight"])
    _same(after, ranks, 2)
    for r in range(2):
        torch.testing.assert_close(ranks[r][3], one.prototypes, rtol=1e-4, atol=1e-5)
        for k in range(2):  # the same keys; within a step the ranks' keys are gathered rank
            # by rank ([P, U] of rank 0, then of rank 1), one process's in view order ([P of
            # both, U of both]): the queue (large enough here to keep them all) holds the same
            # set, and the contrastive loss reads it as a set
            torch.testing.assert_close(_rows(ranks[r][4][k]), _rows(one.queues[k].feats),
                                       rtol=1e-4, atol=1e-5)


def _rows(feats):
    """The rows of `feats` in an order that does not depend on where they were written."""
    key = feats @ torch.linspace(1.0, 2.0, feats.shape[1])
    return feats[key.argsort()]


def _same(state, ranks, at):
    for name, v in state.items():
        for r in range(2):
            torch.testing.assert_close(ranks[r][at][name].float(), v.float(), rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"rank {r}, {name}: {m}")

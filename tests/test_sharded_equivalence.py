"""Two gloo ranks, each owning half the table, train the model one process trains: with the
random views switched off and one process given the union of the two ranks' batches, a
warm-up epoch ends with the same weights and BatchNorm statistics, and the divide that follows
finds the same P/U split (BatchNorm over every rank's rows, gradients averaged by DDP, the
divide's collectives). What is left to differ between the paths is the random draws."""
import numpy as np
import pytest
import torch

N = 384  # rows (192 a rank): 3 warm-up batches of 128 (64 a rank)


def _inputs():
    from coreg_ray.data import load_image_table, synthetic_annotations

    train = load_image_table("digits:train").subset(np.arange(N))
    return train, synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)


def _config():
    from tests.conftest import tiny_config

    return tiny_config(**{"model.backbone": "small_cnn", "train.warmup_batch_size": 128,
                          "train.batch_size": 64, "train.epochs": 4, "train.warmup_epochs": 2})


def _no_views(trainer):
    trainer.aug.strong = trainer.aug.weak = trainer.aug.plain  # no random draws in the views


def _state(trainer):
    return {f"net{k}.{name}": v.detach().clone() for k, net in enumerate(trainer.raw_nets)
            for name, v in net.state_dict().items()}


def _rank(rank, store, out):
    import torch.distributed as dist

    from coreg_ray.coreg.comm import TorchDistComm
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data.shards import Shard

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
    torch.save((state, [w.clone() for w in trainer.split_w]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_and_divide_as_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    import coreg_ray.coreg.trainer as trainer_module
    from coreg_ray.coreg.sampling import shard as rank_batches
    from coreg_ray.coreg.trainer import CoReg

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, tmp_path / "store", tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    class Rank:  # the batches rank r draws (each rank shuffles its own rows)
        world_size = 2
        all_reduce_min = staticmethod(lambda t: t)

        def __init__(self, r):
            self.rank = r

    def union(n, seed, batch, comm, device, keep_last=False):
        half = [rank_batches(n // 2, seed, batch, Rank(r), device, keep_last) for r in range(2)]
        return [torch.cat([a, b + n // 2]) for a, b in zip(*half)]

    monkeypatch.setattr(trainer_module, "shard", union)
    train, ann = _inputs()
    one = CoReg(_config(), progress=False)
    one._prepare(train, ann, None)
    _no_views(one)
    one.warmup_epoch(0)
    state = _state(one)
    for name, v in state.items():  # every rank holds one process's weights and statistics
        for r in range(2):
            torch.testing.assert_close(ranks[r][0][name].float(), v.float(), rtol=1e-4,
                                       atol=1e-5, msg=name)
    one.divide(1)
    for k in range(2):
        split = torch.cat([ranks[0][1][k], ranks[1][1][k]])
        assert ((split > 0.5) == (one.split_w[k] > 0.5)).float().mean() > 0.99
        torch.testing.assert_close(split, one.split_w[k], rtol=0, atol=1e-3)

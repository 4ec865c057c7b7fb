"""`sampling.split_batches` with several ranks: equal step counts and batch sizes on every rank
(DDP and the all_gathers need them), and no P row of any rank left out of its pass."""
import torch

from coreg_ray.coreg.sampling import split_batches


class _Ranks:
    """Rank `rank` of a group whose min collective is answered from every rank's (P, U) counts,
    given up front: split_batches reduces [P, U, -P] (the max of P as the min of -P)."""

    def __init__(self, rank: int, counts: list):
        self.rank, self.world_size, self.counts = rank, len(counts), counts

    def all_reduce_min(self, t):
        sent = torch.tensor([[p, u, -p] for p, u in self.counts])
        assert t.tolist() == sent[self.rank].tolist()  # what this rank sends
        return sent.min(0).values


def _split(p_counts, n=400, batch=64):
    masks = []
    for r, p in enumerate(p_counts):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=torch.Generator().manual_seed(r))[:p]] = True
        masks.append(m)
    counts = [(int(m.sum()), int((~m).sum())) for m in masks]
    return masks, [split_batches(m, 7, batch, _Ranks(r, counts), "cpu")
                   for r, m in enumerate(masks)]


def test_every_rank_trains_every_p_row_with_equal_batches():
    masks, out = _split([150, 97])  # rank 1 has fewer P rows: it fills up, rank 0 drops none
    sizes = [[(len(ix), len(iu)) for ix, iu in b] for b in out]
    assert sizes[0] == sizes[1]
    assert sum(len(ix) for ix, _ in out[0]) == 150 and all(s == 32 for s, _ in sizes[0][:-1])
    for m, batches in zip(masks, out):
        p = torch.cat([ix for ix, _ in batches])
        assert m[p].all()  # P batches hold P rows only, U batches U rows only
        assert (~m[torch.cat([iu for _, iu in batches])]).all()
        assert set(p.tolist()) == set(torch.nonzero(m).view(-1).tolist())  # none left out
    p1 = torch.cat([ix for ix, _ in out[1]])
    assert len(p1) == 150 and len(set(p1.tolist())) == 97  # 53 of its rows a second time


def test_a_rank_with_fewer_than_two_p_rows_stops_every_rank():
    _, out = _split([150, 1])
    assert out == [[], []]


def test_one_rank_is_the_reference_pass():
    masks, out = _split([150])
    assert [len(ix) for ix, _ in out[0]] == [64, 64, 22]
    assert sorted(torch.cat([ix for ix, _ in out[0]]).tolist()) == \
        torch.nonzero(masks[0]).view(-1).tolist()

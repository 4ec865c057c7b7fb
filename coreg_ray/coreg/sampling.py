"""Which samples and which random views each rank gets, epoch by epoch: every seed of a Co-Reg
run from one formula (`epoch_seed`), and the index batches (`shard`, `split_batches`).

Draws are re-seeded per epoch, so a resumed run replays exactly the epochs a killed run would
have run. Batch orders are shared by every rank (each rank then takes its share); view draws
(augmentations, MixUp) are each rank's own, so N workers draw independent but reproducible
views. The constants are those every recorded run was made with: changing one changes every
number (the quickstart's table included).
"""
from __future__ import annotations

import torch

RUN_STRIDE = 1_000_003  # a prime: seeds of runs with other train.seed values lie this far apart
NET_STREAM = 7_777  # warm-up: net k shuffles as stream k * NET_STREAM
VIEW_STREAM = 7_919  # a Co-Reg pass's view draws (its batch order is stream 0)
RANK_STRIDE = 1_009  # a rank's view seed: base * RANK_STRIDE + rank


def coreg_pass(epoch: int, net: int) -> int:
    """A post-warm-up epoch has two passes (net 0 trains, then net 1), each seeded as an epoch
    of its own: 2 * epoch + net."""
    return 2 * epoch + net


def epoch_seed(seed: int, epoch: int, stream: int = 0, rank: int | None = None) -> int:
    """seed * 1_000_003 + epoch + stream: a batch order, shared by every rank; with `rank`, that
    rank's view seed, (seed * 1_000_003 + epoch + stream) * 1_009 + rank. A run's seeds:

        warm-up, net k's batch order     epoch_seed(seed, epoch, k * NET_STREAM)
        warm-up and divide views         epoch_seed(seed, epoch, rank=rank)
        Co-Reg pass of net a, batches    epoch_seed(seed, coreg_pass(epoch, a))
        Co-Reg pass of net a, views      epoch_seed(seed, coreg_pass(epoch, a), VIEW_STREAM, rank)
    """
    base = seed * RUN_STRIDE + epoch + stream
    return base if rank is None else base * RANK_STRIDE + rank


def shard(n: int, seed: int, batch: int, comm, device, keep_last: bool = False):
    """This rank's batches of one epoch: a permutation of range(n) shared by all ranks (`seed`),
    dealt round-robin. `batch` is the global batch: each of W ranks takes batch // W, and every
    rank gets the same number of batches of the same sizes (the permutation's last n mod W
    samples sit out this epoch), so DDP's collectives match. `keep_last` keeps the last
    partial batch (the reference's warm-up loader does)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    w = comm.world_size
    mine = perm[:(n // w) * w][comm.rank::w].to(device)
    batch = min(max(1, batch // w), len(mine))
    steps = -(-len(mine) // batch) if keep_last else max(1, len(mine) // batch)
    return [mine[i * batch:(i + 1) * batch] for i in range(steps)]


def split_batches(is_p: torch.Tensor, seed: int, batch: int, comm, device, use_unlabeled=True):
    """(P, U) index batches of one net's pass: as many steps as P fills full batches on this
    rank; U is cycled to give every step a U batch of the same size (None: no U). Global batch,
    equal shares: every rank gets the same number of equal-sized batches (the split is the same
    on all ranks), which DDP and the all_gathers need."""
    r, w = comm.rank, comm.world_size
    bs = max(1, batch // w)
    g = torch.Generator().manual_seed(seed)
    p_idx = torch.nonzero(is_p.cpu()).view(-1)  # one host sync per epoch
    u_idx = torch.nonzero(~is_p.cpu()).view(-1)
    p_idx = p_idx[torch.randperm(len(p_idx), generator=g)]
    u_idx = u_idx[torch.randperm(len(u_idx), generator=g)]
    p_mine = p_idx[:(len(p_idx) // w) * w][r::w].to(device)
    u_mine = u_idx[:(len(u_idx) // w) * w][r::w].to(device)
    if len(p_mine) == 0:
        return []
    bs = min(bs, len(p_mine))
    batches = []
    for i in range(len(p_mine) // bs):
        ix = p_mine[i * bs:(i + 1) * bs]
        iu = u_mine[(i * bs + torch.arange(bs, device=device)) % len(u_mine)] \
            if len(u_mine) and use_unlabeled else None
        batches.append((ix, iu))
    return batches

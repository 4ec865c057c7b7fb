"""Which samples and which random views each rank gets, epoch by epoch: every seed of a Co-Reg
run from one formula (`epoch_seed`), and the index batches (`shard`, `split_batches`).

Draws are re-seeded per epoch, so a resumed run replays exactly the epochs a killed run would
have run. Each rank shuffles its own rows (its shard of the table; one process: all of them)
and every rank makes the same number of steps; view draws (augmentations, MixUp) are each
rank's own, so N workers draw independent but reproducible
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


SHARD_STRIDE = 104_729  # a prime: rank r shuffles its own rows with seed + r * SHARD_STRIDE


def _rank_generator(seed: int, rank: int) -> torch.Generator:
    """Rank r's shuffles of its own rows (rank 0, and so one process, uses `seed` itself)."""
    return torch.Generator().manual_seed(seed + rank * SHARD_STRIDE)


def shard(n: int, seed: int, batch: int, comm, device, keep_last: bool = False):
    """This rank's batches of one epoch over its own `n` rows (local indices; every rank owns a
    contiguous shard of the table, `coreg_ray.data.shards`): a permutation of range(n) seeded
    per rank, of which every rank keeps as many as the smallest shard holds. `batch` is the
    global batch: each of W ranks takes batch // W, and every rank gets the same number of
    batches of the same sizes, so DDP's collectives match. `keep_last` keeps the last partial
    batch (the reference's warm-up loader does). One process: a permutation of all n rows."""
    w = comm.world_size
    perm = torch.randperm(n, generator=_rank_generator(seed, comm.rank))
    m = n if w == 1 else int(comm.all_reduce_min(torch.tensor([n], device=device)).item())
    mine = perm[:m].to(device)
    batch = min(max(1, batch // w), m)
    steps = -(-m // batch) if keep_last else max(1, m // batch)
    return [mine[i * batch:(i + 1) * batch] for i in range(steps)]


def split_batches(is_p: torch.Tensor, seed: int, batch: int, comm, device, use_unlabeled=True):
    """(P, U) index batches of one net's pass over this rank's rows (`is_p`: its own rows'
    split), as the reference's two loaders give them: one shuffled pass over P, its last partial
    batch kept; U from a shuffled loader that is iterated again (a fresh shuffle) each time it
    runs out, its last batch of a pass smaller. None for U: no U rows (on every rank if one has
    none) or `use_unlabeled` off.

    A batch of one row is never made (the projection head's BatchNorm cannot train on it; the
    reference stops with an error there): a last P batch of one row is dropped, a last U batch
    of one row is skipped for the next shuffle's first.

    Several ranks (every rank must make the same number of steps with batches of the same
    sizes, which DDP and the all_gathers need): every rank's P pass is as long as the largest
    rank's P count, so no P row goes untrained; a rank with fewer P rows fills its pass with
    rows of a fresh shuffle of its own P rows (as `DistributedSampler` pads), a few rows twice.
    U: each shuffle gives as many rows as the rank with the fewest U rows holds (U is drawn
    round after round anyway). No rank has 2 P rows: no batches on any."""
    w = comm.world_size
    bs = max(1, batch // w)
    g = _rank_generator(seed, comm.rank)
    p_idx = torch.nonzero(is_p.cpu()).view(-1)  # one host sync per epoch
    u_idx = torch.nonzero(~is_p.cpu()).view(-1)
    p_order = torch.randperm(len(p_idx), generator=g)
    u_order = torch.randperm(len(u_idx), generator=g)
    p_least, u_least, p_most = len(p_idx), len(u_idx), len(p_idx)
    if w > 1:  # one collective: the max of P is minus the min of -P
        p_least, u_least, neg_most = comm.all_reduce_min(torch.tensor(
            [p_least, u_least, -p_most], device=device)).tolist()
        p_most = -int(neg_most)
    if p_least < 2:
        return []
    p_mine = p_idx[p_order]
    while len(p_mine) < p_most:  # fill up to the largest rank's pass (several ranks only)
        p_mine = torch.cat([p_mine, p_idx[torch.randperm(len(p_idx), generator=g)]])
    p_mine = p_mine[:p_most].to(device)
    sizes = [bs] * (p_most // bs) + ([p_most % bs] if p_most % bs > 1 else [])
    p_batches = p_mine[:sum(sizes)].split(sizes)
    if u_least < 2 or not use_unlabeled:
        return [(ix, None) for ix in p_batches]
    u_batches, u_perm, pos = [], u_idx[u_order[:u_least]], 0
    for _ in p_batches:
        if u_least - pos < 2:  # this shuffle is used up (or only one row is left): a new one
            u_perm, pos = u_idx[torch.randperm(len(u_idx), generator=g)[:u_least]], 0
        u_batches.append(u_perm[pos:pos + bs])
        pos += len(u_batches[-1])
    return [(ix, iu.to(device)) for ix, iu in zip(p_batches, u_batches)]

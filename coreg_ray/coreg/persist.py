"""A Co-Reg trainer's persistence (`CoReg` inherits it): its checkpoint state, checkpoints
written atomically and restored after checks, the exported model (`model.pt`), and the
per-shard state of a sharded run.

One process writes everything into one `checkpoint.pt`. A sharded run (Ray Train, every rank
owning a shard of the rows, `coreg_ray.data.shards`) writes, inside one Ray Train checkpoint:
`checkpoint.pt` from rank 0 without the per-sample state (networks, optimisers, prototypes,
MoCo queues, history: the same on every rank), one `shard-RRRRR.pt` per rank with its rows'
per-sample state (`PER_SAMPLE`, keyed by row position and checked by id), and `manifest.json`
(world size, rows per rank, the files, the table's fingerprint). Restoring with the same world
size gives every rank its own file back; with another, each rank takes its rows from the files
whose ranges overlap its own (re-sharding by row position, the ids checked).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coreg_ray.coreg.checkpoint import check_checkpoint, read_checkpoint
from coreg_ray.errors import CoregError

PER_SAMPLE = ("div_history", "pred_table", "split_w", "scores")  # one row per sample
MANIFEST = "manifest.json"
SHARDS_FORMAT = "coreg-ray-shards/1"


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


class Persistence:
    def checkpoint_state(self, epoch: int, per_sample: bool = True) -> dict:
        """Everything a resumed run needs; per_sample=False leaves out the per-sample state
        (a sharded run keeps it per rank: `shard_state`)."""
        state = {
            "epoch": epoch, "config": self.cfg.to_dict(),
            "nets": [n.state_dict() for n in self.raw_nets],
            "key_nets": [n.state_dict() for n in self.key_nets],
            "opts": [o.state_dict() for o in self.opts],
            "prototypes": self.prototypes, "queues": [q.state() for q in self.queues],
            "div_history": self.div_history, "pred_table": self.pred_table,
            "split_w": self.split_w, "scores": self.scores, "history": self.history, "elapsed": self.elapsed,
            "torch_rng": torch.get_rng_state(),
            "data": getattr(self.data, "fingerprint", None),  # what it was made on (resume checks)
        }
        if not per_sample:
            for key in PER_SAMPLE:
                del state[key]
            state["shards"] = self.comm.world_size
        return state

    def shard_state(self) -> dict:
        """This rank's per-sample state, with its row range and ids (a `shard-RRRRR.pt`)."""
        cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
        return {"rank": self.comm.rank, "world": self.comm.world_size,
                "rows": [self.lo, self.lo + self.n], "n": self.n_total,
                "ids": np.asarray(self.ids).tolist(),
                "fingerprint": getattr(self.data, "shard_fingerprint", None),
                "div_history": [cpu(h) for h in self.div_history],
                "pred_table": cpu(self.pred_table), "split_w": cpu(self.split_w),
                "scores": cpu(self.scores), "torch_rng": torch.get_rng_state()}

    def manifest(self, epoch: int) -> dict:
        """manifest.json of a sharded checkpoint."""
        return {"format": SHARDS_FORMAT, "epoch": epoch, "world": self.comm.world_size,
                "n": self.n_total, "counts": list(self.counts),
                "files": [shard_file(r) for r in range(self.comm.world_size)],
                "data": getattr(self.data, "fingerprint", None)}

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """Atomic: write a temp file, then rename over the old checkpoint."""
        if self.comm.rank != 0:
            return
        from coreg_ray.outputs import atomic_path

        with atomic_path(path) as tmp:  # the temp file is removed on any failure, Ctrl-C too
            torch.save(self.checkpoint_state(epoch), tmp)

    def load_checkpoint(self, path) -> None:
        self.load_state(read_checkpoint(path), str(path))

    def load_state(self, state: dict, where: str = "checkpoint", shards=None) -> None:
        """Restore a checkpoint after checking it was made for this model and data (one line
        if not, or if its contents do not fit). `shards`: (manifest, {file: shard
        state}: the files overlapping this rank's rows) of a sharded checkpoint, whose
        per-sample state is not in `state`."""
        check_checkpoint(state, where, getattr(self.data, "fingerprint", None), self.cfg)
        try:
            self._load_state(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise CoregError(f"{where}: its contents do not fit this run ({type(exc).__name__}: "
                             f"{first}); train into a new --output") from None
        if shards is not None:
            self.load_shards(*shards, where=where)
        elif "pred_table" not in state:
            raise CoregError(f"{where}: a sharded checkpoint ({state.get('shards')} ranks) "
                             "without its shard files: resume it with coreg-ray train --workers")

    def _load_state(self, state: dict) -> None:
        for net, sd in zip(self.raw_nets, state["nets"]):
            net.load_state_dict(sd)
        for net, sd in zip(self.key_nets, state["key_nets"]):
            net.load_state_dict(sd)
        for opt, sd in zip(self.opts, state["opts"]):
            opt.load_state_dict(sd)
        self.prototypes = state["prototypes"].to(self.device)
        for q, s in zip(self.queues, state["queues"]):
            q.feats, q.labels, q.is_p, q.ptr = (s["feats"].to(self.device), s["labels"].to(self.device),
                                               s["is_p"].to(self.device), s["ptr"])
        if "pred_table" in state:  # a sharded checkpoint keeps these per rank
            self._set_per_sample(state)
        self.history = list(state["history"])
        self.elapsed = state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["epoch"] + 1

    def _set_per_sample(self, state: dict) -> None:
        self.div_history = [[t.cpu() for t in h] for h in state["div_history"]]
        self.pred_table = [t.to(self.device) for t in state["pred_table"]]
        self.split_w = [t.to(self.device) for t in state["split_w"]]
        self.scores = [t.to(self.device) for t in state["scores"]]

    def load_shards(self, manifest: dict, states: dict, where: str = "checkpoint") -> None:
        """This rank's per-sample state from a sharded checkpoint: from its own file when the
        world size is the same, else re-sharded by row position from every file overlapping
        its rows; the rows' ids must be this run's (one line if not)."""
        lo, hi = self.lo, self.lo + self.n
        if manifest.get("format") != SHARDS_FORMAT or manifest.get("n") != self.n_total:
            raise CoregError(f"{where}: its shards hold {manifest.get('n')} rows, this pool "
                             f"{self.n_total}: resume on the pool it was made on, or train into "
                             "a new --output")
        parts, at = [], 0
        for file, count in zip(manifest["files"], manifest["counts"]):
            a, b = at, at + count
            at = b
            if b <= lo or a >= hi:
                continue
            st = states.get(file)
            if st is None or st.get("rows") != [a, b]:
                raise CoregError(f"{where}: {file} holds rows {st.get('rows')}, its manifest "
                                 f"says [{a}, {b}]: the checkpoint is damaged")
            s0, s1 = max(a, lo) - a, min(b, hi) - a
            parts.append({"ids": st["ids"][s0:s1],
                          "div_history": [[t[s0:s1] for t in h] for h in st["div_history"]],
                          **{k: [t[s0:s1] for t in st[k]] for k in ("pred_table", "split_w",
                                                                   "scores")}})
            if manifest["world"] == self.comm.world_size and st.get("rank") == self.comm.rank:
                torch.set_rng_state(st["torch_rng"])
                mine = getattr(self.data, "shard_fingerprint", None) or {}
                if (st.get("fingerprint") or {}).get("images") not in (None, mine.get("images")):
                    raise CoregError(f"{where}: {file} was made on other images than this "
                                     f"rank's rows [{lo}, {hi}): resume on the pool it was made "
                                     "on, or train into a new --output")
        ids = [i for p in parts for i in p["ids"]]
        if ids != np.asarray(self.ids).tolist():
            raise CoregError(f"{where}: the ids of its shards' rows [{lo}, {hi}) are not this "
                             "pool's: resume on the pool it was made on, or train into a new "
                             "--output")
        cat = lambda key: [torch.cat([p[key][k] for p in parts])  # noqa: E731
                           for k in range(len(parts[0][key]))]
        hist = [[torch.cat([p["div_history"][k][e] for p in parts])
                 for e in range(len(parts[0]["div_history"][k]))] for k in range(2)]
        self._set_per_sample({"div_history": hist, "pred_table": cat("pred_table"),
                              "split_w": cat("split_w"), "scores": cat("scores")})

    def export(self) -> dict:
        """What `model.pt` holds: enough to predict without the training data."""
        return {"format": "coreg-ray/1", "backbone": self.cfg.model.backbone,
                "num_classes": self.num_classes, "classes": self.classes,
                "image_size": self.image_size, "proj_dim": self.cfg.model.proj_dim,
                "mean": self.mean, "std": self.std,
                "nets": [{k: v.cpu() for k, v in n.state_dict().items()} for n in self.raw_nets]}

    def save_model(self, path) -> None:
        from coreg_ray.outputs import atomic_path

        with atomic_path(path) as tmp:
            torch.save(self.export(), tmp)

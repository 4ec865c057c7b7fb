"""What the few-shot comparators (CoOp, LoRA) share: their checked inputs (`few_shot_inputs`),
one optimiser step on a batch's loss, the mean loss of each epoch and the progress line
(`EpochLosses`)."""
from __future__ import annotations

from coreg_ray.errors import CoregError


def load_table(t):
    """An `ImageTable` as is, else whatever `load_image_table` reads."""
    from coreg_ray.data.tables import ImageTable, load_image_table

    return t if isinstance(t, ImageTable) else load_image_table(t)


def few_shot_inputs(who: str, shots, seed, train_table, test_table, classes):
    """(shots, seed, train, test or None, class names) of one few-shot run, checked: at least one
    shot, labelled tables, one class name per class of the train table (`classes`: as
    `resolve_classes` takes them; default the table's). Errors start with `who`."""
    from coreg_ray.annotate.templates import resolve_classes

    shots, seed = int(shots), int(seed)
    if shots < 1:
        raise CoregError(f"{who}: shots must be at least 1, got {shots}")
    train = load_table(train_table)
    test = load_table(test_table) if test_table is not None else None
    for what, table in (("train", train), ("test", test)):
        if table is not None and table.labels is None:
            raise CoregError(f"{who}: the {what} table {table.source or ''} has no labels")
    names = resolve_classes(classes, train.classes)
    if len(names) != train.num_classes:
        raise CoregError(f"{who}: {len(names)} class names for {train.num_classes} classes")
    return shots, seed, train, test, names


class EpochLosses:
    """`step(opt, loss, n)` per batch (n: its size; `sched`, when given, steps after the
    optimiser), `end_epoch(ep)` after each epoch. `losses`: the mean loss per epoch (weighted by
    batch size); `steps`: optimiser steps so far. Prints "NAME epoch E/EPOCHS loss L" every
    `log_every` epochs (0: never)."""

    def __init__(self, name: str, epochs: int, log_every: int = 0):
        self.name, self.epochs, self.log_every = name, epochs, log_every
        self.losses: list[float] = []
        self.steps = 0
        self._total, self._count = 0.0, 0

    def step(self, opt, loss, n: int, sched=None) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        self._total += float(loss.detach()) * n
        self._count += n
        self.steps += 1

    def end_epoch(self, ep: int) -> None:
        self.losses.append(self._total / max(1, self._count))
        self._total, self._count = 0.0, 0
        if self.log_every and (ep + 1) % self.log_every == 0:
            print(f"{self.name} epoch {ep + 1}/{self.epochs} loss {self.losses[-1]:.4f}", flush=True)

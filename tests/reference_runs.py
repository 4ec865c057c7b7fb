"""Tiny single-process Co-Reg runs whose every per-epoch number is pinned bit for bit
(tests/test_sharded_reference.py; recorded by `python -m tests.reference_runs OUT.json` before
the sharded trainer changed any code, and again after the reference bookkeeping of the Co-Reg
phase was matched): the single-process path must keep them exactly."""
import json
import sys

import numpy as np

CASES = {
    "default": {},
    "class_balanced": {"coreg.class_balanced_split": True},
    "few_shot_gate": {"fewshot.shots": 2, "coreg.agreement_gate": True,
                      "coreg.candidate_loss_weight": 0.5},
    "no_alignment_tiny_cnn": {"coreg.distribution_alignment": False,
                              "model.backbone": "tiny_cnn"},
}


def run_case(name: str) -> list[dict]:
    from coreg_ray.coreg.trainer import CoReg
    from coreg_ray.data import load_image_table, synthetic_annotations
    from tests.conftest import tiny_config

    train = load_image_table("digits:train").subset(np.arange(300))
    test = load_image_table("digits:test").subset(np.arange(120))
    ann = synthetic_annotations(train.ids, train.labels, 10, q=0.3, eta=0.1, seed=0)
    over = {"train.epochs": 4, "train.warmup_epochs": 2, "coreg.feature_delay": 0,
            **CASES[name]}
    trainer = CoReg(tiny_config(**over), progress=False)
    trainer.fit(train, ann, test)
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in trainer.history]


if __name__ == "__main__":
    out = {name: run_case(name) for name in CASES}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)

"""The single-process trainer keeps its numbers bit for bit: tiny runs recorded before the
sharded trainer (tests/reference_runs.py -> tests/data/reference_runs.json) replayed exactly,
every per-epoch number equal (floats compared with ==)."""
import json
from pathlib import Path

import pytest

from tests.reference_runs import CASES, run_case

RECORDED = json.loads((Path(__file__).parent / "data" / "reference_runs.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_process_numbers_are_unchanged(case):
    got = json.loads(json.dumps(run_case(case)))  # the same float -> JSON round trip
    assert got == RECORDED[case]

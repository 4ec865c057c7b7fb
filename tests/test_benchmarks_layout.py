"""benchmarks/ stays usable on any machine (issue 13, item 6): scripts and write-ups name no
machine path (/tmp, /work, /home: a script takes such paths as arguments or derives them from
its own location), and every path benchmarks/README.md names exists. Reads files only."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# scripts, configs and write-ups; raw rows (.json, .jsonl, .log, .txt, .csv) are what a run
# printed and are left as recorded
CHECKED = {".py", ".sh", ".md", ".yaml", ".yml"}
MACHINE_PATH = re.compile(r"(?<![\w.~-])/+(tmp|work|home)(?=/|\b)")
# Files allowed to name a machine path, each with the reason. Keep it empty unless a file
# really has to (e.g. a write-up quoting an error message that contains one).
EXCEPTIONS: dict[str, str] = {}
# paths in README.md are taken from the repository root when they start with one of these,
# else from benchmarks/ (links, `results/...`, `scripts/...`, bare file names)
ROOT_DIRS = ("benchmarks/", "configs/", "coreg_ray/", "tests/", "jobs/", "docs/", ".ci/")
FILE_LIKE = re.compile(r"^[\w.*-]+\.(py|sh|md|json|jsonl|yaml|yml|csv|txt|log)$")


def checked_files():
    return sorted(p for p in BENCH.rglob("*")
                  if p.is_file() and p.suffix in CHECKED and "__pycache__" not in p.parts)


def test_no_machine_paths_in_benchmark_scripts_and_write_ups():
    files = checked_files()
    assert any(p.parent == BENCH / "scripts" for p in files)  # the walk found the scripts
    found = []
    for p in files:
        rel = str(p.relative_to(REPO))
        if rel in EXCEPTIONS:
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert not found, "machine paths (take them as arguments, or from __file__):\n" + "\n".join(found)
    for rel in EXCEPTIONS:  # an exception for a file that no longer needs it goes
        assert (REPO / rel).exists() and MACHINE_PATH.search((REPO / rel).read_text()), rel


def test_machine_path_pattern():
    for bad in ("out=/tmp/x", "`cd /tmp/qsS`", "sqlite:////tmp/x.db", '"/work/main/.devdata"',
                "/home/user/data", "(/tmp)"):
        assert MACHINE_PATH.search(bad), bad
    for ok in ("runs/tmp/x.yaml", "~/work/x", "shared/work/x", "../tmp.py", "tmp/", "a/home"):
        assert not MACHINE_PATH.search(ok), ok


def readme_paths(text: str) -> set[str]:
    """Link targets and the path-like words of `code` spans in the README."""
    words = set(re.findall(r"\]\(([^)\s]+)\)", text))
    for span in re.findall(r"`([^`]+)`", text):
        words.update(span.split())
    out = set()
    for w in words:
        w = w.strip("'\",;:()[]")
        if "://" in w or w.startswith(("$", "<", "-")) or "=" in w:
            continue
        if w.startswith(ROOT_DIRS) or w.startswith(("results/", "scripts/")) or FILE_LIKE.match(w):
            out.add(w)
    return out


def test_every_path_in_the_benchmarks_index_exists():
    text = (BENCH / "README.md").read_text()
    paths = readme_paths(text)
    assert "scripts/digits_quickstart.py" in paths and "accuracy_cpu.md" in paths  # the parse works
    missing = []
    for p in sorted(paths):
        base = REPO if p.startswith(ROOT_DIRS) else BENCH
        if not (list(base.glob(p)) if "*" in p else (base / p).exists()):
            missing.append(p)
    assert not missing, f"benchmarks/README.md names paths that do not exist: {missing}"


def test_scripts_live_in_scripts_and_rows_in_results():
    """The top of benchmarks/ holds the write-ups only."""
    top_level_scripts = {p.name for p in BENCH.iterdir() if p.suffix in {".py", ".sh", ".yaml"}}
    assert not top_level_scripts, top_level_scripts
    top_level_rows = {p.name for p in BENCH.iterdir() if p.suffix in {".json", ".jsonl"}}
    assert not top_level_rows, top_level_rows

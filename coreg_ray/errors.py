"""User-facing errors: one line, naming the file/row/field that is wrong."""
from __future__ import annotations

import importlib


class CoregError(Exception):
    """An error caused by the user's input or environment. The CLI prints it as one line."""


class NotApplicable(CoregError):
    """The method cannot run on this input by construction (e.g. distilling an annotator's
    probabilities from a table that has none). Experiment tables show such cells as `n/a`."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (the CLI installs the handler), so a terminated run
    stops exactly like an interrupted one: checkpoint kept, MLflow run marked KILLED."""


def require(module: str, extra: str):
    """Import an optional dependency or fail with a line naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CoregError(
            f"'{module}' is not installed: pip install 'coreg-ray[{extra}]' ({exc})"
        ) from exc


def printable(text) -> str:
    """`text` safe for a terminal, on one line: control characters (ANSI escapes, newlines,
    carriage returns: from class names, file names, ...) shown escaped (\\x1b, \\n), never
    sent raw."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode()
                   for c in str(text))


def note(message: str) -> None:
    """A one-line note on stderr (`note: ...`): something the user should know that is not an
    error (e.g. how many images of a table were resized)."""
    import sys

    print(f"note: {printable(message)}", file=sys.stderr)

"""Output locations: checked before any work is done, written atomically, no temp file left.

Every command that writes (`train`, `synth`, `simulate-annotator`, `annotate`, `experiment`,
`quickstart`, `tune`) calls `check_output_dir` / `check_output_file` on each place it will
write, after its arguments and before it reads its inputs, so a path that is a file, lies
under a file or cannot be written is one `CoregError` line and nothing has been touched. The
checks create nothing: they look at the path and at the first part of it that exists.

Every file is then written through `atomic_path` (or `write_text_atomic` / `write_json_atomic`):
a temp file `NAME.tmp` beside the target, renamed over it when complete, and removed on any
failure (an exception, Ctrl-C, SIGTERM), so a failed command leaves neither a half-written file
nor a `*.tmp`. An OS error while writing is one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

from coreg_ray.errors import CoregError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local(path, what: str) -> None:
    """Tables, models and outputs are local paths (a shared filesystem on a cluster): a URI such
    as s3://BUCKET/x is one line saying so, instead of "not found: s3:/BUCKET/x"."""
    if _SCHEME.match(str(path)):
        raise CoregError(f"{what} {path}: remote URIs ({str(path).split('://')[0]}://) are not "
                         "read or written by coreg-ray; put the file on a filesystem every node "
                         "mounts (e.g. NFS) and give its path (only --storage-path, Ray Train's "
                         "checkpoint store, takes s3:// and gs://)")


def _first_existing(p: Path) -> Path:
    """`p` or its nearest ancestor that exists (as the OS resolves the path)."""
    q = p
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def _check_creatable(p: Path, what: str) -> None:
    """`p` does not exist: its nearest existing ancestor must be a writable folder."""
    anc = _first_existing(p.parent if str(p.parent) else Path("."))
    if not anc.is_dir():
        raise CoregError(f"{what} {p}: {anc} is a file, not a folder, so nothing can be "
                         "written under it")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise CoregError(f"{what} {p}: cannot be written (no write permission in {anc})")


def check_uri_output(path, what: str, folder: bool):
    """An output on object storage / a pyarrow filesystem (`coreg_ray.data.location.UriPath`):
    the filesystem answers (credentials, endpoint: one line within seconds otherwise) and the
    place is not a file where a folder is wanted, or the reverse. Creates nothing."""
    from coreg_ray.data.location import UriPath

    loc = path if isinstance(path, UriPath) else UriPath(str(path))
    if not folder and "/" not in loc.path.strip("/"):
        raise CoregError(f"{what} {loc}: give a file inside a bucket (s3://BUCKET/NAME)")
    if folder and loc.is_file():
        raise CoregError(f"{what} {loc}: is a file, not a folder")
    if not folder and loc.is_dir() and loc.list_files():
        raise CoregError(f"{what} {loc}: is a folder, not a file")
    return loc


def check_output_dir(path, what: str = "output folder", uri_ok: bool = False):
    """A folder the command may write into: an existing writable folder, or a path whose
    nearest existing ancestor is a writable folder. Creates nothing. With `uri_ok`, an
    s3:// / gs:// URI is checked with `check_uri_output` (returns a UriPath)."""
    from coreg_ray.data.location import is_uri

    if uri_ok and is_uri(path):
        return check_uri_output(path, what, folder=True)
    check_local(path, what)
    p = Path(path)
    if str(path).strip() == "":
        raise CoregError(f"{what}: empty path")
    if p.exists():
        if not p.is_dir():
            raise CoregError(f"{what} {p}: is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise CoregError(f"{what} {p}: cannot be written (no write permission)")
        return p
    if os.path.lexists(p):  # a dangling symlink
        raise CoregError(f"{what} {p}: is a broken link")
    _check_creatable(p, what)
    return p


def check_output_file(path, what: str = "output file", hint: str = "", uri_ok: bool = False):
    """A file the command may (over)write: not a folder; an existing file must be writable,
    a new one creatable. `hint` is added when the path is a folder (e.g. the name to give).
    Creates nothing. With `uri_ok`, a URI is checked with `check_uri_output`."""
    from coreg_ray.data.location import is_uri

    if uri_ok and is_uri(path):
        return check_uri_output(path, what, folder=False)
    check_local(path, what)
    p = Path(path)
    if str(path).strip() == "":
        raise CoregError(f"{what}: empty path")
    if p.is_dir():
        raise CoregError(f"{what} {p}: is a folder, not a file{hint}")
    if p.exists():
        if not os.access(p, os.W_OK) or not os.access(p.parent, os.W_OK | os.X_OK):
            raise CoregError(f"{what} {p}: cannot be written (no write permission)")
        return p
    _check_creatable(p, what)
    return p


def tmp_path(path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".tmp")


@contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp: write(tmp)`: the parent folder is created, `tmp` is renamed
    over `p` when the block completes and removed if it fails (whatever the exception). For a
    `UriPath` (object storage) `tmp` is a local temp file uploaded in one PUT when the block
    completes: the object appears whole or not at all."""
    from coreg_ray.data.location import UriPath

    if isinstance(path, UriPath):
        yield from _atomic_remote(path)
        return
    p = Path(path)
    tmp = tmp_path(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, p)
    except OSError as exc:
        _unlink(tmp)
        raise CoregError(f"{p}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        _unlink(tmp)
        raise


def _atomic_remote(loc):
    import tempfile

    fd, name = tempfile.mkstemp(prefix="coreg-", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        loc.write_bytes(tmp.read_bytes())
    finally:
        _unlink(tmp)


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def finite_or_none(obj):
    """`obj` with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # NumPy / torch scalars
        return finite_or_none(obj.item())
    return obj


def to_json(data, indent=None) -> str:
    """Strict JSON: non-finite numbers become null (never the invalid `NaN`)."""
    return json.dumps(finite_or_none(data), indent=indent, default=_default, allow_nan=False)


def _default(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f if math.isfinite(f) else None


def write_json_atomic(path, data, indent: int | None = 2) -> None:
    write_text_atomic(path, to_json(data, indent))


def _as_local(p) -> Path | None:
    """The resolved local path of an input or output (symlinks, `..` and relative parts
    resolved), or None for what is not a local path (a URI, 'digits:train', an object)."""
    if not isinstance(p, (str, os.PathLike)) or _SCHEME.match(str(p)) or str(p).strip() == "":
        return None
    return Path(p).expanduser().resolve()


def check_not_input(output, inputs: dict, what: str = "--output") -> None:
    """One line, before anything is read or written, when the output `output` would destroy
    or be read back as one of `inputs` ({flag: path}): it is the same file (also through a
    symlink or a hard link), or it lies inside an input folder (where a later read of the
    folder would take it for input, or it would overwrite a file of it). URIs are compared as
    strings; what is not a path (a built-in source) is skipped."""
    out_s = str(output)
    out = _as_local(output)
    for flag, inp in inputs.items():
        if inp is None or not isinstance(inp, (str, os.PathLike)):
            continue
        src = _as_local(inp)
        if out is None or src is None:
            if out_s.rstrip("/") == str(inp).rstrip("/"):
                raise CoregError(f"{what} {output}: is the {flag} input; writing it would "
                                 "destroy that input (give another path)")
            continue
        same = out == src or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            raise CoregError(f"{what} {output}: is the {flag} input {inp}; writing it would "
                             "destroy that input (give another path)")
        if src.is_dir() and out.is_relative_to(src):
            raise CoregError(f"{what} {output}: lies inside the {flag} input folder {inp}, "
                             "where it would be read back as input or overwrite it (write it "
                             "outside that folder)")


def check_replaceable_table(path, what: str = "--output") -> None:
    """An output table may replace an existing Parquet file (an earlier result) or an empty
    file, never another kind of file: one line instead of overwriting it."""
    p = _as_local(path)
    if p is None or not p.is_file() or p.stat().st_size == 0:
        return
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError:
        return  # check_output_file says what is wrong with it
    if magic != b"PAR1":
        raise CoregError(f"{what} {path}: is an existing file that is not a Parquet table; "
                         "it is not replaced (delete it or give another name)")


def check_outputs_not_inputs(outputs: dict, inputs: dict) -> None:
    """`check_not_input` for each of a command's outputs ({what: path})."""
    for what, out in outputs.items():
        if out is not None:
            check_not_input(out, inputs, what)

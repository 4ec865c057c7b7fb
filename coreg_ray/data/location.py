"""Where a pool or an output lives: a local path, or a URI on a pyarrow filesystem.

    loc = location("s3://bucket/pool")        # UriPath (pyarrow S3FileSystem)
    loc = location("pool/")                   # pathlib.Path, unchanged behaviour
    fs, path = filesystem_of(loc)             # (pyarrow FileSystem, path on it)

`UriPath` offers the few pathlib operations the commands use on their outputs (`/`, `name`,
`with_name`, `exists`, `is_dir`, `is_file`, `read_text`, `read_bytes`, `mkdir`, `unlink`,
`rmtree`, `glob_any`), so the run code treats a bucket prefix as it treats a folder.

Object storage: ``s3://BUCKET/PREFIX`` through ``pyarrow.fs.S3FileSystem``; the endpoint is
``AWS_ENDPOINT_URL`` (or ``?endpoint_override=HOST:PORT`` in the URI), the region
``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (or ``?region=``), credentials the usual AWS ones
(``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` / ``~/.aws/credentials``, or
``?anonymous=true`` for a public bucket). Without any, the command stops at once with one line
(no minutes-long probing of instance metadata); an unreachable endpoint fails after one short
try (connect timeout 3 s, one attempt). ``gs://`` and other schemes go through
``pyarrow.fs.FileSystem.from_uri``. A URI is never printed with its ``user:secret@`` part.
"""
from __future__ import annotations

import os
from datetime import timedelta
import posixpath
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from coreg_ray.errors import CoregError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"(^[A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")
_CACHE: dict = {}


def is_uri(spec) -> bool:
    return isinstance(spec, UriPath) or bool(_SCHEME.match(str(spec)))


def redact(text) -> str:
    """`text` with every ``scheme://user:secret@`` reduced to ``scheme://***@``."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\1***@", str(text))


def _s3(uri: str):
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    bucket = parts.hostname or ""
    if not bucket:
        raise CoregError(f"{redact(uri)}: no bucket (use s3://BUCKET/PREFIX)")
    path = (bucket + parts.path).rstrip("/")
    kw = {"connect_timeout": 3.0, "request_timeout": 20.0,
          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)}
    endpoint = q.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"{q.get('scheme', 'https')}://{endpoint}")
        kw["endpoint_override"] = ep.netloc
        kw["scheme"] = ep.scheme or "https"
    region = q.get("region") or os.environ.get("AWS_REGION") or \
        os.environ.get("AWS_DEFAULT_REGION")
    kw["region"] = region or "us-east-1"
    if q.get("anonymous", "").lower() in ("1", "true", "yes"):
        kw["anonymous"] = True
    elif parts.username:
        kw["access_key"], kw["secret_key"] = parts.username, parts.password or ""
    elif os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    elif not (os.environ.get("AWS_PROFILE") or os.environ.get("AWS_ROLE_ARN") or
              os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or
              Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE",
                                  Path.home() / ".aws" / "credentials")).is_file()):
        raise CoregError(f"s3://{path}: no credentials: set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or add ?anonymous=true for a "
                         "public bucket; the endpoint is AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(**kw), path


def _gcs(uri: str):
    """GcsFileSystem with a short retry limit; credentials: GOOGLE_APPLICATION_CREDENTIALS,
    gcloud's application-default file, or ?anonymous=true (else one line at once)."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    kw = {"retry_time_limit": timedelta(seconds=5)}
    if q.get("anonymous", "").lower() in ("1", "true", "yes"):
        kw["anonymous"] = True
    elif not (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or
              (Path.home() / ".config/gcloud/application_default_credentials.json").is_file()):
        raise CoregError(f"{redact(uri)}: no credentials: set GOOGLE_APPLICATION_CREDENTIALS "
                         "(or run gcloud auth application-default login), or add "
                         "?anonymous=true for a public bucket")
    if q.get("endpoint_override"):
        kw["endpoint_override"] = q["endpoint_override"]
    return pafs.GcsFileSystem(**kw)


def resolve(uri: str):
    """(pyarrow FileSystem, path on it) for a URI; cached per scheme+authority+query. One line
    (credentials removed) when the filesystem cannot be made."""
    import pyarrow.fs as pafs

    uri = str(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    key = (scheme, parts.netloc, parts.query, os.environ.get("AWS_ENDPOINT_URL"),
           os.environ.get("AWS_ACCESS_KEY_ID"))
    if scheme == "s3":
        if key not in _CACHE:
            _CACHE[key] = _s3(uri)[0]
        return _CACHE[key], (parts.hostname + parts.path).rstrip("/")
    if scheme == "file":
        return pafs.LocalFileSystem(), parts.path
    if scheme in ("gs", "gcs"):
        if key not in _CACHE:
            _CACHE[key] = _gcs(uri)
        return _CACHE[key], (parts.hostname + parts.path).rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise CoregError(f"{redact(uri)}: no filesystem for this URI "
                         f"({redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)})") from None
    return fs, path.rstrip("/")


def fs_error(loc, exc) -> CoregError:
    """One line for a filesystem error on `loc` (unreachable endpoint, denied, ...)."""
    msg = " ".join(str(exc).split())
    for s in (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")):
        if s:
            msg = msg.replace(s, "***")
    low = msg.lower()
    why = msg[:240]
    if "curl" in low or "connect" in low or "timeout" in low or "timed out" in low:
        why = f"endpoint unreachable ({msg[:160]})"
    elif "access" in low and "denied" in low or "403" in low or "invalidaccesskey" in low \
            or "signature" in low:
        why = f"access denied: check the credentials ({msg[:160]})"
    return CoregError(f"{redact(loc)}: {redact(why)}")


class UriPath:
    """A file or folder on a pyarrow filesystem, with the pathlib operations the commands use."""

    def __init__(self, uri: str, fs=None, path: str | None = None):
        self.uri = str(uri).rstrip("/") if not str(uri).endswith("://") else str(uri)
        if fs is None:
            fs, path = resolve(self.uri)
        self.fs, self.path = fs, path

    # --- naming
    def __str__(self) -> str:
        return redact(self.uri)


    def __repr__(self) -> str:
        return f"UriPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UriPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name) -> "UriPath":
        return UriPath(_join(self.uri, str(name)), self.fs, posixpath.join(self.path, str(name)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "UriPath":
        base, _ = _split_query(self.uri)
        return UriPath(_with_query(posixpath.dirname(base), self.uri), self.fs,
                       posixpath.dirname(self.path))

    def with_name(self, name: str) -> "UriPath":
        return self.parent / name

    # --- queries
    def _info(self):
        try:
            return self.fs.get_file_info(self.path)
        except Exception as exc:
            raise fs_error(self, exc) from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type == pafs.FileType.File

    def list_files(self, recursive: bool = True) -> list:
        """[(path on the filesystem, size)] of the files below this folder, sorted."""
        import pyarrow.fs as pafs
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive,
                                                            allow_not_found=True))
        except Exception as exc:
            raise fs_error(self, exc) from None
        return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)

    def glob_any(self, prefix: str, suffix: str) -> bool:
        return any(posixpath.basename(p).startswith(prefix) and p.endswith(suffix)
                   for p, _ in self.list_files())

    # --- bytes
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise fs_error(self, exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """One PUT: an object appears whole or not at all."""
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except Exception as exc:
            raise fs_error(self, exc) from None

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except Exception as exc:
            raise fs_error(self, exc) from None

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except Exception as exc:
            if not missing_ok:
                raise fs_error(self, exc) from None

    def rmtree(self) -> None:
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise fs_error(self, exc) from None


def _split_query(uri: str):
    base, _, q = uri.partition("?")
    return base, q


def _with_query(base: str, like: str) -> str:
    _, q = _split_query(like)
    return base + (f"?{q}" if q else "")


def _join(uri: str, name: str) -> str:
    base, _ = _split_query(uri)
    return _with_query(base.rstrip("/") + "/" + name, uri)


def location(spec):
    """A `UriPath` for a URI, else a `pathlib.Path`."""
    if isinstance(spec, (UriPath, Path)):
        return spec
    return UriPath(str(spec)) if is_uri(spec) else Path(spec)


def for_workers(spec):
    """`spec` as a process started in another folder must name it: an existing local path made
    absolute (Ray workers do not run in the driver's working folder), and so the ROOT of
    `torchvision:NAME:ROOT`; URIs, `digits...`, missing paths (left for the one-line error
    naming them as given) and tables in memory unchanged."""
    if not isinstance(spec, (str, os.PathLike)) or is_uri(spec):
        return spec
    text = str(spec)
    if text.startswith("torchvision:"):
        parts = text.split(":")
        if len(parts) >= 3 and parts[2] and Path(parts[2]).exists():
            parts[2] = str(Path(parts[2]).absolute())
        return ":".join(parts)
    return str(Path(text).absolute()) if Path(text).exists() else spec


def filesystem_of(loc):
    """(pyarrow FileSystem, path) for a `UriPath` or a local path."""
    import pyarrow.fs as pafs

    if isinstance(loc, UriPath):
        return loc.fs, loc.path
    return pafs.LocalFileSystem(), str(Path(loc).absolute())


def rmtree(loc) -> None:
    import shutil
    if isinstance(loc, UriPath):
        loc.rmtree()
    else:
        shutil.rmtree(loc, ignore_errors=True)


def has_files(loc, prefix: str, suffix: str) -> bool:
    """Whether any file named PREFIX*SUFFIX lies in `loc` or below it."""
    if isinstance(loc, UriPath):
        return loc.glob_any(prefix, suffix)
    p = Path(loc)
    return p.is_dir() and any(p.rglob(f"{prefix}*{suffix}"))


def read_table(loc, columns=None):
    """A Parquet file at a local path or `UriPath`, as a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, p = filesystem_of(loc)
    try:
        return pq.read_table(p, filesystem=fs, columns=columns)
    except Exception as exc:
        raise fs_error(loc, exc) from None

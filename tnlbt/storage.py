"""Paths and URIs: one set of helpers for local folders and remote object stores.

Every path in the config (``data.raw_dir``, ``data.processed_dir``, ``train.runs_dir``, checkpoints) may
be a local path (``data/processed``, ``/mnt/nfs/x``), a ``file://`` URI, or a remote URI (``s3://bucket/key``,
``gs://bucket/key``, and any other fsspec protocol such as ``memory://`` or ``az://``). The helpers here turn
such a string into a :class:`pyarrow.fs.FileSystem` plus a path inside it, which is what Ray Data
(``read_parquet(..., filesystem=)``), Ray Train (``RunConfig(storage_path=, storage_filesystem=)``) and
pyarrow itself consume.

Why pyarrow.fs first and fsspec second: Ray Data and Ray Train speak pyarrow filesystems natively, and pyarrow
ships S3 and GCS clients (no extra packages). Other protocols go through fsspec wrapped in
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))`` so callers see one type.

Nothing here touches the network at import time; a filesystem is built on the first call for its scheme.
Remote object stores have no directories, so :func:`makedirs` is a no-op there (creating "directory marker"
objects would need bucket-level permissions that training roles often lack).
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shutil
import threading
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "ObjectStoreOnDisk",
    "StorageError",
    "as_local",
    "as_text_stream",
    "cache_dir",
    "clear_filesystem_cache",
    "copy_dir",
    "describe",
    "download_dir",
    "ensure_parent",
    "exists",
    "is_remote",
    "isdir",
    "isfile",
    "join",
    "list_files",
    "listdir",
    "local_path",
    "makedirs",
    "object_store_on_disk",
    "open_input",
    "open_output",
    "open_parquet",
    "ray_runtime_env",
    "ray_storage",
    "read_bytes",
    "read_text",
    "register_filesystem",
    "remove",
    "resolve",
    "scheme",
    "to_ray_storage_path",
    "upload_dir",
    "write_bytes",
    "write_text",
]

_LOCAL_SCHEMES = ("", "file", "local")
_ROUTES_ENV = "TNLBT_STORAGE_ROUTES"  # scheme=/folder routes, see ObjectStoreOnDisk
_OBJECT_STORE_TYPES = ("s3", "gcs")  # pyarrow FileSystem.type_name values without real directories
# Schemes Ray Train / Ray Data resolve themselves from the URI string on every node (credentials come from
# each node's environment); everything else must be passed to Ray as an explicit filesystem object.
_RAY_NATIVE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")

_registry: dict[str, pafs.FileSystem] = {}
_cache: dict[str, pafs.FileSystem] = {}
_lock = threading.Lock()


class StorageError(ValueError):
    """A path or URI cannot be used (unknown scheme, missing bucket, ...)."""


# -- parsing ----------------------------------------------------------------------------------------
def scheme(uri: str | os.PathLike[str]) -> str:
    """The lower-case URI scheme (``"s3"``, ``"file"``), or ``""`` for a plain local path.

    A single letter before ``:`` is a Windows drive, not a scheme.
    """
    s = os.fspath(uri)
    if "://" not in s:
        return ""
    head = s.split("://", 1)[0]
    if len(head) <= 1 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return ""
    return head.lower()


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for anything that is not on this machine's local filesystem (``s3://``, ``gs://``, ``memory://``)."""
    return scheme(uri) not in _LOCAL_SCHEMES


def local_path(uri: str | os.PathLike[str]) -> str | None:
    """The absolute local path for a local path or ``file://`` URI; ``None`` for a remote URI."""
    s = os.fspath(uri)
    sc = scheme(s)
    if sc == "":
        return os.path.abspath(os.path.expanduser(s))
    if sc in ("file", "local"):
        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{s!r}: file:// URIs must name a local path (file:///abs/path)")
        return os.path.abspath(unquote(parts.path))
    return None


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a path or URI, keeping the scheme (``join("s3://b/x", "y")`` -> ``"s3://b/x/y"``)."""
    s = os.fspath(uri)
    if scheme(s) == "":
        return os.path.join(s, *parts)
    head, rest = s.split("://", 1)
    return f"{head}://{posixpath.join(rest, *parts) if rest else posixpath.join(*parts)}"


# -- filesystems ------------------------------------------------------------------------------------
def register_filesystem(uri_scheme: str, fs: pafs.FileSystem | None) -> None:
    """Route every URI with this scheme to ``fs`` (``None`` removes the route).

    For tests (a ``SubTreeFileSystem`` standing in for S3) and for filesystems that need explicit options
    (e.g. ``S3FileSystem(endpoint_override=...)`` for MinIO). The path inside ``fs`` is the URI without its
    ``scheme://`` prefix (``s3://bucket/key`` -> ``bucket/key``), as for pyarrow's own S3/GCS filesystems.
    """
    key = uri_scheme.lower()
    with _lock:
        if fs is None:
            _registry.pop(key, None)
        else:
            _registry[key] = fs


def clear_filesystem_cache() -> None:
    """Forget the filesystems built so far (new credentials or environment variables take effect)."""
    with _lock:
        _cache.clear()


def _s3_filesystem(uri: str) -> pafs.FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if region or endpoint:
        # Built directly: no network call. (from_uri would first ask S3 for the bucket's region.)
        return pafs.S3FileSystem(region=region or "us-east-1", endpoint_override=endpoint or None)
    fs, _ = pafs.FileSystem.from_uri(uri)  # resolves the bucket's region once (one HEAD request)
    return fs


def _fsspec_filesystem(sc: str) -> pafs.FileSystem:
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError as e:  # pragma: no cover - fsspec is a declared dependency
        raise StorageError(f"{sc}:// needs fsspec ({e})") from e
    try:
        fs = fsspec.filesystem(sc)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"no filesystem for {sc}:// ({e}); install the fsspec backend for it or use s3://, gs://, file://"
        ) from e
    return PyFileSystem(FSSpecHandler(fs))


def _filesystem_for(sc: str, uri: str) -> pafs.FileSystem:
    # S3 clients are region-bound and the region is looked up per bucket, so cache per bucket there.
    key = f"{sc}://{urlsplit(uri).netloc}" if sc in ("s3", "s3a") else sc
    with _lock:
        if sc in _registry:
            return _registry[sc]
        if key in _cache:
            return _cache[key]
    if sc in ("s3", "s3a"):
        fs = _s3_filesystem(uri if sc == "s3" else "s3://" + uri.split("://", 1)[1])
    elif sc in ("gs", "gcs"):
        fs = pafs.GcsFileSystem()
    elif sc == "hdfs":
        fs, _ = pafs.FileSystem.from_uri(uri)
    else:
        fs = _fsspec_filesystem(sc)
    with _lock:
        _cache.setdefault(key, fs)
        return _cache[key]


def _inner_path(sc: str, uri: str, fs: pafs.FileSystem) -> str:
    rest = uri.split("://", 1)[1]
    if isinstance(fs, pafs.PyFileSystem):
        # fsspec filesystems define their own root conventions (memory:// -> "/x", az:// -> "container/x").
        handler = fs.handler
        inner = getattr(handler, "fs", None)
        if inner is not None and hasattr(inner, "_strip_protocol"):
            return inner._strip_protocol(uri)
    return rest.rstrip("/") or rest


def resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or URI.

    Local paths and ``file://`` URIs give ``LocalFileSystem`` and an absolute path; ``s3://b/k`` gives
    ``S3FileSystem`` and ``b/k``; ``gs://b/k`` gives ``GcsFileSystem`` and ``b/k``; other schemes go through
    fsspec. Raises :class:`StorageError` for a scheme nobody handles.
    """
    s = os.fspath(uri)
    sc = scheme(s)
    _routes_from_env()
    if sc in _registry:
        fs = _registry[sc]
        return fs, _inner_path(sc, s, fs)
    lp = local_path(s)
    if lp is not None:
        return pafs.LocalFileSystem(), lp
    fs = _filesystem_for(sc, s)
    path = _inner_path(sc, s, fs)
    if sc in ("s3", "s3a", "gs", "gcs") and not path.split("/", 1)[0]:
        raise StorageError(f"{s!r}: missing bucket name ({sc}://BUCKET/path)")
    return fs, path


def _is_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in _OBJECT_STORE_TYPES or fs.type_name == "py::objectstore-on-disk"


# -- queries ----------------------------------------------------------------------------------------
def exists(uri: str | os.PathLike[str]) -> bool:
    """True if a file or directory (or, on object stores, a key prefix) exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def isdir(uri: str | os.PathLike[str]) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def isfile(uri: str | os.PathLike[str]) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_files(uri: str | os.PathLike[str], *patterns: str) -> list[str]:
    """Sorted names of the files (not folders) directly under ``uri`` matching any ``fnmatch`` pattern (all
    files without patterns); ``[]`` if the folder does not exist."""
    import fnmatch

    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = (posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.File)
    return sorted(n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns))


def as_local(uri: str | os.PathLike[str]) -> Path:
    """A local location as a Path: a plain path as given (a relative path stays relative), a ``file://`` URI
    as its absolute path. Raises :class:`StorageError` for a remote URI (callers branch on :func:`is_remote`)."""
    s = os.fspath(uri)
    if scheme(s) == "":
        return Path(s)
    lp = local_path(s)
    if lp is None:
        raise StorageError(f"{s!r} is not a local path")
    return Path(lp)


def open_parquet(uri: str | os.PathLike[str]) -> Any:
    """A :class:`pyarrow.parquet.ParquetFile` for a local path or a URI (read lazily, row group by row group)."""
    import pyarrow.parquet as pq

    if not is_remote(uri):
        return pq.ParquetFile(as_local(uri))
    fs, path = resolve(uri)
    return pq.ParquetFile(path, filesystem=fs)


def listdir(uri: str | os.PathLike[str]) -> list[str]:
    """Sorted entry names (not paths) directly under ``uri``; ``[]`` if it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


# -- reading and writing ----------------------------------------------------------------------------
def makedirs(uri: str | os.PathLike[str]) -> None:
    """Create a directory and its parents (exist_ok). A no-op on S3/GCS, which have no directories."""
    fs, path = resolve(uri)
    if _is_object_store(fs):
        return
    fs.create_dir(path, recursive=True)


def open_input(uri: str | os.PathLike[str]) -> IO[bytes]:
    """A seekable binary file for reading (works with ``json.load``, ``ijson``, PIL, ``pyarrow.parquet``)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{os.fspath(uri)}: no such file")
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(f"{os.fspath(uri)}: is a directory")
    return fs.open_input_file(path)


def open_output(uri: str | os.PathLike[str]) -> IO[bytes]:
    """A binary file for writing (truncates); parent directories are created on local filesystems.

    Object stores make the object visible only when the stream is closed, so use it as a context manager.
    """
    fs, path = resolve(uri)
    parent = posixpath.dirname(path)
    if parent and not _is_object_store(fs):
        fs.create_dir(parent, recursive=True)
    return fs.open_output_stream(path)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_text(uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def write_text(uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def remove(uri: str | os.PathLike[str], missing_ok: bool = True) -> None:
    """Delete a file or a whole directory tree."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        if not missing_ok:
            raise FileNotFoundError(os.fspath(uri))
        return
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)


# -- whole directories (checkpoints, processed data) ------------------------------------------------
def copy_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a directory tree between any two locations (local <-> S3, S3 -> GCS, ...)."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    if sfs.get_file_info(spath).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{os.fspath(src)}: not a directory")
    if not _is_object_store(dfs):
        dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


def download_dir(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> str:
    """Make a directory available locally; returns the local path.

    A local ``uri`` is returned as is (no copy); a remote one is copied into ``local_dir`` first (e.g. a
    checkpoint on S3 before ``load_model``, which reads with plain ``open``).
    """
    lp = local_path(uri)
    if lp is not None:
        return lp
    target = os.path.abspath(os.fspath(local_dir))
    if os.path.isdir(target):
        shutil.rmtree(target)  # a stale partial copy would mix two checkpoints
    copy_dir(uri, target)
    return target


def upload_dir(local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy a local directory to ``uri`` (which may be local too)."""
    src = os.path.abspath(os.fspath(local_dir))
    lp = local_path(uri)
    if lp is not None and os.path.abspath(lp) == src:
        return
    copy_dir(src, uri)


# -- Ray --------------------------------------------------------------------------------------------
def to_ray_storage_path(uri: str | os.PathLike[str]) -> str:
    """The string for ``RunConfig(storage_path=...)``: an absolute local path, or an ``s3://``/``gs://`` URI.

    Ray resolves ``s3://``/``gs://`` itself on every node. For schemes Ray cannot resolve (``memory://``, a
    scheme routed with :func:`register_filesystem`), use :func:`ray_storage`, which also returns the
    filesystem object; this function raises :class:`StorageError` for them.
    """
    path, fs = ray_storage(uri)
    if fs is not None:
        raise StorageError(
            f"{os.fspath(uri)!r}: Ray cannot resolve {scheme(uri)}:// by itself; use "
            "tnlbt.storage.ray_storage() and pass storage_filesystem= too"
        )
    return path


def ray_storage(uri: str | os.PathLike[str]) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    ``storage_filesystem`` is ``None`` when Ray can resolve the path by itself (local, s3, gs), which is what
    a multi-node cluster wants: each node builds its own client with its own credentials. Otherwise the path
    is stripped of its scheme, as Ray requires together with an explicit filesystem.
    """
    s = os.fspath(uri)
    sc = scheme(s)
    _routes_from_env()
    if sc in _registry:
        fs, path = resolve(s)
        return path, fs
    lp = local_path(s)
    if lp is not None:
        return lp, None
    if sc in _RAY_NATIVE_SCHEMES:
        return ("gs://" + s.split("://", 1)[1]) if sc == "gcs" else s.rstrip("/"), None
    fs, path = resolve(s)
    return path, fs


_FORWARDED_ENV = (_ROUTES_ENV, "TNLBT_CACHE_DIR")


def cache_dir() -> Path:
    """This machine's cache for the local side of remote runs: ``$TNLBT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tnlbt``, else ``~/.cache/tnlbt``. Holds fetched checkpoints, training staging folders and
    embedded vector stores of remote runs; everything in it can be rebuilt from the remote copy."""
    env = os.environ.get("TNLBT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tnlbt"


def ray_runtime_env() -> dict[str, Any]:
    """``runtime_env`` entries that carry ``TNLBT_STORAGE_ROUTES``, ``TNLBT_CACHE_DIR`` and the
    ``TNLBT_INDEX_*`` index settings into Ray tasks, actors, train workers and Serve replicas.

    Ray workers inherit the environment of the process that started Ray, which may predate the variable (a Ray
    started earlier in the same process, or a long-lived local cluster), so callers pass this explicitly.
    Empty when the variable is unset: on a real cluster each node resolves ``s3://``/``gs://`` itself with its
    own credentials.
    """
    env = {k: v for k, v in os.environ.items()
           if v and (k in _FORWARDED_ENV or k.startswith("TNLBT_INDEX_"))}  # index settings too (store.py)
    return {"env_vars": env} if env else {}


def describe(uri: str | os.PathLike[str]) -> dict[str, Any]:
    """A small dict for logs and error messages: scheme, remote flag, filesystem type and inner path."""
    fs, path = resolve(uri)
    return {"uri": os.fspath(uri), "scheme": scheme(uri) or "local", "remote": is_remote(uri),
            "filesystem": fs.type_name, "path": path}


def as_text_stream(binary: IO[bytes], encoding: str = "utf-8") -> io.TextIOWrapper:
    """Wrap a binary stream from :func:`open_input` for line-by-line text reading."""
    return io.TextIOWrapper(binary, encoding=encoding)  # type: ignore[arg-type]


def ensure_parent(uri: str | os.PathLike[str]) -> None:
    """Create the parent directory of a file URI (no-op on object stores)."""
    s = os.fspath(uri)
    if scheme(s) == "":
        Path(os.path.abspath(s)).parent.mkdir(parents=True, exist_ok=True)
        return
    fs, path = resolve(s)
    parent = posixpath.dirname(path)
    if parent and not _is_object_store(fs):
        fs.create_dir(parent, recursive=True)


# -- errors ---------------------------------------------------------------------------------------------------
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(e: BaseException | None) -> OSError | None:
    """The "no space left" (or quota) error in ``e`` or in the exceptions it was raised from or during, if any;
    also when a Ray worker's failure carries it only as text (a RayTaskError holds the worker's traceback).

    Chained: a failed write is often followed by a failed close in a ``finally``, which then carries the first.
    """
    seen: set[int] = set()
    cur = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return cur
        cur = cur.__cause__ or cur.__context__
    if e is not None and ("No space left on device" in str(e) or "Disk quota exceeded" in str(e)):
        return OSError(errno.ENOSPC, "No space left on device")
    return None


def error_line(e: OSError) -> str:
    """An OS error as one short line: what and where."""
    text = " ".join(str(x) for x in (e.strerror or e, e.filename) if x)
    return text.splitlines()[0][:300] if text else "no space left on device"


# -- an object store on local disk (tests, laptops, multi-process runs) -----------------------------


class ObjectStoreOnDisk(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that stores objects under a local folder *with S3's semantics*.

    What makes it stricter than ``SubTreeFileSystem`` (and so a useful stand-in for S3/GCS in tests):

    * directories do not exist by themselves: a prefix "exists" only while some object lies under it, and
      ``create_dir`` is a no-op, as on S3 without marker objects;
    * no appends (``open_append_stream`` raises, as pyarrow's S3 does) and no directory renames (``move`` of a
      prefix raises): code that appends to a log or renames a temp folder into place fails here as it would
      on S3;
    * an object becomes visible only when its output stream is closed (written to a hidden temp file, then
      renamed), like a multipart upload that completes on close.

    Processes see the same objects because they share the folder; route a scheme to it in every process of a
    run (Ray workers included) with ``TNLBT_STORAGE_ROUTES="s3=/tmp/fake-s3"`` (see :func:`resolve`).
    """

    _TMP = ".objectstore-tmp"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(os.path.join(self.root, self._TMP), exist_ok=True)
        self._local = pafs.LocalFileSystem()

    # pyarrow pickles filesystems into Ray tasks: rebuild from the root folder
    def __reduce__(self):
        return (ObjectStoreOnDisk, (self.root,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectStoreOnDisk) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def _abs(self, path: str) -> str:
        path = path.strip("/")
        if path.split("/", 1)[0] == self._TMP:
            raise OSError(f"{path}: reserved")
        return os.path.join(self.root, path) if path else self.root

    def _rel(self, abspath: str) -> str:
        return os.path.relpath(abspath, self.root).replace(os.sep, "/")

    def _has_objects(self, abspath: str) -> bool:
        return any(files for _dirpath, _dirs, files in os.walk(abspath))

    def _info(self, path: str) -> pafs.FileInfo:
        a = self._abs(path)
        if os.path.isfile(a):
            st = os.stat(a)
            return pafs.FileInfo(path.strip("/"), pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if os.path.isdir(a) and (a == self.root or self._has_objects(a)):
            return pafs.FileInfo(path.strip("/"), pafs.FileType.Directory)
        return pafs.FileInfo(path.strip("/"), pafs.FileType.NotFound)

    # -- FileSystemHandler API --
    def get_type_name(self) -> str:
        return "objectstore-on-disk"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def equals(self, other: object) -> bool:
        return self == other

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return [self._info(p) for p in paths]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = self._abs(selector.base_dir)
        if self._info(selector.base_dir).type != pafs.FileType.Directory:
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(selector.base_dir)
        out = []
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not (dirpath == self.root and d == self._TMP))
            for d in dirs:
                info = self._info(self._rel(os.path.join(dirpath, d)))
                if info.type == pafs.FileType.Directory:
                    out.append(info)
            out.extend(self._info(self._rel(os.path.join(dirpath, f))) for f in sorted(files))
            if not selector.recursive:
                break
        return out

    def create_dir(self, path: str, recursive: bool) -> None:
        return None  # prefixes are implicit

    def delete_dir(self, path: str) -> None:
        a = self._abs(path)
        if os.path.isdir(a):
            shutil.rmtree(a)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        a = self._abs(path)
        if not os.path.isdir(a):
            if missing_dir_ok:
                return
            raise FileNotFoundError(path)
        for name in os.listdir(a):
            p = os.path.join(a, name)
            if a == self.root and name == self._TMP:
                continue
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)

    def delete_root_dir_contents(self) -> None:
        self.delete_dir_contents("", missing_dir_ok=True)

    def delete_file(self, path: str) -> None:
        a = self._abs(path)
        if not os.path.isfile(a):
            raise FileNotFoundError(path)
        os.remove(a)

    def move(self, src: str, dest: str) -> None:
        if not os.path.isfile(self._abs(src)):
            raise OSError(f"{src}: an object store cannot rename a prefix (copy the objects instead)")
        d = self._abs(dest)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        os.replace(self._abs(src), d)

    def copy_file(self, src: str, dest: str) -> None:
        d = self._abs(dest)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copyfile(self._abs(src), d)

    def open_input_stream(self, path: str) -> Any:
        return self._local.open_input_stream(self._abs(path))

    def open_input_file(self, path: str) -> Any:
        return self._local.open_input_file(self._abs(path))

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        final = self._abs(path)
        if os.path.isdir(final):
            raise IsADirectoryError(path)
        tmp = os.path.join(self.root, self._TMP, f"{os.getpid()}-{threading.get_ident()}-{id(final)}-"
                           f"{os.urandom(4).hex()}")
        return pa.PythonFile(_PublishOnClose(tmp, final), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise OSError(f"{path}: object stores do not support appending (rewrite the object instead)")


class _PublishOnClose(io.RawIOBase):
    """A write-only file that appears at ``final`` only when closed without error."""

    def __init__(self, tmp: str, final: str) -> None:
        super().__init__()
        self._tmp, self._final = tmp, final
        self._fh = open(tmp, "wb")  # noqa: SIM115 - closed in close()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._fh.write(b)

    def close(self) -> None:
        if self.closed:
            return
        self._fh.close()
        os.makedirs(os.path.dirname(self._final), exist_ok=True)
        os.replace(self._tmp, self._final)
        super().close()


def object_store_on_disk(root: str | os.PathLike[str]) -> pafs.FileSystem:
    """A :class:`pyarrow.fs.FileSystem` with S3 semantics stored under ``root`` (see :class:`ObjectStoreOnDisk`)."""
    return pafs.PyFileSystem(ObjectStoreOnDisk(root))


def _routes_from_env() -> None:
    """Apply ``TNLBT_STORAGE_ROUTES="s3=/dir,gs=/dir2"``: each scheme goes to an :class:`ObjectStoreOnDisk`.

    Read on every :func:`resolve` (cheap) so that Ray workers, which inherit the driver's environment, route the
    same way without any setup call. Routes set in code with :func:`register_filesystem` win; a route that
    came from the variable goes away when the variable no longer names it.
    """
    spec = os.environ.get(_ROUTES_ENV, "")
    wanted: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        sc, sep, root = item.partition("=")
        if not sep or not sc.strip() or not root.strip():
            raise StorageError(f"{_ROUTES_ENV}={spec!r}: expected 'scheme=/local/folder[,scheme=/folder]'")
        wanted[sc.strip().lower()] = os.path.abspath(root.strip())
    with _lock:
        for sc in list(_env_routed):
            if sc not in wanted:
                _registry.pop(sc, None)
                _env_routed.discard(sc)
        for sc, root in wanted.items():
            current = _registry.get(sc)
            if current is not None and sc not in _env_routed:
                continue  # registered in code
            if current is None or current.handler.root != root:
                _registry[sc] = object_store_on_disk(root)
                _env_routed.add(sc)


_env_routed: set[str] = set()

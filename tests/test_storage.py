"""tnlbt.storage: local paths, file:// URIs, a fake S3 (SubTreeFileSystem), fsspec's memory filesystem.

No test touches the network: S3 is simulated by routing ``s3://`` to a local subtree with
``register_filesystem``, and fsspec's in-process ``memory://`` filesystem stands in for any other protocol.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tnlbt import storage


@pytest.fixture
def fake_s3(tmp_path):
    """``s3://`` routed to ``tmp_path/s3root`` (bucket = first folder), removed again afterwards."""
    root = tmp_path / "s3root"
    root.mkdir()
    storage.register_filesystem("s3", pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    yield root
    storage.register_filesystem("s3", None)


@pytest.fixture
def mem_uri():
    """A fresh prefix in fsspec's process-global memory filesystem, cleaned afterwards."""
    import fsspec

    prefix = f"memory://t{uuid.uuid4().hex[:8]}"
    yield prefix
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(prefix)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# -- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "sc", "remote"),
    [
        ("data/processed", "", False),
        ("/abs/x", "", False),
        ("file:///abs/x", "file", False),
        ("s3://bucket/key", "s3", True),
        ("S3://bucket/key", "s3", True),
        ("gs://bucket/key", "gs", True),
        ("memory://x/y", "memory", True),
        ("C:/windows/path", "", False),
        ("weird name://not a scheme", "", False),
    ],
)
def test_scheme_and_is_remote(uri, sc, remote):
    assert storage.scheme(uri) == sc
    assert storage.is_remote(uri) is remote


def test_join_keeps_scheme():
    assert storage.join("s3://b/runs", "exp1", "checkpoints") == "s3://b/runs/exp1/checkpoints"
    assert storage.join("s3://b/runs/", "x") == "s3://b/runs/x"
    assert storage.join("gs://b", "a/b.json") == "gs://b/a/b.json"
    assert storage.join("file:///tmp/r", "x") == "file:///tmp/r/x"
    assert storage.join("runs", "a", "b") == os.path.join("runs", "a", "b")
    assert storage.join(storage.join("memory://m", "a"), "b") == "memory://m/a/b"


def test_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.local_path("rel/x") == str(tmp_path / "rel" / "x")
    assert storage.local_path(f"file://{tmp_path}/a%20b") == str(tmp_path / "a b")
    assert storage.local_path("s3://b/k") is None
    with pytest.raises(storage.StorageError):
        storage.local_path("file://otherhost/x")


def test_resolve_local_and_file_uri(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    fs2, path2 = storage.resolve(f"file://{tmp_path}/x")
    assert isinstance(fs2, pafs.LocalFileSystem) and path2 == path


def test_resolve_s3_and_gs_shapes_without_network(monkeypatch):
    # With a region in the environment the S3 client is built directly (no bucket-region lookup).
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    storage.clear_filesystem_cache()
    try:
        fs, path = storage.resolve("s3://my-bucket/recipe1m/processed/")
        assert fs.type_name == "s3" and path == "my-bucket/recipe1m/processed"
        assert fs.region == "us-west-2"
        gfs, gpath = storage.resolve("gs://gb/x/y")
        assert gfs.type_name == "gcs" and gpath == "gb/x/y"
        with pytest.raises(storage.StorageError, match="bucket"):
            storage.resolve("s3:///no-bucket")
    finally:
        storage.clear_filesystem_cache()


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="nosuchproto"):
        storage.resolve("nosuchproto://x/y")


# -- round trips on three backends ------------------------------------------------------------------
def _roundtrip(base: str) -> None:
    """The same operations on any backend: write/read text and bytes, list, exists, Parquet, remove."""
    d = storage.join(base, "run", "checkpoints", "epoch_001")
    storage.makedirs(d)
    storage.write_text(storage.join(d, "config.json"), json.dumps({"a": 1}))
    storage.write_bytes(storage.join(d, "model.safetensors"), b"\x00\x01weights")
    assert storage.exists(storage.join(d, "config.json"))
    assert not storage.exists(storage.join(d, "missing.json"))
    assert storage.isdir(d)
    assert json.loads(storage.read_text(storage.join(d, "config.json"))) == {"a": 1}
    assert storage.read_bytes(storage.join(d, "model.safetensors")) == b"\x00\x01weights"
    assert storage.listdir(d) == ["config.json", "model.safetensors"]
    assert storage.listdir(storage.join(base, "nothing-here")) == []
    with storage.open_input(storage.join(d, "config.json")) as f:
        assert json.load(f) == {"a": 1}  # binary file object works with json.load (and ijson)
    # Parquet through the (filesystem, path) pair, as Ray Data and pyarrow take it.
    fs, ppath = storage.resolve(storage.join(base, "processed", "train", "part-0.parquet"))
    storage.ensure_parent(storage.join(base, "processed", "train", "part-0.parquet"))
    pq.write_table(pa.table({"id": ["r1", "r2"]}), ppath, filesystem=fs)
    assert pq.read_table(ppath, filesystem=fs).column("id").to_pylist() == ["r1", "r2"]
    with pytest.raises(FileNotFoundError):
        storage.open_input(storage.join(d, "missing.json"))
    storage.remove(storage.join(d, "config.json"))
    assert storage.listdir(d) == ["model.safetensors"]
    storage.remove(storage.join(base, "run"))
    assert not storage.exists(storage.join(base, "run"))
    storage.remove(storage.join(base, "run"))  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(base, "run"), missing_ok=False)


def test_roundtrip_local_path(tmp_path):
    _roundtrip(str(tmp_path / "local"))


def test_roundtrip_file_uri(tmp_path):
    _roundtrip(f"file://{tmp_path}/furi")
    assert not (tmp_path / "furi" / "run").exists()


def test_roundtrip_fake_s3(fake_s3):
    _roundtrip("s3://bucket/prefix")
    # The bytes really went through the subtree: the bucket is a folder under the fake root.
    storage.write_text("s3://bucket/prefix/marker.txt", "hi")
    assert (fake_s3 / "bucket" / "prefix" / "marker.txt").read_text() == "hi"


def test_roundtrip_fsspec_memory(mem_uri):
    fs, _ = storage.resolve(mem_uri)
    assert isinstance(fs, pafs.PyFileSystem)
    _roundtrip(mem_uri)


def test_open_input_on_directory_is_an_error(tmp_path):
    with pytest.raises(IsADirectoryError):
        storage.open_input(str(tmp_path))


# -- directories: checkpoints up and down -----------------------------------------------------------
def _make_ckpt(path) -> None:
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    for name, data in {"model.safetensors": b"w" * 1000, "config.json": b"{}", "sub/x.bin": b"xyz"}.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def _tree(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def test_upload_download_dir_fake_s3(fake_s3, tmp_path):
    src = tmp_path / "ckpt"
    _make_ckpt(src)
    uri = "s3://bucket/runs/r1/checkpoint_000001"
    storage.upload_dir(str(src), uri)
    assert storage.listdir(uri) == ["config.json", "model.safetensors", "sub"]
    local = storage.download_dir(uri, tmp_path / "dl")
    assert _tree(local) == _tree(src)
    # A second download replaces a stale partial copy instead of mixing files.
    (tmp_path / "dl" / "stale.txt").write_text("old")
    local = storage.download_dir(uri, tmp_path / "dl")
    assert _tree(local) == _tree(src)


def test_download_dir_local_is_no_copy(tmp_path):
    src = tmp_path / "ckpt"
    _make_ckpt(src)
    assert storage.download_dir(str(src), tmp_path / "unused") == str(src)
    assert storage.download_dir(f"file://{src}", tmp_path / "unused") == str(src)
    assert not (tmp_path / "unused").exists()
    storage.upload_dir(str(src), str(src))  # same place: nothing to do, nothing broken
    assert _tree(src)["config.json"] == b"{}"


def test_copy_dir_memory_to_local(mem_uri, tmp_path):
    storage.write_text(storage.join(mem_uri, "d", "a.txt"), "A")
    storage.write_text(storage.join(mem_uri, "d", "b", "c.txt"), "C")
    storage.copy_dir(storage.join(mem_uri, "d"), str(tmp_path / "out"))
    assert _tree(tmp_path / "out") == {"a.txt": b"A", os.path.join("b", "c.txt"): b"C"}
    with pytest.raises(FileNotFoundError):
        storage.copy_dir(storage.join(mem_uri, "nope"), str(tmp_path / "out2"))


# -- Ray Train storage ------------------------------------------------------------------------------
def test_to_ray_storage_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.to_ray_storage_path("runs") == str(tmp_path / "runs")  # Ray wants absolute local paths
    assert storage.to_ray_storage_path(f"file://{tmp_path}/runs") == str(tmp_path / "runs")
    assert storage.to_ray_storage_path("s3://b/runs/") == "s3://b/runs"
    assert storage.to_ray_storage_path("gs://b/runs") == "gs://b/runs"
    assert storage.to_ray_storage_path("gcs://b/runs") == "gs://b/runs"
    with pytest.raises(storage.StorageError, match="ray_storage"):
        storage.to_ray_storage_path("memory://m/runs")


def test_ray_storage_with_custom_filesystem(fake_s3, mem_uri):
    # A routed scheme is not resolvable by Ray from the string alone: path without scheme + filesystem.
    path, fs = storage.ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and isinstance(fs, pafs.SubTreeFileSystem)
    path, fs = storage.ray_storage(storage.join(mem_uri, "runs"))
    assert fs is not None and path.endswith("/runs") and "://" not in path
    path, fs = storage.ray_storage("/abs/runs")
    assert (path, fs) == ("/abs/runs", None)


def test_describe(tmp_path):
    d = storage.describe(f"file://{tmp_path}")
    assert d["scheme"] == "file" and d["remote"] is False and d["filesystem"] == "local"


# -- the on-disk object store (S3 semantics) ----------------------------------------------------------
@pytest.fixture
def disk_s3(tmp_path, monkeypatch):
    """``s3://`` routed through TNLBT_STORAGE_ROUTES to an ObjectStoreOnDisk under ``tmp_path/objs``."""
    root = tmp_path / "objs"
    monkeypatch.setenv("TNLBT_STORAGE_ROUTES", f"s3={root}")
    yield root
    monkeypatch.delenv("TNLBT_STORAGE_ROUTES")
    storage.resolve("/")  # forget the route


def test_roundtrip_object_store_on_disk(disk_s3):
    _roundtrip("s3://bucket/prefix")
    assert storage.describe("s3://bucket/x")["filesystem"] == "py::objectstore-on-disk"


def test_object_store_on_disk_has_s3_semantics(disk_s3):
    fs, base = storage.resolve("s3://bucket/run")
    storage.makedirs("s3://bucket/run/empty")  # no marker objects: an empty prefix does not exist
    assert not storage.exists("s3://bucket/run/empty")
    with storage.open_output("s3://bucket/run/a.txt") as f:
        f.write(b"part")
        assert not storage.exists("s3://bucket/run/a.txt")  # visible only once the upload completes
    assert storage.read_bytes("s3://bucket/run/a.txt") == b"part"
    assert storage.isdir("s3://bucket/run")
    with pytest.raises(OSError, match="append"):
        fs.open_append_stream(f"{base}/a.txt")
    storage.write_text("s3://bucket/run/d/x.json", "{}")
    with pytest.raises(OSError, match="rename a prefix"):
        fs.move(f"{base}/d", f"{base}/e")
    fs.move(f"{base}/a.txt", f"{base}/b.txt")  # single objects can move (copy + delete on S3)
    assert storage.listdir("s3://bucket/run") == ["b.txt", "d"]
    storage.remove("s3://bucket/run/d/x.json")
    assert storage.listdir("s3://bucket/run") == ["b.txt"]  # the prefix went with its last object


def test_object_store_route_reaches_other_processes(disk_s3):
    import subprocess
    import sys

    storage.write_text("s3://bucket/shared/hello.txt", "from the parent")
    code = ("from tnlbt import storage; print(storage.read_text('s3://bucket/shared/hello.txt'));"
            "storage.write_text('s3://bucket/shared/child.txt', 'from the child')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "from the parent"
    assert storage.read_text("s3://bucket/shared/child.txt") == "from the child"


def test_object_store_filesystem_pickles_for_ray_tasks(disk_s3):
    import pickle

    fs, path = storage.resolve("s3://bucket/p/t.parquet")
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=fs)
    fs2 = pickle.loads(pickle.dumps(fs))
    assert pq.read_table(path, filesystem=fs2).column("x").to_pylist() == [1, 2]
    assert storage.ray_storage("s3://bucket/runs") == ("bucket/runs", fs)


def test_routes_env_is_validated_and_code_routes_win(tmp_path, monkeypatch):
    monkeypatch.setenv("TNLBT_STORAGE_ROUTES", "s3")
    with pytest.raises(storage.StorageError, match="scheme=/local/folder"):
        storage.resolve("s3://b/k")
    code_fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    storage.register_filesystem("s3", code_fs)
    try:
        monkeypatch.setenv("TNLBT_STORAGE_ROUTES", f"s3={tmp_path / 'other'}")
        assert storage.resolve("s3://b/k")[0] is code_fs
    finally:
        storage.register_filesystem("s3", None)
        monkeypatch.delenv("TNLBT_STORAGE_ROUTES")


@pytest.mark.parametrize("where", ["local", "object_store"])
def test_file_helpers_behave_alike_on_disk_and_on_the_store(where, tmp_path, disk_s3):
    """isfile / list_files / open_parquet give the same answers locally and on the store; as_local keeps a
    relative path relative and refuses a remote URI."""
    base = str(tmp_path / "loc") if where == "local" else "s3://bucket/p"
    for name in ("part-p00000.parquet", "part-r00000.parquet", ".part-p00001.parquet.tmp", "vocab.json"):
        storage.write_bytes(storage.join(base, "train", name), b"x")
    fs, path = storage.resolve(storage.join(base, "val", "part-p00000.parquet"))
    storage.ensure_parent(storage.join(base, "val", "part-p00000.parquet"))
    pq.write_table(pa.table({"id": ["a", "b"]}), path, filesystem=fs)
    train = storage.join(base, "train")
    assert storage.list_files(train, "part-*.parquet") == ["part-p00000.parquet", "part-r00000.parquet"]
    assert storage.list_files(train) == [".part-p00001.parquet.tmp", "part-p00000.parquet",
                                         "part-r00000.parquet", "vocab.json"]
    assert storage.list_files(storage.join(base, "missing")) == []
    assert storage.isfile(storage.join(train, "vocab.json")) and not storage.isfile(train)
    pf = storage.open_parquet(storage.join(base, "val", "part-p00000.parquet"))
    assert pf.read().column("id").to_pylist() == ["a", "b"]
    assert storage.as_local("rel/x") == Path("rel/x")
    assert storage.as_local(f"file://{tmp_path}") == tmp_path
    with pytest.raises(storage.StorageError):
        storage.as_local("s3://bucket/p")

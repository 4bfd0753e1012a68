"""Storage against a real local directory and a real S3 server (moto, its own process), same cases."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs
import pytest
from conftest import free_port, wait_for_port

from sdsg_ray.config import StorageConfig
from sdsg_ray.storage import ObjectNotFound, Storage, StorageError, join, normalize


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh empty prefix: a temp directory, or a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return join(request.getfixturevalue("s3_bucket"), "store")


@pytest.fixture
def storage() -> Storage:
    return Storage()


def test_roundtrip_exists_delete(root, storage):
    uri = join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00payload"
    storage.write_text(join(root, "t.txt"), "héllo")
    assert storage.read_text(join(root, "t.txt")) == "héllo"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting a missing object is fine


def test_missing_key_is_object_not_found(root, storage):
    uri = join(root, "nope.jpg")
    with pytest.raises(ObjectNotFound, match="nope.jpg"):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError):  # callers may catch the builtin too
        storage.read_bytes(uri)


def test_listing_paginates_sorted_and_filters(root, storage):
    """1203 keys: more than one S3 page (1000), mixed suffixes and nesting; sorted full URIs."""
    names = [f"img/{i // 100:02d}/{i:05d}.{'jpg' if i % 3 else 'PNG'}" for i in range(1200)]
    names += ["img/readme.txt", "img.jpg", "img/00.jpg"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: storage.write_bytes(join(root, n), b"x"), names))
    listed = list(storage.list(join(root, "img")))
    expected = sorted(normalize(join(root, n)) for n in names if n.startswith("img/"))
    assert listed == expected
    assert len(listed) == 1202
    images = list(storage.list(root, suffixes=(".jpg", ".png")))
    assert len(images) == 1202  # case-insensitive suffix; readme.txt dropped; img.jpg included
    assert normalize(join(root, "img.jpg")) in images
    assert list(storage.list(join(root, "does-not-exist"))) == []


def test_failed_write_leaves_nothing_and_keeps_old(root, storage, tmp_path):
    uri = join(root, "dir", "obj.bin")
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.open_write(uri) as f:
            f.write(b"half of it")
            raise RuntimeError("writer died")
    assert not storage.exists(uri)
    assert list(storage.list(root)) == []
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"new but unfinished")
            raise RuntimeError("writer died")
    assert storage.read_bytes(uri) == b"old"
    if not root.startswith("s3://"):
        assert os.listdir(os.path.dirname(normalize(uri))) == ["obj.bin"]  # no temp file left


def test_arrow_filesystem_lists_same_keys(root, storage):
    for name in ("x/1.png", "x/2.jpg", "x/sub/3.png"):
        storage.write_bytes(join(root, name), name.encode())
    fs, path = storage.arrow_filesystem(join(root, "x"))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    arrow_files = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.File)
    ours = list(storage.list(join(root, "x")))
    prefix = "s3://" if root.startswith("s3://") else ""
    assert [prefix + p for p in arrow_files] == ours
    with fs.open_input_stream(f"{path}/sub/3.png") as f:
        assert f.read() == b"x/sub/3.png"


def test_storage_pickles_and_works_after(root, storage):
    storage.write_bytes(join(root, "p.bin"), b"1")
    _ = storage.store("s3://b").client  # build the client, then make sure pickling drops it
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.store("s3://b")._client is None
    assert clone.read_bytes(join(root, "p.bin")) == b"1"


def test_missing_bucket_is_storage_error(s3_endpoint, storage):
    uri = "s3://no-such-bucket-sdsg/x.jpg"
    with pytest.raises(StorageError, match="no-such-bucket-sdsg") as info:
        storage.read_bytes(uri)
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StorageError, match="does not exist"):
        storage.exists(uri)
    with pytest.raises(StorageError, match="no-such-bucket-sdsg"):
        list(storage.list("s3://no-such-bucket-sdsg/prefix"))


def test_wrong_credentials_is_storage_error_without_secret(monkeypatch):
    """moto with IAM auth enforced: an unknown access key is rejected as on AWS (InvalidAccessKeyId)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        storage = Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}"))
        for call in (lambda: storage.read_bytes("s3://bkt/k.jpg"), lambda: storage.write_bytes("s3://bkt/k", b"1")):
            with pytest.raises(StorageError, match=r"s3://bkt/k.*access denied") as info:
                call()
            assert "very-secret-value" not in str(info.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert Storage().store("s3://b").endpoint_url == "http://env:9000"
    assert Storage(StorageConfig(endpoint_url="http://cfg:9000")).store("s3://b").endpoint_url == "http://cfg:9000"
    fs, path = Storage(StorageConfig(endpoint_url="http://cfg:9000")).arrow_filesystem("s3://b/k/")
    assert isinstance(fs, pyarrow.fs.PyFileSystem) and path == "b/k"
    assert fs.handler.store.endpoint_url == "http://cfg:9000"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert Storage().store("s3://b").endpoint_url is None


def test_uri_helpers(tmp_path):
    assert join("s3://b", "x/", "/y.jpg") == "s3://b/x/y.jpg"
    assert join("s3://b/p/", "q") == "s3://b/p/q"
    assert normalize(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    assert normalize("s3://b/k") == "s3://b/k"
    with pytest.raises(StorageError, match="gs://"):
        normalize("gs://b/k")



def test_relative_link_within_one_namespace_only(tmp_path):
    storage = Storage()
    assert storage.relative_link(str(tmp_path / "sel" / "curation.html"), f"file://{tmp_path}/report") == "../sel/curation.html"
    assert storage.relative_link("s3://b/sel/curation.html", "s3://b/report") == "../sel/curation.html"
    assert storage.relative_link("s3://other/curation.html", "s3://b/report") == "s3://other/curation.html"
    assert storage.relative_link("s3://b/curation.html", str(tmp_path)) == "s3://b/curation.html"

# ----- manifests (same local/S3 parametrisation) -------------------------------------------------
def test_manifest_roundtrip_and_resolve(root, storage):
    from sdsg_ray.manifest import (
        is_manifest, read_manifest, read_manifest_table, resolve_images, write_manifest, write_manifest_shards,
    )

    images = [join(root, "imgs", f"{i:03d}.{'jpg' if i % 2 else 'png'}") for i in range(25)]
    for uri in images:
        storage.write_bytes(uri, b"x")
    storage.write_bytes(join(root, "imgs", "notes.txt"), b"x")
    expected = [normalize(u) for u in images]
    assert resolve_images(join(root, "imgs"), storage) == sorted(expected)  # listing: images only

    single = join(root, "m.parquet")
    write_manifest(images, single, storage, score=[float(i) for i in range(25)])
    assert is_manifest(single, storage) and read_manifest(single, storage) == expected
    assert read_manifest_table(single, storage).column("score").to_pylist()[3] == 3.0

    shards = write_manifest_shards(iter(images), join(root, "man"), storage, shard_size=10)
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"manifest-0000{i}.parquet" for i in range(3)]
    assert is_manifest(join(root, "man"), storage) and not is_manifest(join(root, "imgs"), storage)
    assert resolve_images(join(root, "man"), storage) == expected  # manifest order kept

    with pytest.raises(ObjectNotFound, match="no images"):
        resolve_images(join(root, "empty"), storage)
    storage.write_bytes(join(root, "bad.parquet"), b"not parquet")
    with pytest.raises(StorageError, match="bad.parquet"):
        read_manifest(join(root, "bad.parquet"), storage)
    with pytest.raises(ValueError, match="score"):
        write_manifest(images, single, storage, score=[1.0])


def test_arrow_view_of_s3_does_what_ray_train_and_data_do(s3_bucket, storage, tmp_path):
    """Ray Train uploads a checkpoint directory with pyarrow.fs.copy_files, lists and downloads it, and
    deletes old ones; Ray Data pickles the filesystem into its tasks. All through our one S3 client."""
    local = tmp_path / "checkpoint"
    (local / "sub").mkdir(parents=True)
    (local / "state.pt").write_bytes(b"weights" * 1000)
    (local / "sub" / "meta.json").write_text("{}")
    fs, base = storage.arrow_filesystem(join(s3_bucket, "runs"))
    fs = pickle.loads(pickle.dumps(fs))  # what a Ray task receives

    fs.create_dir(f"{base}/exp/empty", recursive=True)
    assert fs.get_file_info(f"{base}/exp/empty").type == pyarrow.fs.FileType.Directory
    pyarrow.fs.copy_files(str(local), f"{base}/exp/checkpoint-1", destination_filesystem=fs)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/exp", recursive=True))
    files = {i.path: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    assert files == {f"{base}/exp/checkpoint-1/state.pt": 7000, f"{base}/exp/checkpoint-1/sub/meta.json": 2}
    dirs = {i.path for i in infos if i.type == pyarrow.fs.FileType.Directory}
    assert {f"{base}/exp/checkpoint-1", f"{base}/exp/checkpoint-1/sub"} <= dirs
    shallow = fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/exp/checkpoint-1"))
    assert {(i.base_name, i.type) for i in shallow} == {
        ("state.pt", pyarrow.fs.FileType.File), ("sub", pyarrow.fs.FileType.Directory)}

    back = tmp_path / "back"
    pyarrow.fs.copy_files(f"{base}/exp/checkpoint-1", str(back), source_filesystem=fs)
    assert (back / "state.pt").read_bytes() == b"weights" * 1000
    with fs.open_input_file(f"{base}/exp/checkpoint-1/state.pt") as f:  # random access, ranged GETs
        f.seek(6993)
        assert f.read() == b"weights"

    fs.move(f"{base}/exp/checkpoint-1", f"{base}/exp/checkpoint-2")
    assert fs.get_file_info(f"{base}/exp/checkpoint-1").type == pyarrow.fs.FileType.NotFound
    fs.delete_dir(f"{base}/exp/checkpoint-2")
    assert fs.get_file_info(f"{base}/exp/checkpoint-2").type == pyarrow.fs.FileType.NotFound
    with pytest.raises(FileNotFoundError):
        fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/nothing-here"))
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{base}/nothing-here.bin")
    assert list(storage.list(join(s3_bucket, "runs"))) == []  # directory markers are never listed


def test_pin_settings_records_once_then_reports_what_differs(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "out" / "_RUN.json")
    assert storage.pin_settings(uri, {"metric": "stlpips-alex", "batch": 32}) == {}
    assert storage.pin_settings(uri, {"metric": "stlpips-alex", "batch": 32}) == {}
    assert storage.pin_settings(uri, {"metric": "stlpips-vgg", "batch": 32}) == {"metric": ("stlpips-alex", "stlpips-vgg")}
    assert json.loads(storage.read_text(uri))["metric"] == "stlpips-alex"  # the first record stays


def test_s3_objects_carry_the_content_type_of_their_name(s3_bucket, storage):
    """An S3 website serves the report and the curation page only when they are labelled text/html
    (S3 labels an upload binary/octet-stream unless told); both write paths set it."""
    from sdsg_ray.storage import split_s3

    storage.write_text(join(s3_bucket, "site", "curation.html"), "<html></html>")
    with storage.open_write(join(s3_bucket, "site", "sprite.jpg")) as f:
        f.write(b"\xff\xd8jpeg")
    storage.write_bytes(join(s3_bucket, "site", "scores.unknownext"), b"x")
    kinds = {}
    for name in ("curation.html", "sprite.jpg", "scores.unknownext"):
        bucket, key = split_s3(join(s3_bucket, "site", name))
        kinds[name] = storage.store(s3_bucket).client.head_object(Bucket=bucket, Key=key)["ContentType"]
    assert kinds["curation.html"] == "text/html"
    assert kinds["sprite.jpg"] == "image/jpeg"
    assert kinds["scores.unknownext"] == "binary/octet-stream"  # S3's default where the name says nothing

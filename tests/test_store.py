"""The artifact store and its read-through cache, on the local data root and on a real S3 server."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from facetrace.tasks.store import AlteredObject, ArtifactStore, ObjectCache, Staging, check_key


@pytest.fixture
def store(store_url, data_dir: Path) -> ArtifactStore:
    return ArtifactStore(store_url or data_dir)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_exists_size_list_delete(store: ArtifactStore):
    assert not store.exists("images/ab/x.png")
    store.put_bytes("images/ab/x.png", b"one")
    store.put_bytes("models/m/model.keras", b"model bytes")
    assert store.exists("images/ab/x.png") and store.size("images/ab/x.png") == 3
    assert store.get_bytes("images/ab/x.png") == b"one"
    assert store.list() == ["images/ab/x.png", "models/m/model.keras"]
    assert store.list("models") == ["models/m/model.keras"]
    store.put_bytes("images/ab/x.png", b"two")  # rewriting a key replaces it whole
    assert store.get_bytes("images/ab/x.png") == b"two"
    store.delete("images/ab/x.png")
    assert not store.exists("images/ab/x.png")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("images/ab/x.png")


def test_a_batch_of_objects_is_visible_once_synced(store: ArtifactStore):
    """durable=False: the caller syncs once per batch before any catalog row names the objects."""
    keys = [store.put_bytes(f"images/0{i}/obj{i}.png", bytes([i]) * 10, durable=False) for i in range(5)]
    store.sync()
    assert all(store.get_bytes(k) == bytes([i]) * 10 for i, k in enumerate(keys))
    store.sync()  # nothing pending: nothing to do


def test_local_store_keeps_todays_layout(data_dir: Path):
    store = ArtifactStore(data_dir)
    store.put_bytes("images/ab/abc.png", b"png")
    assert (data_dir / "images" / "ab" / "abc.png").read_bytes() == b"png"
    assert store.url_for("images/ab/abc.png") == str((data_dir / "images/ab/abc.png").resolve())
    assert not list(data_dir.rglob(".tmp-*"))


def test_s3_store_url_names_the_bucket(s3_server, store_url):
    if not store_url:
        pytest.skip("remote store only")
    store = ArtifactStore(store_url)
    assert store.url_for("images/ab/x.png") == f"{store_url}/images/ab/x.png"
    clone = pickle.loads(pickle.dumps(store))  # task runners send the store to worker processes
    store.put_bytes("a/b", b"x")
    assert clone.get_bytes("a/b") == b"x"


@pytest.mark.parametrize("key", ["/etc/passwd", "../x", "a/../../x", "a//b", "", "s3://other/x", "a\\b"])
def test_keys_cannot_escape_the_store(key: str):
    with pytest.raises(ValueError):
        check_key(key)


def test_put_file_and_tree(store: ArtifactStore, tmp_path: Path):
    folder = tmp_path / "site"
    (folder / "sub").mkdir(parents=True)
    (folder / "index.html").write_text("<html>")
    (folder / "sub" / "page.html").write_text("<p>")
    keys = store.put_tree("validation/gx", folder)
    assert keys == ["validation/gx/index.html", "validation/gx/sub/page.html"]
    assert store.get_bytes("validation/gx/sub/page.html") == b"<p>"


def test_cache_fetches_once_verifies_and_refuses_altered_objects(store: ArtifactStore, data_dir: Path):
    data = b"face bytes" * 100
    key = f"images/{sha(data)[:2]}/{sha(data)}.png"
    store.put_bytes(key, data)
    cache = ObjectCache(store, data_dir / "cache" / "objects", max_bytes=1 << 20)
    first = cache.fetch_path(key, sha(data))
    assert first.read_bytes() == data and first.suffix == ".png"
    assert cache.fetch_path(key, sha(data)) == first
    assert cache.fetched == (0 if store.local else 1)  # a hit reads nothing remote
    with pytest.raises(AlteredObject, match="does not match its registered sha256"):
        cache.fetch_path(key, sha(b"something else"))
    with pytest.raises(FileNotFoundError):
        cache.fetch_path("images/00/missing.png", sha(b"missing"))


def test_altered_object_in_store_is_refused_even_after_caching(store: ArtifactStore, data_dir: Path):
    data = b"model" * 1000
    key = "models/m/t/model.keras"
    store.put_bytes(key, data)
    cache = ObjectCache(store, data_dir / "cache" / "objects", max_bytes=1 << 20)
    cache.fetch_path(key, sha(data))
    store.put_bytes(key, b"tampered" * 10)
    fresh = ObjectCache(store, data_dir / "cache" / "fresh", max_bytes=1 << 20)
    with pytest.raises(AlteredObject):
        fresh.fetch_path(key, sha(data))
    with pytest.raises(AlteredObject):  # the bulk path (a snapshot's images) checks every object too
        fresh.fetch_many([(key, sha(data))])
    if not store.local:  # the copy cached before the change was verified then, and is still the right bytes
        assert cache.fetch_path(key, sha(data)).read_bytes() == data
        # a cached copy altered on this disk is detected and fetched again (here: refused, the store changed)
        cached = next((data_dir / "cache" / "objects").rglob("*.keras"))
        cached.write_bytes(b"local damage")
        with pytest.raises(AlteredObject):
            cache.fetch_path(key, sha(data))


def test_cache_is_bounded_least_recently_used_first(s3_server, store_url, data_dir: Path):
    if not store_url:
        pytest.skip("a local store is read in place, never copied")
    store = ArtifactStore(store_url)
    blobs = [bytes([i]) * 1000 for i in range(5)]
    keys = [f"images/{sha(b)[:2]}/{sha(b)}.png" for b in blobs]
    for key, blob in zip(keys, blobs):
        store.put_bytes(key, blob)
    cache = ObjectCache(store, data_dir / "cache" / "objects", max_bytes=2500)
    import os
    import time

    for n, (key, blob) in enumerate(zip(keys[:3], blobs[:3])):
        path = cache.fetch_path(key, sha(blob))
        os.utime(path, (time.time() - 100 + n, time.time() - 100 + n))
    cache.fetch_path(keys[0], sha(blobs[0]))  # used again: now the most recent
    cache.fetch_path(keys[3], sha(blobs[3]))
    assert cache.size() <= 2500
    names = {p.name.split(".")[0] for p in (data_dir / "cache" / "objects").rglob("*.png")}
    assert sha(blobs[0]) in names and sha(blobs[3]) in names and sha(blobs[1]) not in names
    # a bulk read keeps its whole batch until the reader is done, then trims
    paths = cache.fetch_many([(k, sha(b)) for k, b in zip(keys, blobs)])
    assert all(Path(p).is_file() for p in paths)
    cache.trim()
    assert cache.size() <= 2500


def test_staging_publishes_a_built_folder(store: ArtifactStore, data_dir: Path):
    staging = Staging(store, "reports/mobilenet_v2/t1", data_dir)
    staging.dir.mkdir(parents=True)
    (staging.dir / "roc.png").write_bytes(b"png")
    assert staging.key(staging.dir / "roc.png") == "reports/mobilenet_v2/t1/roc.png"
    assert staging.publish() == ["reports/mobilenet_v2/t1/roc.png"]
    staging.discard()
    assert store.get_bytes("reports/mobilenet_v2/t1/roc.png") == b"png"
    assert not (data_dir / "cache" / "staging").exists() or not any((data_dir / "cache" / "staging").iterdir())


def test_store_from_settings(store_env, data_dir: Path):
    store = ArtifactStore.from_settings()
    assert store.local == (store_env.store_url is None)
    if store.local:
        assert Path(store.root) == data_dir.resolve()


def test_store_options_are_json_fsspec_options(s3_server, store_url, monkeypatch):
    from facetrace.tasks.store import load_options

    assert load_options(None) == {}
    assert load_options('{"client_kwargs": {"region_name": "us-east-1"}}') == {
        "client_kwargs": {"region_name": "us-east-1"}}
    with pytest.raises(ValueError, match="not JSON"):
        load_options("endpoint=http://x")
    with pytest.raises(ValueError, match="JSON object"):
        load_options("[1, 2]")
    if store_url:  # the endpoint given as an option instead of AWS_ENDPOINT_URL reaches the same server
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        options = load_options(json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}}))
        store = ArtifactStore(store_url, options)
        store.put_bytes("a/b", b"via options")
        assert store.get_bytes("a/b") == b"via options"

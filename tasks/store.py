"""The artifact store: every shared artifact (images, models, model cards, reports, data docs) under
one URL, and a local read-through cache of it keyed by sha256.

``FACETRACE_STORE_URL`` unset: the store is the data root itself, with today's layout byte for byte
(``images/<sha[:2]>/<sha256>.<ext>``, ``models/...``, ``reports/...``, ``validation/...``). Set: any
fsspec URL, e.g. ``s3://bucket/prefix`` (endpoint and credentials from the standard AWS variables,
``AWS_ENDPOINT_URL`` included, or ``FACETRACE_STORE_OPTIONS``: a JSON object of fsspec storage options,
or ``block:NAME`` naming a Prefect Secret block that holds that JSON).

The catalog holds *keys* (``images/ab/ab...ff.png``), never a machine's path; :meth:`ArtifactStore.url_for`
turns a key into something a person can open. A reader never sees a partial object: the local backend
writes a temporary file and renames it, an S3 PUT is atomic by nature.

Machine-local things (caches, the inbox, build folders) stay under the data root and never go here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from facetrace.tasks.storage import TEMP_PREFIX, file_sha256, sha256_hex, sync_data_root, write_atomically

OBJECTS_CACHE = Path("cache") / "objects"


class StoreError(RuntimeError):
    """The store could not be reached or refused an operation (the message names the store URL)."""


class AlteredObject(ValueError):
    """An object whose bytes no longer match the sha256 the catalog recorded for it."""


def check_key(key: str) -> str:
    """A store key: a relative POSIX path without ``..`` (a catalog row must not steer a write elsewhere)."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key:
        raise ValueError(f"not a store key: {key!r}")
    parts = key.split("/")
    if any(part in ("..", ".", "") for part in parts) or ":" in parts[0]:
        raise ValueError(f"not a store key: {key!r}")
    return key


def load_options(raw: str | None) -> dict[str, Any]:
    """fsspec storage options from ``FACETRACE_STORE_OPTIONS``: JSON, or ``block:NAME`` (a Prefect Secret)."""
    if not raw:
        return {}
    if raw.startswith("block:"):
        from prefect.blocks.system import Secret

        value = Secret.load(raw.removeprefix("block:")).get()
        options = value if isinstance(value, dict) else json.loads(value)
    else:
        try:
            options = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"FACETRACE_STORE_OPTIONS is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError("FACETRACE_STORE_OPTIONS must be a JSON object of fsspec storage options")
    return options


class ArtifactStore:
    """Put, get and list objects by key, on the local data root or any fsspec file system.

    Picklable (a task runner's worker process rebuilds the file system from the URL and options).
    """

    def __init__(self, url: str | os.PathLike, options: dict[str, Any] | None = None) -> None:
        import fsspec.core

        raw = os.fspath(url)
        self.options = dict(options or {})
        protocol = fsspec.core.split_protocol(raw)[0]
        self.local = protocol in (None, "file", "local")
        if self.local:
            self.root = str(Path(fsspec.core.strip_protocol(raw) if protocol else raw).resolve())
            self.url = self.root
        else:
            self.url = raw.rstrip("/")
            if protocol in ("s3", "s3a"):
                # Objects change under other machines' hands: never answer from a stale listing.
                self.options.setdefault("use_listings_cache", False)
            self.root = fsspec.core.url_to_fs(self.url, **self.options)[1].rstrip("/")
        self._fs = None
        self._pending = threading.local()  # per thread: objects put with durable=False, sent by sync()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    @classmethod
    def from_settings(cls, settings=None) -> ArtifactStore:
        if settings is None:
            from facetrace.settings import get_settings

            settings = get_settings()
        if not settings.store_url:
            return cls(settings.data_dir)
        return cls(settings.store_url, load_options(settings.store_options))

    @property
    def fs(self):
        if self._fs is None:
            import fsspec.core

            self._fs = fsspec.core.url_to_fs(self.url, **self.options)[0]
        return self._fs

    # ------------------------------------------------------------ addressing

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` on a local store (a remote store has none)."""
        if not self.local:
            raise ValueError(f"{self.url} is not a local store")
        return Path(self._path(key))

    def url_for(self, key: str) -> str:
        """Where a person (or another tool) finds ``key``: a local path, or the store URL of the object.
        An absolute path (a row from before keys, outside the data root) is shown as it is."""
        if os.path.isabs(key):
            return key
        return self._path(key) if self.local else f"{self.url}/{check_key(key)}"

    def key_of(self, path: str | os.PathLike) -> str | None:
        """The key of a local file inside a local store; None for anything else."""
        if not self.local:
            return None
        try:
            rel = Path(path).resolve().relative_to(self.root)
        except ValueError:
            return None
        return rel.as_posix()

    def _guard(self, action: str, key: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (FileNotFoundError, AlteredObject, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - a network or permission failure, named with the store
            raise StoreError(f"artifact store {self.url}: {action} {key} failed: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------ writing

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> str:
        """Write ``data`` under ``key`` so that no reader sees a partial object; returns the key.

        ``durable=False`` leaves the rest to :meth:`sync`, once per batch, which the caller must call
        before any catalog row points at the object: locally the fsync (the file is renamed into place
        at once), remotely the upload itself, all of this thread's pending objects in one concurrent call.
        """
        path = self._path(key)
        if self.local:
            write_atomically(Path(path), data, durable=durable)
        elif durable:
            self._guard("put", key, lambda: self.fs.pipe_file(path, data))
        else:
            self._pending_objects()[path] = data
        return key

    def _pending_objects(self) -> dict[str, bytes]:
        if not hasattr(self._pending, "objects"):
            self._pending.objects = {}
        return self._pending.objects

    def put_file(self, key: str, source: str | os.PathLike) -> str:
        """Copy a local file to ``key`` (atomically, like :meth:`put_bytes`)."""
        source = Path(source)
        if self.local:
            target = Path(self._path(key))
            if target.exists() and os.path.samefile(source, target):
                return key  # built in place
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{target.name}")
            try:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self._guard("put", key, lambda: self.fs.put_file(str(source), self._path(key)))
        return key

    def put_tree(self, prefix: str, folder: str | os.PathLike, *, workers: int = 4) -> list[str]:
        """Every file under a local ``folder`` to ``prefix/<relative path>``; returns the keys."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX))
        keys = [f"{prefix}/{p.relative_to(folder).as_posix()}" for p in files]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(self.put_file, keys, files))
        return keys

    def sync(self) -> None:
        """Make every write so far durable before a catalog row points at it (local: ``syncfs``;
        remote: this thread's pending objects uploaded, concurrently)."""
        if self.local:
            sync_data_root(Path(self.root))
            return
        pending = self._pending_objects()
        if not pending:
            return
        objects, self._pending.objects = dict(pending), {}  # a failed upload is retried by re-putting
        self._guard("put", f"{len(objects)} objects under {self.url}", lambda: self.fs.pipe(objects))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.local:
            Path(path).unlink(missing_ok=True)
        else:
            self._guard("delete", key, lambda: self.fs.rm_file(path) if self.fs.exists(path) else None)

    # ------------------------------------------------------------ reading

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        path = self._path(key)
        if self.local:
            try:
                return Path(path).read_bytes()
            except (IsADirectoryError, NotADirectoryError):
                raise FileNotFoundError(f"{path} is not a file") from None
        return self._guard("get", key, lambda: self.fs.cat_file(path))

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Several objects' bytes by key, fetched concurrently (one request each, in flight together);
        FileNotFoundError names the first missing one."""
        if self.local:
            return {key: self.get_bytes(key) for key in keys}
        paths = {self._path(key): key for key in keys}
        found = self._guard("get", f"{len(keys)} objects", lambda: self.fs.cat(list(paths), on_error="return"))
        out = {}
        for path, key in paths.items():
            value = found.get(path, FileNotFoundError(path))
            if isinstance(value, FileNotFoundError):
                raise FileNotFoundError(f"{key} is not in the artifact store {self.url}")
            if isinstance(value, Exception):
                raise StoreError(f"artifact store {self.url}: get {key} failed: {type(value).__name__}: {value}")
            out[key] = value
        return out

    def get_file(self, key: str, target: str | os.PathLike) -> None:
        """Download ``key`` to a local file (streamed: model files can be large)."""
        if self.local:
            shutil.copyfile(self._path(key), target)
        else:
            self._guard("get", key, lambda: self.fs.get_file(self._path(key), str(target)))

    def exists(self, key: str) -> bool:
        path = self._path(key)
        if self.local:
            return Path(path).is_file()
        return self._guard("exists", key, lambda: self.fs.isfile(path))

    def size(self, key: str) -> int:
        path = self._path(key)
        if self.local:
            return Path(path).stat().st_size
        return self._guard("size", key, lambda: self.fs.size(path))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursive, sorted), temporaries of the local backend left out."""
        base = f"{self.root}/{check_key(prefix)}" if prefix else self.root
        if self.local:
            if not Path(base).is_dir():
                return []
            found = [p for p in Path(base).rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]
            return sorted(p.relative_to(self.root).as_posix() for p in found)
        self.fs.invalidate_cache()
        found = self._guard("list", prefix or "/", lambda: self.fs.find(base))
        self.fs.invalidate_cache()
        root = self.fs._strip_protocol(self.root).rstrip("/")
        return sorted(f[len(root) + 1:] for f in found)


def as_store(store: ArtifactStore | str | os.PathLike) -> ArtifactStore:
    """A store as given, or the local store at a data root (callers that still pass a folder)."""
    return store if isinstance(store, ArtifactStore) else ArtifactStore(store)


# ---------------------------------------------------------------- the read-through cache


class ObjectCache:
    """Verified local copies of store objects under ``<data root>/cache/objects``, keyed by sha256.

    A cached file is named by its digest, so it is never stale; every fetch checks the sha256 (a
    download before it is kept, a hit before it is used), so an altered object never feeds a model.
    The cache is bounded: :meth:`trim` evicts the least recently used files beyond ``max_bytes``
    (called after each fetch that grew it, and by callers after a bulk read that must stay whole).
    A local store needs no copies: its own files are checked and used in place.
    """

    def __init__(self, store: ArtifactStore, root: Path, max_bytes: int) -> None:
        self.store, self.root, self.max_bytes = store, Path(root), max_bytes
        self.fetched = 0  # objects read from the store (a remote one) by this cache instance
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, store: ArtifactStore | None = None, settings=None,
                      data_dir: str | os.PathLike | None = None) -> ObjectCache:
        """The cache of this machine's data root (``data_dir`` overrides the settings' one)."""
        if settings is None:
            from facetrace.settings import get_settings

            settings = get_settings()
        root = Path(data_dir if data_dir is not None else settings.data_dir) / OBJECTS_CACHE
        return cls(store or ArtifactStore.from_settings(settings), root, settings.cache_max_bytes)

    def _entry(self, key: str, sha256: str) -> Path:
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        suffix = PurePosixPath(key).suffix  # Keras recognises a model file by its extension
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def fetch_path(self, key: str, sha256: str, *, trim: bool = True) -> Path:
        """A local file holding ``key``'s bytes, verified against ``sha256`` (AlteredObject otherwise)."""
        if self.store.local:
            path = self.store.local_path(key)
            if not path.is_file():
                raise FileNotFoundError(f"{key} is not in the artifact store {self.store.url}")
            _verify(file_sha256(path), sha256, key, self.store)
            return path
        entry = self._entry(key, sha256)
        if entry.is_file():
            if file_sha256(entry) == sha256:
                os.utime(entry)  # most recently used
                return entry
            entry.unlink(missing_ok=True)  # altered on this disk: fetch again
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{entry.name}")
        try:
            try:
                self.store.get_file(key, tmp)
            except FileNotFoundError:
                raise FileNotFoundError(f"{key} is not in the artifact store {self.store.url}") from None
            _verify(file_sha256(tmp), sha256, key, self.store)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self.fetched += 1
        if trim:
            self.trim(keep=entry)
        return entry

    def fetch_bytes(self, key: str, sha256: str) -> bytes:
        return self.fetch_path(key, sha256).read_bytes()

    def fetch_many(self, items: Sequence[tuple[str, str]], *, workers: int = 8) -> list[str]:
        """Local paths of many (key, sha256) objects, in order, fetched on a few threads; trimmed once
        after all of them, so none of this batch is evicted before the caller reads it."""
        if not self.store.local:
            # Misses are downloaded in chunks of concurrent requests (one event loop, not a thread each).
            missing = [(k, sha) for k, sha in dict(items).items() if not self._entry(k, sha).is_file()]
            for start in range(0, len(missing), 64):
                chunk = missing[start:start + 64]
                for key, data in self.store.get_many([k for k, _ in chunk]).items():
                    self._keep(key, dict(chunk)[key], data)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            paths = list(pool.map(lambda item: str(self.fetch_path(*item, trim=False)), items))
        if not self.store.local:
            self.trim(keep_all={Path(p) for p in paths}, budget=self.max_bytes)
        return paths

    def _keep(self, key: str, sha256: str, data: bytes) -> Path:
        """Verified bytes of ``key`` into the cache (atomically: a reader never sees half an entry)."""
        _verify(sha256_hex(data), sha256, key, self.store)
        entry = self._entry(key, sha256)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{entry.name}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self.fetched += 1
        return entry

    def adopt(self, key: str, source: Path, sha256: str) -> None:
        """Seed the cache with a file this machine just built and uploaded (no download to read it back)."""
        if self.store.local:
            return
        entry = self._entry(key, sha256)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{entry.name}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        self.trim(keep=entry)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob("*/*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]

    def trim(self, keep: Path | None = None, keep_all: set[Path] | None = None, budget: int | None = None) -> int:
        """Evict least-recently-used files until the cache holds at most ``max_bytes``; returns bytes freed.

        ``keep`` / ``keep_all``: files just fetched, evicted last (a batch larger than the whole cache
        stays until its reader is done; the next trim removes it).
        """
        limit = self.max_bytes if budget is None else budget
        protected = set(keep_all or ()) | ({keep} if keep else set())
        with self._lock:
            entries = []
            for path in self._files():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((path in protected, stat.st_mtime, stat.st_size, path))
            total = sum(e[2] for e in entries)
            freed = 0
            for is_protected, _, size, path in sorted(entries, key=lambda e: (e[0], e[1])):
                if total <= limit or is_protected:
                    break
                path.unlink(missing_ok=True)
                total -= size
                freed += size
            return freed


def _verify(actual: str, expected: str, key: str, store: ArtifactStore) -> None:
    if actual != expected:
        raise AlteredObject(f"{key} in the artifact store {store.url} does not match its registered sha256 "
                            f"(expected {expected[:12]}..., found {actual[:12]}...); refusing to use it")


def image_paths(items: Iterable[Any], cache: ObjectCache | None = None, workers: int = 8) -> list[str]:
    """Verified local paths of catalogued images (anything with ``.path`` (a key) and ``.sha256``)."""
    cache = cache or ObjectCache.from_settings()
    return cache.fetch_many([(item.path, item.sha256) for item in items], workers=workers)


def artifact_file(ref: str | os.PathLike, sha256: str | None = None, cache: ObjectCache | None = None) -> Path:
    """A local, verified file for a catalogued artifact (a model, say).

    ``ref`` is a store key, read through this machine's cache; an absolute path (a catalog from before
    keys, or a file a caller built itself) is used as it is. With ``sha256``, bytes that differ are
    refused (:class:`AlteredObject`, a ValueError); a missing artifact is FileNotFoundError.
    """
    path = Path(ref)
    if path.is_absolute():
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        if sha256 and file_sha256(path) != sha256:
            raise AlteredObject(f"model file {path} does not match its registered sha256; refusing to load it")
        return path
    cache = cache or ObjectCache.from_settings()
    key = check_key(os.fspath(ref))
    if sha256:
        return cache.fetch_path(key, sha256)
    if not cache.store.local:  # the cache is keyed by digest: without one there is nothing to check against
        raise ValueError(f"{key}: an artifact in a remote store is read with its registered sha256")
    local = cache.store.local_path(key)
    if not local.is_file():
        raise FileNotFoundError(f"{key} is not in the artifact store {cache.store.url}")
    return local


# ---------------------------------------------------------------- folders built here, published there


class Staging:
    """A local folder whose files become the store's objects under ``prefix``.

    On a local store the folder *is* the store's folder (nothing to copy: today's layout); on a
    remote one it is a build folder under ``<data root>/cache/staging`` that :meth:`publish` uploads.
    """

    def __init__(self, store: ArtifactStore, prefix: str, data_dir: Path) -> None:
        self.store, self.prefix = store, check_key(prefix)
        self.dir = (store.local_path(prefix) if store.local
                    else Path(data_dir) / "cache" / "staging" / uuid.uuid4().hex / prefix)

    def key(self, path: str | os.PathLike) -> str:
        """The key a file of this folder has (or will have, once published)."""
        rel = Path(path).resolve().relative_to(self.dir.resolve()).as_posix()
        return f"{self.prefix}/{rel}"

    def publish(self) -> list[str]:
        """Upload the folder (a no-op on a local store) and return its keys."""
        if self.store.local:
            return [f"{self.prefix}/{p.relative_to(self.dir).as_posix()}" for p in sorted(self.dir.rglob("*"))
                    if p.is_file()]
        return self.store.put_tree(self.prefix, self.dir) if self.dir.is_dir() else []

    def discard(self) -> None:
        """Remove the local build folder of a remote store (after :meth:`publish`)."""
        if not self.store.local:
            shutil.rmtree(self.dir.parents[len(PurePosixPath(self.prefix).parts) - 1], ignore_errors=True)

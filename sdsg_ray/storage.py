"""URI-addressed storage: a local path, ``file:///abs/path``, ``s3://bucket/prefix``, or any registered scheme.

Each URI scheme has one object store class, registered by scheme in :data:`STORES` (:class:`LocalObjects`
for local paths and ``file://``, :class:`S3Objects` on one boto3 client for ``s3://``); :class:`Storage`
looks the store up by the URI's scheme and keeps the project's guarantees on top of it: atomic writes (a
reader sees the old object or the new one, never half of one), sorted listings streamed page by page, and
errors that name the URI and the endpoint (never a credential). Ray gets the same store as a pyarrow
filesystem (:meth:`Storage.arrow_filesystem`), so Ray Train's checkpoints and Ray Data's parquet reads share
the client, endpoint, retries and error translation configured in :class:`~sdsg_ray.config.StorageConfig`.
A new scheme (``gs://``) is one :class:`ObjectStore` subclass and one ``STORES.register`` call.

Endpoint: ``StorageConfig.endpoint_url`` > ``$AWS_ENDPOINT_URL`` > AWS itself. Credentials always come
from the standard AWS chain (environment, profile, instance role) and are never logged. Local URIs are
normalised to absolute paths (``file:///a/b`` and ``a/b`` both become ``/abs/a/b``), so the keys a
listing yields, the keys a manifest holds and the keys in ``labels.csv`` are the same strings.
"""

from __future__ import annotations

import contextlib
import io
import json
import mimetypes
import os
import posixpath
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import pyarrow
import pyarrow.fs

from sdsg_ray.config import StorageConfig
from sdsg_ray.errors import UserError
from sdsg_ray.registry import Registry

# Marks our in-progress local writes; listings skip them so a half-written file is never yielded.
_TMP_MARK = ".sdsg-tmp-"
# Up to this size an S3 write is one PUT from memory; above, a multipart upload from a spooled temp file.
_SINGLE_PUT_BYTES = 64 * 1024 * 1024
# Reads through the pyarrow view fetch at least this many bytes per ranged GET (parquet reads are small).
_READ_BUFFER_BYTES = 4 * 1024 * 1024
_AUTH_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
LOCAL_SCHEME = "file"  # a URI without "://" is a local path


class StorageError(UserError, RuntimeError):
    """Storage could not be used: permission, endpoint, credentials, missing bucket. Names the URI."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object named by the URI does not exist."""


def scheme(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``"file"`` for ``file://...`` and for plain local paths."""
    name, sep, _ = uri.partition("://")
    return name if sep else LOCAL_SCHEME


def store_class(uri: str) -> type[ObjectStore]:
    """The registered store class for ``uri``'s scheme; an unknown scheme is a StorageError naming the URI."""
    if scheme(uri) not in STORES:
        choices = ", ".join(f"{name}://" for name in STORES)
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or one of {choices})")
    return STORES[scheme(uri)]


def normalize(uri: str) -> str:
    """The canonical form of a URI, as its store defines it (local paths: absolute, without ``file://``;
    ``s3://`` unchanged)."""
    return store_class(uri).normalize(uri)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/runs", "x", "y.pt") == "s3://b/runs/x/y.pt"``; local URIs keep their form."""
    out = uri.rstrip("/") or uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if not out.endswith("/") else f"{out}{part}"
    return out


def _content_type(key: str) -> dict[str, str]:
    """The object's Content-Type from its name, so an S3 website serves pages and images (the report, the
    curation page and its sprites) as such; S3 would otherwise label every upload binary/octet-stream."""
    content_type, _ = mimetypes.guess_type(key)
    return {"ContentType": content_type} if content_type else {}


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if scheme(uri) != "s3":
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    return bucket, key


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, size in bytes and last modification time (None if unknown)."""

    uri: str
    size: int
    mtime: datetime | None = None


# ----------------------------------------------------------------------------------------------
# The object stores: one class per scheme, the same small interface


class ObjectStore:
    """What a scheme implements: ``list(prefix)`` (every object under the "directory", recursively, sorted
    by full URI, streamed), ``info``, ``open_read`` (seekable; a missing object raises ObjectNotFound),
    ``open_write`` (a context manager whose bytes become the object only if the block succeeds) and
    ``delete`` (a missing object is fine). :class:`Storage` builds one per scheme from the StorageConfig
    on first use and hands it URIs already in the store's :meth:`normalize` form. Stores travel to Ray
    workers inside a Storage, so they must pickle (drop clients and sockets, rebuild them lazily)."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    @staticmethod
    def normalize(uri: str) -> str:
        """The canonical form of ``uri`` (listings yield and manifests hold this form)."""
        return uri

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open_write(uri) as f:
            f.write(data)

    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """``(filesystem, path inside it)`` for Ray Train and Ray Data."""
        raise StorageError(f"{uri}: the {scheme(uri)}:// store has no pyarrow filesystem (Ray cannot read it)")

    def relative(self, target: str, base: str) -> str | None:
        """A relative link from ``base`` to ``target`` when both lie in one namespace (one filesystem, one
        bucket), else None (the caller links the full URI)."""
        return None


class LocalObjects(ObjectStore):
    """Objects as files under absolute paths; writes go to a temp file that is renamed into place."""

    @staticmethod
    def normalize(uri: str) -> str:
        if uri.startswith("file://"):
            uri = urlparse(uri).path
        return os.path.abspath(os.path.expanduser(uri))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every file under the directory ``prefix``, recursively, in S3's byte order of full keys."""
        if not os.path.isdir(prefix):
            return
        try:
            entries = list(os.scandir(prefix))
        except PermissionError:
            raise StorageError(f"{prefix}: permission denied while listing") from None
        # Sorting directories as "name/" reproduces S3's byte order of full keys ("a.jpg" < "a/x").
        entries.sort(key=lambda e: e.name + "/" if e.is_dir() else e.name)
        for entry in entries:
            if entry.is_dir():
                yield from self.list(entry.path)
            elif _TMP_MARK not in entry.name:
                yield ObjectInfo(entry.path, entry.stat().st_size)

    def info(self, path: str) -> ObjectInfo | None:
        return ObjectInfo(path, os.path.getsize(path)) if os.path.isfile(path) else None

    def open_read(self, path: str) -> IO[bytes]:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{path}: no such object") from None
        except OSError as err:
            raise StorageError(f"{path}: {type(err).__name__}: {err.strerror or err}") from None

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{path}: cannot create directory {directory}: {err.strerror or err}") from None
        tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
            # Atomic for readers. No fsync: crash durability is not the goal, and one fsync per image
            # made writing a dataset I/O-bound.
            os.replace(tmp, path)
        except PermissionError as err:
            raise StorageError(f"{path}: permission denied: {err.strerror or err}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StorageError(f"{path}: cannot delete: {err.strerror or err}") from None

    def arrow_filesystem(self, path: str) -> tuple[pyarrow.fs.FileSystem, str]:
        return pyarrow.fs.LocalFileSystem(), path

    def relative(self, target: str, base: str) -> str | None:
        return os.path.relpath(target, base)


class S3Objects(ObjectStore):
    """Objects in S3 or an S3-compatible store, through one boto3 client built on first use. Picklable for
    Ray: the client (sockets, locks) is dropped when pickled and rebuilt lazily from the same settings."""

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        self._client: Any = None
        self._lock = threading.Lock()
        self._checked_buckets: set[str] = set()

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    # settings and errors ---------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint in effect: config > $AWS_ENDPOINT_URL > None (AWS itself)."""
        return self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def region(self) -> str | None:
        return self.config.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")

    def where(self) -> str:
        return self.endpoint_url or "AWS S3"

    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """This store behind pyarrow's interface (:class:`S3ArrowHandler`), and the path ``bucket/key``. The
        endpoint and region of this process are written into the handler's config, so that a copy shipped
        to a Ray worker reaches the same store whatever that worker's environment says."""
        bucket, key = split_s3(uri)
        resolved = S3Objects(self.config.model_copy(update={"endpoint_url": self.endpoint_url, "region": self.region}))
        return pyarrow.fs.PyFileSystem(S3ArrowHandler(resolved)), f"{bucket}/{key}".rstrip("/")

    def relative(self, target: str, base: str) -> str | None:
        (bucket, key), (base_bucket, base_key) = split_s3(target), split_s3(base)
        return posixpath.relpath(key, base_key or ".") if bucket == base_bucket else None

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe once built) with the configured retry policy and timeouts."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    cfg = self.config
                    self._client = boto3.session.Session().client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=Config(
                            retries={"max_attempts": cfg.max_attempts, "mode": cfg.retry_mode},
                            max_pool_connections=64,
                            connect_timeout=cfg.connect_timeout_s,
                            read_timeout=cfg.read_timeout_s,
                        ),
                    )
        return self._client

    def error(self, err: Exception, uri: str, operation: str) -> StorageError:
        """A botocore exception as one of our errors, naming the URI, the operation and the endpoint."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.where()
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_KEY_CODES:
                return ObjectNotFound(f"{uri}: no such object")
            if code == "NoSuchBucket":
                return StorageError(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist at {where}")
            if code in _AUTH_CODES:
                return StorageError(
                    f"{uri}: access denied ({code}) at {where}; check the credentials of the standard "
                    "AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role) and the "
                    "bucket policy"
                )
            message = err.response.get("Error", {}).get("Message", "")
            attempts = err.response.get("ResponseMetadata", {}).get("RetryAttempts")
            tried = f" after {attempts + 1} attempts" if attempts else ""
            return StorageError(f"{uri}: {operation} failed{tried}: S3 error {code}: {message} (endpoint {where})")
        if isinstance(err, NoCredentialsError):
            return StorageError(f"{uri}: no AWS credentials found in the standard chain (env, profile, role)")
        if isinstance(err, EndpointConnectionError):
            return StorageError(f"{uri}: {operation} failed: cannot reach the S3 endpoint {where}")
        return StorageError(f"{uri}: {operation} failed: {type(err).__name__}: {err} (endpoint {where})")

    @contextlib.contextmanager
    def errors(self, uri: str, operation: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as err:
            raise self.error(err, uri, operation) from None

    def _check_bucket(self, uri: str) -> None:
        """A 404 from HEAD cannot tell a missing key from a missing bucket; ask once per bucket."""
        bucket, _ = split_s3(uri)
        if bucket in self._checked_buckets:
            return
        try:
            with self.errors(uri, "HEAD bucket"):
                self.client.head_bucket(Bucket=bucket)
        except ObjectNotFound:  # head_bucket's 404 (NoSuchBucket already says the same)
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {self.where()}") from None
        self._checked_buckets.add(bucket)

    # the interface -----------------------------------------------------------------------------------

    def pages(self, prefix_uri: str, **kwargs: Any) -> Iterator[dict]:
        """The ListObjectsV2 pages under the prefix ``prefix_uri/``, 1000 keys a request (never all in memory)."""
        bucket, prefix = split_s3(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        with self.errors(prefix_uri, "LIST"):
            yield from self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **kwargs)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """Objects under the prefix ``prefix_uri/`` in byte order, skipping directory markers (keys ending in "/")."""
        bucket, _ = split_s3(prefix_uri)
        for page in self.pages(prefix_uri):
            for obj in page.get("Contents", ()):
                if not obj["Key"].endswith("/"):
                    yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj.get("LastModified"))

    def has_prefix(self, prefix_uri: str) -> bool:
        """Whether any object (a directory marker included) lies under ``prefix_uri/`` (one LIST of one key)."""
        return any(page.get("KeyCount", 0) for page in self.pages(prefix_uri, MaxKeys=1))

    def info(self, uri: str) -> ObjectInfo | None:
        """The object's size and mtime, or None if there is no such object (a missing bucket raises)."""
        bucket, key = split_s3(uri)
        if not key:
            return None
        try:
            with self.errors(uri, "HEAD"):
                head = self.client.head_object(Bucket=bucket, Key=key)
        except ObjectNotFound:  # a 404: no such key, or no such bucket
            self._check_bucket(uri)
            return None
        return ObjectInfo(uri, int(head["ContentLength"]), head.get("LastModified"))

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        with self.errors(uri, "GET"):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        bucket, key = split_s3(uri)
        with self.errors(uri, "GET range"):
            body = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")["Body"]
            return body.read()

    def open_read(self, uri: str) -> IO[bytes]:
        """A seekable binary reader that fetches the object in ranged GETs (large objects never sit in memory)."""
        info = self.info(uri)
        if info is None:
            raise ObjectNotFound(f"{uri}: no such object")
        return io.BufferedReader(_RangeReader(self, uri, info.size), buffer_size=_READ_BUFFER_BYTES)

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """Bytes are spooled, then sent as one PUT or a multipart upload: S3 makes an object visible only
        when that PUT or CompleteMultipartUpload succeeds, so readers never see a partial object."""
        with tempfile.SpooledTemporaryFile(max_size=_SINGLE_PUT_BYTES) as spool:
            yield spool
            self.upload(uri, spool)

    def upload(self, uri: str, spool: IO[bytes]) -> None:
        """Send everything written to ``spool`` (positioned at its end) as the object ``uri``."""
        bucket, key = split_s3(uri)
        size = spool.tell()
        spool.seek(0)
        with self.errors(uri, "PUT"):
            if size <= _SINGLE_PUT_BYTES:
                self.client.put_object(Bucket=bucket, Key=key, Body=spool.read(), **_content_type(key))  # one PUT: atomic on S3
            else:
                self.client.upload_fileobj(spool, bucket, key, ExtraArgs=_content_type(key))

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        with self.errors(uri, "DELETE"):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_many(self, uris: list[str]) -> None:
        """Delete objects of one bucket, 1000 per request (S3's limit for DeleteObjects)."""
        for start in range(0, len(uris), 1000):
            chunk = uris[start:start + 1000]
            bucket = split_s3(chunk[0])[0]
            with self.errors(chunk[0], "DELETE objects"):
                self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": split_s3(u)[1]} for u in chunk], "Quiet": True}
                )

    def copy(self, source: str, target: str) -> None:
        (src_bucket, src_key), (dst_bucket, dst_key) = split_s3(source), split_s3(target)
        with self.errors(source, "COPY"):
            self.client.copy({"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key)


class _RangeReader(io.RawIOBase):
    """The raw, seekable view of one S3 object: every read is a ranged GET."""

    def __init__(self, store: S3Objects, uri: str, size: int) -> None:
        super().__init__()
        self.store, self.uri, self.size, self.pos = store, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self.pos)
        if length <= 0:
            return 0
        data = self.store.read_range(self.uri, self.pos, length)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


# ----------------------------------------------------------------------------------------------
# The same S3 store as a pyarrow filesystem, for Ray Train and Ray Data


class _UploadOnClose(io.RawIOBase):
    """A write-only stream that becomes the object when closed (never earlier, never partially)."""

    def __init__(self, store: S3Objects, uri: str) -> None:
        super().__init__()
        self.store, self.uri = store, uri
        self.spool = tempfile.SpooledTemporaryFile(max_size=_SINGLE_PUT_BYTES)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.spool.write(data)

    def tell(self) -> int:
        return self.spool.tell()

    def close(self) -> None:
        if not self.closed:
            try:
                self.store.upload(self.uri, self.spool)
            finally:
                self.spool.close()
                super().close()


class S3ArrowHandler(pyarrow.fs.FileSystemHandler):
    """pyarrow's filesystem interface over :class:`S3Objects` (paths are ``bucket/key``). S3 has no
    directories: a "directory" exists when an object lies under its prefix. ``create_dir`` writes an empty
    ``dir/`` marker object, as pyarrow's own S3 filesystem does, so that an empty directory a caller just
    created is found; listings never yield markers."""

    def __init__(self, store: S3Objects) -> None:
        self.store = store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3ArrowHandler) and other.store.config == self.store.config

    @staticmethod
    def uri(path: str) -> str:
        return "s3://" + path.strip("/")

    def get_type_name(self) -> str:
        return "sdsg-s3"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def _info(self, path: str) -> pyarrow.fs.FileInfo:
        path = path.strip("/")
        if "/" not in path:  # a bucket
            return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.Directory)
        found = self.store.info(self.uri(path))
        if found is not None:
            return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=found.size, mtime=found.mtime)
        if self.store.has_prefix(self.uri(path)):
            return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.Directory)
        return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.NotFound)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return [self._info(p) for p in paths]

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        base = selector.base_dir.strip("/")
        out: list[pyarrow.fs.FileInfo] = []
        dirs: set[str] = set()
        if selector.recursive:
            for obj in self.store.list(self.uri(base)):
                path = obj.uri[len("s3://"):]
                parent = path.rsplit("/", 1)[0]
                while len(parent) > len(base) and parent not in dirs:  # directories implied by the keys
                    dirs.add(parent)
                    parent = parent.rsplit("/", 1)[0]
                out.append(pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=obj.size, mtime=obj.mtime))
        else:  # one level: the objects directly under base, and its sub-prefixes
            bucket = base.split("/")[0]
            for page in self.store.pages(self.uri(base), Delimiter="/"):
                dirs.update(f"{bucket}/{common['Prefix'].rstrip('/')}" for common in page.get("CommonPrefixes", ()))
                out += [pyarrow.fs.FileInfo(f"{bucket}/{o['Key']}", pyarrow.fs.FileType.File, size=int(o["Size"]),
                                            mtime=o.get("LastModified"))
                        for o in page.get("Contents", ()) if not o["Key"].endswith("/")]
        out += [pyarrow.fs.FileInfo(d, pyarrow.fs.FileType.Directory) for d in sorted(dirs)]
        if not out and not selector.allow_not_found and not self.store.has_prefix(self.uri(base)):
            raise FileNotFoundError(f"{self.uri(base)}: no such directory")
        return out

    def create_dir(self, path: str, recursive: bool) -> None:
        path = path.strip("/")
        if "/" in path and self.store.info(self.uri(path)) is None and not self.store.has_prefix(self.uri(path)):
            self.store.write_bytes(self.uri(path) + "/", b"")

    def _keys_under(self, path: str, missing_ok: bool = False) -> list[str]:
        """Every key under ``path/``, directory markers included; none is a FileNotFoundError unless ``missing_ok``."""
        bucket, _ = split_s3(self.uri(path))
        pages = self.store.pages(self.uri(path))
        keys = [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", ())]
        if not keys and not missing_ok:
            raise FileNotFoundError(f"{self.uri(path)}: no such directory")
        return keys

    def delete_dir(self, path: str) -> None:
        self.store.delete_many(self._keys_under(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        keys = self._keys_under(path, missing_ok=missing_dir_ok)
        self.store.delete_many([k for k in keys if k != self.uri(path) + "/"])  # the directory itself stays

    def delete_root_dir_contents(self) -> None:
        raise StorageError("refusing to delete every bucket's contents")

    def delete_file(self, path: str) -> None:
        if self.store.info(self.uri(path)) is None:
            raise FileNotFoundError(f"{self.uri(path)}: no such object")
        self.store.delete(self.uri(path))

    def move(self, src: str, dest: str) -> None:
        if self.store.info(self.uri(src)) is not None:
            self.store.copy(self.uri(src), self.uri(dest))
            self.store.delete(self.uri(src))
            return
        keys = self._keys_under(src, missing_ok=True)
        if not keys:
            raise FileNotFoundError(f"{self.uri(src)}: no such object or directory")
        for key in keys:
            self.store.copy(key, self.uri(dest) + key[len(self.uri(src)):])
        self.store.delete_many(keys)

    def copy_file(self, src: str, dest: str) -> None:
        self.store.copy(self.uri(src), self.uri(dest))

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(self.store.open_read(self.uri(path)), mode="r")

    open_input_file = open_input_stream

    def open_output_stream(self, path: str, metadata) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_UploadOnClose(self.store, self.uri(path)), mode="w")

    def open_append_stream(self, path: str, metadata) -> pyarrow.NativeFile:
        raise NotImplementedError("S3 objects cannot be appended to")


# ----------------------------------------------------------------------------------------------
# The registry of stores, and Storage: the project's one entry point

STORES: Registry[type[ObjectStore]] = Registry("object store")
STORES.register(LOCAL_SCHEME, LocalObjects)
STORES.register("s3", S3Objects)


class Storage:
    """One object store per URI scheme behind one API (see the module docstring for its guarantees), each
    built from ``config`` on first use of its scheme. Picklable for Ray: stores pickle without their clients."""

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()
        self._stores: dict[str, ObjectStore] = {}

    def store(self, uri: str) -> ObjectStore:
        """The store that holds ``uri`` (built on first use of its scheme)."""
        name = scheme(uri)
        if name not in self._stores:
            self._stores.setdefault(name, store_class(uri)(self.config))
        return self._stores[name]

    def _on(self, uri: str) -> tuple[ObjectStore, str]:
        """The store that holds ``uri`` and the URI in that store's form."""
        store = self.store(uri)
        return store, store.normalize(uri)

    def list(self, prefix_uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
        """Full URIs of the objects under a prefix (a "directory"), streamed in byte order (S3's order, which
        the local walk reproduces). ``suffixes`` filters case-insensitively (``(".jpg", ".png")``). A prefix
        with nothing under it yields nothing."""
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        store, prefix = self._on(prefix_uri)
        for obj in store.list(prefix):
            if wanted is None or obj.uri.lower().endswith(wanted):
                yield obj.uri

    def read_bytes(self, uri: str) -> bytes:
        store, uri = self._on(uri)
        return store.read_bytes(uri)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def open_read(self, uri: str) -> IO[bytes]:
        """A seekable binary reader (S3: ranged GETs, so a large object is never read whole)."""
        store, uri = self._on(uri)
        return store.open_read(uri)

    def open_write(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file to write ``uri`` into; it appears only if the block finishes without error (on
        error the previous object, if any, is left untouched)."""
        store, uri = self._on(uri)
        return store.open_write(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the new one, never half of it."""
        store, uri = self._on(uri)
        store.write_bytes(uri, data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def info(self, uri: str) -> ObjectInfo | None:
        """Size (and mtime where known) of an object, or None if it does not exist."""
        store, uri = self._on(uri)
        return store.info(uri)

    def exists(self, uri: str) -> bool:
        """Whether an object (a file, not a prefix) exists; a missing bucket is an error, not False."""
        return self.info(uri) is not None

    def delete(self, uri: str) -> None:
        """Delete one object; deleting a missing object is fine."""
        store, uri = self._on(uri)
        store.delete(uri)

    def pin_settings(self, uri: str, settings: dict) -> dict:
        """Record ``settings`` as JSON at ``uri`` the first time; afterwards return what differs from the
        recorded ones as {name: (recorded, given)} (empty: same). Resumable stages call it so that one
        output folder never mixes work done with different settings."""
        if not self.exists(uri):
            self.write_text(uri, json.dumps(settings, indent=2))
            return {}
        recorded = json.loads(self.read_text(uri))
        return {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}

    def relative_link(self, target: str, base: str) -> str:
        """A link from a page in the directory ``base`` to ``target`` that works from a file and on an S3
        website: relative when both live in one namespace (filesystem, bucket), else ``target``'s URI."""
        if scheme(target) != scheme(base):
            return target
        store, target_in_store = self._on(target)
        return store.relative(target_in_store, store.normalize(base)) or target

    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """``(filesystem, path inside it)`` for Ray Train's ``storage_filesystem`` and Ray Data's readers."""
        store, uri = self._on(uri)
        return store.arrow_filesystem(uri)


def get_storage(config: StorageConfig | None = None) -> Storage:
    return Storage(config)

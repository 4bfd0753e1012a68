"""URI-addressed storage: a local path, ``file:///abs/path`` or ``s3://bucket/prefix``.

Every module reads and writes through :class:`Storage`, so the same pipeline runs against a laptop
directory, AWS S3 or any S3-compatible store (MinIO, Ceph, moto). Object operations use boto3; Ray Data
gets a pyarrow filesystem built from the same settings (:meth:`Storage.arrow_filesystem`).

Endpoint: ``StorageConfig.endpoint_url`` > ``$AWS_ENDPOINT_URL`` > AWS itself. Credentials always come
from the standard AWS chain (environment, profile, instance role) and are never logged.

Local URIs are normalised to absolute paths (``file:///a/b`` and ``a/b`` both become ``/abs/a/b``), so
the keys a listing yields, the keys a manifest holds and the keys in ``labels.csv`` are the same strings.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs

from sdsg_ray.config import StorageConfig

# Marks our in-progress local writes; listings skip them so a half-written file is never yielded.
_TMP_MARK = ".sdsg-tmp-"
# Up to this size an S3 write is one PUT from memory; above, a multipart upload from a spooled temp file.
_SINGLE_PUT_BYTES = 64 * 1024 * 1024
_AUTH_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(RuntimeError):
    """Storage could not be used: permission, endpoint, credentials, missing bucket. Names the URI."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object named by the URI does not exist."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """The canonical form of a URI: ``s3://`` unchanged, local paths absolute without ``file://``."""
    if is_s3(uri):
        return uri
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/runs", "x", "y.pt") == "s3://b/runs/x/y.pt"``; local URIs keep their form."""
    out = uri.rstrip("/") if uri.rstrip("/") else uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if not out.endswith("/") else f"{out}{part}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    return bucket, key


class Storage:
    """One object-store client for local and S3 URIs.

    Picklable, because Ray ships it to workers: the boto3 client is built lazily on first use in each
    process and dropped when pickled (clients hold sockets and locks).
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()
        self._client: Any = None
        self._lock = threading.Lock()
        self._checked_buckets: set[str] = set()

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    # ----- settings -------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint in effect: config > $AWS_ENDPOINT_URL > None (AWS itself)."""
        return self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def region(self) -> str | None:
        return self.config.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")

    def _where(self) -> str:
        return self.endpoint_url or "AWS S3"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (boto3 clients are thread-safe once built)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    session = boto3.session.Session()
                    self._client = session.client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=Config(
                            retries={"max_attempts": 5, "mode": "adaptive"},
                            max_pool_connections=64,
                            connect_timeout=10,
                            read_timeout=60,
                        ),
                    )
        return self._client

    # ----- errors ---------------------------------------------------------------------------
    def _s3_error(self, err: Exception, uri: str) -> StorageError:
        """Translate a botocore exception into our errors; never includes credentials."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_KEY_CODES:
                return ObjectNotFound(f"{uri}: no such object")
            if code == "NoSuchBucket":
                bucket, _ = split_s3(uri)
                return StorageError(f"{uri}: bucket {bucket!r} does not exist at {self._where()}")
            if code in _AUTH_CODES:
                return StorageError(
                    f"{uri}: access denied ({code}) at {self._where()}; check the credentials of the standard "
                    "AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance role) and the "
                    "bucket policy"
                )
            message = err.response.get("Error", {}).get("Message", "")
            return StorageError(f"{uri}: S3 error {code}: {message} (endpoint {self._where()})")
        if isinstance(err, NoCredentialsError):
            return StorageError(f"{uri}: no AWS credentials found in the standard chain (env, profile, role)")
        if isinstance(err, EndpointConnectionError):
            return StorageError(f"{uri}: cannot reach the S3 endpoint {self._where()}")
        return StorageError(f"{uri}: {type(err).__name__}: {err} (endpoint {self._where()})")

    @contextlib.contextmanager
    def _s3_errors(self, uri: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as err:
            raise self._s3_error(err, uri) from None

    def _check_bucket(self, uri: str) -> None:
        """A 404 from HEAD cannot tell a missing key from a missing bucket; ask once per bucket."""
        bucket, _ = split_s3(uri)
        if bucket in self._checked_buckets:
            return
        with self._s3_errors(uri):
            try:
                self.client.head_bucket(Bucket=bucket)
            except Exception as err:
                code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket"):
                    raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {self._where()}") from None
                raise
        self._checked_buckets.add(bucket)

    # ----- listing --------------------------------------------------------------------------
    def list(self, prefix_uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
        """Yield full URIs of the objects under a prefix (a "directory"), sorted, lazily.

        S3 is listed page by page (1000 keys a request), so millions of keys stream without being held
        in memory; S3 returns keys in byte order, and the local walk yields the same order. ``suffixes``
        filters case-insensitively (``(".jpg", ".png")``). A prefix with nothing under it yields nothing.
        """
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        keep = (lambda name: name.lower().endswith(wanted)) if wanted else (lambda name: True)
        if is_s3(prefix_uri):
            yield from self._list_s3(prefix_uri, keep)
        else:
            yield from self._list_local(normalize(prefix_uri), keep)

    def _list_s3(self, prefix_uri: str, keep) -> Iterator[str]:
        bucket, prefix = split_s3(prefix_uri)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        with self._s3_errors(prefix_uri):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if not key.endswith("/") and keep(key):
                        yield f"s3://{bucket}/{key}"

    def _list_local(self, root: str, keep) -> Iterator[str]:
        if not os.path.isdir(root):
            return
        try:
            entries = list(os.scandir(root))
        except PermissionError:
            raise StorageError(f"{root}: permission denied while listing") from None
        # Sorting directories as "name/" reproduces S3's byte order of full keys ("a.jpg" < "a/x").
        entries.sort(key=lambda e: e.name + "/" if e.is_dir() else e.name)
        for entry in entries:
            if entry.is_dir():
                yield from self._list_local(entry.path, keep)
            elif _TMP_MARK not in entry.name and keep(entry.name):
                yield entry.path

    # ----- objects --------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        path = normalize(uri)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(f"{uri}: no such object") from None
        except (IsADirectoryError, PermissionError, OSError) as err:
            raise StorageError(f"{uri}: {type(err).__name__}: {err.strerror or err}") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[IO[bytes]]:
        """A binary file to write ``uri`` into; it appears only if the block finishes without error.

        Local: a temp file in the target directory, then ``os.replace`` (atomic on POSIX). S3: bytes are
        spooled, then sent as one PUT or a multipart upload; S3 makes an object visible only when the PUT
        or CompleteMultipartUpload succeeds, so readers never see a partial object. On error nothing is
        written and the previous object, if any, is left untouched.
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with tempfile.SpooledTemporaryFile(max_size=_SINGLE_PUT_BYTES) as spool:
                yield spool
                size = spool.tell()
                spool.seek(0)
                with self._s3_errors(uri):
                    if size <= _SINGLE_PUT_BYTES:
                        self.client.put_object(Bucket=bucket, Key=key, Body=spool.read())
                    else:
                        self.client.upload_fileobj(spool, bucket, key)
            return
        path = normalize(uri)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{uri}: cannot create directory {directory}: {err.strerror or err}") from None
        tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
            # Atomic for readers. No fsync: crash durability is not the goal, and one fsync per image
            # made writing a 2000-image dataset I/O-bound.
            os.replace(tmp, path)
        except PermissionError as err:
            raise StorageError(f"{uri}: permission denied: {err.strerror or err}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the new one, never half of it."""
        if is_s3(uri) and len(data) <= _SINGLE_PUT_BYTES:
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                self.client.put_object(Bucket=bucket, Key=key, Body=data)  # one PUT: atomic on S3
            return
        with self.open_write(uri) as f:
            f.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def exists(self, uri: str) -> bool:
        """Whether an object (a file, not a prefix) exists; a missing bucket is an error, not False."""
        if not is_s3(uri):
            return os.path.isfile(normalize(uri))
        bucket, key = split_s3(uri)
        with self._s3_errors(uri):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:
                code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
                if code not in _MISSING_KEY_CODES:
                    raise
        self._check_bucket(uri)
        return False

    def delete(self, uri: str) -> None:
        """Delete one object; deleting a missing object is fine."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            with self._s3_errors(uri):
                self.client.delete_object(Bucket=bucket, Key=key)
            return
        try:
            os.unlink(normalize(uri))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StorageError(f"{uri}: cannot delete: {err.strerror or err}") from None

    # ----- Ray Data -------------------------------------------------------------------------
    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """``(filesystem, path inside it)`` for pyarrow / Ray Data, from the same endpoint and region.

        pyarrow's S3 filesystem reads credentials from the same AWS chain as boto3.
        """
        if not is_s3(uri):
            return pyarrow.fs.LocalFileSystem(), normalize(uri)
        bucket, key = split_s3(uri)
        kwargs: dict[str, Any] = {}
        endpoint = self.endpoint_url
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme
        region = self.region or ("us-east-1" if endpoint else None)
        if region:
            kwargs["region"] = region
        return pyarrow.fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def get_storage(config: StorageConfig | None = None) -> Storage:
    return Storage(config)


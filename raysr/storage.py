"""Read and write local paths and ``s3://bucket/key`` URIs, and give Ray Train its run storage.

One S3 policy for all of raysr's traffic, set here: every request is tried up to
``S3_MAX_ATTEMPTS`` times in the AWS SDKs' "standard" retry mode (throttling, 5xx and
broken connections, with exponential backoff), against ``AWS_ENDPOINT_URL`` when set (MinIO,
Ceph, moto), with the SDKs' usual credentials (environment, shared config, instance role).
A missing object or a denied request raises :class:`StorageError` naming the URI and what to
check. Two maintained clients carry it, each where only it does the job:

* boto3 (:func:`s3_client`) for everything raysr reads and writes itself: shards, manifests,
  weights, images, generator files, run-checkpoint files read back.
* ``pyarrow.fs.S3FileSystem`` (:func:`storage_args`) for what Ray Train and Tune store
  themselves (checkpoint uploads, run state): Ray takes only a ``pyarrow.fs.FileSystem``.

Why not one client (checked with pyarrow 26.0.1, boto3 1.43, Ray 2.60):

* pyarrow's S3FileSystem neither writes nor reads user metadata (``x-amz-meta-*`` keys given
  to ``open_output_stream`` are dropped; ``metadata()`` of an input stream lists only
  Content-Length/Type, ETag and Last-Modified), and make_shards keeps each shard's sha256
  there so that a re-run checks shards without downloading them. Its input stream sends a
  HEAD, then one ranged GET per ``read()`` (a 256 MB shard read in 1 MiB pieces costs 256
  requests, each with S3's first-byte latency), and it answers a missing bucket and a missing
  key with the same FileNotFoundError. Forked processes are not the obstacle: a forked child
  reads through it, on a filesystem object from the parent or a new one.
* boto3 cannot be Ray's storage without an adapter: the maintained one, fsspec's
  ``FSSpecHandler`` over s3fs, brings aiobotocore, a second (async) botocore pinned to a few
  botocore releases (aiobotocore 3.10: botocore 1.43.115-1.43.117) with its own retry loop
  over botocore's; a pyarrow handler over boto3 of our own is the code this module avoids.

raysr adds only what neither client does: resuming a body read that breaks midway
(:class:`_ResumableS3Reader`, behind :func:`open_stream`), and keeping the retry policy when
Ray pickles the filesystem into its processes (:class:`RetryingS3FileSystem`).
:func:`write_stream` uploads large files in parts.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs

S3_PREFIX = "s3://"
# The retry policy of all S3 traffic: tries per request in the SDKs' "standard" mode (botocore's
# and, under pyarrow, the AWS C++ SDK's), and tries without progress of a broken body read;
# 8 ride out a few seconds of endpoint trouble.
S3_MAX_ATTEMPTS = 8
# Backoff between tries to resume a broken body read: 0.2 s, 0.4 s, ... capped (the SDKs back
# off their requests themselves).
STREAM_RETRY_BASE_S = 0.2
STREAM_RETRY_MAX_S = 5.0

_clients: dict[tuple[int, int], object] = {}
_clients_lock = threading.Lock()


class StorageError(OSError):
    """A URI that cannot be read or written: missing, denied, or malformed."""


def is_s3(uri: str | os.PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name; expected s3://BUCKET/KEY")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or s3:// URI."""
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base, *parts))


def _endpoint() -> str | None:
    """``AWS_ENDPOINT_URL`` (an S3-compatible store, or moto in tests); None: AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """A boto3 S3 client for this process and thread (boto3 clients are not fork-safe)."""
    key = (os.getpid(), threading.get_ident())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
            # boto3 reads AWS_ENDPOINT_URL itself; passing it explicitly also
            # covers older botocore releases that predate that variable.
            client = boto3.client("s3", endpoint_url=_endpoint(), config=config)
            _clients[key] = client
    return client


def error_code(err: Exception) -> str:
    """S3's error code in a botocore error ("NoSuchKey", "403", ...); "" for other errors."""
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _explain(uri: str, err: Exception) -> StorageError:
    """Turn a botocore error into one message a user can act on."""
    code = error_code(err)
    if code in ("404", "NoSuchKey", "NotFound"):
        return StorageError(f"{uri} does not exist (S3 said {code}); check the bucket and key")
    if code == "NoSuchBucket":
        return StorageError(f"bucket of {uri} does not exist; create it or fix the URI")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"access to {uri} denied (S3 said {code}); check AWS credentials "
            "(AWS_ACCESS_KEY_ID/AWS_PROFILE or the instance role) and the bucket policy")
    return StorageError(f"S3 request for {uri} failed: {err}")


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a local file or S3 object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:  # botocore raises several unrelated classes
            raise _explain(uri, err) from err
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as err:
        raise StorageError(f"{uri} does not exist") from err


def _upload(uri: str, fileobj: BinaryIO, **kwargs) -> None:
    bucket, key = split_s3(uri)
    try:
        s3_client().upload_fileobj(fileobj, bucket, key, **kwargs)
    except Exception as err:
        raise _explain(uri, err) from err


def _file_mode() -> int:
    """The permissions ``open()`` would give a new file (0666 less the umask); mkstemp's 0600
    would hide shards, checkpoints and images from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_local(uri: str | os.PathLike, fill) -> None:
    """Write a local file through ``fill(file)`` into a temporary file, then rename it."""
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole: S3 objects appear atomically; local files via rename,
    so a crash never leaves a half-written file under the final name."""
    if is_s3(uri):
        _upload(uri, io.BytesIO(data))
    else:
        _replace_local(uri, lambda f: f.write(data))


def remove(uri: str | os.PathLike) -> None:
    """Delete a local file or S3 object; one that does not exist is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as err:
            raise _explain(uri, err) from err
        return
    Path(uri).unlink(missing_ok=True)


def exists(uri: str | os.PathLike) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            explained = _explain(uri, err)
            if "does not exist" in str(explained):
                return False
            raise explained from err
    return Path(uri).exists()


def list_files(uri: str | os.PathLike) -> list[str]:
    """Every file below a local directory or S3 prefix, as full paths/URIs, sorted."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [f"{S3_PREFIX}{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        except Exception as err:
            raise _explain(uri, err) from err
        return sorted(out)
    root = Path(uri)
    if not root.is_dir():
        raise StorageError(f"{uri} is not a directory")
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- streaming reads, uploads

STREAM_BUFFER_BYTES = 1 << 20
# Above this size uploads go in parts (boto3 uploads the parts concurrently).
MULTIPART_CHUNK_BYTES = 64 << 20


def _transient_read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke while reading a body": worth a resume."""
    import botocore.exceptions
    import urllib3.exceptions

    return (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class _ResumableS3Reader(io.RawIOBase):
    """Raw reader of one S3 object that survives dropped connections.

    botocore retries a failed *request*, but not a connection that dies while the
    body is being read (a reset halfway through a 256 MB shard). This reader keeps
    its offset and, on such an error, re-requests the rest with ``Range`` and
    ``If-Match`` (so a replaced object is never spliced onto the old one), with
    exponential backoff, up to ``S3_MAX_ATTEMPTS`` tries without progress.
    """

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self._bucket, self._key = split_s3(uri)
        self._pos = 0
        self._size: int | None = None
        self._etag: str | None = None
        self._body = None
        self._transient = _transient_read_errors()
        self._open()

    def _open(self) -> None:
        kwargs = {"Bucket": self._bucket, "Key": self._key}
        if self._etag is not None:
            kwargs.update(Range=f"bytes={self._pos}-", IfMatch=self._etag)
        try:
            response = s3_client().get_object(**kwargs)
        except Exception as err:
            if error_code(err) in ("412", "PreconditionFailed"):
                raise StorageError(f"{self.uri} was replaced while being read; read it again") from err
            raise _explain(self.uri, err) from err
        if self._etag is None:
            self._etag = response.get("ETag")
            self._size = int(response["ContentLength"])
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._size is not None and self._pos >= self._size:
            return 0
        failures = 0
        while True:
            try:
                data = self._body.read(len(buffer))
                if not data:  # the server ended the body early without an error
                    raise ConnectionError(f"body ended at byte {self._pos} of {self._size}")
                break
            except self._transient as err:
                failures += 1
                if failures >= S3_MAX_ATTEMPTS:
                    raise StorageError(f"reading {self.uri} failed {failures} times at byte {self._pos} "
                                       f"(last error: {err}); check the endpoint and network") from err
                self._close_body()
                time.sleep(min(STREAM_RETRY_MAX_S, STREAM_RETRY_BASE_S * 2 ** (failures - 1)))
                self._open()
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # the connection is already broken; nothing left to release
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


def open_stream(uri: str | os.PathLike, buffer_size: int = STREAM_BUFFER_BYTES) -> BinaryIO:
    """A buffered, sequential binary reader of a local file or S3 object.

    An S3 read that loses its connection midway resumes where it stopped (see
    :class:`_ResumableS3Reader`); a missing or denied object raises :class:`StorageError`
    naming the URI.
    """
    if is_s3(uri):
        return io.BufferedReader(_ResumableS3Reader(uri), buffer_size=buffer_size)
    try:
        return open(uri, "rb", buffering=buffer_size)
    except FileNotFoundError as err:
        raise StorageError(f"{uri} does not exist") from err


def write_stream(uri: str | os.PathLike, fileobj: BinaryIO, metadata: dict[str, str] | None = None) -> None:
    """Copy a readable binary file object (from its current position) to ``uri``.

    S3: uploaded in ``MULTIPART_CHUNK_BYTES`` parts, the object appears whole;
    ``metadata`` becomes user metadata (``x-amz-meta-*``). Local: written to a
    temporary file and renamed, so a crash never leaves a partial file; metadata
    is not stored.
    """
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_CHUNK_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES)
        _upload(uri, fileobj, ExtraArgs={"Metadata": dict(metadata or {})}, Config=config)
    else:
        _replace_local(uri, lambda f: shutil.copyfileobj(fileobj, f, STREAM_BUFFER_BYTES))


def object_info(uri: str | os.PathLike) -> tuple[int, dict[str, str]] | None:
    """``(size in bytes, user metadata)`` of a file or S3 object, or None if it does not exist.

    Local files have no user metadata (``{}``). A denied S3 request raises :class:`StorageError`.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as err:
            explained = _explain(uri, err)
            if "does not exist" in str(explained):
                return None
            raise explained from err
        return int(head["ContentLength"]), dict(head.get("Metadata", {}))
    try:
        return Path(uri).stat().st_size, {}
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- Ray Train's run storage


def storage_args(storage: str) -> dict:
    """``RunConfig`` storage arguments for a local directory or s3://bucket/prefix.

    S3 gets a pyarrow S3FileSystem and a ``bucket/prefix`` path, on the endpoint and with the
    retry policy of :func:`s3_client` (Ray itself does not retry a checkpoint upload).
    """
    if not is_s3(storage):
        return {"storage_path": os.path.abspath(os.path.expanduser(storage))}
    endpoint = _endpoint()
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = region or "us-east-1"
    elif not region:  # on AWS proper, the bucket's own region (as Ray's from_uri finds it)
        region = pyarrow.fs.resolve_s3_region(split_s3(storage)[0])
    fs = RetryingS3FileSystem(S3_MAX_ATTEMPTS, region=region, **kwargs)
    return {"storage_path": storage[len("s3://"):].rstrip("/"), "storage_filesystem": fs}


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3FileSystem with ``max_attempts`` tries per request (AWS standard retry mode:
    throttling, 5xx and broken connections, with backoff), kept when pickled.

    Ray pickles the storage filesystem into its controller and every worker, and pyarrow's
    ``S3FileSystem.__reduce__`` leaves the retry strategy out (pyarrow 26): unpickled, it falls
    back to pyarrow's default of 3 attempts, which three 503 SlowDown in a row exhaust.
    """

    def __init__(self, max_attempts: int, **kwargs):
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts, self.kwargs = max_attempts, kwargs

    def __reduce__(self):
        # a partial: __reduce__ cannot pass keyword arguments to the constructor itself
        return functools.partial(RetryingS3FileSystem, self.max_attempts, **self.kwargs), ()

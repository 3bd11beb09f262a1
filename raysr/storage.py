"""Read and write local paths and ``s3://bucket/key`` URIs, and give Ray Train its run storage.

One S3 stack for all of raysr's traffic: boto3. Shards, manifests, weights, images and generator
files go through :func:`s3_client`; what Ray Train and Tune store themselves (checkpoint uploads,
run state) goes through the same client, behind the ``pyarrow.fs.FileSystem`` that Ray takes
(:func:`storage_args`: a ``pyarrow.fs.PyFileSystem`` over :class:`S3Handler`). One retry policy:
every request is tried up to ``S3_MAX_ATTEMPTS`` times in botocore's "standard" retry mode
(throttling, 5xx and broken connections, with exponential backoff), against ``AWS_ENDPOINT_URL``
when set (MinIO, Ceph, moto), with boto3's usual credentials (environment, shared config, instance
role). A missing object or a denied request raises :class:`StorageError` naming the URI and what
to check.

Why boto3 and not pyarrow's S3FileSystem for everything (checked with pyarrow 26.0.1, boto3 1.43,
Ray 2.60): pyarrow's S3 client neither writes nor reads user metadata (make_shards keeps each
shard's sha256 there, so that a re-run checks shards without downloading them), sends one ranged
GET per ``read()`` (a 256 MB shard in 1 MiB reads is 256 requests, each paying S3's first-byte
latency), answers a missing bucket and a missing key with the same error, and drops its retry
strategy when pickled (Ray pickles the storage filesystem into every process). fsspec's s3fs would
bring aiobotocore, a second botocore pinned to a few releases, with its own retry loop.

What no library does, and raysr keeps: resuming a body read that breaks midway
(:class:`_ResumableS3Reader`, behind :func:`open_stream`: botocore retries requests, not a body cut
short), and the small handler that lets Ray's filesystem interface reach boto3 (:class:`S3Handler`:
pyarrow ships one only for fsspec). :func:`write_stream` uploads large files in parts (boto3's
managed transfer).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs

S3_PREFIX = "s3://"
# The retry policy of all S3 traffic: tries per request in botocore's "standard" mode, and tries
# without progress of a broken body read; 8 ride out a few seconds of endpoint trouble.
S3_MAX_ATTEMPTS = 8
# Backoff between tries to resume a broken body read: 0.2 s, 0.4 s, ... capped (botocore backs
# off its requests itself).
STREAM_RETRY_BASE_S = 0.2
STREAM_RETRY_MAX_S = 5.0

_clients: dict[tuple[int, int, int], object] = {}
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


def s3_client(max_attempts: int | None = None):
    """A boto3 S3 client for this process and thread (boto3 clients are not fork-safe), trying each
    request up to ``max_attempts`` times (default: ``S3_MAX_ATTEMPTS``)."""
    max_attempts = max_attempts or S3_MAX_ATTEMPTS
    key = (os.getpid(), threading.get_ident(), max_attempts)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # total_max_attempts counts the first try; botocore's max_attempts counts only retries
            config = Config(retries={"total_max_attempts": max_attempts, "mode": "standard"})
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


def _upload(uri: str, fileobj: BinaryIO, metadata: dict[str, str] | None = None,
            max_attempts: int | None = None) -> None:
    """Upload ``fileobj`` (from its position) whole: in ``MULTIPART_CHUNK_BYTES`` parts above that
    size (boto3 sends the parts concurrently); ``metadata`` becomes user metadata (``x-amz-meta-*``)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(uri)
    config = TransferConfig(multipart_threshold=MULTIPART_CHUNK_BYTES, multipart_chunksize=MULTIPART_CHUNK_BYTES)
    try:
        s3_client(max_attempts).upload_fileobj(fileobj, bucket, key, ExtraArgs={"Metadata": dict(metadata or {})},
                                               Config=config)
    except Exception as err:
        raise _explain(uri, err) from err


def _file_mode() -> int:
    """The permissions ``open()`` would give a new file (0666 less the umask); mkstemp's 0600
    would hide shards, checkpoints and images from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ``.<name>.<mkstemp's 8 characters>.tmp``: where _replace_local writes ``name`` before the rename
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


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


def temporary_for(path: str | os.PathLike) -> str | None:
    """For the temporary file :func:`write_bytes` writes a local file through before renaming it (a
    process killed mid-write leaves it behind), the path of the file it stands for; else None."""
    path = Path(path)
    match = _TEMPORARY.match(path.name)
    return str(path.with_name(match["name"])) if match else None


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
    exponential backoff, up to ``max_attempts`` (``S3_MAX_ATTEMPTS``) tries without progress.
    """

    def __init__(self, uri: str, max_attempts: int | None = None):
        super().__init__()
        self.uri = uri
        self._max_attempts = max_attempts or S3_MAX_ATTEMPTS
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
            response = s3_client(self._max_attempts).get_object(**kwargs)
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
                if failures >= self._max_attempts:
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
        _upload(uri, fileobj, metadata)
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

    S3 gets a ``bucket/prefix`` path on a ``pyarrow.fs.PyFileSystem`` over :class:`S3Handler`:
    raysr's boto3 client and retry policy (Ray itself does not retry a checkpoint upload).
    """
    if not is_s3(storage):
        return {"storage_path": os.path.abspath(os.path.expanduser(storage))}
    split_s3(storage)  # a bucket name, or a StorageError saying what is wrong
    return {"storage_path": storage[len(S3_PREFIX):].rstrip("/"),
            "storage_filesystem": pyarrow.fs.PyFileSystem(S3Handler(S3_MAX_ATTEMPTS))}


_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class S3Handler(pyarrow.fs.FileSystemHandler):
    """The ``pyarrow.fs`` filesystem interface (which Ray Train and Tune take for their storage) on
    raysr's boto3 client, for paths ``bucket/key``; wrap it in ``pyarrow.fs.PyFileSystem``.

    Ray pickles the filesystem into its controller and every worker; the handler carries
    ``max_attempts`` (``S3_MAX_ATTEMPTS`` of the process that made it) with it. S3 has no folders:
    a "directory" is a prefix that objects lie under, ``create_dir`` does nothing, and
    ``delete_dir`` deletes every object under the prefix. Reads go through the resumable reader;
    a written file is uploaded when its stream closes, and an upload that fails after every retry
    raises there (so Ray never registers a checkpoint with a file missing).
    """

    def __init__(self, max_attempts: int = S3_MAX_ATTEMPTS):
        self.max_attempts = max_attempts

    def _client(self):
        return s3_client(self.max_attempts)

    def get_type_name(self) -> str:
        return "raysr-s3"

    def normalize_path(self, path: str) -> str:
        return path

    def __eq__(self, other) -> bool:  # what PyFileSystem.equals compares
        return isinstance(other, S3Handler) and other.max_attempts == self.max_attempts

    def __hash__(self) -> int:
        return hash(self.max_attempts)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return [self._info(path) for path in paths]

    def _info(self, path: str) -> pyarrow.fs.FileInfo:
        bucket, key = _bucket_key(path)
        if not key:
            return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.Directory)
        try:
            head = self._client().head_object(Bucket=bucket, Key=key)
            return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=head["ContentLength"],
                                       mtime=head["LastModified"])
        except Exception as err:
            if error_code(err) not in _NOT_FOUND:
                raise _explain(S3_PREFIX + path, err) from err
        try:
            listing = self._client().list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
        except Exception as err:
            raise _explain(S3_PREFIX + path, err) from err
        found = pyarrow.fs.FileType.Directory if listing.get("KeyCount") else pyarrow.fs.FileType.NotFound
        return pyarrow.fs.FileInfo(path, found)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        bucket, key = _bucket_key(selector.base_dir)
        prefix = key.rstrip("/") + "/" if key else ""
        files, dirs = [], set()
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, **({} if selector.recursive else {"Delimiter": "/"}))
            for page in pages:
                dirs.update(p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", []))
                for obj in page.get("Contents", []):
                    parts = obj["Key"][len(prefix):].split("/")
                    # the folders between the base and the object (only a recursive listing has them)
                    dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                    if parts[-1]:  # not a folder marker ("a/b/")
                        files.append(pyarrow.fs.FileInfo(f"{bucket}/{obj['Key']}", pyarrow.fs.FileType.File,
                                                         size=obj["Size"], mtime=obj["LastModified"]))
        except Exception as err:
            raise _explain(S3_PREFIX + selector.base_dir, err) from err
        if not files and not dirs and not selector.allow_not_found and key:
            raise FileNotFoundError(f"{S3_PREFIX}{selector.base_dir} does not exist")
        return [pyarrow.fs.FileInfo(f"{bucket}/{d}", pyarrow.fs.FileType.Directory) for d in sorted(dirs)] + files

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # S3 has no folders: one exists once an object lies under it

    def delete_dir(self, path: str) -> None:
        self.delete_dir_contents(path, missing_dir_ok=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        bucket, key = _bucket_key(path)
        if not key:
            raise StorageError(f"refusing to empty the whole bucket {bucket}")
        prefix = key.rstrip("/") + "/"
        try:
            for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:  # a page holds at most 1000 keys, as many as one delete_objects takes
                    self._client().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        except Exception as err:
            raise _explain(S3_PREFIX + path, err) from err

    def delete_root_dir_contents(self) -> None:
        raise StorageError("refusing to delete every bucket")

    def delete_file(self, path: str) -> None:
        bucket, key = _bucket_key(path)
        try:
            self._client().delete_object(Bucket=bucket, Key=key)
        except Exception as err:
            raise _explain(S3_PREFIX + path, err) from err

    def copy_file(self, src: str, dest: str) -> None:
        (src_bucket, src_key), (bucket, key) = _bucket_key(src), _bucket_key(dest)
        try:  # boto3's managed copy: in parts above 5 GB, server-side
            self._client().copy({"Bucket": src_bucket, "Key": src_key}, bucket, key)
        except Exception as err:
            raise _explain(S3_PREFIX + src, err) from err

    def move(self, src: str, dest: str) -> None:  # one file (Ray moves nothing in its storage)
        self.copy_file(src, dest)
        self.delete_file(src)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        reader = io.BufferedReader(_ResumableS3Reader(S3_PREFIX + path, self.max_attempts), STREAM_BUFFER_BYTES)
        return pyarrow.PythonFile(reader, mode="r")

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        # Random access (Parquet footers): the whole object, read once through the resumable reader.
        with _ResumableS3Reader(S3_PREFIX + path, self.max_attempts) as reader:
            return pyarrow.BufferReader(reader.readall())

    def open_output_stream(self, path: str, metadata=None) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_S3Upload(S3_PREFIX + path, self.max_attempts, metadata), mode="w")

    def open_append_stream(self, path: str, metadata=None):
        raise StorageError(f"{S3_PREFIX}{path}: S3 objects cannot be appended to")


def _bucket_key(path: str) -> tuple[str, str]:
    """A pyarrow filesystem path ``bucket/a/b`` -> ``("bucket", "a/b")``."""
    return split_s3(S3_PREFIX + path.lstrip("/"))


class _S3Upload(io.RawIOBase):
    """A write-only file whose bytes become the S3 object ``uri`` when it closes (spooled to a
    temporary file above ``MULTIPART_CHUNK_BYTES``, uploaded in parts above that size)."""

    def __init__(self, uri: str, max_attempts: int, metadata=None):
        super().__init__()
        self.uri, self._max_attempts = uri, max_attempts
        self._metadata = {_text(k): _text(v) for k, v in dict(metadata or {}).items()}
        self._file = tempfile.SpooledTemporaryFile(max_size=MULTIPART_CHUNK_BYTES)

    def writable(self) -> bool:
        return True

    def __del__(self):  # dropped without close(): never upload what may be half-written
        self._file.close()

    def write(self, data) -> int:
        return self._file.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.seek(0)
            _upload(self.uri, self._file, self._metadata, self._max_attempts)
        finally:
            self._file.close()
            super().close()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

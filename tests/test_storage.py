"""raysr.storage: local and s3:// reads/writes."""

import os
import stat

import pytest

from raysr import storage


def test_local_writes_are_atomic_and_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "out.bin"
        storage.write_bytes(str(target), b"abc")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # what open() gives, not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temporary file left


def test_a_failed_local_write_leaves_the_old_file_untouched(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        storage._replace_local(str(target), broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_missing_local_file_is_a_storage_error_naming_it(tmp_path):
    with pytest.raises(storage.StorageError, match="nope.bin does not exist"):
        storage.read_bytes(str(tmp_path / "nope.bin"))


def test_s3_round_trip_listing_and_clear_missing_errors(s3_bucket):
    base = f"s3://{s3_bucket}/dir"
    storage.write_bytes(storage.join(base, "a.bin"), b"1")
    storage.write_bytes(storage.join(base, "b/c.bin"), b"22")
    assert storage.read_bytes(f"{base}/b/c.bin") == b"22"
    assert storage.exists(f"{base}/a.bin") and not storage.exists(f"{base}/zzz.bin")
    assert storage.list_files(base) == [f"{base}/a.bin", f"{base}/b/c.bin"]
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(f"{base}/zzz.bin")
    with pytest.raises(storage.StorageError, match="bucket"):
        storage.read_bytes("s3://no-such-bucket-raysr/x")
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.split_s3("s3:///key")

"""raysr.io: local and s3:// reads/writes."""

import os
import stat

import pytest

from raysr import io as rio


def test_local_writes_are_atomic_and_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "out.bin"
        rio.write_bytes(str(target), b"abc")
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
        rio._replace_local(str(target), broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_missing_local_file_is_a_storage_error_naming_it(tmp_path):
    with pytest.raises(rio.StorageError, match="nope.bin does not exist"):
        rio.read_bytes(str(tmp_path / "nope.bin"))


def test_s3_round_trip_listing_and_clear_missing_errors(s3_bucket):
    base = f"s3://{s3_bucket}/dir"
    rio.write_bytes(rio.join(base, "a.bin"), b"1")
    rio.write_bytes(rio.join(base, "b/c.bin"), b"22")
    assert rio.read_bytes(f"{base}/b/c.bin") == b"22"
    assert rio.exists(f"{base}/a.bin") and not rio.exists(f"{base}/zzz.bin")
    assert rio.list_files(base) == [f"{base}/a.bin", f"{base}/b/c.bin"]
    with pytest.raises(rio.StorageError, match="does not exist"):
        rio.read_bytes(f"{base}/zzz.bin")
    with pytest.raises(rio.StorageError, match="bucket"):
        rio.read_bytes("s3://no-such-bucket-raysr/x")
    with pytest.raises(rio.StorageError, match="no bucket name"):
        rio.split_s3("s3:///key")

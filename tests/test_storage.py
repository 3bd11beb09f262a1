"""raysr.storage: local and s3:// reads/writes."""

import os
import pickle
import stat

import pyarrow.fs
import pytest
from pyarrow.fs import FileType

from faults import Fault
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


# --------------------------------------------------------------------------- Ray's run storage (S3Handler)


def _fs(max_attempts: int = storage.S3_MAX_ATTEMPTS):
    return storage.storage_args("s3://unused")["storage_filesystem"] if max_attempts == storage.S3_MAX_ATTEMPTS \
        else pyarrow.fs.PyFileSystem(storage.S3Handler(max_attempts))


def test_run_storage_filesystem_does_what_ray_asks_of_it(s3_bucket, tmp_path):
    """The calls Ray Train makes on its storage filesystem: write and read a file, look up files and
    folders, list a folder, upload and download a checkpoint folder (pyarrow.fs.copy_files), delete it."""
    fs = pickle.loads(pickle.dumps(_fs()))  # as Ray hands it to its processes
    assert storage.storage_args(f"s3://{s3_bucket}/runs/") == {"storage_path": f"{s3_bucket}/runs",
                                                              "storage_filesystem": fs}
    with fs.open_output_stream(f"{s3_bucket}/runs/a/snapshot.json") as out:
        out.write(b'{"step": 3}')
    with fs.open_input_stream(f"{s3_bucket}/runs/a/snapshot.json") as f:
        assert f.read() == b'{"step": 3}'
    assert fs.open_input_file(f"{s3_bucket}/runs/a/snapshot.json").read_at(4, 2) == b"step"
    info = fs.get_file_info([f"{s3_bucket}/runs/a/snapshot.json", f"{s3_bucket}/runs/a", f"{s3_bucket}/runs/zz"])
    assert [i.type for i in info] == [FileType.File, FileType.Directory, FileType.NotFound]
    assert info[0].size == 11

    local = tmp_path / "checkpoint_00000001"
    (local / "sub").mkdir(parents=True)
    (local / "state.pt").write_bytes(b"s" * 1000)
    (local / "sub" / "x.bin").write_bytes(b"x")
    dest = f"{s3_bucket}/runs/a/checkpoint_00000001"
    fs.create_dir(dest)
    pyarrow.fs.copy_files(str(local), dest, destination_filesystem=fs)
    top = fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_bucket}/runs/a"))
    assert sorted((i.path, i.type) for i in top) == [(dest, FileType.Directory),
                                                      (f"{s3_bucket}/runs/a/snapshot.json", FileType.File)]
    every = fs.get_file_info(pyarrow.fs.FileSelector(dest, recursive=True))
    assert sorted((i.path, i.type) for i in every) == [(f"{dest}/state.pt", FileType.File),
                                                        (f"{dest}/sub", FileType.Directory),
                                                        (f"{dest}/sub/x.bin", FileType.File)]
    assert fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_bucket}/nope", allow_not_found=True)) == []
    with pytest.raises(FileNotFoundError):
        fs.get_file_info(pyarrow.fs.FileSelector(f"{s3_bucket}/nope"))
    back = tmp_path / "back"
    pyarrow.fs.copy_files(dest, str(back), source_filesystem=fs)
    assert (back / "state.pt").read_bytes() == b"s" * 1000 and (back / "sub" / "x.bin").read_bytes() == b"x"

    fs.copy_file(f"{dest}/state.pt", f"{s3_bucket}/runs/b/state.pt")
    fs.move(f"{s3_bucket}/runs/a/snapshot.json", f"{s3_bucket}/runs/b/snapshot.json")
    fs.delete_file(f"{dest}/sub/x.bin")
    assert storage.list_files(f"s3://{s3_bucket}/runs") == [f"s3://{dest}/state.pt"] + [
        f"s3://{s3_bucket}/runs/b/{n}" for n in ("snapshot.json", "state.pt")]
    fs.delete_dir(f"{s3_bucket}/runs/a")
    assert storage.list_files(f"s3://{s3_bucket}") == [f"s3://{s3_bucket}/runs/b/{n}"
                                                       for n in ("snapshot.json", "state.pt")]


def test_run_storage_retries_uploads_and_raises_when_every_try_failed(s3_bucket, s3_faults):
    """A 503 on a file's upload: the second try lands it. A file refused as often as the
    filesystem tries (2 here, kept through pickling): closing the stream raises, nothing is stored."""
    fs = _fs()
    s3_faults.arm(Fault("slowdown", times=1, method="PUT", path="/a.bin"))
    with fs.open_output_stream(f"{s3_bucket}/a.bin") as out:
        out.write(b"abc")
    assert s3_faults.count("PUT", "/a.bin") == 2
    assert storage.read_bytes(f"s3://{s3_bucket}/a.bin") == b"abc"

    fs = pickle.loads(pickle.dumps(_fs(max_attempts=2)))
    s3_faults.arm(Fault("slowdown", times=2, method="PUT", path="/b.bin"))
    with pytest.raises(storage.StorageError, match="SlowDown"):
        with fs.open_output_stream(f"{s3_bucket}/b.bin") as out:
            out.write(b"abc")
    assert s3_faults.count("PUT", "/b.bin") == 2
    assert not storage.exists(f"s3://{s3_bucket}/b.bin")


def test_large_uploads_go_in_parts_and_a_503_on_starting_them_is_retried(s3_bucket, s3_faults, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_CHUNK_BYTES", 5 << 20)  # S3's smallest part
    data = os.urandom(6 << 20)
    s3_faults.arm(Fault("slowdown", times=2, method="POST", path="/big.bin?uploads"))
    with _fs().open_output_stream(f"{s3_bucket}/big.bin") as out:
        out.write(data)
    assert s3_faults.count("POST", "/big.bin?uploads") == 3
    assert s3_faults.count("PUT", "/big.bin?") == 2  # the parts (a whole-object PUT has no query)
    assert storage.read_bytes(f"s3://{s3_bucket}/big.bin") == data


def test_reads_resume_a_body_cut_short(s3_bucket, s3_faults):
    """Ray's read of a checkpoint file whose body breaks after 4 kB: the rest comes with one ranged GET."""
    data = os.urandom(100_000)
    storage.write_bytes(f"s3://{s3_bucket}/state.pt", data)
    s3_faults.arm(Fault("cut_reply", times=1, method="GET", path="/state.pt", after_bytes=4096))
    with _fs().open_input_stream(f"{s3_bucket}/state.pt") as f:
        assert f.read() == data
    assert s3_faults.count("GET", "/state.pt") == 2 and s3_faults.count("GET", "/state.pt", ranged=True) == 1

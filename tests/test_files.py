"""htsep.files: synced, atomic, never-replacing writes and provably stale temporaries."""

import errno
import os
from pathlib import Path

import pytest

from htsep import files


def test_place_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, files.rename_no_replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(source, target):
        events.append(("rename", os.path.basename(target)))
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files, "rename_no_replace", rename)
    target = tmp_path / "stem.wav"
    temporary = files.create_temporary(target)
    temporary.write_bytes(b"data")
    files.place(temporary, target, replace=False)
    assert events == [
        ("fsync", temporary.name),
        ("rename", "stem.wav"),
        ("fsync", tmp_path.name),
    ]
    assert target.read_bytes() == b"data" and not temporary.exists()


@pytest.mark.parametrize("mechanism", ["renameat2", "link", "check"])
def test_no_replace_keeps_a_file_that_appeared(tmp_path, monkeypatch, mechanism):
    if mechanism != "renameat2":
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    if mechanism == "check":  # a file system without hard links

        def no_links(source, target):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "stem.wav"
    target.write_bytes(b"theirs")
    temporary = files.create_temporary(target)
    temporary.write_bytes(b"ours")
    with pytest.raises(FileExistsError):
        files.rename_no_replace(temporary, target)
    assert target.read_bytes() == b"theirs" and temporary.read_bytes() == b"ours"
    target.unlink()
    files.rename_no_replace(temporary, target)
    assert target.read_bytes() == b"ours" and not temporary.exists()


def test_atomic_output_removes_its_temporary_when_the_target_appeared(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(FileExistsError), files.atomic_output(target, replace=False) as temporary:
        temporary.write_bytes(b"new")
        target.write_bytes(b"old")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_temporaries_keep_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        temporary = files.create_temporary(tmp_path / "a.wav")
    finally:
        os.umask(old)
    assert temporary.stat().st_mode & 0o777 == 0o644


def test_remove_stale_leaves_other_files_and_live_owners(tmp_path):
    mine = files.create_temporary(tmp_path / "a.wav")
    staging = files.StagingFolder(tmp_path)
    for name in ["a.wav", ".a.wav.1234abcd.tmp", ".htsep-x", ".hidden"]:
        (tmp_path / name).write_bytes(b"user data")
    assert files.remove_stale(tmp_path) == []
    assert files.remove_stale(tmp_path / "missing") == []
    assert len(os.listdir(tmp_path)) == 6
    staging.cleanup()
    assert not (tmp_path / staging.name).exists()
    assert mine.exists()


def test_remove_unfinished_takes_only_what_was_not_put_in_place(tmp_path):
    """After an interruption the command removes the temporaries and staging folders it made
    and had not finished; files already put in place, and folders already cleaned up, stay
    untouched, and what is not ours is never listed."""
    files.remove_unfinished()  # whatever earlier tests left registered
    placed_target = tmp_path / "done.wav"
    placed = files.create_temporary(placed_target)
    placed.write_bytes(b"complete")
    files.place(placed, placed_target, replace=False)
    cleaned = files.StagingFolder(tmp_path)
    cleaned.cleanup()
    left_file = files.create_temporary(tmp_path / "half.wav")
    left_folder = files.StagingFolder(tmp_path)
    (left_folder.path / "stem.wav").write_bytes(b"x")
    foreign = tmp_path / ".someone-else.tmp"
    foreign.write_bytes(b"theirs")
    assert sorted(files.remove_unfinished()) == sorted([left_file, left_folder.path])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".someone-else.tmp", "done.wav"]
    assert placed_target.read_bytes() == b"complete"
    assert files.remove_unfinished() == []


def test_make_folder_names_what_is_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-file").symlink_to(tmp_path / "file")
    expected = {
        "file/a/b": "file is a file, not a folder",
        "loop/a": "loop is a symbolic link loop",
        "gone/a": f"gone is a symbolic link to {tmp_path / 'nowhere'}, which does not exist",
        "gone": f"gone is a symbolic link to {tmp_path / 'nowhere'}, which does not exist",
        "to-file/a": "to-file is a symbolic link to a file, not to a folder",
    }
    for relative, reason in expected.items():
        with pytest.raises(OSError) as caught:
            files.make_folder(tmp_path / relative)
        assert caught.value.strerror == f"{tmp_path}/{reason}"
    files.make_folder(tmp_path / "new" / "deep")  # what can be made is made
    files.make_folder(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir()
    assert not (tmp_path / "nowhere").exists()


def test_real_path_takes_link_loops(tmp_path: Path) -> None:
    """Path.resolve raises RuntimeError on a loop in Python 3.11: real_path never raises."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    assert files.real_path(tmp_path / "a" / "x").name == "x"
    assert files.real_path(tmp_path / "link" / "f") == tmp_path.resolve() / "dir" / "f"
    assert files.broken_link(tmp_path / "a") == "a symbolic link loop"
    assert files.broken_link(tmp_path / "link") is None
    assert files.broken_link(tmp_path / "dir") is None
    assert files.broken_link(tmp_path / "absent") is None

"""quantnoise.checkpoint: atomic writes (permissions, full disk, missing folders) and safe loading."""
import errno
import os
import stat

import pytest
import torch

from quantnoise import checkpoint, export
from quantnoise.checkpoint import atomic_write, load_checkpoint, save_checkpoint


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_new_files_get_the_umask_permissions_like_torch_save(tmp_path, umask, mask):
    umask(mask)
    torch.save({"x": 1}, tmp_path / "plain.pt")
    save_checkpoint({"model": {}}, tmp_path / "ckpt.pt")
    export.save_qnz(tmp_path / "m.qnz", {"b": torch.zeros(2)}, {})
    assert mode(tmp_path / "plain.pt") == 0o666 & ~mask
    assert mode(tmp_path / "ckpt.pt") == mode(tmp_path / "plain.pt") == mode(tmp_path / "m.qnz")


def test_overwriting_keeps_the_existing_files_permissions(tmp_path, umask):
    umask(0o022)
    save_checkpoint({"model": {}}, tmp_path / "ckpt.pt")
    os.chmod(tmp_path / "ckpt.pt", 0o640)
    save_checkpoint({"model": {"a": torch.ones(1)}}, tmp_path / "ckpt.pt")
    assert mode(tmp_path / "ckpt.pt") == 0o640 and "a" in load_checkpoint(tmp_path / "ckpt.pt")["model"]


def test_a_full_disk_leaves_the_old_file_intact_and_no_temp_file(tmp_path, monkeypatch):
    save_checkpoint({"model": {"w": torch.ones(3)}}, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_failing_fsync_also_leaves_no_trace(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "x.bin", lambda tmp: open(tmp, "wb").close())
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(OSError) as e:
        save_checkpoint({"model": {}}, tmp_path / "no" / "such" / "ckpt.pt")
    msg = str(e.value)
    assert "output folder" in msg and str(tmp_path / "no" / "such") in msg and "does not exist" in msg, msg
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="is not a folder"):
        save_checkpoint({"model": {}}, tmp_path / "file" / "ckpt.pt")
    with pytest.raises(OSError, match="is a folder"):
        save_checkpoint({"model": {}}, tmp_path)


def test_missing_or_unreadable_checkpoint_is_one_line(tmp_path):
    with pytest.raises(OSError, match="checkpoint .*missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="is not a readable fairseq checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"model": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="'model' entry is a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_loading_a_checkpoint_keeps_a_global_namespace_allowlist(tmp_path):
    """torch's safe_globals() context removes its classes on exit: loading must not undo the
    plugin's global allowlist of argparse.Namespace (fairseq's own torch.load relies on it)."""
    import argparse

    torch.serialization.add_safe_globals([argparse.Namespace])
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(arch="transformer")}, tmp_path / "c.pt")
    load_checkpoint(tmp_path / "c.pt")
    assert argparse.Namespace in torch.serialization.get_safe_globals()

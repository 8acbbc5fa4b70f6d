"""quantnoise.runtime.ext: the compiled kernel is built atomically and only a finished build is ever loaded.

Each case runs in a fresh process (``available()`` is cached and a loaded library stays loaded), with
``QUANTNOISE_EXT_DIR`` pointing at a folder of the test's own."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from quantnoise.runtime import ext

PROBE = ("import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
         "from quantnoise.runtime import ext, kernels\n"
         "import torch\n"
         "ok = ext.available()\n"
         "x, codes, cents = torch.randn(2, 8), torch.zeros(3, 2, dtype=torch.uint8), torch.randn(4, 4)\n"
         "y = kernels.pq_linear_lut(x, codes, cents)\n"  # runs the compiled op when loaded, pure PyTorch otherwise
         "print('available', ok, tuple(y.shape))\n")


def probe(folder) -> subprocess.CompletedProcess:
    env = {**os.environ, ext.DIR_ENV: str(folder), "OMP_NUM_THREADS": "1"}
    env.pop(ext.NO_EXT_ENV, None)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)


def final_folder(root):
    return root / ext._name()


def built_library():
    path = ext.library_path()
    if os.environ.get(ext.DIR_ENV) or ext.check(path) is not None:
        pytest.skip("no finished build of the kernel in the default folder (make kernels)")
    return path


def test_a_truncated_library_without_marker_is_ignored_with_one_warning(tmp_path):
    lib = built_library()
    folder = final_folder(tmp_path)
    folder.mkdir()
    (folder / lib.name).write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])  # a build killed while linking
    out = probe(tmp_path)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # was SIGBUS (exit 135) when loaded
    assert "available False (2, 3)" in out.stdout
    assert out.stderr.count("not loading the compiled kernel") == 1 and "no completion marker" in out.stderr


def test_a_library_that_does_not_match_its_marker_is_ignored(tmp_path):
    lib = built_library()
    folder = final_folder(tmp_path)
    shutil.copytree(lib.parent, folder)
    data = bytearray((folder / lib.name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged after the build
    (folder / lib.name).write_bytes(bytes(data))
    out = probe(tmp_path)
    assert out.returncode == 0 and "available False" in out.stdout, out.stderr[-2000:]
    assert "does not match the completion marker" in out.stderr


def test_a_finished_build_elsewhere_is_loaded(tmp_path):
    lib = built_library()
    shutil.copytree(lib.parent, final_folder(tmp_path))
    out = probe(tmp_path)
    assert out.returncode == 0 and "available True (2, 3)" in out.stdout, out.stderr[-2000:]
    assert "not loading" not in out.stderr


def test_a_build_in_progress_is_not_seen(tmp_path):
    """Another process linking: its temporary folder holds a 0-byte library; nothing is loaded, silently
    (before, the poller loaded the 0-byte file at the final path and fell back without a word)."""
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = tmp_path / f"{ext._name()}.tmp-{busy.pid}-abcd1234"
        tmp.mkdir()
        (tmp / f"{ext._name()}.so").write_bytes(b"")
        (tmp / "lock").write_text("")
        out = probe(tmp_path)
        assert out.returncode == 0 and "available False" in out.stdout
        assert "not loading" not in out.stderr  # no library at the final path: not built (yet), no warning
        env = {**os.environ, ext.DIR_ENV: str(tmp_path)}
        subprocess.run([sys.executable, "-c", "from quantnoise.runtime import ext; ext._remove_dead_builds("
                        "ext.build_dir())"], env=env, check=True, timeout=120)
        assert tmp.exists()  # its process is alive: left alone
    finally:
        busy.send_signal(signal.SIGKILL)
        busy.wait()


@pytest.mark.slow
def test_build_clears_a_dead_build_and_replaces_a_damaged_library(tmp_path):
    """A killed build's folder (torch's lock file in it, its process gone) made later builds wait forever; a
    damaged library at the final path was returned as built.  Now both are cleared and one real build runs."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{ext._name()}.tmp-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "lock").write_text("")
    folder = final_folder(tmp_path)
    folder.mkdir()
    (folder / f"{ext._name()}.so").write_bytes(b"\x7fELF truncated")
    env = {**os.environ, ext.DIR_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "quantnoise.runtime"], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not stale.exists()
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing temporary left behind
    lib = folder / f"{ext._name()}.so"
    assert (folder / ext.MARKER).read_text().strip() == ext._sha256(lib)
    assert "available True (2, 3)" in probe(tmp_path).stdout

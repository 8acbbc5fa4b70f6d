"""The compiled kernels of quantnoise.runtime (quantnoise/runtime/csrc/pq_lut.cpp): build them, load them.

    python -m quantnoise.runtime          # build (`make kernels`; ~20 s, g++ and ninja)

A PyTorch C++ extension registering ``torch.ops.quantnoise.pq_direct_linear`` (the pq product with no table, for
the fewest tokens), ``pq_lut_linear`` (the pq look-up-table product for few tokens), ``pq_decode`` (codes to rows)
and ``int4_linear``; quantnoise/runtime/kernels.py falls back to
pure PyTorch when the library is absent.  Built with ``torch.utils.cpp_extension`` into
``quantnoise/runtime/csrc/build/`` (``$QUANTNOISE_EXT_DIR`` overrides it, e.g. for a read-only install) under a
name holding the hash of the source, torch's version, the flags and the CPU (``-march=native``), so a stale
build, or one made for another CPU, is never loaded.

The build is atomic: it compiles in a folder of its own (``NAME.tmp-PID-*``), writes a completion marker holding
the library's SHA-256, then renames the folder into place.  So a build killed midway leaves only its temporary
folder (removed by the next build once its process is gone, with torch's lock file in it: no build waits on a
dead one), a process looking while another links sees no library rather than a partial one, and two builds at
once both succeed (the second finds the first's).  The runtime only loads a library whose marker matches it
(anything else is ignored with one warning, and ``build()`` replaces it); it never compiles
(``QUANTNOISE_NO_EXT=1``: do not load it).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import uuid
from typing import Optional

import torch

logger = logging.getLogger(__name__)
SOURCE = pathlib.Path(__file__).with_name("csrc") / "pq_lut.cpp"
NO_EXT_ENV, DIR_ENV = "QUANTNOISE_NO_EXT", "QUANTNOISE_EXT_DIR"
CFLAGS = ["-O3", "-march=native"]  # for this machine's CPU (AVX-512 here: the table 1.3-2.3x faster at 16-64 tokens)
MARKER = "COMPLETE"  # in the library's folder: the SHA-256 of the finished library
BUILD_TIMEOUT_S = 1800
# run in a child process: cpp_extension.load also loads the library, which the building process must not do
# from a temporary path (the runtime loads it from its final path; two loads would register the ops twice)
_COMPILE = """import sys
from torch.utils import cpp_extension
name, source, folder, verbose = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
cpp_extension.load(name=name, sources=[source], build_directory=folder, extra_cflags=sys.argv[5:],
                   is_python_module=False, verbose=verbose)
"""


@functools.lru_cache(None)
def _cpu() -> bytes:
    """What -march=native compiles for: the CPU's model and instruction-set flags (a build made on another CPU
    is never loaded)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})).encode()


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode() + _cpu())
    return f"qn_pq_lut_{digest.hexdigest()[:12]}"


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(DIR_ENV) or SOURCE.parent / "build")


def library_path() -> pathlib.Path:
    return build_dir() / _name() / f"{_name()}.so"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check(path: pathlib.Path) -> Optional[str]:
    """Why the library at ``path`` must not be loaded (None: it is a finished build)."""
    if not path.is_file():
        return "no library file"
    marker = path.with_name(MARKER)
    if not marker.is_file():
        return "no completion marker: an unfinished or interrupted build"
    if marker.read_text().strip() != _sha256(path):
        return "its SHA-256 does not match the completion marker: a truncated or damaged file"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(root: pathlib.Path) -> None:
    """Temporary folders of builds whose process is gone (a killed build, with torch's lock file in it)."""
    for d in root.glob("*.tmp-*-*"):
        try:
            pid = int(d.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _alive(pid):
            logger.info("runtime: removing %s, left by a build that did not finish", d)
            shutil.rmtree(d, ignore_errors=True)


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the extension unless a finished build for this source, torch and CPU exists; return its path.
    RuntimeError (the compiler's last lines) when it does not compile."""
    out = library_path()
    if check(out) is None:
        return out
    root = out.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root)
    tmp = root / f"{out.parent.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # ninja from the venv (PyPI's ninja) when the venv is not activated: the child's PATH only
        env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run([sys.executable, "-c", _COMPILE, out.parent.name, str(SOURCE), str(tmp),
                               "1" if verbose else "0", *CFLAGS], env=env, capture_output=not verbose, text=True,
                              timeout=BUILD_TIMEOUT_S)
        lib = tmp / out.name
        if proc.returncode != 0 or not lib.is_file() or lib.stat().st_size == 0:
            tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-5:])
            raise RuntimeError(f"compiling {SOURCE.name} failed (exit {proc.returncode}): {tail}")
        (tmp / f"{MARKER}.part").write_text(_sha256(lib) + "\n")
        os.replace(tmp / f"{MARKER}.part", tmp / MARKER)
        if out.parent.exists():  # another build finished first, or a damaged leftover
            if check(out) is None:
                return out
            stale = root / f"{out.parent.name}.tmp-{os.getpid()}-damaged"
            os.rename(out.parent, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, out.parent)  # atomic: the folder appears whole, marker included
        except OSError:  # lost a race to a build that finished meanwhile
            if check(out) is not None:
                raise
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(None)
def available() -> bool:
    """True once ``torch.ops.quantnoise`` kernels are loaded (a finished build for this source, torch and CPU)."""
    if os.environ.get(NO_EXT_ENV):
        return False
    path = library_path()
    if not path.parent.exists():
        logger.debug("runtime: no compiled kernel at %s (python -m quantnoise.runtime builds it)", path)
        return False
    why = check(path)
    if why is not None:
        logger.warning("runtime: not loading the compiled kernel %s (%s); using pure PyTorch; rebuild it with "
                       "`python -m quantnoise.runtime`", path, why)
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        logger.warning("runtime: cannot load the compiled kernel %s (%s); using pure PyTorch", path, e)
        return False
    return True


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build()
    except (OSError, RuntimeError, ImportError, subprocess.TimeoutExpired) as e:  # no compiler / ninja: still works
        logger.warning("quantnoise: the compiled runtime kernel was not built (%s); pure PyTorch kernels will be "
                       "used", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return 0
    logger.info("quantnoise: compiled runtime kernel at %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The compiled kernel of quantnoise.runtime (quantnoise/csrc/pq_lut.cpp): build it, load it.

    python -m quantnoise.runtime_ext          # build (scripts/setup_venv.sh runs it; ~20 s, g++ and ninja)

A PyTorch C++ extension registering ``torch.ops.quantnoise.pq_lut_linear`` (the pq look-up-table product for
few tokens) and ``torch.ops.quantnoise.pq_decode`` (codes to rows); quantnoise/runtime_kernels.py falls back to
pure PyTorch when the library is absent.  Built with
``torch.utils.cpp_extension`` into ``quantnoise/csrc/build/`` under a name holding the hash of the source,
torch's version, the flags and the CPU (``-march=native``), so a stale build, or one made for another CPU, is
never loaded; the runtime only loads a finished build, it never compiles (``QUANTNOISE_NO_EXT=1``: do not load it).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform
import sys

import torch

logger = logging.getLogger(__name__)
SOURCE = pathlib.Path(__file__).with_name("csrc") / "pq_lut.cpp"
BUILD_DIR = SOURCE.parent / "build"
NO_EXT_ENV = "QUANTNOISE_NO_EXT"
CFLAGS = ["-O3", "-march=native"]  # for this machine's CPU (AVX-512 here: the table 1.3-2.3x faster at 16-64 tokens)


@functools.lru_cache(None)
def _cpu() -> bytes:
    """What -march=native compiles for: the CPU's model and instruction-set flags (a build made on another CPU
    is never loaded)."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})).encode()


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode() + _cpu())
    return f"qn_pq_lut_{digest.hexdigest()[:12]}"


def library_path() -> pathlib.Path:
    return BUILD_DIR / _name() / f"{_name()}.so"


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the extension (if not already built for this source and torch); return the library's path."""
    from torch.utils import cpp_extension

    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # ninja from the venv (PyPI's ninja) when the venv is not activated
    os.environ["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cpp_extension.load(name=_name(), sources=[str(SOURCE)], build_directory=str(out.parent), extra_cflags=CFLAGS,
                       is_python_module=False, verbose=verbose)
    return out


@functools.lru_cache(None)
def available() -> bool:
    """True once ``torch.ops.quantnoise`` kernels are loaded (a finished build for this source and torch)."""
    if os.environ.get(NO_EXT_ENV):
        return False
    path = library_path()
    if not path.exists():
        logger.debug("runtime: no compiled kernel at %s (python -m quantnoise.runtime_ext builds it)", path)
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
    except (OSError, RuntimeError, ImportError, SystemExit) as e:  # no compiler / ninja: the runtime still works
        logger.warning("quantnoise: the compiled runtime kernel was not built (%s); pure PyTorch kernels will be "
                       "used", str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return 0
    logger.info("quantnoise: compiled runtime kernel at %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

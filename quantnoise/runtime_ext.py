"""The compiled kernel of quantnoise.runtime (quantnoise/csrc/pq_lut.cpp): build it, load it.

    python -m quantnoise.runtime_ext          # build (scripts/setup_venv.sh runs it; ~20 s, g++ and ninja)

A PyTorch C++ extension registering ``torch.ops.quantnoise.pq_lut_gather`` (the gather-sum of the pq
look-up-table product; quantnoise/runtime_kernels.py computes the table and falls back to pure PyTorch
when the library is absent).  Built with ``torch.utils.cpp_extension`` into ``quantnoise/csrc/build/``
under a name holding the hash of the source and of torch's version, so a stale build is never loaded;
the runtime only loads a finished build, it never compiles (``QUANTNOISE_NO_EXT=1``: do not load it).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import sys

import torch

logger = logging.getLogger(__name__)
SOURCE = pathlib.Path(__file__).with_name("csrc") / "pq_lut.cpp"
BUILD_DIR = SOURCE.parent / "build"
NO_EXT_ENV = "QUANTNOISE_NO_EXT"


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"qn_pq_lut_{digest}"


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
    cpp_extension.load(name=_name(), sources=[str(SOURCE)], build_directory=str(out.parent), extra_cflags=["-O3"],
                       is_python_module=False, verbose=verbose)
    return out


@functools.lru_cache(None)
def available() -> bool:
    """True once ``torch.ops.quantnoise.pq_lut_gather`` is loaded (a finished build for this source and torch)."""
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

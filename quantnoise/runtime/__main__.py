"""``python -m quantnoise.runtime``: build the runtime's compiled kernels (quantnoise.runtime.ext)."""
import sys

from .ext import main

sys.exit(main())

"""fairseq plugin: ``fairseq-train --user-dir $(quantnoise user-dir) --arch qn_transformer_lm ...``.

fairseq imports this folder by its name (``qn_fairseq``); importing the modules below runs their
``register_*`` decorators.  This is the only part of quantnoise that imports fairseq.
"""
from . import compat, models, runtime  # noqa: F401

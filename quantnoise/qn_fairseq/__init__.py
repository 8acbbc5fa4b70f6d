"""fairseq plugin: ``fairseq-train --user-dir $(quantnoise user-dir) --arch qn_transformer_lm ...``.

fairseq imports this folder by its name (``qn_fairseq``); importing the modules below runs their
``register_*`` decorators.  This is the only part of quantnoise that imports fairseq.

One module under one name: imported as ``quantnoise.qn_fairseq``, the package makes itself the top-level
``qn_fairseq`` that ``--user-dir`` imports (``quantnoise.commands.user_dir.import_plugin``), each submodule
``quantnoise.qn_fairseq.X`` the module ``qn_fairseq.X``, so the architectures are registered once whichever
import comes first (two names used to run the decorators twice: "Cannot register duplicate model architecture").
"""
import sys

if __name__ == "qn_fairseq":
    from . import compat, models, runtime  # noqa: F401
else:
    import importlib
    import pkgutil

    from quantnoise.commands.user_dir import import_plugin

    _plugin = import_plugin()
    for _sub in pkgutil.iter_modules(_plugin.__path__):
        sys.modules[f"{__name__}.{_sub.name}"] = importlib.import_module(f"qn_fairseq.{_sub.name}")
    sys.modules[__name__] = _plugin

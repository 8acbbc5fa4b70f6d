"""``quantnoise user-dir``: the absolute path to give fairseq's ``--user-dir``."""
import importlib
import pathlib
import sys


def plugin_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent / "qn_fairseq"


def import_plugin():
    """The plugin package under the one name fairseq's ``--user-dir`` gives it, the top-level ``qn_fairseq``
    (imported as fairseq imports it, if nothing has yet).  quantnoise's folder is on ``sys.path`` only while it
    is imported (it would make ``export``, ``nn``, ``config``... importable as top-level modules)."""
    if "qn_fairseq" not in sys.modules:
        parent = str(plugin_dir().parent)
        sys.path.insert(0, parent)
        try:
            importlib.import_module("qn_fairseq")
        finally:
            if parent in sys.path:
                sys.path.remove(parent)
    return sys.modules["qn_fairseq"]


def add_parser(sub) -> None:
    p = sub.add_parser("user-dir", help="print the path for fairseq's --user-dir")
    p.set_defaults(func=lambda args: print(plugin_dir()) or 0)

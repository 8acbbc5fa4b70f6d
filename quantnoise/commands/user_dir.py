"""``quantnoise user-dir``: the absolute path to give fairseq's ``--user-dir``."""
import pathlib


def plugin_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent / "qn_fairseq"


def add_parser(sub) -> None:
    p = sub.add_parser("user-dir", help="print the path for fairseq's --user-dir")
    p.set_defaults(func=lambda args: print(plugin_dir()) or 0)

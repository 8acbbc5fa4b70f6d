"""Write a plain-text LM corpus as train/valid/test files, one sentence-ish line each.

Default source (no download): the docstrings of a fixed list of Python standard-library modules,
so the demo corpus exists on any machine with Python (~0.3 MB).  ``--all-stdlib`` takes the docstrings
of every pure-Python module of the standard library instead (read with ``ast``, nothing imported;
~1.6 MB of text on CPython 3.11, the corpus of ``recipes/lm --size small``).  ``--text FILE`` uses
any plain-text corpus instead.  Lines are tokenised by splitting punctuation from words (a ``--text`` corpus keeps one line per
input line; the docstrings are taken a paragraph per line); the split is deterministic.

    python scripts/make_corpus.py OUT_DIR [--text FILE | --all-stdlib] [--max-lines N]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import re
import sys
import sysconfig

STDLIB = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
          "email", "fractions", "functools", "http.client", "inspect", "json", "logging", "multiprocessing",
          "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
          "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request", "zipfile"]
# folders of the standard library left out of --all-stdlib: tests, IDLE, tool demos, installers
SKIP = re.compile(r"(^|/)(site-packages|dist-packages|test|tests|idle_test|idlelib|lib2to3|turtledemo|ensurepip"
                  r"|__pycache__|config-[^/]*)(/|$)")
TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+|[^\sA-Za-z\d]")


def stdlib_text() -> str:
    docs = []
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from this build is fine: the corpus just shrinks
            continue
        for obj in [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]:
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(doc)
    return "\n".join(docs)


def all_stdlib_text() -> str:
    """Docstrings (module, class, function; in file order, then ``ast.walk`` order) of every .py file
    of this Python's standard library outside SKIP, parsed with ``ast`` (no module is imported)."""
    import ast

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP.search(path.relative_to(root).as_posix()):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs += [d for d in map(ast.get_docstring, nodes) if d]
    return "\n\n".join(docs)


def lines_of(text: str, max_lines: int, unit: str = "line"):
    """Tokenised lines: one per input line (``unit="line"``, the fairseq convention for a text
    corpus) or one per blank-line-separated paragraph (``"paragraph"``, for wrapped docstrings)."""
    pieces = re.split(r"\n\s*\n", text) if unit == "paragraph" else text.splitlines()
    out = []
    for par in pieces:
        toks = TOKEN.findall(par)
        if len(toks) >= (4 if unit == "paragraph" else 1):
            out.append(" ".join(toks).lower())
        if len(out) >= max_lines:
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="plain-text corpus to use instead of the stdlib docstrings")
    src.add_argument("--all-stdlib", action="store_true",
                    help="docstrings of every pure-Python stdlib module (~1.6 MB) instead of the 34-module default")
    ap.add_argument("--max-lines", type=int, default=200_000)
    a = ap.parse_args(argv)
    if a.text:
        path = pathlib.Path(a.text)
        if not path.is_file():
            print(f"make_corpus: --text {a.text!r} is not a file; pass a plain-text corpus", file=sys.stderr)
            return 2
        lines = lines_of(path.read_text(encoding="utf-8", errors="replace"), a.max_lines, "line")
    else:
        lines = lines_of(all_stdlib_text() if a.all_stdlib else stdlib_text(), a.max_lines, "paragraph")
    if len(lines) < 20:
        print(f"make_corpus: only {len(lines)} usable lines in the corpus; need at least 20", file=sys.stderr)
        return 2
    out = pathlib.Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"valid": lines[0::20], "test": lines[1::20], "train": [l for i, l in enumerate(lines) if i % 20 > 1]}
    for split, rows in splits.items():
        (out / f"{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"corpus: {len(splits['train'])} train / {len(splits['valid'])} valid / {len(splits['test'])} test lines in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

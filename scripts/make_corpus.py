"""Write a plain-text LM corpus as train/valid/test files, one sentence-ish line each.

Default source (no download): the docstrings of a fixed list of Python standard-library modules,
so the demo corpus exists on any machine with Python (~0.3 MB).  ``--all-stdlib`` takes the docstrings
of every pure-Python module of the standard library instead (read with ``ast``, nothing imported;
~1.6 MB of text on CPython 3.11, the corpus of ``recipes/lm --size small``).  ``--manpages`` renders
the Linux manual pages of Debian's ``manpages`` and ``manpages-dev`` packages with ``groff`` (system calls,
C library, file formats, overviews; ``apt-get install manpages manpages-dev groff-base``), a paragraph per
line: a second real corpus, in another domain.  ``--text FILE`` uses
any plain-text corpus instead.  Lines are tokenised by splitting punctuation from words (a ``--text`` corpus keeps one line per
input line; the docstrings are taken a paragraph per line); the split is deterministic.

    python scripts/make_corpus.py OUT_DIR [--text FILE | --all-stdlib | --manpages] [--max-lines N]
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


MANPAGE_PACKAGES = ("manpages", "manpages-dev")


def manpage_texts():
    """Every manual page the Debian packages MANPAGE_PACKAGES install (``dpkg -L``, sorted; ``.so``
    redirections skipped), rendered one at a time by ``groff -t -man`` to plain text without hyphenation
    or emphasis; page headers and footers fall away as paragraphs of fewer than 4 tokens."""
    import gzip
    import shutil
    import subprocess

    fix = f"run apt-get install {' '.join(MANPAGE_PACKAGES)} groff-base"
    if shutil.which("dpkg") is None or shutil.which("groff") is None:
        raise SystemExit(f"make_corpus: --manpages needs dpkg and groff; {fix}")
    listed = subprocess.run(["dpkg", "-L", *MANPAGE_PACKAGES], capture_output=True, text=True)
    pages = sorted(p for p in listed.stdout.split() if re.search(r"/man/man\d/[^/]+\.gz$", p))
    if listed.returncode or not pages:
        raise SystemExit(f"make_corpus: no manual pages from {' and '.join(MANPAGE_PACKAGES)}; {fix}")
    for page in pages:
        src = gzip.open(page).read()
        if not src.lstrip().startswith(b".so "):  # not a link to another page
            yield subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=200n"], input=src,
                                 capture_output=True).stdout.decode("utf-8", errors="replace")


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
    src.add_argument("--manpages", action="store_true",
                     help="the Linux manual pages of Debian's manpages + manpages-dev packages, rendered by groff")
    ap.add_argument("--max-lines", type=int, default=200_000)
    a = ap.parse_args(argv)
    if a.text:
        path = pathlib.Path(a.text)
        if not path.is_file():
            print(f"make_corpus: --text {a.text!r} is not a file; pass a plain-text corpus", file=sys.stderr)
            return 2
        lines = lines_of(path.read_text(encoding="utf-8", errors="replace"), a.max_lines, "line")
    elif a.manpages:  # rendered page by page, only as many as --max-lines needs
        lines = []
        for text in manpage_texts():
            lines += lines_of(text, a.max_lines - len(lines), "paragraph")
            if len(lines) >= a.max_lines:
                break
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

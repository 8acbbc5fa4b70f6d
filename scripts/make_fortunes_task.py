"""A real sentence-classification task from Debian's ``fortunes`` package: each fortune cookie is a
text, its label the file (category) the fortune-mod maintainers filed it under (computers,
politics, science, ...).  The labels are theirs, not ours.

    apt-get install fortunes
    python scripts/make_fortunes_task.py OUTDIR [--train 5000] [--seed 0] [--categories a,b,...]

Writes OUTDIR/{train,dev,test}.tsv (label<TAB>text): a seeded shuffle, ``--train`` lines for
training and the rest halved into dev and test.  A fortune's lines are joined with spaces; a text
found under two categories is dropped (no label noise, no train/test overlap).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections import Counter

DEFAULT_DIR = "/usr/share/games/fortunes"
DEFAULT_CATEGORIES = "computers,definitions,men-women,people,politics,science,songs-poems,work,zippy"


def read_fortunes(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        chunks = re.split(r"^%\s*$", f.read(), flags=re.M)
    for c in chunks:
        text = " ".join(c.split())  # lines, tabs and runs of spaces -> one space
        if text:
            yield text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="label<TAB>text splits from Debian's fortunes package")
    ap.add_argument("outdir")
    ap.add_argument("--fortunes-dir", default=DEFAULT_DIR)
    ap.add_argument("--categories", default=DEFAULT_CATEGORIES)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cats = [c for c in a.categories.split(",") if c]
    missing = [c for c in cats if not os.path.isfile(os.path.join(a.fortunes_dir, c))]
    if missing:
        sys.exit(f"error: no fortune file {missing[0]!r} in {a.fortunes_dir}; `apt-get install fortunes` "
                 f"or pass --fortunes-dir / --categories")
    owner, rows = {}, []
    for c in cats:
        for text in read_fortunes(os.path.join(a.fortunes_dir, c)):
            owner.setdefault(text, set()).add(c)
            rows.append((c, text))
    rows = sorted({(c, t) for c, t in rows if len(owner[t]) == 1})
    random.Random(a.seed).shuffle(rows)
    if not 0 < a.train < len(rows) - 1:
        sys.exit(f"error: --train {a.train} must leave dev and test lines: there are {len(rows)} fortunes")
    rest = rows[a.train:]
    splits = {"train": rows[:a.train], "dev": rest[: len(rest) // 2], "test": rest[len(rest) // 2:]}
    os.makedirs(a.outdir, exist_ok=True)
    for name, part in splits.items():
        with open(os.path.join(a.outdir, f"{name}.tsv"), "w", encoding="utf-8") as f:
            f.writelines(f"{c}\t{t}\n" for c, t in part)
        print(f"{name}: {len(part)} lines, {dict(sorted(Counter(c for c, _ in part).items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/make_corpus.py: any plain-text corpus, one output line per input line."""
import sys

import pytest

from conftest import ROOT, run


def test_text_corpus_keeps_its_lines(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(f"Line {i}: the cat sat on mat number {i}." for i in range(100)) + "\n", encoding="utf-8")
    run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / "out", "--text", src])
    counts = {s: len((tmp_path / "out" / f"{s}.txt").read_text().splitlines()) for s in ("train", "valid", "test")}
    assert counts == {"train": 90, "valid": 5, "test": 5}
    assert (tmp_path / "out" / "valid.txt").read_text().splitlines()[0] == "line 0 : the cat sat on mat number 0 ."


def test_bad_corpus_is_one_line_error(tmp_path):
    proc = run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / "o", "--text", tmp_path / "missing.txt"],
               check=False)
    assert proc.returncode == 2 and "is not a file" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_or_too_small_corpus_is_one_line_error_and_writes_nothing(tmp_path):
    for name, text in (("empty.txt", ""), ("blank.txt", "\n \n\t\n"), ("short.txt", "a b c\n" * 5)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        proc = run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / "out", "--text", tmp_path / name],
                   check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and "usable lines" in err[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_all_stdlib_corpus_is_larger_and_deterministic(tmp_path):
    for out in ("a", "b"):
        run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / out, "--all-stdlib"])
    train = (tmp_path / "a" / "train.txt").read_text()
    assert len(train) > 1_000_000 and train == (tmp_path / "b" / "train.txt").read_text()
    proc = run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / "c", "--all-stdlib", "--text", "x"],
               check=False)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def _have_manpages():
    import shutil
    import subprocess
    return shutil.which("groff") and shutil.which("dpkg") and \
        subprocess.run(["dpkg", "-s", "manpages"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _have_manpages(), reason="needs Debian's manpages and groff-base packages")
def test_manpages_corpus_is_rendered_prose_and_deterministic(tmp_path):
    for out in ("a", "b"):
        run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / out, "--manpages", "--max-lines", "60"])
    train = (tmp_path / "a" / "train.txt").read_text()
    assert train == (tmp_path / "b" / "train.txt").read_text() and len(train.splitlines()) == 54
    words = train.split()
    assert words.count("the") > 20 and not any(w.startswith((".", "\\f")) for w in words if len(w) > 1)  # no troff left

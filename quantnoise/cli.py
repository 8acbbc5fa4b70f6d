"""``quantnoise`` command line: one module per verb in quantnoise/commands/.

Each command module defines ``add_parser(subparsers)`` (which sets ``func``); ``func(args)`` returns
an exit code.  A ``ValueError``/``OSError`` from a command becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module names under quantnoise.commands, in help order
COMMANDS = ["user_dir", "sweep_report", "sensitivity", "quantize", "export", "inspect", "decompress"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantnoise", description="Quant-Noise training, iPQ and compressed export")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"quantnoise.commands.{name}").add_parser(sub)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise here
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, MemoryError) as e:  # MemoryError: a .qnz too large to decode here, with its size
        print(f"quantnoise {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""One module per ``quantnoise`` sub-command (see quantnoise/cli.py)."""

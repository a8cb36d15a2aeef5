"""`python -m vdit.cli COMMAND ...`, the same as `vdit COMMAND ...`."""

from vdit.cli import main

main()

"""``python -m nat64ho``: the same as the ``nat64ho`` command."""

from nat64ho.cli import main

main()

"""`python -m tuneline.cli`: the `tuneline` command."""

from tuneline.cli import main

main()

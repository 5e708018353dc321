"""`python -m lionkd`: the `lionkd` command."""

from lionkd.cli import main

main()

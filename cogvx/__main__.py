"""`python -m cogvx` runs the command line."""

from cogvx.cli import main

main()

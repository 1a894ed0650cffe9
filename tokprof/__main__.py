"""`python -m tokprof`: the same command line as `tokprof`."""

from tokprof.cli import main

main()

"""``python -m htsep``: the same command line as the ``htsep`` script."""

from htsep.cli import main

main()

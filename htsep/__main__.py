"""The ``htsep`` command's entry point (the ``htsep`` script, ``python -m htsep``).

Ctrl-C, SIGTERM and SIGHUP stop the command with its one-line message and exit status from the
moment ``import htsep`` is done: importing the command line itself (typer, click) takes a
tenth of a second, and a Ctrl-C there would otherwise print Python's traceback.
"""

from __future__ import annotations

import contextlib
import sys

from htsep.interrupts import (
    exit_status,
    hold_signals_while_torch_loads,
    how_stopped,
    signals_as_interrupts,
)


def main() -> None:
    hold_signals_while_torch_loads()
    with signals_as_interrupts(deaf_after=True):
        try:
            from htsep import cli
        except KeyboardInterrupt as exc:
            # Deaf to further signals by now: the command line can be imported to give
            # separate --json its records, one per input as given.
            with contextlib.suppress(Exception):
                from htsep import cli

                cli.early_interrupted_records(sys.argv[1:])
            print(f"htsep: error: {how_stopped(exc)}", file=sys.stderr)
            sys.exit(exit_status(exc))
        cli.main()


if __name__ == "__main__":
    main()

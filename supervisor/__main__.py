"""flood-supervisor's entry point (also `python -m flood.supervisor`): database drivers the
records never use are kept out before the command line's imports bring in peewee."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flood import drivers


def main(argv: Sequence[str] | None = None) -> int:
    drivers.keep_out_unused()
    from flood.supervisor import cli  # after the drivers are out: it imports peewee

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""``r1mega-make-cold-start`` as a script (the command ships inside the package: ``r1mega.cli.make_cold_start``)."""

from r1mega.cli.make_cold_start import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main()

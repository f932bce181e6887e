#!/usr/bin/env python
"""``r1mega-make-preferences`` as a script (the command ships inside the package: ``r1mega.cli.make_preferences``)."""

from r1mega.cli.make_preferences import KINDS, main, parse_args

__all__ = ["KINDS", "main", "parse_args"]

if __name__ == "__main__":
    main()

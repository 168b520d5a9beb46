"""``python -m casty_sa.cli``: the ``casty-sa`` command."""

import sys

from casty_sa.cli import main

if __name__ == "__main__":
    sys.exit(main())

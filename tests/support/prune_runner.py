"""``casty-sa`` in a process that kills itself at an exact point (not a test module).

``--kill-in-delete N``: right after the N-th ``DELETE`` of event rows has run, inside its
batch's transaction (not committed), the process sends itself ``SIGKILL``: a prune
interrupted mid-batch, at the same place on every run, without timing luck.

Usage::

    python tests/support/prune_runner.py --kill-in-delete 5 -- prune --url URL --all --snapshot
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Any

from sqlalchemy import Engine, event

from casty_sa.cli import main

_EVENT_DELETE = re.compile(r"\s*DELETE\s+FROM\s+\S*casty_sa_events\b", re.IGNORECASE)


def kill_in_delete(n: int) -> None:
    """SIGKILL this process right after the ``n``-th delete of event rows ran."""
    seen = 0

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal seen
        if _EVENT_DELETE.match(statement):
            seen += 1
            if seen == n:
                os.kill(os.getpid(), signal.SIGKILL)

    event.listen(Engine, "after_cursor_execute", after)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-in-delete", type=int, required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    kill_in_delete(args.kill_in_delete)
    sys.exit(main([a for a in args.argv if a != "--"]))

"""Keeping passwords out of every line ``casty-sa`` writes: its messages and its logs.

:class:`Redactor` knows the secrets of the URLs a command was given; ``main``
runs every message through it, and :func:`logging_to_stderr` every log record.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import URL

from casty_sa.urls import mask_secrets, url_secrets

__all__ = ["Redactor", "logging_to_stderr"]


@dataclass
class Redactor:
    """Scrubs passwords out of text: those of the URLs it was told about, and any ``user:pw@``
    or ``?password=…`` (see :func:`casty_sa.urls.mask_secrets`).

    Examples
    --------
    >>> redact = Redactor()
    >>> redact.add_url("postgresql://app:s3cret@db/bank")
    >>> redact("login failed with s3cret for postgresql://app:s3cret@db/bank")
    'login failed with *** for postgresql://app:***@db/bank'
    """

    secrets: set[str] = field(default_factory=set)

    def add_url(self, url: str | URL) -> None:
        """Remember the secrets of ``url``: its password, ``?password=``, ``?sslpassword=``, …
        (as given, and as encoded in URL text).

        Parameters
        ----------
        url : str | URL
            A URL; one that does not parse contributes nothing here, and its
            ``user:password@`` part is still caught by the pattern.
        """
        self.secrets |= url_secrets(url)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret and any URL password replaced by ``***``."""
        return mask_secrets(text, self.secrets)


class _RedactingFormatter(logging.Formatter):
    """A log formatter that runs the whole formatted record (traceback included) through a
    :class:`Redactor`."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """Format the record, then scrub it."""
        return self._redact(super().format(record))


@contextmanager
def logging_to_stderr(verbose: int, redact: Redactor) -> Iterator[None]:
    """Log ``casty_sa`` (and with ``-v`` alembic) to stderr for the command's duration."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(redact))
    levels = {
        "casty_sa": logging.DEBUG if verbose else logging.WARNING,
        "alembic": logging.INFO if verbose else logging.WARNING,
    }
    saved = []
    for name, level in levels.items():
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate

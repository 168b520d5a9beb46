"""Griffe extension: render the reStructuredText bits of casty-sa's numpy docstrings as Markdown.

casty-sa's docstrings are numpy style, read by ``help()`` and doctest as much as by this site,
so they use Sphinx roles (``:class:`SchemaError```) and ``::`` literal blocks. mkdocstrings
renders docstrings as Markdown, where those would show as raw text. This extension, loaded by
mkdocstrings from ``mkdocs.yml``, rewrites them when the site is built (the source is untouched):

- a role becomes a cross-reference to the object's page when that object is documented, and
  plain code otherwise (``~`` keeps only the last name, as in Sphinx);
- a paragraph ending in ``::`` ends in ``:`` and its indented block stays a code block.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):`([^`]+)`")
_LITERAL = re.compile(r"::[ \t]*$", re.M)
_PACKAGE = "casty_sa"


def _target(obj: griffe.Object, text: str) -> tuple[str, str]:
    """``(identifier, shown name)`` of a role's text, resolved in ``obj``'s scope."""
    explicit = re.fullmatch(r"(.+?)\s*<(.+)>", text)
    if explicit:
        return explicit.group(2), explicit.group(1)
    short = text.startswith("~")
    name = text.lstrip("~.")
    shown = name.rsplit(".", 1)[-1] if short else name
    if name.startswith(f"{_PACKAGE}.") or name == _PACKAGE:
        return _canonical(obj, name), shown
    head, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(head)
    except (griffe.NameResolutionError, AttributeError, KeyError):
        return name, shown
    return _canonical(obj, f"{resolved}.{rest}" if rest else resolved), shown


def _canonical(obj: griffe.Object, path: str) -> str:
    """Where ``path`` is documented: the defining module's path of a re-exported name."""
    if not path.startswith(f"{_PACKAGE}."):
        return path
    try:
        found = obj.package[path.removeprefix(f"{_PACKAGE}.")]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path
    return str(found.canonical_path)


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        identifier, shown = _target(obj, match.group(1))
        return (
            f'<autoref identifier="{escape(identifier)}" optional>'
            f"<code>{escape(shown)}</code></autoref>"
        )

    return _LITERAL.sub(":", _ROLE.sub(role, text))


class RestructuredTextToMarkdown(griffe.Extension):
    """Rewrite roles and literal-block markers in every docstring of the loaded objects."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)

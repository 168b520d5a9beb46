"""The documentation site builds, and every example in it runs.

Conventions for the Markdown under ``docs/`` (the included ``docs/_sections/*.md`` too):

- Every ```` ```python ```` block is run in a fresh subprocess, in an empty temporary directory,
  and must exit 0. ``CASTY_SA_URL`` is unset, so a block that reads it falls back to its own
  default (a SQLite file).
- An HTML comment on the line before the fence changes that; it does not show on the site:

  ``<!-- docs-test: postgresql -->``
      The block runs with ``CASTY_SA_URL`` set to a fresh, empty PostgreSQL database (the
      suite's server). Write it as ``os.environ.get("CASTY_SA_URL", <default>)``.
  ``<!-- docs-test: compile -->``
      The block is a fragment that cannot run on its own (an Alembic ``env.py``): it is only
      compiled.

- Every command of a ```` ```sh ```` block is checked without running it: ``casty-sa`` and
  ``alembic`` command lines must be accepted by their argument parsers, ``pip install`` must
  name a checkout of casty-sa or the wheel of this version (it is not published yet) and extras
  that exist, ``make`` a target of the Makefile.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL

from support import tools

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MARKERS = {"postgresql", "compile"}
BLOCK_TIMEOUT = 60.0

_FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<name>[\w-]+)\s*-->")
_INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file under docs/."""

    path: Path
    line: int
    lang: str
    marker: str | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(DOCS)}:{self.line}"


def _blocks() -> list[Block]:
    found: list[Block] = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text()
        for match in _FENCE.finditer(text):
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            marker = _MARKER.fullmatch(before.strip())
            found.append(
                Block(
                    path=path,
                    line=text.count("\n", 0, match.start()) + 1,
                    lang=match.group("lang"),
                    marker=marker.group("name") if marker else None,
                    code=textwrap.dedent(match.group("body")),
                )
            )
    return found


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang == "sh"]


def _params(blocks: list[Block], marker: str | None) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in blocks if b.marker == marker]


def _env(url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CASTY_SA_URL", "CASTY_SA_SCHEMA")}
    if url is not None:
        env["CASTY_SA_URL"] = url
    return env


def _run(block: Block, cwd: Path, url: str | None = None) -> None:
    run = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=cwd,
        env=_env(url),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert run.returncode == 0, f"{block.id} failed:\n{block.code}\n{run.stdout}\n{run.stderr}"


def _text(page: Path) -> str:
    """The visible text of a built page's article."""
    content = page.read_text()
    article = content[content.find("<article") : content.find("</article>")]
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", article)))


def _built(site: Path, page: Path) -> Path:
    relative = page.relative_to(DOCS).with_suffix("")
    return site / ("index.html" if relative.name == "index" else relative / "index.html")


def _pages() -> list[Path]:
    """The Markdown files that are pages (not the partials under ``docs/_*``)."""
    pages = sorted(DOCS.rglob("*.md"))
    return [p for p in pages if not p.relative_to(DOCS).parts[0].startswith("_")]


# -- the site ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict``, from outside the repository."""
    out = tmp_path_factory.mktemp("site")
    # no -q: it silences the warnings that --strict counts, and the build would pass with them
    command = ["build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)]
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", *command],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr}"
    assert "WARNING" not in build.stderr, build.stderr
    return out


def test_every_page_is_built(site: Path) -> None:
    assert len(_pages()) >= 14
    for page in _pages():
        assert _built(site, page).is_file(), page


def _headings(markdown: str) -> set[str]:
    """Texts of the ``##``-and-deeper headings of a Markdown text, outside code blocks."""
    prose = _FENCE.sub("", markdown)
    return {re.sub(r"[`*]", "", h).strip() for h in re.findall(r"^#{2,6} (.+)$", prose, re.M)}


def _built_headings(page: Path) -> set[str]:
    found = re.findall(r"<h[2-6] id=\"[^\"]*\">(.*?)</h[2-6]>", page.read_text(), re.S)
    return {re.sub(r"<[^>]+>|¶", "", html.unescape(h)).strip() for h in found}


def test_included_sections_are_rendered_into_their_pages(site: Path) -> None:
    included: set[Path] = set()
    for page in _pages():
        for match in _INCLUDE.finditer(page.read_text()):
            section = REPO / match.group("path")
            included.add(section)
            expected = _headings(section.read_text())
            assert expected, f"{section} has no heading"
            missing = expected - _built_headings(_built(site, page))
            assert not missing, f"{section} is not rendered into {page}: {missing}"
    assert included == set((DOCS / "_sections").glob("*.md")), "a section no page includes"


def test_ddl_is_generated_from_the_migrations(site: Path) -> None:
    source = (DOCS / "migrations.md").read_text()
    assert "CREATE TABLE" not in source, "the DDL must be generated, not copied"
    text = _text(_built(site, DOCS / "migrations.md"))
    # SQLite, PostgreSQL, MySQL 8, MariaDB (docs/_sections/ddl.md, tests/test_ddl_docs.py)
    assert text.count("CREATE TABLE casty_sa_events") == 4
    assert "BYTEA" in text and "LONGBLOB" in text


def test_api_pages_render_the_docstrings(site: Path) -> None:
    journal = _text(site / "api" / "journal" / "index.html")
    for expected in ("Parameters:", "max_batch_events", "Examples:", "load_snapshot", "Raises:"):
        assert expected in journal, expected
    for page in (site / "api").glob("*/index.html"):
        text = _text(page)
        assert not re.search(r":(class|func|meth|data|mod|attr|exc):[\s`]", text), page
    # a Sphinx role in a docstring becomes a link to the object's own page
    migrations = (site / "api" / "migrations" / "index.html").read_text()
    assert 'href="../models/#casty_sa.models.VERSION_TABLE"' in migrations


# -- the examples ----------------------------------------------------------------------------


def test_examples_are_found_and_marked_correctly() -> None:
    assert len(PYTHON) >= 10
    assert {b.path.name for b in PYTHON} >= {"getting-started.md", "cli.md", "cluster.md"}
    for path in DOCS.rglob("*.md"):
        for match in _MARKER.finditer(path.read_text()):
            assert match.group("name") in MARKERS, f"unknown marker in {path}: {match.group(0)}"
    marked = sum(1 for b in PYTHON if b.marker is not None)
    assert marked == sum(len(_MARKER.findall(p.read_text())) for p in DOCS.rglob("*.md")), (
        "a docs-test marker that is not on the line before a python fence"
    )


@pytest.mark.parametrize("block", _params(PYTHON, None))
def test_python_example_runs(block: Block, tmp_path: Path) -> None:
    _run(block, tmp_path)


@pytest.mark.parametrize("block", _params(PYTHON, "postgresql"))
async def test_python_example_runs_on_postgresql(
    block: Block, tmp_path: Path, new_postgres_db: Callable[..., Awaitable[URL]]
) -> None:
    url = await new_postgres_db(migrated=False)
    await asyncio.to_thread(_run, block, tmp_path, url.render_as_string(hide_password=False))


@pytest.mark.parametrize("block", _params(PYTHON, "compile"))
def test_python_fragment_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec")


def _check_command(words: list[str]) -> None:
    program, args = words[0], words[1:]
    if program == "casty-sa":
        from casty_sa.cli import build_parser

        build_parser().parse_args(args)
    elif program == "alembic":
        from alembic.config import CommandLine

        CommandLine(prog="alembic").parser.parse_args(args)
    elif program == "pip":
        assert args[0] == "install", words
        pyproject = (REPO / "pyproject.toml").read_text()
        version = re.search(r'^version = "(.+)"', pyproject, re.M)
        assert version is not None
        for spec in (a for a in args[1:] if a != "-e"):
            # casty-sa is not published: a checkout, or the wheel built from it
            path, _, extras = spec.partition("[")
            assert path.startswith("/path/to/casty-sa"), f"not a checkout or wheel: {words}"
            if path.endswith(".whl"):
                assert path.endswith(f"/dist/casty_sa-{version[1]}-py3-none-any.whl"), words
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert re.search(rf"^{extra} = \[", pyproject, re.M), f"no extra {extra!r}"
    elif program == "python" and args[:1] == ["tools/read_plans.py"]:
        tools.load("read_plans").build_parser().parse_args(args[1:])
    elif program == "python":
        assert args[:2] == ["-m", "build"], words  # builds the wheel pip installs
    elif program == "hatch":
        assert args[0] == "build", words
    elif program == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in args:
            assert re.search(rf"^{target}:", makefile, re.M), f"no make target {target!r}"
    else:
        pytest.fail(f"no check for {program!r} commands in sh blocks: add one to {__file__}")


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in SHELL])
def test_shell_commands_parse(block: Block) -> None:
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            try:
                _check_command(words)
            except SystemExit as exc:
                pytest.fail(f"{block.id}: {line!r} is refused by its parser ({exc})")

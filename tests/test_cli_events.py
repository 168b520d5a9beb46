"""``casty-sa events``: the global order as lines or JSON lines, filters, resuming, --follow.

In-process through ``casty_sa.cli.main`` on a SQLite file and PostgreSQL; ``--follow`` in a
subprocess of the installed entry point, ended by SIGINT as Ctrl-C would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import SAJournal
from casty_sa.cli import ExitCode, main

from support.dbtools import execute, plain

TIMEOUT = 60


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def fill(url: URL | str, events: dict[str, list[object]]) -> None:
    async with SAJournal(url) as journal:
        for entity_id, values in events.items():
            await journal.persist(
                entity_id,
                [PersistedEvent(i, v, 1767225600.0 + i) for i, v in enumerate(values, 1)],
            )


@pytest.fixture
def url(db_url: URL) -> str:
    asyncio.run(fill(db_url, {"acct-1": ["opened", 5], "a%b": [{"n": 1}], "acct-2": ["x" * 500]}))
    return plain(db_url)


def test_lines_in_global_order_and_resuming(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = run(capsys, "events", "--url", url)
    assert code == ExitCode.OK, err
    lines = out.splitlines()
    assert [line.split("  ")[1:4] for line in lines] == [
        ["acct-1", "1", "str"],
        ["acct-1", "2", "int"],
        ["a%b", "1", "dict"],
        ["acct-2", "1", "str"],
    ]
    assert lines[0].endswith("2026-01-01T00:00:01.000000+00:00  'opened'")
    assert len(lines[3].split("  ")[5]) == 120  # a long event is shortened
    offsets = [line.split("  ")[0] for line in lines]
    assert offsets == sorted(offsets)
    code, out, _ = run(capsys, "events", "--url", url, "--after", offsets[1], "--limit", "1")
    assert code == ExitCode.OK and out.splitlines() == [lines[2]]


def test_json_lines_and_filters(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = run(capsys, "events", "--url", url, "--json", "--type", "str", "--type", "int")
    assert code == ExitCode.OK, err
    found = [json.loads(line) for line in out.splitlines()]
    assert [(f["entity_id"], f["sequence_nr"], f["event_type"]) for f in found] == [
        ("acct-1", 1, "str"),
        ("acct-1", 2, "int"),
        ("acct-2", 1, "str"),
    ]
    assert found[0]["event"] == "'opened'" and found[0]["timestamp"] == 1767225601.0
    code, out, _ = run(capsys, "events", "--url", url, "--prefix", "a%", "--json")
    assert [json.loads(line)["entity_id"] for line in out.splitlines()] == ["a%b"]


def test_undecodable_and_raw_payloads_are_shown_not_fatal(
    capsys: pytest.CaptureFixture[str], url: str, db_url: URL
) -> None:
    asyncio.run(
        execute(db_url, "UPDATE casty_sa_events SET event_type = NULL WHERE entity_id = 'a%b'")
    )
    code, out, err = run(capsys, "events", "--url", url, "--decoder", "json:loads")
    assert code == ExitCode.OK, err
    assert len(out.splitlines()) == 4 and "cannot decode" in out
    assert out.splitlines()[2].split("  ")[3] == "-"  # no stored type, none decoded
    code, out, _ = run(capsys, "events", "--url", url, "--raw", "--json")
    assert code == ExitCode.OK
    assert all("payload_base64" in json.loads(line) for line in out.splitlines())


@pytest.mark.parametrize(
    "argv",
    [["--after", "nope"], ["--after", "f" * 36], ["--limit", "0"], ["--type", ""]],
)
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], url: str, argv: list[str]
) -> None:
    code, out, err = run(capsys, "events", "--url", url, *argv)
    assert code == ExitCode.USAGE and out == "" and "Traceback" not in err


def test_an_offset_from_elsewhere_is_refused(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = run(capsys, "events", "--url", url, "--after", "0001" + "0" * 32)
    assert code == ExitCode.USAGE and out == "" and "ahead" in err


def test_follow_prints_new_events_until_ctrl_c(db_url: URL) -> None:
    asyncio.run(fill(db_url, {"acct-1": ["opened"]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "casty_sa.cli", "events", "--follow", "--url", plain(db_url)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert "acct-1  1  str" in proc.stdout.readline().decode()
        asyncio.run(fill(db_url, {"acct-2": ["later"]}))  # printed as it commits
        assert "acct-2  1  str" in proc.stdout.readline().decode()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code in (ExitCode.OK, ExitCode.INTERRUPTED) and "Traceback" not in stderr

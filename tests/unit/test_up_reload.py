"""`ichat up`'s SIGHUP: arguments read again from @FILE, what a roll may change, and the
roll itself against scripted workers (the real thing: tests/integration/test_up.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from ichat.commands.rolling import Roll, roll
from ichat.commands.up import Group, parse_args


def test_arguments_come_from_a_file_as_shell_words_with_comments(tmp_path: Path) -> None:
    args = tmp_path / "fleet.args"
    args.write_text(
        "# the fleet\n--workers 2 --api-key 'k 1'\n--status-port 9200  # probes\n"
        "--enable-prefix-caching --max-num-seqs 8\n"
    )
    config = parse_args([f"@{args}", "--port", "9000"])
    assert (config.workers, config.api_key, config.port) == (2, "k 1", 9000)
    assert config.status_urls == ["http://127.0.0.1:9200", "http://127.0.0.1:9201"]
    assert config.engine_argv == ["--enable-prefix-caching", "--max-num-seqs", "8"]
    assert config.engine_flags("/m") == [
        "--api-key", "k 1", "--model-path", "/m", "--served-model-name", "ichat-test",
        "--enable-prefix-caching", "--max-num-seqs", "8",
    ]  # fmt: skip
    worker = config.worker_argv(0, "/m")
    assert worker[-len(config.engine_flags("/m")) :] == config.engine_flags("/m")


def test_a_roll_changes_engine_flags_model_and_drain_timeout_only() -> None:
    old = parse_args(["--workers", "2", "--status-port", "9200", "--max-num-seqs", "8"])
    assert old.fixed_fields_changed(parse_args(["--workers", "2", "--status-port", "9200",
                                                "--max-num-seqs", "4", "--drain-timeout", "5",
                                                "--served-model-name", "m2"])) == []  # fmt: skip
    assert old.fixed_fields_changed(parse_args(["--workers", "3", "--status-port", "9201"])) == [
        "workers",
        "status_port",
    ]


def sighup(argv: list[str], started: list[str]) -> tuple[Group, str]:
    """A group started with ``started``, sent SIGHUP with ``argv``: what it logged."""
    group = Group(parse_args(started))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ichat.up")
    logger.addHandler(handler)
    try:
        asyncio.run(group.reload(argv))
    finally:
        logger.removeHandler(handler)
    return group, "\n".join(records)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--workers", "3", "--status-port", "9200", "--api-key", "k"], "workers cannot change"),
        (["--status-port", "9200", "--api-key", "k"], "the arguments did not change"),
        (["--status-port", "9200", "--api-key", "k", "--no-such-option-value"], None),
        (["--status-port", "9200", "--api-key", "k", "--model-path", "/nonexistent"], "cannot be"),
        (["--workers", "x"], "cannot be read"),
    ],
)
def test_sighup_refuses_what_a_roll_cannot_do_and_says_why(
    argv: list[str], why: str | None
) -> None:
    started = ["--status-port", "9200", "--api-key", "k"]
    if why is None:  # an engine flag: a roll, to workers that are not there
        group, log = sighup(argv, started)
        assert "the roll stopped: http://127.0.0.1:9200 cannot be reached" in log
        assert group.config == parse_args(started)  # the old configuration stands
        return
    group, log = sighup(argv, started)
    assert "nothing reloaded" in log and why in log
    assert group.config == parse_args(started)


def test_sighup_without_status_ports_or_key_rolls_nothing() -> None:
    _, log = sighup(["--max-num-seqs", "4"], [])
    assert "no status port" in log
    _, log = sighup(["--status-port", "9200", "--max-num-seqs", "4"], ["--status-port", "9200"])
    assert "no reload without a key" in log


def test_a_roll_reloads_one_worker_after_another_and_stops_at_the_first_failure() -> None:
    calls: list[tuple[str, dict[str, object], str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((str(request.url), json.loads(request.content),
                      request.headers.get("authorization", "")))  # fmt: skip
        if request.url.host == "w2":
            return httpx.Response(400, json={"error": "unrecognized arguments: --bad"})
        return httpx.Response(200, json={"method": "swap", "seconds": 1.5})

    plan = Roll(["http://w1:1", "http://w2:1", "http://w3:1"], ["--bad"], {"drain_timeout": 5.0},
                admin_key="adm")  # fmt: skip
    done = asyncio.run(roll(plan, transport=httpx.MockTransport(answer)))
    assert done.reloaded == ["http://w1:1"] and not done.ok
    assert done.error == "http://w2:1: HTTP 400: unrecognized arguments: --bad"
    assert [c[0] for c in calls] == ["http://w1:1/reload", "http://w2:1/reload"]  # w3 untouched
    body = {"engine_args": ["--bad"], "merge": False, "method": "auto",
            "settings": {"drain_timeout": 5.0}}  # fmt: skip
    assert all(c[1] == body and c[2] == "Bearer adm" for c in calls)

"""``ichat reload``: replace running workers' engines by ones with new flags.

    ichat reload http://HOST:STATUS_PORT [URL...] [--merge] [--api-key KEY] -- FLAGS...

Each worker (``ichat serve --status-port``) starts an engine with the new flags while
the old one serves, warms it up, sends new requests to it on the same port, and stops
the old engine once its requests have ended. If the new engine does not start, the old
one serves on and this command exits non-zero with the engine's error.

With the same flags (``--merge`` and none), an engine that can loads its weights again
in place instead (vLLM 0.32: new requests wait while it pauses, reloads and resumes; no
second engine, no second share of memory); ``--swap`` or ``--in-place`` choose. An
engine that cannot run beside a second one (SGLang) is restarted with new flags
instead: out of the gateway, drained, stopped, started with them (``restart``).

Several URLs (the workers of ``ichat up``, of a deployment) are rolled one at a time,
each only once the one before serves its new engine; every worker stays in service
throughout. The first failure stops the roll: the workers after it keep their old
configuration (and the command names which ran what).

Exit codes: 0 reloaded; 2 bad usage, flags the engine refused, or a missing or wrong
key; 8 the reload was refused (not serving, one in progress, an engine without
reload) or its engine did not start (the old one serves on); 1 the worker could not
be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ichat.commands.rolling import Roll, roll
from ichat.worker.settings import LOG_LEVELS

BAD_INPUT = 2
UNREACHABLE = 1
FAILED = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichat reload",
        allow_abbrev=False,
        usage="ichat reload STATUS_URL [STATUS_URL...] [--merge] [--api-key KEY] "
        "-- ENGINE_FLAGS...",
        description="Replace running workers' engines by ones started with new flags, "
        "without a moment out of service: each old engine serves until the new one is "
        "ready, then finishes its requests. Several workers are rolled one at a time.",
    )
    parser.add_argument(
        "urls",
        nargs="+",
        metavar="STATUS_URL",
        help="a worker's status URL: http://HOST:PORT of `ichat serve --status-port`",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="append the flags to those the engine runs with (a later flag wins) instead "
        "of replacing them; with no flags: the same configuration, weights read again",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--swap",
        action="store_const",
        const="swap",
        dest="method",
        default="auto",
        help="always start a new engine beside the serving one and switch to it",
    )
    how.add_argument(
        "--in-place",
        action="store_const",
        const="in_place",
        dest="method",
        help="the same flags: the serving engine loads its weights again (refused where it cannot)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("ICHAT_ADMIN_KEY"),
        help="the worker's admin key (default: $ICHAT_ADMIN_KEY)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="also set the worker's drain timeout (seconds), at once; without `--`, "
        "only the settings change",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="also set iChat's and the engine's log level in the worker, at once",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the reload to end (default: %(default)s)",
    )
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and the engine's flags after ``--``."""
    args = list(argv)
    if "--" not in args:
        return args, []
    at = args.index("--")
    return args[:at], args[at + 1 :]


def main(argv: Sequence[str]) -> int:
    ours, engine_argv = split_argv(argv)
    parser = build_parser()
    ns = parser.parse_args(ours)
    settings = {
        name: value
        for name, value in (("drain_timeout", ns.drain_timeout), ("log_level", ns.log_level))
        if value is not None
    }
    if "--" not in argv and not ns.merge and not settings:
        parser.error("give the engine's flags after `--` (or --merge to keep them)")
    flags = engine_argv if "--" in argv or ns.merge else None  # None: settings only
    plan = Roll(ns.urls, flags, settings, ns.api_key, ns.timeout, merge=ns.merge, method=ns.method)
    print(f"ichat reload: {' '.join(ns.urls)} {json.dumps(flags)} {json.dumps(settings)}",
          file=sys.stderr)  # fmt: skip
    done = asyncio.run(roll(plan, on_reloaded=_print_answer))
    if done.ok:
        return 0
    print(f"ichat reload: error: {done.error}", file=sys.stderr)
    if len(ns.urls) > 1:
        left = ns.urls[len(done.reloaded) :]
        print(f"ichat reload: the roll stopped at {left[0]}; reloaded: {done.reloaded}; "
              f"still on their old configuration: {left}", file=sys.stderr)  # fmt: skip
    if done.status is None:
        return UNREACHABLE
    return BAD_INPUT if done.status in (400, 401, 403) else FAILED


def _print_answer(url: str, answer: dict[str, Any]) -> None:
    """A worker's answer on stdout (JSON), a line of it on stderr."""
    print(json.dumps(answer, indent=2), flush=True)
    phases = answer.get("phases") or {}
    print(
        f"ichat reload: {url} reloaded ({answer.get('method')}) in "
        f"{phases.get('reload', answer.get('seconds', 0)):.1f} s; "
        f"serving {answer.get('served_model_names')}",
        file=sys.stderr,
    )

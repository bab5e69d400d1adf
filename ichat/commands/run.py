"""What the long-running commands (`ichat gateway`, `ichat up`) share around their loop:
logging, the orphan guard, and turning iChat's errors into a message and exit code."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ichat.errors import IChatError
from ichat.process import reaper


def run_command(prog: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` under the orphan guard; an ``IChatError`` is printed and its exit
    code returned (``main`` is called inside, so argument errors count too)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with reaper.guarded():  # children die with this process, even on SIGKILL
            return asyncio.run(main())
    except IChatError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code

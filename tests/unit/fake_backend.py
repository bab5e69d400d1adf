"""A fake engine behind the real BaseBackend lifecycle (unit tests only).

The "engine" is a child process (so cleanup has something to kill) and a tiny raw
ASGI app served by the real uvicorn; switches make it fail, hang or die.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any

from ichat.backends.base_backend import BaseBackend
from ichat.config import WorkerConfig
from ichat.errors import EngineDiedError


class FakeBackend(BaseBackend):
    engine_name = "fake"
    engine_package = "fake_engine"

    def __init__(
        self,
        config: WorkerConfig,
        *,
        fail_start: bool = False,
        hang_start: bool = False,
        healthy: bool = True,
        engine_exits_cleanly: bool = True,
    ) -> None:
        self.fail_start = fail_start
        self.hang_start = hang_start
        self.healthy = healthy
        self.engine_exits_cleanly = engine_exits_cleanly
        self.dead = False
        self.started_engine = False
        self.warmups = 0
        self.child: subprocess.Popen[bytes] | None = None
        super().__init__(config, ["--fake-flag", "1"])

    @classmethod
    def engine_help(cls) -> str:
        return "fake engine flags"

    def parse_args(self, config: WorkerConfig, argv: list[str]) -> Any:
        return {"argv": argv}

    def served_model_name(self) -> str:
        return "fake-model"

    async def start_engine(self, stack: contextlib.AsyncExitStack) -> None:
        self.started_engine = True
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        if self.engine_exits_cleanly:
            stack.callback(self.child.terminate)
        if self.fail_start:
            raise RuntimeError("model cannot load")
        if self.hang_start:
            await asyncio.sleep(3600)

    async def build_app(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    reply = message["type"] + ".complete"
                    await send({"type": reply})
                    if message["type"] == "lifespan.shutdown":
                        return
            path = scope["path"]
            status = 200
            if path == "/health":
                status = 200 if self.healthy else 503
            elif path == "/slow":
                await asyncio.sleep(1.0)
            elif path == "/warm":
                self.warmups += 1
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": path.encode()})

        return app

    async def warmup(self, client: Any) -> None:
        response = await client.get("/warm")
        response.raise_for_status()

    async def check_engine_alive(self) -> None:
        if self.dead:
            raise EngineDiedError("fake engine died")

"""A server that answers streamed chats as vLLM's does, without an engine: what the
load generator reaches against a server that costs (almost) nothing.

    python bench/trivial_server.py --port 8000 --processes 4 [--itl-ms 10]

``--processes`` server processes share the port (SO_REUSEPORT). Each request streams
``max_tokens`` content chunks shaped like vLLM's, then ``[DONE]``; with ``--itl-ms`` the
chunks come that many milliseconds apart (a paced engine), else as fast as the server
writes them. ``/health`` answers 200. ``bench_ab.py --configs trivial`` runs it: the
client's capacity at the benchmark's load and the latency the client itself adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import sys

from aiohttp import web


def _chunk(index: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f" t{index}"}, "finish_reason": None}
    event = {"id": "chatcmpl-trivial", "object": "chat.completion.chunk", "model": "trivial",
             "choices": [choice]}  # fmt: skip
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    pause = request.app["itl"]
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for index in range(int(body.get("max_tokens") or 16)):
        if pause:
            await asyncio.sleep(pause)
        await response.write(_chunk(index))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


def serve(port: int, itl_ms: float) -> None:
    app = web.Application()
    app["itl"] = itl_ms / 1000
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, print=None,
                access_log=None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    args = parser.parse_args()
    procs = [multiprocessing.Process(target=serve, args=(args.port, args.itl_ms))
             for _ in range(args.processes)]  # fmt: skip
    for proc in procs:
        proc.start()
    # SIGTERM (the benchmark's stop) ends the server processes too, not only this one
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)


if __name__ == "__main__":
    main()

"""Another worker, through the gateway: where a request goes when this worker's engine
died and no engine of its own takes over at once (no standby ready).

Without a standby, a worker needs a whole engine start (17-36 s on an H100) before it
serves again; with two workers behind SMG the other one can finish what the dead engine
was doing. ``ThroughTheGateway`` makes ASGI apps that send one request to the gateway
(SMG picks a healthy worker; the dying worker has left it at the death's detection) and
pass the answer on as ASGI messages: ``ReplayOnEngineDeath`` runs a request the client
has no byte of yet again there, and continues a cut stream there token-exactly (every
worker of one model has the same tokenizer).

SMG's ``/v1/completions`` takes a text prompt only (a prompt of token ids: 400, "did not
match any variant of untagged enum StringOrArray", SMG 1.13), while its SGLang-native
``/generate`` takes ``input_ids`` and passes fields it does not know on to the worker. A
continuation (a completion whose prompt is token ids) therefore travels as ``/generate``
with ``input_ids`` and the rest of the completion request under ``ichat_completion``;
the worker that receives it runs it as ``/v1/completions`` on its engine (``inbound``).
SMG does not pass custom headers on, so a forwarded request is marked in its body
(``ichat_forwarded``, removed before the engine sees it): a worker whose engine is dead
does not forward such a request again but answers 503, which SMG retries on another
worker, so a request never circles between dying workers.
"""

from __future__ import annotations

import contextlib
import json
import logging

import httpx

from ichat import smg_workers
from ichat.auth import bearer_headers
from ichat.backends.asgi import Receive, Scope, Send, send_error, wait_keeping_alive, whole_body
from ichat.backends.continuation import COMPLETIONS, DONE, error_event

logger = logging.getLogger("ichat.elsewhere")


GENERATE = "/generate"  # SMG's route that takes token ids
FORWARDED = "ichat_forwarded"  # in the body: a dying worker sent this request
COMPLETION = "ichat_completion"  # in a /generate body: the completion request it carries
SCOPE_KEY = "ichat.forwarded"  # in the ASGI scope of a forwarded request
CONNECT_TIMEOUT = 5.0


def forwarded(scope: Scope) -> bool:
    """Whether this request was forwarded by a worker whose engine died."""
    return bool(scope.get(SCOPE_KEY))


def outbound(path: str, body: bytes) -> tuple[str, bytes]:
    """The request as it goes through the gateway: marked as forwarded; a completion
    whose prompt is token ids as ``/generate``."""
    try:
        request = json.loads(body)
    except ValueError:
        return path, body
    if not isinstance(request, dict):
        return path, body
    prompt = request.get("prompt")
    if path == COMPLETIONS and isinstance(prompt, list) and all(type(i) is int for i in prompt):
        rest = {key: value for key, value in request.items() if key != "prompt"}
        carried = {"model": request.get("model"), "input_ids": prompt,
                   "stream": bool(request.get("stream")), FORWARDED: True,
                   COMPLETION: rest}  # fmt: skip
        return GENERATE, json.dumps(carried).encode()
    return path, json.dumps({**request, FORWARDED: True}).encode()


def inbound(scope: Scope, body: bytes) -> tuple[Scope, bytes]:
    """A request as this worker's engine takes it: one another worker forwarded loses
    its mark (and is noted in the scope), a carried completion becomes one again."""
    if FORWARDED.encode() not in body:
        return scope, body
    try:
        request = json.loads(body)
    except ValueError:
        return scope, body
    if not isinstance(request, dict) or not request.pop(FORWARDED, False):
        return scope, body
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-length"]
    scope = {**scope, SCOPE_KEY: True, "headers": headers}
    carried = request.get(COMPLETION)
    if scope["path"] == GENERATE and isinstance(carried, dict):
        scope.update(path=COMPLETIONS, raw_path=COMPLETIONS.encode())
        request = {**carried, "prompt": request.get("input_ids")}
    return scope, json.dumps(request).encode()


class ThroughTheGateway:
    """Makes one ``GatewayRequest`` per forwarded request."""

    def __init__(
        self, url: str, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.transport = transport  # tests script the gateway here

    def request(self) -> GatewayRequest:
        return GatewayRequest(self)

    async def another_worker_serves(self, model: str, own_url: str) -> bool:
        """Whether the gateway lists a healthy, ready worker of ``model`` other than
        ``own_url`` (False when the gateway does not answer within a few seconds)."""
        try:
            async with httpx.AsyncClient(
                timeout=CONNECT_TIMEOUT, transport=self.transport
            ) as client:
                response = await client.get(
                    self.url + "/workers", headers=bearer_headers(self.api_key)
                )
            listed = smg_workers.entries(response.json()) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("the gateway %s did not list its workers: %s", self.url, exc)
            return False
        for worker in listed:
            if worker.get("url") == own_url:
                continue
            ready = worker.get("is_healthy") and worker.get("status", "ready") == "ready"
            if ready and smg_workers.serves(worker, model):
                return True
        return False


class ThisWorkerAgain(ThroughTheGateway):
    """This worker's own URL, once its restarted engine serves: where what the dying
    engine cut goes when neither a standby nor a gateway takes it (``--continuation-limit``
    on). The dying engine's HTTP server keeps its clients' connections while the worker
    starts the next engine on the same port (the listening socket closed at the death);
    each request waits at most ``--continuation-timeout`` for it, then is forwarded to it
    as to another worker (marked, so that it is never forwarded again)."""

    async def serving(self, timeout: float, keepalive: Send | None = None) -> bool:
        """Wait (at most ``timeout``) until the worker's port answers ``/health`` with
        200; a stream waiting (``keepalive``) gets an SSE comment at once and every
        second."""
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT, transport=self.transport) as client:

            async def healthy() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    reply = await client.get(self.url + "/health",
                                             headers=bearer_headers(self.api_key))  # fmt: skip
                    return reply.status_code == 200
                return False

            comment = b": the engine died; continuing once it has restarted\n\n"
            return await wait_keeping_alive(healthy, timeout, keepalive, comment, poll=0.1)


class GatewayRequest:
    """An ASGI app for one request: the gateway's answer, as ASGI messages. A
    connection that breaks mid-answer ends it with an error event (a stream) or a 502,
    and sets ``broken`` before that event is sent."""

    def __init__(self, gateway: ThroughTheGateway) -> None:
        self.gateway = gateway
        self.broken = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = await whole_body(receive)
        if received is None:
            return  # the client left: nothing to forward
        path, body = outbound(scope["path"], received)
        url = self.gateway.url
        headers = {**bearer_headers(self.gateway.api_key), "content-type": "application/json"}
        started = False
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=None)  # a long answer is no fault
        try:
            async with (
                httpx.AsyncClient(timeout=timeout, transport=self.gateway.transport) as client,
                client.stream("POST", url + path, content=body, headers=headers) as response,
            ):
                kept = [(b"content-type", response.headers.get("content-type", "").encode())]
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": kept})  # fmt: skip
                started = True
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            self.broken = True
            why = f"the gateway did not answer: {type(exc).__name__}: {exc}"
            logger.warning("%s forwarded to %s: %s", scope["path"], url, why)
            if started:
                await send({"type": "http.response.body", "body": error_event(why, 502) + DONE,
                            "more_body": False})  # fmt: skip
            else:
                await send_error(send, 502, "BadGateway", why)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

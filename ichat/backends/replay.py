"""Requests that a dying engine failed before their first byte are sent again.

With a standby, an engine death costs the worker a fraction of a second, but every
request in flight on the dead engine still fails: a non-streamed one with a 500, a
stream with an error event. Those whose client has not received a byte of the answer
yet -- every non-streamed request, and each stream that had produced nothing -- can be
run again on the engine that serves next, and the client never sees the death.

``ReplayOnEngineDeath`` is ASGI middleware around the engine's own app. For the
generating routes it keeps the request's body, holds the response's start until its
first body message, and when that message is a failure *and* the engine that served
the request is dead (the engine's own verdict), it drops that response, waits until
another engine serves, and runs the request again on it (at most ``max_replays``
times). A stream whose answer had begun is continued on that engine from its last
token when it can be (``continuation_limit`` > 0; see :mod:`ichat.backends.continuation`),
otherwise passed through untouched. A sampled request runs again from its start: the
client gets a complete answer, drawn anew (the same one with a ``seed``).

Where no engine of this worker takes over at once (no standby ready) and a gateway is
known (``elsewhere``), both go to another worker through the gateway instead
(:mod:`ichat.backends.elsewhere`): the request again, or the stream's continuation.

An engine whose answers stall at its death instead of ending with an error (SGLang:
its handlers wait for a scheduler that is gone) gives ``death_of``: the middleware
races each answer against its engine's death and, once the death is known, stops the
engine's handler and treats the answer as cut there (a stream that cannot be continued
ends with an error event and ``[DONE]``).

The drain deadline hands requests off the same way (``handing_off``): a worker that
stops aborts what its engine still runs at ``--drain-timeout``; while it hands off,
the engine's "abort" finish counts as a cut, so a stream under way is continued on
another worker through the gateway and a request with no byte sent yet runs there
again, instead of ending with ``finish_reason: "abort"``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ichat.backends import continuation, elsewhere
from ichat.backends.asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    send_error,
    wait_keeping_alive,
    whole_body,
)
from ichat.backends.continuation import (
    DONE,
    Continued,
    EventReader,
    TrackedStream,
    error_event,
    sse,
)

logger = logging.getLogger("ichat.replay")


GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class EngineWatch(Protocol):
    """What the middleware asks of the backend about the engine serving requests."""

    def current(self) -> Any:
        """The engine serving now (an opaque token, compared by identity)."""

    def died(self, engine: Any) -> bool:
        """Whether ``engine`` is dead by its own verdict."""


class ReplayOnEngineDeath:
    def __init__(
        self,
        app: ASGIApp,
        watch: EngineWatch,
        *,
        wait_for_next_engine: float = 10.0,
        max_replays: int = 1,
        continuation_limit: int = 0,
        max_model_len: Callable[[], int] | None = None,
        decode: continuation.Decode | None = None,
        reasoning_parser: bool = False,
        on_continuation: Callable[[Continued], None] | None = None,
        gateway: elsewhere.ThroughTheGateway | None = None,
        takes_over_here: Callable[[], bool] = lambda: True,
        handing_off: Callable[[], bool] = lambda: False,
        death_of: Callable[[Any], Awaitable[Any]] | None = None,
        restarted: elsewhere.ThisWorkerAgain | None = None,
        paths: frozenset[str] = GENERATING_PATHS,
        continuable_paths: frozenset[str] = GENERATING_PATHS,
        ids_unasked_absent: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.watch = watch
        self.wait_for_next_engine = wait_for_next_engine
        self.max_replays = max_replays
        self.continuation_limit = continuation_limit if max_model_len is not None else 0
        self.max_model_len = max_model_len
        self.decode = decode
        self.reasoning_parser = reasoning_parser
        self.on_continuation = on_continuation
        self.gateway = gateway
        self.takes_over_here = takes_over_here  # an engine of this worker serves next, soon
        self.handing_off = handing_off  # the worker stops: what is aborted goes elsewhere
        self.death_of = death_of  # awaits an engine's death (its answers stall then)
        self.restarted = restarted  # this worker, once its restarted engine serves
        self.paths = paths
        self.continuable_paths = continuable_paths  # where the engine streams token ids
        # the engine omits the token-id fields a client did not ask for (SGLang) rather
        # than sending them as null (vLLM): the client gets them the same way
        self.ids_unasked_absent = ids_unasked_absent
        self._clock = clock
        self.replayed = 0  # requests run again after an engine death (for tests, logs)
        self.continued = 0  # continuations of cut streams on the next engine
        self.forwarded = 0  # requests and continuations sent to another worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        posted = scope["type"] == "http" and scope["method"] == "POST"
        if not (posted and scope["path"] in (*self.paths, elsewhere.GENERATE)):
            await self.app(scope, receive, send)
            return
        body = await whole_body(receive)
        if body is None:
            return  # the client left while sending it
        scope, body = elsewhere.inbound(scope, body)  # what another worker forwarded
        if scope["path"] not in self.paths:  # the engine's native /generate: not replayed
            await self._untracked(scope, _replaying(body, receive), send)
            return
        request = self._continuable(scope["path"], body)
        engine = self.watch.current()
        for attempt in range(self.max_replays + 1):
            died = functools.partial(self.watch.died, engine)
            gate = _FirstMessageGate(send, died, self.handing_off)
            if request is None:
                stalled = await self._serve(engine, scope, _replaying(body, receive), gate.send)
                if stalled and gate.decided:  # a stream under way, not continuable
                    gate.dropped = True
                    await send(_body(error_event("the engine died") + DONE, more=False))
                    return
                gate.dropped = gate.dropped or stalled
            else:
                stream = TrackedStream.of(scope["path"], request, self.ids_unasked_absent)
                reader = _EngineStream(stream, gate.send, died, self.handing_off)
                stalled = await self._serve(
                    engine, scope, _replaying(stream.engine_body(), receive), reader.send
                )
                reader.cut = reader.cut or stalled
                if reader.cut and gate.decided:  # the client has part of the answer
                    await self._continue(scope, receive, send, stream, engine)
                    return
                gate.dropped = gate.dropped or reader.cut  # it has nothing: run it again
            if not gate.dropped:
                await gate.flush()
                return
            if attempt == self.max_replays:
                break
            target = await self._next_target(scope, engine)
            if target is None:
                break
            if target.engine is None:  # another worker answers the client, as it answers
                self.replayed += 1
                logger.warning("%s %s, before any byte reached the client: sent to %s",
                               scope["path"], self._ended_by(), target.what)  # fmt: skip
                await target.app(scope, _replaying(body, receive), send)
                return
            engine = target.engine
            self.replayed += 1
            logger.warning(
                "%s failed as the engine died, before any byte reached the client: "
                "sent again to the engine that serves now",
                scope["path"],
            )
        await send_error(
            send, 503, "ServiceUnavailable", "the engine died and no other engine took over"
        )

    async def _serve(self, engine: Any, scope: Scope, receive: Receive, send: Send) -> bool:
        """The engine's app answers; True when ``engine`` died before the answer's last
        message and the answer, stalled, was stopped (only with ``death_of``). A handler
        still running after its answer's end (its tail) is stopped too, but its answer
        stands: another message would break the connection, which the next request on
        it (a gateway's kept-alive connection) may be using already."""
        if self.death_of is None:
            await self.app(scope, receive, send)
            return False
        ended = False

        async def noting(message: Message) -> None:
            nonlocal ended
            await send(message)
            last = message["type"] == "http.response.body" and not message.get("more_body")
            ended = ended or last

        answer = asyncio.ensure_future(self.app(scope, receive, noting))
        death = asyncio.ensure_future(self.death_of(engine))
        try:
            done, _ = await asyncio.wait({answer, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
            if not answer.done():  # stalled on the dead engine (or we are cancelled)
                answer.cancel()
                await asyncio.wait({answer})
        if answer in done:
            answer.result()  # the app's own failure propagates
            return False
        if not answer.cancelled() and answer.exception() is not None:
            logger.debug("a handler stopped at the engine's death raised %r", answer.exception())
        return not ended

    async def _untracked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The engine's answer as it is; one that stalls at the engine's death ends
        then: a 503 before its start, an error event and ``[DONE]`` after it."""
        started = False

        async def noting(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        if await self._serve(self.watch.current(), scope, receive, noting):
            if started:
                await send(_body(error_event("the engine died") + DONE, more=False))
            else:
                await send_error(send, 503, "ServiceUnavailable", "the engine died")

    def _continuable(self, path: str, body: bytes) -> dict[str, Any] | None:
        """The request's JSON when its stream could be continued; None otherwise."""
        if not self.continuation_limit or path not in self.continuable_paths:
            return None
        try:
            request = json.loads(body)
        except ValueError:
            return None
        if not isinstance(request, dict):
            return None
        why = continuation.not_continuable(path, request, reasoning=self.reasoning_parser)
        if why is not None:
            if why != "not streamed":
                logger.debug("%s: a cut stream could not be continued (%s)", path, why)
            return None
        return request

    async def _continue(
        self, scope: Scope, receive: Receive, send: Send, stream: TrackedStream, dead: Any
    ) -> None:
        """Continue ``stream`` on the engines that serve next, each from the last token
        the client received, at most ``continuation_limit`` times."""
        assert self.max_model_len is not None
        t0 = self._clock()
        for _ in range(self.continuation_limit):
            target = None if stream.prompt_ids is None else (
                await self._next_target(scope, dead, send))  # fmt: skip
            if target is None:
                break
            body = stream.continuation_body(self.max_model_len())
            if body is None:  # the engine died after the last token
                events = b"".join(sse(e) for e in stream.closing_events())
                await send(_body(events + DONE, more=False))
                self._report(Continued("closed", 0, self._clock() - t0))
                return
            stream.begin_continuation()
            tail = _ContinuationStream(
                stream, send, target.died, self.decode, self._clock, self.handing_off
            )
            self.continued += 1
            logger.warning(
                "%s %s %s after %d tokens: continued on %s "
                "(%d prompt tokens re-prefilled, %.3f s after the cut)",
                scope["path"], stream.id, self._ended_by(), len(stream.generated),
                target.what, len(body["prompt"]), self._clock() - t0,
            )  # fmt: skip
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-length"]
            tail_scope = {**scope, "path": continuation.COMPLETIONS, "headers": headers,
                          "raw_path": continuation.COMPLETIONS.encode()}  # fmt: skip
            await target.app(tail_scope, _replaying(json.dumps(body).encode(), receive),
                             tail.send)  # fmt: skip
            outcome = "cut" if tail.cut else "refused" if tail.refused else "continued"
            stall = None if tail.first_sent_at is None else tail.first_sent_at - t0
            self._report(Continued(outcome, len(body["prompt"]), stall))
            if not tail.cut:
                return
            dead = target.engine or dead
        self._report(Continued("gave_up"))
        await send(_body(error_event("the engine died; the stream could not be continued")
                         + DONE, more=False))  # fmt: skip

    def _ended_by(self) -> str:
        if self.handing_off():
            return "aborted at the drain deadline"
        return "cut by the engine's death"

    async def _next_target(
        self, scope: Scope, dead: Any, keepalive: Send | None = None
    ) -> _Target | None:
        """Where a request of the dead engine runs next: another worker through the
        gateway when no engine of this worker takes over at once (or the worker hands its
        requests off as it stops), else the engine that serves next; None when none does
        within ``wait_for_next_engine``, and at once for a request another worker
        forwarded here as its engine died (its 503 makes the gateway try another)."""
        handing_off = self.handing_off()
        if self.gateway is not None and (handing_off or not self.takes_over_here()):
            if handing_off or not elsewhere.forwarded(scope):
                self.forwarded += 1
                request = self.gateway.request()
                return _Target(request, lambda: request.broken, None,
                               "another worker through the gateway")  # fmt: skip
            return None
        if self.restarted is not None and not self.takes_over_here():
            if elsewhere.forwarded(scope):  # already sent here again once: no loop
                return None
            if not await self.restarted.serving(self.wait_for_next_engine, keepalive):
                return None
            self.forwarded += 1
            request = self.restarted.request()
            return _Target(request, lambda: request.broken, None, "the restarted engine")
        if not await self._next_engine(dead, keepalive):
            return None
        engine = self.watch.current()
        died = functools.partial(self.watch.died, engine)
        return _Target(self.app, died, engine, "the next engine")

    def _report(self, continued: Continued) -> None:
        if self.on_continuation is not None:
            self.on_continuation(continued)

    async def _next_engine(self, dead: Any, keepalive: Send | None = None) -> bool:
        """Wait for an engine other than ``dead`` that is alive; a stream waiting
        (``keepalive``) gets an SSE comment at once and every second."""

        async def alive() -> bool:
            engine = self.watch.current()
            return engine is not dead and not self.watch.died(engine)

        comment = b": the engine died; continuing on the next one\n\n"
        return await wait_keeping_alive(alive, self.wait_for_next_engine, keepalive, comment,
                                        poll=0.01, clock=self._clock)  # fmt: skip


@dataclass(frozen=True)
class _Target:
    """Where a request of a dead engine runs next."""

    app: ASGIApp
    died: Callable[[], bool]  # its verdict on the answer it is giving
    engine: Any  # the engine of this worker; None: another worker, through the gateway
    what: str  # for the log


def _body(data: bytes, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _UntilTheEngineDies:
    """Forwards a stream's events, each as ``_event`` makes it, to the client; stops at
    an error event of the dead engine, or at an "abort" finish while the worker hands
    its requests off (``cut``), and keeps everything after it from the client."""

    def __init__(
        self, send: Send, engine_died: Callable[[], bool], handing_off: Callable[[], bool]
    ) -> None:
        self._send = send
        self._engine_died = engine_died
        self._handing_off = handing_off
        self._events = EventReader()
        self.cut = False

    def _event(self, raw: bytes, event: dict[str, Any] | str | None) -> bytes | None:
        raise NotImplementedError

    def _fast(self, raw: bytes) -> bytes | None:
        """The event for the client without parsing it; None: parse it."""
        return None

    async def _forward(self, message: Message) -> None:
        out = []
        for raw in self._events.feed(message.get("body", b"")):
            if _ABORTED in raw and self._handing_off() and _aborted(continuation.parse(raw)):
                self.cut = True
                break
            fast = self._fast(raw)
            if fast is not None:
                out.append(fast + b"\n\n")
                continue
            event = continuation.parse(raw)
            if isinstance(event, dict) and "error" in event and self._engine_died():
                self.cut = True
                break
            piece = self._event(raw, event)
            if piece is not None:
                out.append(piece)
        more = True if self.cut else message.get("more_body", False)
        if out or not more:
            await self._send(_body(b"".join(out), more=more))


class _EngineStream(_UntilTheEngineDies):
    """A continuable stream's events from the engine on their way to the client: notes
    its token ids (removing those the client did not ask for)."""

    def __init__(
        self,
        stream: TrackedStream,
        send: Send,
        engine_died: Callable[[], bool],
        handing_off: Callable[[], bool],
    ):
        super().__init__(send, engine_died, handing_off)
        self._stream = stream
        self._passthrough = False  # not a stream (an error status): untouched

    def _fast(self, raw: bytes) -> bytes | None:
        return self._stream.from_engine_bytes(raw)

    def _event(self, raw: bytes, event: dict[str, Any] | str | None) -> bytes | None:
        if isinstance(event, dict):
            return sse(self._stream.from_engine(event))
        return raw + b"\n\n"

    async def send(self, message: Message) -> None:
        if self.cut:
            return
        if message["type"] == "http.response.start":
            self._passthrough = message.get("status", 200) != 200
            await self._send(message)
        elif message["type"] != "http.response.body" or self._passthrough:
            await self._send(message)
        else:
            await self._forward(message)


class _ContinuationStream(_UntilTheEngineDies):
    """A continuation's completion events, in the client's stream's format."""

    def __init__(
        self,
        stream: TrackedStream,
        send: Send,
        engine_died: Callable[[], bool],
        decode: continuation.Decode | None,
        clock: Callable[[], float],
        handing_off: Callable[[], bool],
    ):
        super().__init__(send, engine_died, handing_off)
        self._stream = stream
        self._decode = decode
        self._clock = clock
        self._refused: bytes | None = None  # the engine refused the continuation
        self.first_sent_at: float | None = None  # when the client got its first chunk

    @property
    def refused(self) -> bool:
        return self._refused is not None

    def _event(self, raw: bytes, event: dict[str, Any] | str | None) -> bytes | None:
        if isinstance(event, dict) and "error" not in event:
            translated = self._stream.from_continuation(event, self._decode)
            if translated is None:
                return None
            if self.first_sent_at is None:
                self.first_sent_at = self._clock()
            return sse(translated)
        return None if event is None else raw + b"\n\n"  # [DONE], or the engine's error

    async def send(self, message: Message) -> None:
        if self.cut or message["type"] not in ("http.response.start", "http.response.body"):
            return
        if message["type"] == "http.response.start":
            if message.get("status", 200) != 200:
                self._refused = b""
            return
        if self._refused is None:
            await self._forward(message)
            return
        self._refused += message.get("body", b"")
        if not message.get("more_body", False):
            why = self._refused.decode(errors="replace")[:500]
            await self._send(_body(error_event(f"the continuation failed: {why}", 500)
                                   + DONE, more=False))  # fmt: skip


class _FirstMessageGate:
    """Holds the response's start until its first body message; drops the response
    when that message is a failure and the request's engine is dead, or an "abort"
    finish while the worker hands its requests off."""

    def __init__(
        self, send: Send, engine_died: Callable[[], bool], handing_off: Callable[[], bool]
    ) -> None:
        self._send = send
        self._engine_died = engine_died
        self._handing_off = handing_off
        self._start: Message | None = None
        self.decided = False
        self.dropped = False

    async def send(self, message: Message) -> None:
        if self.dropped:
            return
        if self.decided:
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        self.decided = True
        status = self._start["status"] if self._start is not None else 200
        body = message.get("body", b"")
        failed = status >= 500 or _is_error_event(body)
        if (failed and self._engine_died()) or (
            status == 200 and _ABORTED in body and self._handing_off() and _aborted_body(body)
        ):
            self.dropped = True
            return
        if self._start is not None:
            await self._send(self._start)
        await self._send(message)

    async def flush(self) -> None:
        """A response that ended without a body message: its start, as it was."""
        if not self.decided and self._start is not None:
            self.decided = True
            await self._send(self._start)


_ABORTED = b'"abort"'  # in what the engine answers a request it aborted


def _aborted(event: dict[str, Any] | str | None) -> bool:
    """An event (or a whole answer) whose choice ended with the engine's "abort"."""
    if not isinstance(event, dict):
        return False
    choices = event.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices
    )


def _aborted_body(body: bytes) -> bool:
    """A non-streamed answer, or a stream's first chunk, that the engine aborted."""
    text = body.lstrip()
    if text.startswith(b"data:"):
        return any(_aborted(continuation.parse(raw)) for raw in EventReader().feed(body))
    try:
        return _aborted(json.loads(body))
    except ValueError:
        return False


def _is_error_event(body: bytes) -> bool:
    """A stream's first chunk that is an error event (``data: {"error": ...}``)."""
    text = body.lstrip()
    if not text.startswith(b"data:"):
        return False
    try:
        event = json.loads(text[5:].split(b"\n", 1)[0])
    except ValueError:
        return False
    return isinstance(event, dict) and "error" in event


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The request's body once, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

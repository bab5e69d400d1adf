"""GatewayRegistration against a scripted gateway (httpx.MockTransport); no real sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

import httpx
import pytest

from ichat.worker.registration import GatewayRegistration, GatewaySettings

SETTINGS = GatewaySettings(
    url="http://gw", worker_url="http://10.0.0.5:8000", model="tiny", api_key="admin-key"
)


class Gateway:
    """SMG's control plane as far as the worker uses it; ``down`` refuses connections."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, object]] = {}
        self.calls: list[str] = []
        self.down = 0  # the next N calls fail to connect
        self.auth: set[str | None] = set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        self.auth.add(request.headers.get("authorization"))
        if self.down:
            self.down -= 1
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/workers" and request.method == "GET":
            listed = [{"id": k, **v} for k, v in self.workers.items()]
            return httpx.Response(200, json={"workers": listed, "total": len(listed)})
        if request.method == "POST" and request.url.path == "/workers":
            body = json.loads(request.content)
            if any(w["url"] == body["url"] for w in self.workers.values()):  # as SMG 1.13
                return httpx.Response(409, json={"code": "WORKER_ALREADY_EXISTS"})
            worker_id = f"w{len(self.calls)}"
            self.workers[worker_id] = body
            return httpx.Response(202, json={"status": "accepted", "worker_id": worker_id})
        worker_id = request.url.path.rsplit("/", 1)[-1]
        if worker_id not in self.workers:
            return httpx.Response(404, json={"error": "not found"})
        if request.method == "DELETE":
            del self.workers[worker_id]
            return httpx.Response(202, json={"status": "accepted"})
        return httpx.Response(200, json={"id": worker_id, **self.workers[worker_id]})


def scenario(
    steps: Callable[[GatewayRegistration, Gateway], object],
    settings: GatewaySettings = SETTINGS,
) -> tuple[GatewayRegistration, Gateway, list[float]]:
    gateway = Gateway()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    registration = GatewayRegistration(
        settings, transport=httpx.MockTransport(gateway.handle), sleep=sleep
    )

    async def main() -> None:
        task = asyncio.create_task(registration.run())
        try:
            result = steps(registration, gateway)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, 5)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    return registration, gateway, slept


def test_join_posts_the_worker_url_and_served_model_with_the_admin_key() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        reg.join()
        assert await reg.wait_settled(1)

    reg, gw, _ = scenario(steps)
    assert list(gw.workers.values()) == [
        {"url": "http://10.0.0.5:8000", "models": [{"id": "tiny"}]}
    ]
    assert reg.worker_id in gw.workers and reg.joins == 1
    assert gw.auth == {"Bearer admin-key"}


def test_the_engines_own_key_is_given_to_the_gateway_for_its_calls_to_the_worker() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        reg.join()
        assert await reg.wait_settled(1)

    settings = dataclasses.replace(SETTINGS, worker_api_key="engine-key")
    _, gw, _ = scenario(steps, settings)
    [registered] = gw.workers.values()
    assert registered["api_key"] == "engine-key"
    assert gw.auth == {"Bearer admin-key"}  # the control plane still gets the admin key


def test_leave_deletes_the_registration() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        reg.join()
        assert await reg.wait_settled(1)
        reg.leave()
        assert await reg.wait_settled(1)

    reg, gw, _ = scenario(steps)
    assert gw.workers == {} and reg.worker_id is None and reg.leaves == 1
    assert gw.calls[-1].startswith("DELETE /workers/w")


def test_a_gateway_that_is_down_is_retried_with_capped_backoff_and_never_raises() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        gw.down = 7
        reg.join()
        assert await reg.wait_settled(2)

    reg, gw, slept = scenario(steps)
    assert reg.failures == 7 and reg.joins == 1 and len(gw.workers) == 1
    assert slept[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_a_gateway_that_forgot_the_worker_gets_it_registered_again() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        reg.join()
        assert await reg.wait_settled(1)
        gw.workers.clear()  # the gateway restarted
        while reg.joins < 2:  # the periodic re-check (fake sleep: at once)
            await asyncio.sleep(0)

    reg, gw, _ = scenario(steps)
    assert reg.joins == 2 and list(gw.workers) == [reg.worker_id]


def test_leave_before_any_join_settles_without_calling_the_gateway() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        reg.leave()
        assert await reg.wait_settled(1)

    _, gw, _ = scenario(steps)
    assert gw.calls == []


def test_wait_settled_is_bounded_while_the_gateway_is_down() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        gw.down = 10**6
        reg.join()
        assert not await reg.wait_settled(0.05)

    reg, _, _ = scenario(steps)
    assert reg.worker_id is None and reg.failures > 0


def test_an_entry_left_at_our_url_is_adopted_instead_of_retrying_409_for_ever() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        gw.workers["old"] = {"url": SETTINGS.worker_url, "models": [{"id": "tiny"}]}
        reg.join()
        assert await reg.wait_settled(1)
        reg.leave()
        assert await reg.wait_settled(1)

    reg, gw, _ = scenario(steps)
    assert gw.calls[:3] == ["POST /workers", "GET /workers", "DELETE /workers/old"]
    assert gw.workers == {}
    assert (reg.joins, reg.leaves) == (1, 1)


def test_an_entry_at_our_url_for_another_model_is_replaced() -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        gw.workers["old"] = {"url": SETTINGS.worker_url, "models": [{"id": "other"}]}
        reg.join()
        assert await reg.wait_settled(1)

    reg, gw, slept = scenario(steps)
    assert gw.calls[:4] == ["POST /workers", "GET /workers", "DELETE /workers/old", "POST /workers"]
    assert [w["models"] for w in gw.workers.values()] == [[{"id": "tiny"}]]
    assert reg.worker_id is not None and reg.worker_id != "old"
    assert slept[0] == 0.2  # one short back-off between the refused and the accepted POST


def test_a_gateway_that_never_answered_is_not_said_to_answer_again_when_the_worker_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def steps(reg: GatewayRegistration, gw: Gateway) -> None:
        gw.down = 1000
        reg.join()
        while reg.failures < 2:
            await asyncio.sleep(0)
        reg.leave()  # SIGTERM: never joined, so nothing to ask the gateway
        assert await reg.wait_settled(1)

    with caplog.at_level(logging.DEBUG, logger="ichat.registration"):
        reg, _, _ = scenario(steps)
    assert reg.joins == 0 and reg.failures >= 2
    assert not [r for r in caplog.records if "answers again" in r.getMessage()]

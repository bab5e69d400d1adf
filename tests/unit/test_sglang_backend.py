"""SGLangBackend's own logic, without SGLang: signals, failure reports, refused modes."""

from __future__ import annotations

import asyncio
import pickle
import signal
from types import SimpleNamespace

import pytest

from ichat.backends import sglang_compat
from ichat.backends.compat import Workarounds
from ichat.backends.sglang_backend import (
    FailureReport,
    SGLangBackend,
    _resumed,
    _smaller_kv_cache,
)
from ichat.errors import ConfigError, EngineDiedError


def test_the_loop_keeps_the_workers_signal_handlers_while_sglang_adds_its_own() -> None:
    workarounds = Workarounds("sglang", sglang_compat.WORKAROUNDS)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        loop.add_signal_handler(signal.SIGUSR1, seen.append, "worker")

        class TokenizerManager:  # adds its handler as SGLang's does
            def auto_create_handle_loop(self) -> None:
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, seen.append, "sglang")

        launched = sglang_compat.Launched(TokenizerManager(), None, {}, None)
        sglang_compat.start_tokenizer_manager_loop(launched, workarounds)  # declined
        signal.raise_signal(signal.SIGUSR1)
        await asyncio.sleep(0.05)
        # the loop's own method is back: a handler added afterwards takes effect
        loop.add_signal_handler(signal.SIGUSR1, seen.append, "later")
        signal.raise_signal(signal.SIGUSR1)
        await asyncio.sleep(0.05)
        loop.remove_signal_handler(signal.SIGUSR1)
        return seen

    assert asyncio.run(main()) == ["worker", "later"]
    assert workarounds.status() == {"loop_signal_handlers_declined": "resolved"}


def test_a_failure_report_only_records_and_travels_with_the_server_args() -> None:
    report = FailureReport()
    copy = pickle.loads(pickle.dumps(report))  # SGLang pickles its args to its children
    assert copy.received is False
    report(signal.SIGQUIT, None)
    assert report.received is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"tokenizer_worker_num": 4}, "--tokenizer-worker-num 4"),
        ({"enable_http2": True}, "--enable-http2"),
        ({"node_rank": 1}, "--node-rank >= 1"),
    ],
)
def test_modes_that_serve_no_single_in_process_http_server_are_refused(
    args: dict[str, object], message: str
) -> None:
    defaults = {"tokenizer_worker_num": 1, "enable_http2": False, "node_rank": 0}
    with pytest.raises(ConfigError, match=message):
        SGLangBackend._reject_unsupported_modes(SimpleNamespace(**{**defaults, **args}))


def test_the_default_mode_is_accepted() -> None:
    SGLangBackend._reject_unsupported_modes(
        SimpleNamespace(tokenizer_worker_num=1, enable_http2=False, node_rank=0)
    )


def test_a_key_other_than_the_gateways_is_refused_behind_a_gateway() -> None:
    from ichat.config import WorkerConfig

    behind = WorkerConfig(gateway_url="http://gw:8080", gateway_api_key="K1")
    with pytest.raises(ConfigError, match="--api-key differs from --gateway-api-key"):
        SGLangBackend._check_the_gateways_key(SimpleNamespace(api_key="K2"), behind)
    for fine in ("K1", None):  # the gateway's key, or none at all
        SGLangBackend._check_the_gateways_key(SimpleNamespace(api_key=fine), behind)
    SGLangBackend._check_the_gateways_key(SimpleNamespace(api_key="K2"), WorkerConfig())


def test_a_standby_that_dies_while_it_wakes_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's resume call waits for its scheduler's reply for ever: the wake is given
    up as soon as one of the standby's processes is found dead, and the call cancelled."""
    resumes: list[asyncio.Task[None]] = []

    async def resume_never_answered(launched: object) -> None:
        current = asyncio.current_task()
        assert current is not None
        resumes.append(current)
        await asyncio.Event().wait()

    monkeypatch.setattr(sglang_compat, "resume_memory", resume_never_answered)
    gone: list[SimpleNamespace] = []
    standby = SimpleNamespace(launched=None, dead_processes=lambda: gone)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, gone.append, SimpleNamespace(pid=4321))
        t0 = loop.time()
        with pytest.raises(EngineDiedError, match="4321 died as it woke"):
            await _resumed(standby)  # type: ignore[arg-type]
        return loop.time() - t0

    assert asyncio.run(main()) < 2.0
    assert resumes and resumes[0].cancelled()


def test_a_standby_wakes_when_sglang_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    woken: list[object] = []

    async def resume(launched: object) -> None:
        await asyncio.sleep(0.1)
        woken.append(launched)

    monkeypatch.setattr(sglang_compat, "resume_memory", resume)
    standby = SimpleNamespace(launched="engine", dead_processes=list)
    asyncio.run(_resumed(standby))  # type: ignore[arg-type]
    assert woken == ["engine"]


def test_a_replacement_standby_with_a_smaller_kv_cache_is_told_with_the_remedy() -> None:
    # measured on an H100 at --mem-fraction-static 0.45: 270810 tokens active, 140223
    # in the standby started beside it (docs/results/h100/failover-h100-sglang-standby-*)
    told = _smaller_kv_cache({"max_total_num_tokens": 270810}, {"max_total_num_tokens": 140223})
    assert told is not None
    assert "140223 tokens" in told and "270810" in told and "52%" in told
    assert "--max-total-tokens 140223" in told
    for standby in (270810, 300000, 260000):  # 260000: within 5 %, as engines differ
        assert (
            _smaller_kv_cache({"max_total_num_tokens": 270810}, {"max_total_num_tokens": standby})
            is None
        )
    assert _smaller_kv_cache({}, {"max_total_num_tokens": 1}) is None  # a version that tells none

"""`ichat gateway` / `ichat up` command lines: iChat's defaults, the user's flags win."""

from __future__ import annotations

import pytest

from ichat.commands import gateway, up
from ichat.errors import ConfigError


def flag(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_gateway_defaults_reach_smg() -> None:
    argv = gateway.parse_args(["--port", "9000", "--api-key", "k"]).smg_argv()
    assert argv[1:4] == ["-m", "smg", "launch"]
    assert flag(argv, "--port") == ["9000"]
    assert flag(argv, "--prometheus-port") == ["9001"]  # never SMG's shared 29000
    assert flag(argv, "--api-key") == ["k"]
    assert flag(argv, "--policy") == ["round_robin"]
    assert flag(argv, "--health-check-interval-secs") == ["5"]


def test_a_smg_flag_given_by_the_user_replaces_the_default_and_unknown_ones_pass() -> None:
    argv = gateway.parse_args(
        ["--health-check-interval-secs", "1", "--upstream-http2", "--log-level=debug"]
    ).smg_argv()
    assert flag(argv, "--health-check-interval-secs") == ["1"]
    assert "--upstream-http2" in argv
    assert "--log-level=debug" in argv and "--log-level" not in argv


def test_up_workers_get_ports_the_gateway_url_the_key_and_engine_flags() -> None:
    config = up.parse_args(
        ["--workers", "2", "--port", "9000", "--worker-port", "9100", "--api-key", "k",
         "--model-path", "/m/llama", "--enable-prefix-caching"]
    )  # fmt: skip
    argv = config.worker_argv(1, "/m/llama")
    assert argv[2:5] == ["ichat", "serve", "--backend"]
    assert flag(argv, "--port") == ["9101"]
    assert flag(argv, "--gateway-url") == ["http://127.0.0.1:9000"]
    assert flag(argv, "--api-key") == ["k"] and flag(argv, "--gateway-api-key") == ["k"]
    assert flag(argv, "--served-model-name") == ["llama"]  # the folder's name
    assert argv[-1] == "--enable-prefix-caching"


def test_up_standby_and_status_ports_reach_each_worker() -> None:
    config = up.parse_args(["--workers", "2", "--standby", "--status-port", "9200"])
    argv = config.worker_argv(1, "/m/llama")
    assert "--standby" in argv
    assert flag(argv, "--status-port") == ["9201"]
    plain = up.parse_args(["--workers", "2"]).worker_argv(0, "/m/llama")
    assert "--standby" not in plain and "--status-port" not in plain


def test_up_refuses_zero_workers() -> None:
    with pytest.raises(ConfigError):
        up.parse_args(["--workers", "0"])


def test_a_second_signal_ends_the_gateways_drain_at_once() -> None:
    import asyncio
    import signal
    import subprocess
    import sys
    import time

    from ichat.commands.gateway import GatewayConfig, GatewayProcess

    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
        "print(flush=True); time.sleep(60)"
    gateway = GatewayProcess(GatewayConfig(shutdown_grace=30))
    proc = subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()  # its handler is set
    gateway.proc = proc

    async def main() -> float:
        received: asyncio.Queue[signal.Signals] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, received.put_nowait, signal.SIGINT)
        t0 = time.monotonic()
        await gateway.drain(received)
        return time.monotonic() - t0

    waited = asyncio.run(main())
    assert proc.poll() is not None  # gone (reaped by the kill's wait)
    assert waited < 10  # killed after the second signal, not waited out for 30 s
    assert gateway.proc is None


def test_requests_in_flight_are_read_from_smgs_metrics() -> None:
    from ichat.commands.gateway import requests_in_flight

    idle = "# TYPE smg_http_connections_active gauge\nsmg_http_connections_active 3\n"
    assert requests_in_flight(idle) == 0  # open connections are not requests
    busy = (
        'smg_worker_requests_active{worker="http://a:8000"} 2\n'
        'smg_worker_requests_active{worker="http://b:8000"} 0\n'
        "smg_admission_inflight 1\n"
    )
    assert requests_in_flight(busy) == 3


def test_drain_settle_is_ichats_flag_and_not_passed_to_smg() -> None:
    from ichat.commands.gateway import parse_args

    config = parse_args(["--drain-settle", "5", "--policy", "cache_aware"])
    assert config.drain_settle == 5.0
    assert "--drain-settle" not in config.smg_argv()

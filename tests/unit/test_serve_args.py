from __future__ import annotations

import pytest

from ichat.commands.serve import parse_args
from ichat.config import WorkerConfig


def test_framework_flags_are_taken_and_the_rest_goes_to_the_engine_unchanged() -> None:
    engine = [
        "--model-path",
        "/m",
        "--tensor-parallel-size",
        "2",
        "--enable-prefix-caching",
        "--max-num-seqs=64",
        "--served-model-name",
        "x",
        "y",
    ]
    config, argv, help_mode = parse_args(
        [
            "--backend",
            "vllm",
            "--host",
            "0.0.0.0",
            *engine[:4],
            "--port",
            "9000",
            *engine[4:],
            "--log-level",
            "DEBUG",
            "--drain-timeout",
            "3",
        ]
    )
    assert argv == engine
    assert help_mode is None
    assert config == WorkerConfig(
        backend="vllm", host="0.0.0.0", port=9000, log_level="debug", drain_timeout=3.0
    )


def test_abbreviations_of_framework_flags_are_not_taken() -> None:
    # argparse would read "--po 1" as --port and "--back" as --backend by default.
    config, argv, _ = parse_args(["--po", "1", "--back", "x", "--host-ip", "h"])
    assert argv == ["--po", "1", "--back", "x", "--host-ip", "h"]
    assert config.port == WorkerConfig().port


def test_defaults_and_help() -> None:
    config, argv, help_mode = parse_args(["--help"])
    assert help_mode == "framework" and argv == []
    assert config.backend == "vllm" and config.log_level is None
    assert parse_args(["--backend", "vllm", "-h"])[2] == "engine"


def test_base_url_uses_a_connectable_host() -> None:
    assert WorkerConfig(host="0.0.0.0", port=1).base_url == "http://127.0.0.1:1"
    assert WorkerConfig(host="::", port=2).base_url == "http://[::1]:2"
    assert WorkerConfig(host="10.1.2.3", port=3).base_url == "http://10.1.2.3:3"


def test_a_vllm_engine_with_keys_of_its_own_accepts_the_gateways_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from ichat.backends.vllm_backend import VLLMBackend
    from ichat.config import WorkerConfig

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    behind = WorkerConfig(gateway_url="http://gw:8080", gateway_api_key="K1")
    args = SimpleNamespace(api_key=["K2"])
    VLLMBackend._accept_the_gateways_key(args, behind)
    assert args.api_key == ["K2", "K1"]
    open_engine = SimpleNamespace(api_key=None)  # no key: it accepts every request
    VLLMBackend._accept_the_gateways_key(open_engine, behind)
    assert open_engine.api_key is None
    alone = SimpleNamespace(api_key=["K2"])
    VLLMBackend._accept_the_gateways_key(alone, WorkerConfig())
    assert alone.api_key == ["K2"]
    monkeypatch.setenv("VLLM_API_KEY", "K3")
    from_env = SimpleNamespace(api_key=None)
    VLLMBackend._accept_the_gateways_key(from_env, behind)
    assert from_env.api_key == ["K3", "K1"]

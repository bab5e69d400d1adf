from __future__ import annotations

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

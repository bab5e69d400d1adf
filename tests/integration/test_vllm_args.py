"""vLLM's own parser, reached through iChat: names mapped, every other flag untouched.

No engine starts here: only vLLM's argument parsing and validation run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ichat.backends.vllm_backend import VLLMBackend
from ichat.config import WorkerConfig
from ichat.errors import ConfigError


def parse(argv: list[str], **config: object) -> object:
    return VLLMBackend(WorkerConfig(**config), argv).get_backend_args()  # type: ignore[arg-type]


def test_unified_names_and_pass_through_flags_reach_vllm(model_dir: Path) -> None:
    args = parse(
        [
            "--model-path",
            str(model_dir),
            "--tokenizer-path",
            str(model_dir),
            "--context-length",
            "777",
            "--served-model-name",
            "a",
            "b",
            "--trust-remote-code",
            "--enable-prefix-caching",
            "--max-num-seqs",
            "17",
            "--tensor-parallel-size",
            "2",
            "--data-parallel-size",
            "3",
            "--pipeline-parallel-size",
            "2",
            "--distributed-executor-backend",
            "ray",
            "--override-generation-config",
            '{"temperature": 0.25}',
            "--seed",
            "5",
        ],
        host="0.0.0.0",
        port=9123,
    )
    assert args.model == str(model_dir) and args.tokenizer == str(model_dir)
    assert args.max_model_len == 777
    assert args.served_model_name == ["a", "b"] and args.trust_remote_code is True
    assert args.enable_prefix_caching is True and args.max_num_seqs == 17
    assert (args.tensor_parallel_size, args.data_parallel_size, args.pipeline_parallel_size) == (
        2,
        3,
        2,
    )
    assert args.distributed_executor_backend == "ray"
    assert args.override_generation_config == {"temperature": 0.25}
    assert args.seed == 5
    assert (args.host, args.port) == ("0.0.0.0", 9123)  # the framework's address wins
    assert args.api_server_count == 1  # one API server: this process


def test_positional_model_is_understood_as_vllm_serve_does(model_dir: Path) -> None:
    assert parse([str(model_dir)]).model == str(model_dir)


def test_several_api_servers_are_refused_with_a_reason(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="api-server-count 2"):
        parse(["--model-path", str(model_dir), "--api-server-count", "2"])
    with pytest.raises(ConfigError, match="--headless"):
        parse(["--model-path", str(model_dir), "--headless"])
    with pytest.raises(ConfigError, match="--uds is not supported"):
        parse(["--model-path", str(model_dir), "--uds", "/tmp/ichat.sock"])


def test_vllms_own_validation_runs_before_any_start(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="enable-auto-tool-choice"):
        parse(["--model-path", str(model_dir), "--enable-auto-tool-choice"])


def test_engine_help_shows_ichat_and_vllm_flags() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ichat", "serve", "--backend", "vllm", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in (
        "--drain-timeout",
        "--no-restart",
        "--tensor-parallel-size",
        "--max-model-len",
        "--enable-prefix-caching",
    ):
        assert flag in proc.stdout, flag


def test_the_caches_that_would_keep_a_stopped_engines_tokenizers_are_found() -> None:
    """vLLM's keyword check memoizes by the renderer's tokenizer-pool methods (4 entries
    a start, 128 kept): the backend clears it after a stop (test_vllm_cycles counts the
    tokenizers left)."""
    from vllm.utils.func_utils import supports_kw

    from ichat.backends import vllm_compat

    caches = vllm_compat.load().engine_keyed_caches
    assert caches, "vLLM's keyword-check cache was not found"

    def template(*, tools: object = None) -> None: ...

    assert supports_kw(template, "tools")
    assert sum(cache.cache_info().currsize for cache in caches) >= 1
    for cache in caches:
        cache.cache_clear()
    assert sum(cache.cache_info().currsize for cache in caches) == 0

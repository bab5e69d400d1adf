#!/usr/bin/env bash
# On the GPU machine (no network), after the vLLM 0.26.0 wheels were installed into
# /tmp/site (../shared/gpu/README.md): run the GPU suite or the benchmark from the repo.
#   bash bench/gpu/device_run.sh tests|standby|tp|bench|ab|loadgen|profile|gateway|gateway-sbs|gateway-workers|gateway+bench|sglang|sglang-standby|sglang-failover|sglang-ab|faults|failover|continuation|reload|roll|startphases|leak OUT_DIR
# faults: kill -9 of EngineCore (KILLS times) and SIGTERM drains (INFLIGHT streams).
# startphases: vLLM's engine started once per PLANS entry in one process, forked (off;
#   plan: its startup plan; frozen: the parent's heap frozen first, as the worker does),
#   with the full collections the engine process ran (bench/probe_engine_start.py).
# leak: CYCLES in-process start/stop cycles, with the GPU memory used after each stop.
# failover: kill -9 of the active engine (KILLS times) with a cold restart and with
#   --standby (MODES="restart standby"), at UTIL of the GPU per engine (0.4: a new standby
#   fits beside an awake engine after a failover); EXTRA: more worker flags (--log-level info
#   keeps vLLM's own timing lines in the worker logs copied to OUT).
# reload: RELOADS reloads (ichat reload --merge, same flags: weights read again) of one
#   worker under CONC streams of TOKENS tokens (bench/bench_reload.py).
# roll: `ichat up --workers 2` on the one GPU rolled ROLLS times under CONC streams of TOKENS
#   tokens through the gateway (bench/bench_roll.py), UTIL of the GPU per engine (a swap
#   starts a third engine beside the two).
# continuation: STREAMS greedy streams cut by kill -9 of the active engine (KILLS times)
#   under --standby, continued on the standby (bench/bench_continuation.py).
# ab: native vLLM, ichat serve and ichat serve with streams tracked (--gateway-url) resident
#   at once (UTIL of the GPU each), BLOCKS blocks of alternating load windows
#   (bench/bench_ab.py): throughput ratios and latency differences with a 95 % CI.
#   WINDOW=S: steady-state windows of S seconds (WARMUP, STAGGER; bench/windows.py) from
#   client processes that live across windows; CLIENT_CPUS=N pins them to the last N CPUs.
#   LOADGEN=vllm-bench: vLLM's own `vllm bench serve` makes each window (REQUESTS, CONC).
# loadgen: the same clients against bench/trivial_server.py (no engine): what they reach.
# profile: the API process's own CPU per 1000 tokens, native vLLM vs ichat serve resident at
#   once, BLOCKS paired windows of REQUESTS at CONC (bench/profile_worker.py); PYSPY=path of
#   a py-spy binary adds one sampled window per server.
# gateway-sbs: the gateway benchmark with both paths streaming at the same time.
# gateway-workers: throughput via the gateway vs direct with 1 and 2 workers on one GPU
#   (WORKERS="1 2", CONFIGS="ichat", PROMPTS=distinct: every request its own prompt).
# sglang-standby / sglang-failover (same SGLang site): tests/gpu/test_gpu_sglang_standby.py,
# and bench_failover.py --engine sglang (MODES, KILLS, FRACTION: --mem-fraction-static);
# sglang-ab: bench_ab.py --engine sglang, SGLang's own server and ichat side by side (each
# server's --mem-fraction-static is of the memory free when it starts).
# sglang: after the SGLang 0.5.16 site was unpacked into /tmp/site (dev_install.sh of
# ../shared/gpu/sglang-0.5.16); native launch_server vs ichat serve, with a kill -9 test.
# gateway+bench (2 GPUs): the gateway benchmark on GPU 0 and the vLLM comparison on GPU 1
# at the same time (32 cores: neither is short of CPU; both are ratios taken side by side).
# (gateway needs smg: stage.sh vllm==0.26.0 smg==1.13.0)
set -uo pipefail
MODE=$1 OUT=$2
rc=0
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export ICHAT_GPU_MODEL=/tmp/llama-1b
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
if [ ! -f $ICHAT_GPU_MODEL/config.json ]; then
  /usr/bin/time -f "model made in %e s" python3 -m ichat make-test-model $ICHAT_GPU_MODEL --size 1b
fi
case $MODE in
  tests) ICHAT_RESULTS=$OUT/gpu-results.json ICHAT_RESULTS_STANDBY=$OUT/gpu-standby-results.json \
           python3 -m pytest tests/gpu/test_gpu_vllm.py tests/gpu/test_gpu_standby.py \
           -v -s -p no:cacheprovider 2>&1 | grep -v "Route:" > $OUT/gpu-tests.log
         rc=${PIPESTATUS[0]}
         tail -n 30 $OUT/gpu-tests.log ;;
  standby) ICHAT_RESULTS_STANDBY=$OUT/gpu-standby-results.json python3 -m pytest \
           tests/gpu/test_gpu_standby.py -v -s -p no:cacheprovider 2>&1 | grep -v "Route:" \
           > $OUT/gpu-standby-tests.log
         rc=${PIPESTATUS[0]}
         tail -n 30 $OUT/gpu-standby-tests.log ;;
  tp)    ICHAT_RESULTS_TP=$OUT/gpu-tp-results.json python3 -m pytest \
           tests/gpu/test_gpu_tensor_parallel.py -v -s -p no:cacheprovider 2>&1 \
           | grep -v "Route:" > $OUT/gpu-tp.log
         rc=${PIPESTATUS[0]}
         tail -n 30 $OUT/gpu-tp.log ;;
  bench) python3 bench/bench_vllm.py --model-path $ICHAT_GPU_MODEL --rounds ${ROUNDS:-2} \
           --concurrency 256 --requests 1024 --max-tokens 128 --client-processes 8 \
           --out /tmp/bench-vllm --tag h200 \
           -- --max-model-len 2048 --gpu-memory-utilization 0.85 2>&1 | tee $OUT/bench.log \
           | grep -v "^(" | tail -n 40
         cp /tmp/bench-vllm/vllm-inprocess-vs-native-h200.* $OUT/ ;;
  gateway) python3 bench/bench_gateway.py --model-path $ICHAT_GPU_MODEL --rounds ${ROUNDS:-2} \
           --concurrency 1 256 --requests 1024 --max-tokens 128 --single 30 --client-processes 8 \
           --configs ${CONFIGS:-smg ichat ichat+pool-idle-60s ichat+http2} --out $OUT --tag h200 \
           -- --max-model-len 2048 --gpu-memory-utilization 0.85 2>&1 \
           | tee $OUT/bench-gateway.log | grep -v "^(" | tail -n 40 ;;
  gateway-sbs) python3 bench/bench_gateway.py --model-path $ICHAT_GPU_MODEL --side-by-side \
           --rounds ${ROUNDS:-3} --concurrency ${CONC:-128} --requests 1024 --max-tokens 128 \
           --single 30 --client-processes 4 --configs ${CONFIGS:-smg ichat ichat+pool-idle-60s ichat+http2} \
           --out $OUT --tag h200-side-by-side -- --max-model-len 2048 \
           --gpu-memory-utilization 0.85 2>&1 | tee $OUT/bench-gateway-sbs.log | grep -v "^(" \
           | tail -n 40 ;;
  gateway-workers) for n in ${WORKERS:-1 2}; do python3 bench/bench_gateway.py --model-path $ICHAT_GPU_MODEL \
           --workers $n --rounds ${ROUNDS:-2} --concurrency 256 --requests ${REQUESTS:-512} --max-tokens 128 \
           --single 20 --client-processes 8 --configs ${CONFIGS:-ichat} ${PROMPTS:+--distinct-prompts} \
           --out $OUT --tag h200-${n}w${PROMPTS:+-$PROMPTS} -- \
           --max-model-len 2048 --kv-cache-memory 30000000000 2>&1 \
           | tee $OUT/bench-gateway-${n}w${PROMPTS:+-$PROMPTS}.log | grep -v "^(" | grep "^\[ichat\|ratio"; done ;;
  sglang) python3 bench/bench_vllm.py --engine sglang --kill-test --model-path $ICHAT_GPU_MODEL \
           --rounds ${ROUNDS:-1} --concurrency 256 --requests 1024 --max-tokens 128 \
           --client-processes 8 --out /tmp/bench-sglang --tag h200 -- --attention-backend fa3 \
           --sampling-backend pytorch --mem-fraction-static 0.8 --cuda-graph-max-bs 256 \
           --disable-piecewise-cuda-graph 2>&1 | tee $OUT/bench-sglang.log | grep -v "^\[20" | tail -n 30
         cp /tmp/bench-sglang/sglang-inprocess-vs-native-h200.* /tmp/bench-sglang/*.log $OUT/ ;;
  sglang-standby) ICHAT_RESULTS_SGLANG_STANDBY=$OUT/gpu-sglang-standby-results.json python3 -m pytest \
           tests/gpu/test_gpu_sglang_standby.py -x -v -p no:cacheprovider 2>&1 | tail -n 25; rc=${PIPESTATUS[0]} ;;
  sglang-failover) M=${MODES:-standby restart}
           python3 bench/bench_failover.py --engine sglang --model-path $ICHAT_GPU_MODEL \
           --kills ${KILLS:-3} --modes $M --out $OUT --tag ${TAG:-gpu-sglang} -- \
           --attention-backend fa3 --sampling-backend pytorch --disable-piecewise-cuda-graph \
           --context-length 2048 --mem-fraction-static ${FRACTION:-0.45} ${EXTRA---enable-memory-saver} 2>&1 \
           | tee $OUT/bench-failover-sglang-${M// /-}.log | grep "^\[" ;;
  sglang-ab) python3 bench/bench_ab.py --engine sglang --model-path $ICHAT_GPU_MODEL \
           --blocks ${BLOCKS:-16} --configs native ichat --concurrency ${CONC:-32} \
           --requests ${REQUESTS:-384} --max-tokens ${TOKENS:-128} --client-processes 8 \
           --out $OUT --tag ${TAG:-gpu-sglang} -- --attention-backend fa3 --sampling-backend pytorch \
           --disable-piecewise-cuda-graph --context-length 2048 \
           --mem-fraction-static ${FRACTION:-0.4} 2>&1 | tee $OUT/bench-ab-sglang.log | grep "^start\|wrote" ;;
  faults) python3 bench/bench_faults.py --model-path $ICHAT_GPU_MODEL --kills ${KILLS:-2} \
           --inflight ${INFLIGHT:-0 16 128} --tokens 1024 --out $OUT --tag h200 \
           -- --max-model-len 2048 --gpu-memory-utilization 0.85 2>&1 \
           | tee $OUT/bench-faults.log | grep "^kill\|^drain" ;;
  failover) M=${MODES:-restart standby}
           python3 bench/bench_failover.py --model-path $ICHAT_GPU_MODEL --kills ${KILLS:-3} \
           --modes $M --out $OUT --tag ${TAG:-h200} \
           -- --max-model-len 2048 --gpu-memory-utilization ${UTIL:-0.4} ${EXTRA:-} 2>&1 \
           | tee $OUT/bench-failover-${M// /-}.log | grep "^\[" ;;
  continuation) python3 bench/bench_continuation.py --model-path $ICHAT_GPU_MODEL \
           --kills ${KILLS:-2} --streams ${STREAMS:-64} --max-tokens ${TOKENS:-512} --out $OUT ${CONTROL:-} \
           --tag ${TAG:-h200} -- --max-model-len 2048 --gpu-memory-utilization ${UTIL:-0.4} 2>&1 \
           | tee $OUT/bench-continuation.log | grep "^kill\|^control\|wrote" ;;
  reload) python3 bench/bench_reload.py --model-path $ICHAT_GPU_MODEL \
           --reloads ${RELOADS:-3} --concurrency ${CONC:-32} --max-tokens ${TOKENS:-256} \
           --settle ${SETTLE:-10} --method ${METHOD:-swap} --out $OUT --tag ${TAG:-h200} \
           -- --max-model-len 2048 \
           --gpu-memory-utilization ${UTIL:-0.4} ${EXTRA:-} 2>&1 \
           | tee $OUT/bench-reload.log | grep "^reload\|^before\|^during\|^failed\|^worker\|wrote" ;;
  roll)  python3 bench/bench_roll.py --model-path $ICHAT_GPU_MODEL \
           --rolls ${ROLLS:-2} --concurrency ${CONC:-32} --max-tokens ${TOKENS:-256} \
           --settle ${SETTLE:-10} --out $OUT --tag ${TAG:-h100} \
           -- --max-model-len 2048 --gpu-memory-utilization ${UTIL:-0.25} ${EXTRA:-} 2>&1 \
           | tee $OUT/bench-roll.log | grep "^roll\|^before\|^during\|^failed\|^worker\|wrote" ;;
  ab)    python3 bench/bench_ab.py --model-path $ICHAT_GPU_MODEL --blocks ${BLOCKS:-8} \
           --starts ${STARTS:-1} --configs ${CONFIGS:-native ichat ichat+replay ichat+tracked} \
           --concurrency ${CONC:-256} --requests ${REQUESTS:-1024} --max-tokens ${TOKENS:-128} \
           --client-processes 8 --out $OUT --tag ${TAG:-h100} ${WINDOW:+--window-seconds $WINDOW \
           --warmup-seconds ${WARMUP:-3} --stagger-seconds ${STAGGER:-1.5}} \
           ${CLIENT_CPUS:+--client-cpus $CLIENT_CPUS} ${LOADGEN:+--loadgen $LOADGEN} \
           -- --max-model-len 2048 --gpu-memory-utilization ${UTIL:-0.22} 2>&1 \
           | tee $OUT/bench-ab.log | grep "^start\|wrote" ;;
  loadgen) python3 bench/bench_ab.py --model-path $ICHAT_GPU_MODEL --configs trivial \
           --blocks ${BLOCKS:-4} --concurrency ${CONC:-256} --max-tokens ${TOKENS:-128} \
           --client-processes 8 --window-seconds ${WINDOW:-8} --warmup-seconds ${WARMUP:-3} \
           --stagger-seconds ${STAGGER:-1.5} ${CLIENT_CPUS:+--client-cpus $CLIENT_CPUS} \
           --out $OUT --tag ${TAG:-h100}-loadgen 2>&1 | tee $OUT/bench-loadgen.log \
           | grep "^start\|wrote" ;;
  profile) python3 bench/profile_worker.py --model-path $ICHAT_GPU_MODEL --blocks ${BLOCKS:-8} \
           --concurrency ${CONC:-256} --requests ${REQUESTS:-1024} --max-tokens ${TOKENS:-128} \
           --client-processes 8 ${PYSPY:+--py-spy $PYSPY} --out $OUT --tag ${TAG:-h100} \
           -- --max-model-len 2048 --gpu-memory-utilization ${UTIL:-0.22} 2>&1 \
           | tee $OUT/bench-profile.log | grep "^start\|^block\|ratio\|wrote" ;;
  startphases) python3 bench/probe_engine_start.py --model-path $ICHAT_GPU_MODEL \
           --plans ${PLANS:-off frozen off frozen} --out $OUT -- --max-model-len 2048 \
           --gpu-memory-utilization ${UTIL:-0.4} > $OUT/engine-start-phases.log 2>&1
         rc=$?; grep -a "^start\|^===\|took\|takes\|finished in\|plan" $OUT/engine-start-phases.log \
           | grep -v "Capturing" | cut -c1-220 ;;
  leak)  python3 bench/leak_check.py --model-path $ICHAT_GPU_MODEL --cycles ${CYCLES:-8} \
           --out $OUT/leak-check-h200-${CYCLES:-8} -- --max-model-len 2048 \
           --gpu-memory-utilization 0.85 2>&1 | tee $OUT/leak-check.log \
           | grep "^cycle\|growth\|left\|gpu_" ;;
  gateway+bench)
         CUDA_VISIBLE_DEVICES=0 bash $0 gateway $OUT > /tmp/gateway.out 2>&1 &
         CUDA_VISIBLE_DEVICES=1 bash $0 bench $OUT > /tmp/bench.out 2>&1
         wait
         tail -n 25 /tmp/gateway.out /tmp/bench.out ;;
esac
# the suite's own exit status (a failed test fails the run), 0 for the benchmarks
exit "${rc:-0}"

"""Start `ichat up` (gateway + one worker) on a model, send one chat completion with
the official `openai` client through the gateway, stop everything with Ctrl-C (SIGINT)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.probe

from ichat.process.processes import free_port
from tests.probe import OutputFollower

READY_MARKER = "OpenAI endpoint:"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--prompt", default="Hello! Who are you?")
    args = parser.parse_args()
    port = free_port()
    key = "sk-ichat-demo"
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    cmd = [
        sys.executable,
        "-m",
        "ichat",
        "up",
        "--workers",
        str(args.workers),
        "--port",
        str(port),
        "--worker-port",
        str(free_port()),
        "--api-key",
        key,
        "--model-path",
        args.model_path,
        "--served-model-name",
        "tiny-chat",
        "--context-length",
        "2048",
    ]
    print("starting:", " ".join(cmd), flush=True)
    up = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    follower = OutputFollower(up, READY_MARKER, sys.stdout)
    try:
        ready = follower.wait(timeout=900)
        url = f"http://127.0.0.1:{port}/v1"
        print(f"\nready after {ready:.1f} s; asking through the gateway at {url}", flush=True)
        client = openai.OpenAI(base_url=url, api_key=key)
        reply = client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": args.prompt}],
            max_tokens=32,
            temperature=0,
        )
        print("\n=== chat completion (random-weight model: the words are noise) ===")
        print(f"prompt: {args.prompt}")
        print(f"answer: {reply.choices[0].message.content!r}")
        print(f"usage:  {reply.usage}\n", flush=True)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C
        code = up.wait(180)
    print(f"ichat up stopped with exit code {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

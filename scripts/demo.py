"""Start `ichat serve` on a model, send one chat completion with `openai`, stop cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import openai

from ichat.probe import wait_healthy
from ichat.processes import free_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--prompt", default="Hello! Who are you?")
    args = parser.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    cmd = [
        sys.executable,
        "-m",
        "ichat",
        "serve",
        "--backend",
        "vllm",
        "--port",
        str(port),
        "--model-path",
        args.model_path,
        "--served-model-name",
        "tiny-chat",
        "--context-length",
        "2048",
    ]
    print("starting:", " ".join(cmd), flush=True)
    worker = subprocess.Popen(cmd, env=env)
    try:
        ready = wait_healthy(url, worker, timeout=900)
        print(f"\nworker ready after {ready:.1f} s at {url}/v1", flush=True)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
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
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        code = worker.wait(120)
    print(f"worker stopped with exit code {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole stack on 127.0.0.1 (what `make run` starts): FastChat's controller, a dashinfer-core
worker with the embedded default model (or --model-path), and the OpenAI API server. Waits until the
model is registered, prints how to call it, and stops all three on Ctrl-C or SIGTERM.

    python -m dashinfer_fastchat.serve [--api-port 8000] [--model-path DIR] [worker options...]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import requests


def wait_for_model(api: str, processes: list[subprocess.Popen], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[2]} exited with code {proc.returncode} during start-up")
        try:
            models = requests.get(f"{api}/v1/models", timeout=2).json()["data"]
            if models:
                return models[0]["id"]
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the model did not register within {timeout:.0f} s")


def stop(processes: list[subprocess.Popen]) -> None:
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address all three servers bind")
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--controller-port", type=int, default=21001)
    parser.add_argument("--worker-port", type=int, default=21002)
    parser.add_argument("--start-timeout", type=float, default=300)
    args, worker_args = parser.parse_known_args(argv)
    env = dict(os.environ)
    env.setdefault("LOGDIR", tempfile.mkdtemp(prefix="dashinfer-fastchat-logs-"))
    controller = f"http://{args.host}:{args.controller_port}"
    worker = f"http://{args.host}:{args.worker_port}"
    api = f"http://{args.host}:{args.api_port}"
    python = sys.executable
    commands = [
        [python, "-m", "fastchat.serve.controller", "--host", args.host, "--port", str(args.controller_port)],
        [python, "-m", "dashinfer_fastchat.worker", "--host", args.host, "--port", str(args.worker_port),
         "--worker-address", worker, "--controller-address", controller, *worker_args],
        [python, "-m", "dashinfer_fastchat.openai_api_server", "--host", args.host, "--port", str(args.api_port),
         "--controller-address", controller],
    ]
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for cmd in commands:
            processes.append(subprocess.Popen(cmd, env=env))
            if cmd is commands[0]:
                time.sleep(2)  # the controller first, so the worker can register
        model = wait_for_model(api, processes, args.start_timeout)
        print(f"\nReady: model {model!r} at {api}/v1 (logs in {env['LOGDIR']}). Try:\n"
              f"  curl {api}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
              f"Ctrl-C stops all three servers.", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("a server exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        stop(processes)


if __name__ == "__main__":
    sys.exit(main())

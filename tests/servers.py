"""Start and stop real server processes on 127.0.0.1 for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output goes to a log file, stopped (with its group) on exit."""

    def __init__(self, args: list[str], log_dir: Path, name: str, env: dict | None = None):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.log = open(self.log_path, "w")
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True, cwd=log_dir)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 40) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                if self.alive():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        self.log.close()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_until(check, timeout: float, what: str, processes: list[Process] = ()) -> object:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        for p in processes:
            if not p.alive():
                raise AssertionError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")


def start_litellm_proxy(log_dir: Path, config_yaml: str) -> dict:
    """The stock `litellm --config` proxy with our provider inside, on a free port, with a fresh
    master key; our provider's engine stats served on another port. Returns base, key, stats, proc."""
    import secrets
    import shutil
    (log_dir / "config.yaml").write_text(config_yaml)
    key = "sk-" + secrets.token_hex(16)
    port, stats_port = free_port(), free_port()
    exe = shutil.which("litellm", path=os.path.dirname(sys.executable)) or "litellm"
    proc = Process([exe, "--config", str(log_dir / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                   log_dir, "proxy", env={"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                          "DASHINFER_STATS_PORT": str(stats_port)})
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(f"{base}/health/liveliness", timeout=2).ok, 120, "the proxy", [proc])
    return {"base": base, "key": key, "stats": f"http://127.0.0.1:{stats_port}", "proc": proc}


def start_fastchat_stack(log_dir: Path, worker_args: list[str], names: set[str], env: dict | None = None) -> dict:
    """FastChat's controller, our worker (`worker_args` after its address flags) and our OpenAI server
    on free ports; returns once every model name in `names` is listed. Returns api (the /v1 base),
    controller and worker (their URLs), worker_proc, and procs (stop them in reverse order)."""
    env = {"LOGDIR": str(log_dir), **(env or {})}
    c_port, w_port, api_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c_port}"
    procs = [Process(python_module("fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)),
                     log_dir, "controller", env)]
    try:
        wait_until(lambda: requests.get(f"{controller}/test_connection", timeout=2).ok, 60, "controller", procs)
        procs.append(Process(python_module("dashinfer_fastchat.worker", "--host", "127.0.0.1", "--port", str(w_port),
                                           "--worker-address", f"http://127.0.0.1:{w_port}", "--controller-address",
                                           controller, *worker_args), log_dir, "worker", env))
        procs.append(Process(python_module("dashinfer_fastchat.openai_api_server", "--host", "127.0.0.1", "--port",
                                           str(api_port), "--controller-address", controller), log_dir, "api", env))
        api = f"http://127.0.0.1:{api_port}/v1"
        wait_until(lambda: names <= {m["id"] for m in requests.get(f"{api}/models", timeout=2).json()["data"]},
                   180, f"{sorted(names)} to register", procs)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return {"api": api, "controller": controller, "worker": f"http://127.0.0.1:{w_port}", "worker_proc": procs[1],
            "procs": procs}

"""Process and environment plumbing of the serving check: progress lines, vLLM's environment, logged child
processes with time limits, the results recorder, and a ``vllm serve`` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .compare import Check

ENTRY = "benchmarks.serve_check"
"""The serving check's module: each part and each 7b load is a child process ``python -m ENTRY --child ...``, started
from the parent's working directory (the repository root)."""
PROGRESS = "[serve_check"
"""Prefix of progress lines; parents echo them from the children's output."""
VERDICTS = {True: "PASS", False: "FAIL", None: "info"}
RESULT = "RESULT "
"""Prefix of the one JSON line a measurement subprocess prints."""

VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not staged on the GPU host
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the forked engine-core process of vllm.LLM hangs at start-up there
    "VLLM_HOST_IP": "127.0.0.1",
    "TVM_FFI_DISABLE_TORCH_C_DLPACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",  # the OpenAI client and urllib must not send local requests to a proxy
    "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}
"""Environment the staged vLLM 0.26 needs on the GPU host (its wheel list's header); set before importing vllm."""

SERVED_NAME = "falqon-smollm2"


_START = time.time()


def say(message: str) -> None:
    """A timestamped progress line (parents echo these from their children's logs)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"{PROGRESS} {stamp} +{time.time() - _START:5.0f}s] {message}", flush=True)


def set_vllm_env() -> None:
    """Apply :data:`VLLM_ENV` where not already set; call before importing vllm."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)


def run_logged(
    cmd: Sequence[str], log_path: Path, timeout: float, *, env: Mapping[str, str] | None = None, group: bool = False
) -> tuple[int | None, list[str]]:
    """Run ``cmd`` with its output in ``log_path``, echoing progress lines; kill it after ``timeout`` seconds.

    Args:
        group: start it in a new process group and kill the whole group at the end (its leftovers too).

    Returns:
        The exit status (``None`` on timeout) and the payloads of its ``RESULT`` lines.
    """
    results: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env=dict(env) if env is not None else None, start_new_session=group,
        )  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(PROGRESS):
                    print(line, end="", flush=True)
                elif line.startswith(RESULT):
                    results.append(line[len(RESULT) :].strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            proc.kill()
        finally:
            if group:
                _kill_group(proc.pid)
            proc.wait()
            reader.join(timeout=10)  # a leftover grandchild may still hold the pipe; the log is complete enough
    return code, results


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class Recorder:
    """A part's results as JSON, rewritten after every update so that a killed part leaves what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stage": "start", "checks": []}

    def update(self, **values: Any) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def stage(self, name: str) -> None:
        say(name)
        self.update(stage=name)

    def check(self, check: Check) -> None:
        verdict = VERDICTS[check.passed]
        say(f"check {check.name}: {check.value} ({check.limit}) {verdict} {check.note}")
        self.update(checks=[*self.data["checks"], asdict(check)])


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(folder: Path, port: int, gpu_memory_utilization: float) -> list[str]:
    """``vllm serve`` on 127.0.0.1, eager (no compile: quick start), vLLM's neutral sampling defaults, no prefix
    caching (a cached prefix is reused from an earlier request's prefill, another kernel path: near-tied greedy
    tokens then flip against the offline engine, which saw other requests)."""
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(folder),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--gpu-memory-utilization", str(gpu_memory_utilization), "--max-model-len", "1024",
        "--enforce-eager", "--generation-config", "vllm", "--disable-uvicorn-access-log",
        "--no-enable-prefix-caching",
    ]  # fmt: skip


def serve_env() -> dict[str, str]:
    """:data:`VLLM_ENV` under this environment, plus spawn for the engine core where no start method is set.

    ``vllm serve`` always runs its engine core in a child process (its async engine has no in-process mode), so
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` cannot help there; spawn (the CLI's own default) avoids a fork.
    """
    return {**VLLM_ENV, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **os.environ}


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> str | None:
    """Poll ``/health`` until it answers 200; returns ``None`` when up, else why not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return f"server exited with status {proc.returncode} before becoming healthy"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(1)
    return f"no healthy /health within {timeout:.0f} s"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (vLLM shuts its engine core down), then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

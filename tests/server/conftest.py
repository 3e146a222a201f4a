"""A real `spruce serve` in a subprocess on a free loopback port, started and stopped by the tests."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
BASE_ARGS = ["smollm2-135m", "--dtype", "float32", "--kv-cache-memory", "256MiB", "--disable-uvicorn-access-log",
             "--uvicorn-log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="spruce-serve-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPRUCE_API_KEY": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "spruce.cli", "serve", *BASE_ARGS, "--port",
                                      str(self.port), *extra], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._wait_healthy(timeout=180)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def engine_pid(self) -> int:
        """The engine process: the server's spawned child (not multiprocessing's resource tracker)."""
        for pid in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return int(pid)
        raise RuntimeError("no engine process found")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--served-model-name", "smollm2-135m", "spruce-test", "--api-key", API_KEY,
                        "--max-num-seqs", "64")
    yield srv
    code = srv.stop()
    assert code == 0, srv.output()

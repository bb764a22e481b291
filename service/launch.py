"""Start raee-serve in a child process on a free loopback port: for the demo, benchmarks and reliability checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from service.client import Client

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`raee-serve --store ... --host 127.0.0.1 --port <free>`; its output goes to a temporary log file.

    admin: also an admin listener on a free loopback port (`admin_address`), reloading from `roots` (default: the
    stores' directories). drain: the SIGTERM notice period (0 here: most users of this class stop servers often)."""

    cpus: set[int] | None = None  # CPUs every server runs on (a benchmark keeps its clients off them); None = any

    def __init__(self, stores: list[str], *extra: str, grace: float = 10.0, drain: float = 0.0, admin: bool = False,
                 roots: tuple[str, ...] = (), port: int | None = None, metrics: bool = False) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.admin_port = free_port() if admin else None
        self.admin_address = f"127.0.0.1:{self.admin_port}" if admin else None
        self.metrics_port = free_port() if metrics else None
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="raee-serve-", delete=False)
        args = [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics-port", str(self.metrics_port or -1), "--grace-s", str(grace), "--drain-s", str(drain)]
        if admin:
            args += ["--admin", "true", "--admin-port", str(self.admin_port)]
        if roots:
            args += ["--store-roots", ",".join(roots)]
        args += list(extra)
        for store in stores:
            args += ["--store", store]
        cpus = self.cpus
        self.process = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def wait_serving(self, timeout: float = 300) -> bool:
        """True once health reports SERVING; False if it did not within `timeout` seconds."""
        with Client(self.address) as client:
            try:
                client.wait_until_serving(timeout)
                return True
            except TimeoutError:
                return False

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far, user and system (/proc/PID/stat fields 14 and 15)."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus page now (started with metrics=True), parsed by metric_values."""
        if self.metrics_port is None:
            raise ValueError("the server was started without metrics (ServerProcess(..., metrics=True))")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as page:
            return metric_values(page.read().decode())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain, then exit); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def metric_values(page: str) -> dict[str, float]:
    """Every sample on a Prometheus text page, by its name with labels as written (`raee_batch_size_sum`,
    `raee_stage_seconds_sum{stage="key"}`)."""
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values

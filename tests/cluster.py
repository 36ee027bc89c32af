"""A two-node Ray cluster on this machine, for the multi-node tests and benchmarks/cluster.py:
a head and a second node, each its own `ray start --block` (own raylet, own ports) in its own
session, so that one node can be killed whole while the other runs on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
HEAD_PORT_OPTIONS = ("--ray-client-server-port", "--dashboard-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports(options: tuple[str, ...]) -> list[str]:
    """Each option a port of its own: other Ray instances run on this machine (the tests' own)."""
    return [arg for option in options for arg in (option, str(free_port()))]


class LocalCluster:
    """`with LocalCluster() as c:` a head (1 CPU) and a second node (1 CPU) at `c.address`;
    `c.kill_second_node()` SIGKILLs the second node's raylet and everything it started."""

    def __init__(self, cpus_per_node: int = 1):
        self.cpus = cpus_per_node
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        self.temp = tempfile.mkdtemp(prefix="zs-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(Path(self.temp) / f"{name}.log", "w")
        node = subprocess.Popen([RAY, "start", "--block", "--num-cpus", str(self.cpus), "--disable-usage-stats",
                                 "--node-ip-address", "127.0.0.1", *ports(PORT_OPTIONS), *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        return node

    def _wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        probe = ("import ray; ray.init(address='%s', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        raise RuntimeError(f"the local cluster at {self.address} did not reach {n} nodes; logs in {self.temp}")

    def __enter__(self) -> LocalCluster:
        try:
            self._start(["--head", "--port", str(self.port), "--temp-dir", self.temp, "--include-dashboard", "false",
                         *ports(HEAD_PORT_OPTIONS)], "head")
            self._start(["--address", self.address], "second")
            self._wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _node_pids(self, node: subprocess.Popen) -> list[int]:
        """The node's process group, and the workers its raylet forked (each in a session of its own)."""
        group = [p for p in _all_pids() if _pgid(p) == node.pid]
        return group + [p for p in _all_pids() if _ppid(p) in group and p not in group]

    def kill_second_node(self) -> None:
        self._kill(self.nodes[1])

    def _kill(self, node: subprocess.Popen) -> None:
        for pid in self._node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()

    def stop(self) -> None:
        """Only this cluster's processes (never `ray stop`: it ends every Ray on the machine)."""
        for node in reversed(self.nodes):
            self._kill(node)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _stat(pid: int) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else -1


def _pgid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[2]) if fields else -1

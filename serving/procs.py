"""Start and stop emulators and routers as subprocesses on loopback (agreement script, benchmark, tests).

Every process is started by :class:`Processes` and stopped by it, by its own pid (terminate, then kill after
a grace period), so nothing outlives the caller even when it fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound then released; a race is possible but unlikely)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``GET url`` answers 200; raise with the process's output if it died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{out[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up within {timeout_s:g} s")
        time.sleep(0.05)


class Processes:
    """A group of ``deflectlab`` subprocesses; use as a context manager so they are always stopped."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir

    def start(self, args: list[str], name: str, python_args: tuple[str, ...] = (),
              module: str = "deflectlab.scripts.cli") -> subprocess.Popen:
        """Start ``python -m MODULE ARGS`` (by default ``deflectlab ARGS``); ``python_args`` go to the interpreter
        first (e.g. ``-m cProfile -o FILE``)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        else:
            out = subprocess.PIPE  # type: ignore[assignment]
        p = subprocess.Popen([sys.executable, *python_args, "-m", module, *args], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def emulator(self, port: int, role: str, time_scale: float, *extra: str, name: str | None = None
                 ) -> subprocess.Popen:
        return self.start(["emulate", "--role", role, "--port", str(port), "--time-scale", str(time_scale),
                           *extra], name or f"emulator-{role}-{port}")

    def router(self, port: int, prefill_ports: list[int], decode_ports: list[int], policy: str, *extra: str,
               python_args: tuple[str, ...] = ()) -> subprocess.Popen:
        return self.start(["route", "--port", str(port), "--prefiller-ports", *map(str, prefill_ports),
                           "--decoder-ports", *map(str, decode_ports), "--policy", policy, *extra],
                          f"router-{port}", python_args)

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """SIGKILL one process (a crash, for fault tests)."""
        p.kill()
        p.wait(timeout=10)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            if p.stdout is not None:
                p.stdout.close()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

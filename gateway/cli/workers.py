"""`gateway serve --workers N`: N gateway processes on one host, sharing one listening socket and the store.

The supervisor binds the socket once and starts each worker with the `spawn` method (a fresh interpreter: no
event loop, thread or connection is inherited), passing the socket; every worker is a full gateway and a replica
of its own in the store (its heartbeat row). SIGTERM or SIGINT to the supervisor is passed to every worker, which
drains as a single `gateway serve` does, and the supervisor exits when all have. A worker that dies while the
others serve (a crash, a kill) is started again, after a pause when it had just started; one that could not start
(status 2: the configuration was rejected; 3: uvicorn could not serve) stops them all, and its status is the
supervisor's.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Final

_PR_SET_PDEATHSIG: Final = 1  # prctl(2): the signal this process gets when its parent dies
REFUSED: Final = (2, 3)  # a worker's exit statuses for "could not start": starting it again cannot help
CRASH_LOOP_S: Final = 5.0  # a worker that dies sooner after its start is started again after a pause
POLL_S: Final = 0.2


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (the kernel spreads connections over them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(overrides: dict[str, Any], sock: socket.socket, supervisor: int) -> None:
    """One worker: a whole gateway on the shared socket (the spawned process's entry point). It leaves the
    terminal's process group (a Ctrl-C reaches the supervisor alone, which passes one SIGTERM on: a second signal
    would cut uvicorn's drain short), and dies with the supervisor (PR_SET_PDEATHSIG)."""
    from gateway.cli.run import serve_on
    from gateway.errors import ConfigError
    from gateway.settings import Settings

    os.setpgrp()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # the supervisor died before the request took effect
        sys.exit(1)
    try:
        code = serve_on(Settings(**overrides), [sock])
    except ConfigError as err:
        print(f"gateway serve: configuration rejected: {err.message}", file=sys.stderr)
        code = 2
    sys.exit(code)


class Supervisor:
    def __init__(self, overrides: dict[str, Any], workers: int, sock: socket.socket, drain_s: float) -> None:
        self._overrides = overrides
        self._sock = sock
        self._grace_s = drain_s + 10.0  # the workers end their own requests at drain_s
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[tuple[BaseProcess, float]] = [self._start() for _ in range(workers)]
        self._stopping = False

    def _start(self) -> tuple[BaseProcess, float]:
        process = self._context.Process(
            target=_worker, args=(self._overrides, self._sock, os.getpid()), daemon=False
        )
        process.start()
        return process, time.monotonic()

    def stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        if not self._stopping:
            self._stopping = True
            for process, _ in self._slots:
                if process.is_alive() and process.pid is not None:
                    _signal(process.pid, signal.SIGTERM)

    def run(self) -> int:
        """Watch the workers until they have all stopped; the exit status."""
        status = 0
        while not self._stopping:
            time.sleep(POLL_S)
            status = self._restart_dead()
            if status:
                self.stop()
        deadline = time.monotonic() + self._grace_s
        for process, _ in self._slots:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        return status

    def _restart_dead(self) -> int:
        for i, (process, started) in enumerate(self._slots):
            if process.is_alive() or self._stopping:
                continue
            code = process.exitcode or 0
            if code in REFUSED:
                _say(f"worker {i} could not start (status {code}): stopping every worker")
                return code
            _say(f"worker {i} (pid {process.pid}) exited with status {code}; starting it again")
            if time.monotonic() - started < CRASH_LOOP_S:
                time.sleep(1.0)
            self._slots[i] = self._start()
        return 0


def _say(message: str) -> None:
    print(f"gateway serve: {message}", file=sys.stderr, flush=True)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited
        os.kill(pid, signum)


def serve_workers(overrides: dict[str, Any], workers: int, host: str, port: int, drain_s: float) -> int:
    sock = bind(host, port)
    _say(f"{workers} workers listening on {host}:{port}")
    supervisor = Supervisor(overrides, workers, sock, drain_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, supervisor.stop)
    try:
        return supervisor.run()
    finally:
        sock.close()

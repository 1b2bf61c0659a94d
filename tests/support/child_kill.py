"""Run a child process and kill -9 it once it has printed a given number of lines: the crash trials of the
aggregator core (a line per step, the kill landing inside the next one)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Mapping, Sequence


def kill_after_lines(argv: Sequence[str], lines: int | None, *, delay_s: float = 0.0,
                     env: Mapping[str, str] | None = None, timeout_s: float = 120.0) -> list[str]:
    """Start ``argv`` with stdout piped; read ``lines`` lines (fewer if it ends first), sleep ``delay_s``,
    SIGKILL it and reap it. ``lines`` None: let it run to its end. Returns the lines read."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, env=dict(env) if env is not None else None,
                            text=True)
    read: list[str] = []
    try:
        if lines is not None:
            assert proc.stdout is not None
            for _ in range(lines):
                line = proc.stdout.readline()
                if not line:
                    break
                read.append(line.rstrip("\n"))
            time.sleep(delay_s)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return read

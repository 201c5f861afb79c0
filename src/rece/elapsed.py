"""How long this process has run, from its start as the operating system records it: a command's report can then say
how much of the wait was Python starting and importing libraries, apart from its own work."""

from __future__ import annotations

import os
import time

IMPORTED = time.perf_counter()  # the fallback origin where /proc is not there: when rece's clock was first imported


def process_seconds() -> float:
    """Seconds since this process started (Linux: /proc/self/stat's start time against /proc/uptime, 10 ms steps);
    elsewhere since this module was imported, which leaves out the interpreter's own start."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): start time in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - IMPORTED
    return max(0.0, uptime - started)


_origin: float | None = None  # perf_counter() when the running command began, when it is not its process's own


def begin_command(own_process: bool) -> None:
    """Mark where the running command's wait began: at the process start for a `rece` process, else now (`main([...])`
    called inside a running Python, whose earlier work is not this command's)."""
    global _origin
    _origin = None if own_process else time.perf_counter()


def waited() -> float:
    """Seconds the user has waited for the running command so far."""
    return process_seconds() if _origin is None else time.perf_counter() - _origin

"""What the kernel spent on this process: system CPU time and page faults (POSIX ``getrusage``).

A process's first touches of memory fault its pages in, paid in the kernel's CPU time: a run in a fresh
process (a server's first, a tracing process just started) pays them, a warm one mostly not. Where
``getrusage`` is missing (Windows), both read zero.
"""

from __future__ import annotations

from typing import Any

resource: Any
try:
    import resource
except ImportError:  # not POSIX
    resource = None


def kernel_usage() -> tuple[float, int]:
    """System CPU seconds and page faults (minor and major) of this process so far."""
    if resource is None:
        return 0.0, 0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return float(ru.ru_stime), int(ru.ru_minflt + ru.ru_majflt)

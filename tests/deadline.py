"""hard_timeout: interrupt a block that runs too long, so a test of "never hangs" fails instead
of hanging the suite."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Hung(Exception):
    """The block ran past its deadline."""


@contextlib.contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """Raise Hung in the main thread after `seconds` (SIGALRM: a pure-Python loop cannot ignore
    it; a DataLoader waiting on its workers is interrupted too)."""

    def fire(*_: object) -> None:
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

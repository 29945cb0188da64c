"""The lock that orders an engine's callers (image and text engines alike).

`FairLock` hands the engine to its callers in arrival order; a long job (gate training) calls
`yield_to_waiters()` between steps, so a visitor's compare waits at most one training step.
"""
from __future__ import annotations

import threading


class FairLock:
    """A reentrant lock handed over in arrival order (a ticket lock).

    `yield_to_waiters()` lets a long job (gate training) step aside between steps: everyone who asked for
    the lock before gets it first, then the job goes on. Python's own locks promise no order, so a thread
    that releases and re-acquires would usually win again.
    """
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner, self._depth = None, 0
        self._next, self._serving = 0, 0          # tickets handed out / the ticket being served

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._owner is None and self._serving == ticket)
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it.")
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._serving = None, self._serving + 1
                self._cond.notify_all()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def waiting(self) -> int:
        """Threads queued for the lock."""
        with self._cond:
            return self._next - self._serving - (self._owner is not None)

    def yield_to_waiters(self) -> bool:
        """Held by this thread: if anyone waits, release fully, queue again, and return True once back."""
        if not self.waiting():
            return False
        with self._cond:
            depth, self._depth = self._depth, 1
        self.release()
        self.acquire()
        with self._cond:
            self._depth = depth
        return True



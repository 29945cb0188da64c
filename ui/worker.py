"""A job in a thread whose progress a generator can yield while it runs (the app's long events)."""
from __future__ import annotations

import queue
import threading


class StepWorker:
    """Runs `work(on_step)` in a thread so a generator can yield while it runs.

    Iterating gives the arguments of every on_step call as they come; afterwards `result` holds what
    `work` returned (an exception inside `work` is raised again by the iteration).
    """

    def __init__(self, work):
        self._items: queue.Queue = queue.Queue()
        self.result, self._error, self.running = None, None, True
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work):
        try:
            self.result = work(lambda *args: self._items.put(args))
        except BaseException as err:  # handed to the iterating thread, never swallowed
            self._error = err
        finally:
            self.running = False
            self._items.put(None)

    def __iter__(self):
        while (item := self._items.get()) is not None:
            yield item
        if self._error is not None:
            raise self._error

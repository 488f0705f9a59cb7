"""One thread for a server's torch work: loading, measuring and decoding.

torch computes in parallel through libgomp (OpenMP), which keeps a team of threads per
calling thread and lets idle team threads spin, ready for the next parallel region, only
while it manages no more threads than there are cores. Once a second thread has run parallel
work (the main thread loading the model, then the engine's worker decoding) every region
puts its team to sleep and wakes it through the kernel. Measured on 2 cores: a small matmul
15 -> 72 us, a lone served request at 0.58x `hasten generate`. So `hasten serve` loads,
measures and decodes on one `ComputeThread`, and the main thread only runs the event loop.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class ComputeThread:
    """A daemon thread running the callables given to it, one after another."""

    def __init__(self, name: str = "hasten-compute"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on this thread; its result, or its exception raised here."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """End the thread once the jobs given so far have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

"""Stand-in peers for the bench's process isolation tests (built in a child process)."""

import os
import signal
import sys
import time


def build(settings: dict):
    behaviour = settings["behaviour"]
    if behaviour == "refuse":
        raise RuntimeError("cannot build this peer")

    def run(prompt):
        if behaviour == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if behaviour == "exit":
            print("dying on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if behaviour == "hang":
            time.sleep(3600)
        return list(reversed(prompt)), 0.01, {"pid": os.getpid()}
    return run

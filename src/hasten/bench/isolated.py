"""A bench method run in a child process, so that a crash, a hang or a missing library costs
that method its row and nothing else (llama-cpp-python built with the wrong CPU kernels dies
with signal 11 in its first generation and used to take the whole bench down).

Parent side: `IsolatedMethod(settings)` is a `Method`; it starts
`python -m hasten.bench.isolated`, sends the settings as one JSON line, then one line per
prompt, and reads one JSON line back per prompt. A child that dies, answers nothing within
`timeout` seconds or cannot build its method raises `MethodFailed` with the reason
("failed: signal 11 (SIGSEGV)", "timed out after 600 s", ...).

Child side: `main()` builds the method with `settings["factory"]` ("module:function", default
the peers' `build_peer`) and serves prompts until stdin closes.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading

from ..errors import HastenError

DEFAULT_FACTORY = "hasten.bench.peers:build_peer"


class MethodFailed(HastenError):
    """A method could not run (its process died, hung or refused): the reason is the text."""


class IsolatedMethod:
    def __init__(self, settings: dict, timeout: float = 600.0, start_timeout: float = 600.0):
        self.settings = {"factory": DEFAULT_FACTORY, **settings}
        self.timeout, self.start_timeout = timeout, start_timeout
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.failure: str | None = None

    def _start(self) -> None:
        self.errors = tempfile.TemporaryFile(mode="w+")  # the child's stderr, for the reason
        self.proc = subprocess.Popen([sys.executable, "-m", "hasten.bench.isolated"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        self._send(self.settings)
        self._receive(self.start_timeout)  # {"ready": true} once the method is built

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the child exited

    def _send(self, obj) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; _receive reports why

    def _receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self._fail(f"timed out after {timeout:.0f} s")
        if line is None:
            self._fail(self._death())
        reply = json.loads(line)
        if "error" in reply:
            self._fail(reply["error"])
        return reply

    def _death(self) -> str:
        code = self.proc.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown"
            return f"failed: signal {-code} ({name})"
        self.errors.seek(0)
        last = [line for line in self.errors.read().splitlines() if line.strip()][-1:]
        return f"failed: exit status {code}" + (f": {last[0]}" if last else "")

    def _fail(self, reason: str):
        self.failure = reason
        self.close()
        raise MethodFailed(reason)

    def __call__(self, prompt: list[int]):
        if self.failure:
            raise MethodFailed(self.failure)
        if self.proc is None:
            self._start()
        self._send({"prompt": list(prompt)})
        reply = self._receive(self.timeout)
        return reply["tokens"], reply["seconds"], reply.get("info", {})

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # only protocol lines go to the parent
    settings = json.loads(sys.stdin.readline())
    if settings.get("threads"):
        import torch
        torch.set_num_threads(settings["threads"])
    try:
        module, function = settings["factory"].split(":")
        method = getattr(importlib.import_module(module), function)(settings)
    except Exception as e:  # noqa: BLE001 - reported as the method's failure
        out.write(json.dumps({"error": f"failed: {type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        tokens, seconds, *info = method(json.loads(line)["prompt"])
        out.write(json.dumps({"tokens": [int(t) for t in tokens], "seconds": seconds,
                              "info": info[0] if info else {}}) + "\n")
        out.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Graceful SIGTERM (D8): a real server process (`serve_gated.py`) with its generation held at a
gate, so "still generating" never depends on the machine's speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
STREAM = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "temperature": 0,
          "stream": True}


class Child:
    def __init__(self, folder: Path, shutdown_timeout: float, gate_after: int = 3):
        self.folder = folder
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "serve_gated.py"), str(folder),
                                      str(shutdown_timeout), str(gate_after)], env=env,
                                     stderr=subprocess.PIPE, text=True)
        self.wait_for_file("port", 60)
        self.url = f"http://127.0.0.1:{(folder / 'port').read_text()}"
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline and self.proc.poll() is None, "server never answered"
                time.sleep(0.05)

    def wait_for_file(self, name: str, seconds: float = 120) -> None:  # a busy machine is slow
        deadline = time.time() + seconds
        while not (self.folder / name).exists():
            assert self.proc.poll() is None, f"server exited: {self.proc.stderr.read()}"
            assert time.time() < deadline, f"{name} never appeared"
            time.sleep(0.02)

    def wait_for_draining(self) -> None:
        deadline = time.time() + 20
        while httpx.get(f"{self.url}/health", timeout=5).status_code != 503:
            assert time.time() < deadline, "the server never started draining"
            time.sleep(0.02)

    def exit_status(self, seconds: float) -> int:
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the server did not exit within {seconds} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def child_factory(tmp_path):
    children = []

    def make(**kwargs) -> Child:
        folder = tmp_path / str(len(children))
        folder.mkdir()
        children.append(Child(folder, **kwargs))
        return children[-1]
    yield make
    for c in children:
        c.kill()


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(child_factory):
    child = child_factory(shutdown_timeout=30)
    with httpx.stream("POST", f"{child.url}/v1/chat/completions", json=STREAM, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has started
        child.wait_for_file("held")  # ... and is generating, held at the gate
        child.proc.send_signal(signal.SIGTERM)
        child.wait_for_draining()
        refused = httpx.post(f"{child.url}/v1/chat/completions", json={**STREAM, "stream": False})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        (child.folder / "open").touch()
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    final = json.loads(rest[-2])
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 30  # it finished, not cut off
    assert child.exit_status(30) == 0


def test_streams_still_running_at_the_shutdown_timeout_are_cancelled(child_factory):
    child = child_factory(shutdown_timeout=0.5)
    with httpx.stream("POST", f"{child.url}/v1/chat/completions", json=STREAM, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        child.wait_for_file("held")  # the gate is never opened
        child.proc.send_signal(signal.SIGTERM)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "shutting_down"
    assert child.exit_status(30) == 0


def test_a_second_sigterm_exits_at_once(child_factory):
    child = child_factory(shutdown_timeout=120)
    with httpx.stream("POST", f"{child.url}/v1/chat/completions", json=STREAM, timeout=30) as r:
        # Keep the line iterator: a dropped one may be closed when collected, and a closed
        # stream is a client that left, whose request the server cancels before the gate.
        lines = r.iter_lines()
        next(lines)
        child.wait_for_file("held")
        child.proc.send_signal(signal.SIGTERM)
        child.wait_for_draining()
        child.proc.send_signal(signal.SIGTERM)
        assert child.exit_status(20) == 1  # long before the 120 s drain would have ended


def test_an_idle_server_exits_on_sigterm_with_status_0(child_factory):
    child = child_factory(shutdown_timeout=30)
    child.proc.send_signal(signal.SIGTERM)
    assert child.exit_status(30) == 0

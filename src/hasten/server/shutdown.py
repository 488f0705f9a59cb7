"""Running the app under uvicorn with a graceful SIGTERM (and Ctrl-C).

First signal: the server stops admitting (new requests get 503 `shutting_down`, /health
answers 503 "draining", queued requests are refused), lets the requests that are generating
finish for up to `shutdown_timeout` seconds, then ends the rest with a 503 error (mid-stream:
an error event) and exits with status 0. A second signal exits at once (status 1).

uvicorn's own handler would stop at once on SIGTERM (and re-raise it after shutdown, so the
process dies of it), and ignore a second SIGTERM; this replaces it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import uvicorn

FORCED_EXIT_STATUS = 1
BACKSTOP_S = 5.0  # after the drain, what uvicorn still waits for open connections


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, shutdown_timeout: float):
        super().__init__(config)
        self.hasten_app = app
        self.shutdown_timeout = shutdown_timeout
        self.draining = False

    def handle_exit(self, sig, frame) -> None:  # called in the main thread by the signal
        if self.draining:
            print("hasten serve: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(FORCED_EXIT_STATUS)
        self.draining = True
        threading.Thread(target=self._drain, name="hasten-drain", daemon=True).start()

    def _drain(self) -> None:
        app, engine = self.hasten_app, self.hasten_app.state.engine
        app.state.draining = True
        engine.cancel_queued()
        print(f"hasten serve: shutting down: {engine.active} requests generating, "
              f"{self.shutdown_timeout:g} s to finish (signal again to exit now)",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.shutdown_timeout
        while (engine.active or engine.queued) and time.monotonic() < deadline:
            time.sleep(0.02)
        if engine.active:
            print(f"hasten serve: cancelling {engine.active} requests still generating",
                  file=sys.stderr, flush=True)
            engine.cancel_running()
        self.should_exit = True


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
               shutdown_timeout: float = 10.0, sockets=None) -> None:
    """Serve `app` (from `create_app`) until a signal, then shut down gracefully."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=BACKSTOP_S)
    GracefulServer(config, app, shutdown_timeout).run(sockets=sockets)

"""`hasten serve`: an OpenAI-compatible HTTP server with streaming and speculative decoding.

    hasten serve --draft lookup --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

One model, one KV cache: requests queue and are served in turn (`engine.py`); the wire format
lives in `protocol.py`, the routes in `app.py`.
"""

from __future__ import annotations

API_KEY_ENV = "HASTEN_API_KEY"


def create_app(*args, **kwargs):
    """See `hasten.server.app.create_app` (imported lazily: FastAPI is only needed to serve)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)

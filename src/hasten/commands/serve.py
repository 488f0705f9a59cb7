"""`hasten serve`: the OpenAI-compatible HTTP server (see `hasten.server`)."""

from __future__ import annotations

import os
import sys

from ..errors import HastenError
from ..server import API_KEY_ENV
from .common import add_draft_args, add_model_args, draft_spec, load_model


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat/completions, streaming)",
        description="Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions "
                    "and /v1/completions (stream: true for server-sent events), GET /v1/models and "
                    "/health. Requests are served one at a time, in arrival order. A request may "
                    "pick its own drafter with the extra field \"draft\"; answers carry speculative "
                    "statistics in a \"hasten\" object.")
    add_model_args(s)
    add_draft_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; "
                        "unset = no key)")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait while one generates; more get 429 with "
                        "Retry-After at once (default: no limit)")
    s.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default: 1 MiB)")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (one line per request is always printed to stderr)")
    s.set_defaults(run=run)


def run(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise HastenError("hasten serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from ..server import create_app
    if not 0 <= args.port < 65536:
        raise HastenError(f"--port must be in 0..65535, got {args.port}")
    spec = draft_spec(args)
    model = load_model(args)
    drafter = model.drafter(spec)
    if drafter is not None and args.tree_size is None:
        model.cost_curve()  # measured once (cached on disk), not during the first request
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.max_queue is not None and args.max_queue < 0:
        raise HastenError("--max-queue must be >= 0")
    app = create_app(model, api_key=api_key, draft=spec, tree_size=args.tree_size,
                     typical=args.typical, max_queue=args.max_queue,
                     max_request_bytes=args.max_request_bytes)
    print(f"hasten serve: {model.name} (context {model.max_positions}, draft {args.draft}) on "
          f"http://{args.host}:{args.port}/v1{' (API key required)' if api_key else ''}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)

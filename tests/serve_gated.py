"""A tiny model served in a child process, for the shutdown tests (`test_server_shutdown.py`).

    python serve_gated.py DIR SHUTDOWN_TIMEOUT GATE_AFTER

Writes DIR/port once listening. Generation holds at its GATE_AFTER-th step (a batched step or a
lone request's on the solo engine), writing DIR/held, until the file DIR/open exists, so a test
can signal the server while a request is demonstrably still generating, on any machine."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import torch

from hasten.api import Model
from hasten.models.llama import build_llama
from hasten.server import create_app
from hasten.server.shutdown import run_server
from tiny import char_tokenizer, hf_reference, tiny_config


def main(folder: Path, shutdown_timeout: float, after: int) -> None:
    torch.set_num_threads(1)
    tok = char_tokenizer()
    cfg = tiny_config(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=None,
                      eos_token_ids=(tok.eos_token_id,))
    backbone = build_llama(cfg, hf_reference(cfg, 0, torch.float32).state_dict())
    model = Model(backbone, tok, name="tiny", max_positions=256, stop_ids=())
    app = create_app(model, log=False)
    engine = app.state.engine
    calls = [0]

    def gate(step):
        def gated(*args):
            calls[0] += 1
            if calls[0] == after:
                (folder / "held").touch()
                deadline = time.time() + 60
                while not (folder / "open").exists() and time.time() < deadline:
                    time.sleep(0.01)
            return step(*args)
        return gated
    engine._step = gate(engine._step)  # noqa: SLF001 - batched steps
    engine._solo_step = gate(engine._solo_step)  # noqa: SLF001 - a lone request's steps
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    (folder / "port.tmp").write_text(str(sock.getsockname()[1]))
    (folder / "port.tmp").rename(folder / "port")
    run_server(app, shutdown_timeout=shutdown_timeout, sockets=[sock])


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))

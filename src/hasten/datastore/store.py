"""The datastore file and its lookups: a token corpus and its suffix array, memory-mapped.

The corpus is the documents' tokens, each document followed by a **separator** whose id is the
vocabulary size (no real token has it), so a continuation read out of it stops at its
document's end.

Lookup: `find(pattern)` narrows to the suffix-array range of the pattern's first token (a
bucket table), then binary-searches the rest; `longest_match(context)` binary-searches the
suffix length too (if the last m tokens occur, so do the last m - 1).

File format (version 1), one file so that replacing it is one atomic rename:

    64-byte prefix: b"HASTENDS", u32 version, u32 0, u64 header length, u64 data start,
                    sha256 of the header
    header: JSON metadata (tokenizer identity, vocabulary size, separator, counts, sources,
            and per array: dtype, length, offset from the data start, size and sha256)
    data (4096-aligned): tokens (uint16 when vocabulary + separator fit, else uint32),
            suffix array (int32 below 2^31 tokens, else int64), buckets (int64, vocab + 2)

Opening checks the prefix, the header checksum, the file size against the header (truncation)
and the arrays' invariants, then memory-maps the arrays: every process that opens the same
datastore shares one copy in the page cache. `verify()` (or `hasten datastore info --verify`)
also checks every array's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import HastenError

FORMAT_VERSION = 1
MAGIC = b"HASTENDS"
_PREFIX = struct.Struct("<8sIIQQ32s")  # 64 bytes
_ALIGN = 4096
_CHUNK = 1 << 24  # elements per chunk in whole-array passes (bounds temporary memory)


class DatastoreError(HastenError):
    """A datastore that cannot be built, read or used with this model."""


# ---- tokenizer identity ----------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (every token string and its id, added tokens too)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:24]


def tokenizer_vocab_size(tokenizer) -> int:
    """One more than the largest token id the tokenizer can produce."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id and the separator (= vocab_size) fit in 16 bits, else uint32."""
    if vocab_size <= 0xFFFF:
        return np.dtype("<u2")
    if vocab_size <= 0xFFFFFFFE:
        return np.dtype("<u4")
    raise DatastoreError(f"a vocabulary of {vocab_size} tokens does not fit in 32-bit token ids")


# ---- the datastore ---------------------------------------------------------------------------

class Datastore:
    """A memory-mapped datastore. Open with `Datastore.open(path, tokenizer=...)`."""

    def __init__(self, path: Path | None, meta: dict, tokens: np.ndarray, suffix: np.ndarray,
                 buckets: np.ndarray):
        self.path, self.meta = path, meta
        self.tokens, self.suffix, self.buckets = tokens, suffix, buckets
        self.separator = int(meta["separator"])
        self.vocab_size = int(meta["tokenizer"]["vocab_size"])

    @property
    def num_tokens(self) -> int:
        """Corpus tokens, separators excluded."""
        return self.tokens.size - self.num_documents

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def __repr__(self) -> str:
        return (f"Datastore({str(self.path)!r}, {self.num_tokens} tokens, "
                f"{self.num_documents} documents, tokenizer {self.meta['tokenizer'].get('name')})")

    # ---- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, tokenizer=None, verify: bool = False) -> Datastore:
        """Map the datastore at `path`. With `tokenizer`, refuse a datastore built for another
        tokenizer. `verify` also checks every array's sha256 (reads the whole file)."""
        path = Path(path)
        meta, data_start = _read_header(path)
        size = path.stat().st_size
        end = data_start + max(a["offset"] + a["nbytes"] for a in meta["arrays"].values())
        if size < end:
            raise DatastoreError(f"datastore {path} is truncated ({size} of {end} bytes): it "
                                 "was not completely written or copied; rebuild it")
        if size > end:
            raise DatastoreError(f"datastore {path} has {size - end} unexpected bytes after its "
                                 "data: it is damaged; rebuild it")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        arrays = {}
        for name in ("tokens", "suffix", "buckets"):
            a = meta["arrays"][name]
            arrays[name] = np.frombuffer(mm, dtype=np.dtype(a["dtype"]), count=a["length"],
                                         offset=data_start + a["offset"])
        store = cls(path, meta, arrays["tokens"], arrays["suffix"], arrays["buckets"])
        store._check_structure()
        if verify:
            store.verify()
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        return store

    def _check_structure(self) -> None:
        """Cheap invariants that a damaged file would likely break."""
        t, sa, b, sep, n = self.tokens, self.suffix, self.buckets, self.separator, self.tokens.size
        problems = []
        if sa.size != n or b.size != sep + 2:
            problems.append("array lengths disagree")
        elif n and int(t[-1]) != sep:
            problems.append("the corpus does not end with a separator")
        elif int(b[0]) != 0 or int(b[-1]) != n or bool((np.diff(b) < 0).any()):
            problems.append("the bucket table is not a cumulative count")
        elif int(b[sep + 1] - b[sep]) != self.num_documents:
            problems.append("the separator count differs from the document count")
        elif n:
            probe = np.linspace(0, n - 1, num=min(n, 257)).astype(np.int64)
            starts = sa[probe].astype(np.int64)
            if bool(((starts < 0) | (starts >= n)).any()):
                problems.append("the suffix array points outside the corpus")
            elif bool((t[starts] != np.searchsorted(b, probe, side="right") - 1).any()):
                problems.append("the suffix array disagrees with the bucket table")
        if problems:
            raise DatastoreError(f"datastore {self.path} is damaged ({problems[0]}); rebuild it")

    def verify(self) -> None:
        """Check every array against the sha256 recorded when it was built."""
        for name, array in (("tokens", self.tokens), ("suffix", self.suffix),
                            ("buckets", self.buckets)):
            if _sha256(array) != self.meta["arrays"][name]["sha256"]:
                raise DatastoreError(f"datastore {self.path}: the {name} array fails its "
                                     "checksum: the file is damaged; rebuild it")

    def check_tokenizer(self, tokenizer, model_name: str | None = None) -> None:
        """Refuse use with a tokenizer other than the one the datastore was built with."""
        built = self.meta["tokenizer"]
        if tokenizer_fingerprint(tokenizer) != built["fingerprint"]:
            who = f"{model_name}'s tokenizer" if model_name else "this tokenizer"
            raise DatastoreError(
                f"datastore {self.path} was built with a different tokenizer "
                f"({built.get('name') or 'unnamed'}, vocabulary {built['vocab_size']}, "
                f"fingerprint {built['fingerprint']}) than {who} (vocabulary "
                f"{tokenizer_vocab_size(tokenizer)}, fingerprint "
                f"{tokenizer_fingerprint(tokenizer)}); its token ids would mean other words. "
                f"Rebuild it for this model: hasten datastore build ... --model <this model>")

    # ---- lookup ------------------------------------------------------------------------------

    def _lower_bound(self, lo: int, hi: int, rest: list[int], after: bool) -> int:
        """First index in [lo, hi), all of whose suffixes share a first token, whose suffix
        continues with something >= `rest` (> `rest` when `after`)."""
        toks, sa, k = self.tokens, self.suffix, len(rest)
        while lo < hi:
            mid = (lo + hi) >> 1
            p = sa.item(mid) + 1
            s = toks[p:p + k].tolist()
            if s < rest or (after and s == rest):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _first_match(self, pattern: list[int]) -> tuple[int, int]:
        """(lower bound, bucket end) for `pattern`; the lower bound is < end iff it occurs."""
        t = pattern[0]
        lo, hi = int(self.buckets[t]), int(self.buckets[t + 1])
        rest = pattern[1:]
        if not rest or lo >= hi:
            return lo, hi
        a = self._lower_bound(lo, hi, rest, after=False)
        if a < hi:
            p = int(self.suffix[a]) + 1
            if self.tokens[p:p + len(rest)].tolist() == rest:
                return a, hi
        return hi, hi

    def find(self, pattern: Sequence[int]) -> tuple[int, int]:
        """Suffix-array range [lo, hi) of the occurrences of `pattern` (empty: lo == hi)."""
        pattern = [int(t) for t in pattern]
        if not pattern or min(pattern) < 0 or max(pattern) >= self.separator:
            return 0, 0
        lo, end = self._first_match(pattern)
        if lo >= end or len(pattern) == 1:
            return lo, end
        return lo, self._lower_bound(lo, end, pattern[1:], after=True)

    def occurrences(self, pattern: Sequence[int]) -> np.ndarray:
        """Sorted corpus positions where `pattern` starts."""
        lo, hi = self.find(pattern)
        return np.sort(self.suffix[lo:hi].astype(np.int64))

    def longest_match(self, context: Sequence[int], max_len: int = 16,
                      min_len: int = 1) -> tuple[int, int, int]:
        """(m, lo, hi): the longest m in [min_len, max_len] such that the last m tokens of
        `context` occur, with their suffix-array range; (0, 0, 0) when none does."""
        q = [int(t) for t in context[-max_len:]] if max_len > 0 else []
        for j in range(len(q) - 1, -1, -1):  # a token the corpus cannot hold ends the query
            if not 0 <= q[j] < self.separator:
                q = q[j + 1:]
                break
        found: dict[int, tuple[int, int]] = {}
        good, bad = min_len - 1, len(q) + 1  # invariant: last `good` occur (or good < min_len)
        while bad - good > 1:
            m = (good + bad) >> 1
            lo, end = self._first_match(q[-m:])
            if lo < end:
                good, found[m] = m, (lo, end)
            else:
                bad = m
        if good < max(min_len, 1):
            return 0, 0, 0
        lo, end = found.get(good) or self._first_match(q[-good:])
        hi = end if good == 1 else self._lower_bound(lo, end, q[-good + 1:], after=True)
        return good, lo, hi

    def sample(self, lo: int, hi: int, max_count: int | None = None) -> np.ndarray:
        """Corpus positions of suffixes lo..hi-1 (int64), evenly spread over the range when
        there are more than `max_count`; in suffix-array order."""
        count = hi - lo
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        if max_count is not None and count > max_count:
            return self.suffix[lo + (np.arange(max_count) * count) // max_count].astype(np.int64)
        return self.suffix[lo:hi].astype(np.int64)

    def read(self, positions: np.ndarray, depth: int) -> np.ndarray:
        """Int64 [len(positions), depth]: the tokens from each position on, with everything
        from the first separator on set to the separator (nothing past a document's end)."""
        if depth <= 0 or len(positions) == 0:
            return np.empty((len(positions), max(depth, 0)), dtype=np.int64)
        pos = np.minimum(np.asarray(positions, dtype=np.int64)[:, None] + np.arange(depth),
                         self.tokens.size - 1)  # the corpus ends with a separator
        rows = self.tokens[pos].astype(np.int64)
        ended = np.logical_or.accumulate(rows >= self.separator, axis=1)
        rows[ended] = self.separator
        return rows

    def continuations(self, lo: int, hi: int, offset: int, depth: int,
                      max_count: int | None = None) -> np.ndarray:
        """Int64 [k, depth]: the `depth` tokens after position `offset` of suffixes lo..hi-1,
        evenly sampled down to `max_count` rows, in suffix-array (lexicographic) order.
        Everything from a row's first separator on is the separator."""
        return self.read(self.sample(lo, hi, max_count) + offset, depth)

    def documents(self) -> Iterator[np.ndarray]:
        """The documents' token arrays, in corpus order (for inspection and tests)."""
        ends = np.flatnonzero(self.tokens == self.separator)
        start = 0
        for end in ends:
            yield self.tokens[start:end]
            start = int(end) + 1


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
                raise DatastoreError(f"{path} is not a hasten datastore (build one with "
                                     "`hasten datastore build`)")
            magic, version, _, header_len, data_start, digest = _PREFIX.unpack(prefix)
            if version != FORMAT_VERSION:
                raise DatastoreError(f"datastore {path} has format version {version}; this "
                                     f"hasten reads version {FORMAT_VERSION}: rebuild it")
            header = f.read(header_len)
    except FileNotFoundError:
        raise DatastoreError(f"datastore {path} does not exist; build one with "
                             "`hasten datastore build SOURCE... --output PATH`") from None
    except IsADirectoryError:
        raise DatastoreError(f"{path} is a folder, not a datastore file") from None
    if len(header) < header_len:
        raise DatastoreError(f"datastore {path} is truncated (its header is cut off); rebuild it")
    if hashlib.sha256(header).digest() != digest:
        raise DatastoreError(f"datastore {path} is damaged (its header fails its checksum); "
                             "rebuild it")
    return json.loads(header), data_start


def _sha256(array: np.ndarray) -> str:
    h = hashlib.sha256()
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        h.update(memoryview(np.ascontiguousarray(flat[start:start + _CHUNK])).cast("B"))
    return h.hexdigest()


def _align(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def write_datastore(path: str | os.PathLike, tokens: np.ndarray, suffix: np.ndarray,
                    buckets: np.ndarray, meta: dict) -> Path:
    """Write the arrays and metadata to `path` atomically (temporary file + rename)."""
    path = Path(path)
    arrays = {"tokens": tokens, "suffix": suffix, "buckets": buckets}
    layout, offset = {}, 0
    for name, a in arrays.items():
        a = arrays[name] = np.ascontiguousarray(a).reshape(-1)
        layout[name] = {"dtype": a.dtype.str, "length": int(a.size), "offset": offset,
                        "nbytes": int(a.nbytes), "sha256": _sha256(a)}
        offset = _align(offset + a.nbytes, 64)
    header = json.dumps({**meta, "arrays": layout}, indent=1).encode()
    data_start = _align(_PREFIX.size + len(header), _ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), data_start,
                                 hashlib.sha256(header).digest()))
            f.write(header)
            for name, a in arrays.items():
                f.seek(data_start + layout[name]["offset"])
                for start in range(0, a.size, _CHUNK):
                    f.write(memoryview(a[start:start + _CHUNK]).cast("B"))
            f.truncate(data_start + max(x["offset"] + x["nbytes"] for x in layout.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""The REST datastore: suffix array, retrieval, the on-disk format and its errors, building
from text sources. Everything is checked against naive definitions on small random corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from hasten.datastore import build as dsmod
from hasten.datastore import store as storemod
from hasten.datastore import (Datastore, DatastoreError, build_datastore, build_from_token_lists,
                              suffix_array, token_dtype, tokenizer_fingerprint)

# ---- helpers ---------------------------------------------------------------------------------


def naive_suffix_array(t) -> list[int]:
    t = list(map(int, t))
    return sorted(range(len(t)), key=lambda i: t[i:])


def random_docs(seed: int, vocab: int, count: int = 12, max_len: int = 30, values=None):
    rng = np.random.default_rng(seed)
    values = np.arange(vocab) if values is None else np.asarray(values)
    return [rng.choice(values, size=int(rng.integers(1, max_len))).tolist() for _ in range(count)]


def naive_occurrences(docs, pattern):
    """(document, offset) of every occurrence inside a document."""
    m = len(pattern)
    return [(d, o) for d, doc in enumerate(docs) for o in range(len(doc) - m + 1)
            if doc[o:o + m] == list(pattern)]


def naive_continuations(docs, pattern, depth):
    return sorted(tuple(docs[d][o + len(pattern):o + len(pattern) + depth])
                  for d, o in naive_occurrences(docs, pattern))


def cut(row, sep):
    row = [int(x) for x in row]
    return tuple(row[:row.index(sep)] if sep in row else row)


def doc_starts(docs):
    starts, pos = [], 0
    for doc in docs:
        starts.append(pos)
        pos += len(doc) + 1
    return starts


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def word_tokenizer(words):
    """A real fast (Rust) tokenizer: one id per whitespace-separated word."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk)


# ---- suffix array ----------------------------------------------------------------------------

@pytest.mark.parametrize("alphabet", [2, 5, 256, 300, 70_000, 1 << 25])
def test_suffix_array_matches_naive(alphabet):
    """Alphabets needing 1, 2, 3 and 4 bytes per token in libdivsufsort's byte string."""
    rng = np.random.default_rng(alphabet)
    for _ in range(20):
        # few distinct values, the largest among them, so suffixes share long prefixes
        values = rng.choice(alphabet, size=min(alphabet, 4), replace=False)
        values[0] = alphabet - 1
        t = rng.choice(values, size=int(rng.integers(1, 120)))
        sa = suffix_array(t, alphabet)
        assert sa.tolist() == naive_suffix_array(t)
        assert sa.dtype == np.int32


def test_suffix_array_edge_cases():
    assert suffix_array(np.array([], dtype=np.int64)).size == 0
    assert suffix_array(np.array([7])).tolist() == [0]
    assert suffix_array(np.array([3, 3, 3, 3])).tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError):
        suffix_array(np.array([1, 5]), alphabet_size=4)


def test_token_dtype():
    assert token_dtype(49_152) == np.uint16
    assert token_dtype(65_535) == np.uint16  # ids up to 65534, separator 65535
    assert token_dtype(65_536) == np.uint32
    assert token_dtype(262_144) == np.uint32


# ---- building and the file format ------------------------------------------------------------

def test_round_trip(tmp_path):
    docs = random_docs(0, 9)
    docs.insert(3, [])  # empty documents are skipped
    path = tmp_path / "s.hds"
    built = build_from_token_lists(docs, 9, path, fingerprint="abc", tokenizer_name="tiny",
                                   description="random")
    store = Datastore.open(path, verify=True)
    kept = [d for d in docs if d]
    assert [d.tolist() for d in store.documents()] == kept
    assert store.num_documents == len(kept) and store.num_tokens == sum(map(len, kept))
    assert store.separator == 9 and store.tokens.dtype == np.uint16
    assert store.meta["tokenizer"] == {"fingerprint": "abc", "name": "tiny", "vocab_size": 9}
    assert store.meta["description"] == "random"
    assert store.suffix.tolist() == naive_suffix_array(store.tokens)
    assert np.array_equal(store.tokens, built.tokens)
    assert not isinstance(store.tokens, np.memmap) and store.tokens.base is not None  # mapped
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_large_vocabulary_uses_uint32(tmp_path):
    vocab = 70_000
    docs = random_docs(1, vocab, values=[0, 1, 65_535, 65_536, 69_999])
    store = build_from_token_lists(docs, vocab, tmp_path / "big.hds")
    store = Datastore.open(tmp_path / "big.hds", verify=True)
    assert store.tokens.dtype == np.uint32 and store.separator == vocab
    assert [d.tolist() for d in store.documents()] == docs
    assert store.suffix.tolist() == naive_suffix_array(store.tokens)
    for pattern in ([69_999], [65_535, 65_536], [0, 69_999, 1]):
        want = [doc_starts(docs)[d] + o for d, o in naive_occurrences(docs, pattern)]
        assert store.occurrences(pattern).tolist() == sorted(want)


def test_bad_inputs(tmp_path):
    with pytest.raises(DatastoreError, match="outside"):
        build_from_token_lists([[1, 2, 9]], 9, tmp_path / "a.hds")
    with pytest.raises(DatastoreError, match="no documents"):
        build_from_token_lists([[], []], 9, tmp_path / "a.hds")
    build_from_token_lists([[1, 2]], 9, tmp_path / "a.hds")
    with pytest.raises(DatastoreError, match="--force"):
        build_from_token_lists([[1, 2]], 9, tmp_path / "a.hds")
    build_from_token_lists([[3]], 9, tmp_path / "a.hds", overwrite=True)
    assert [d.tolist() for d in Datastore.open(tmp_path / "a.hds").documents()] == [[3]]
    with pytest.raises(DatastoreError, match="folder"):
        build_from_token_lists([[1]], 9, tmp_path)


@pytest.fixture
def store_file(tmp_path):
    path = tmp_path / "s.hds"
    build_from_token_lists(random_docs(2, 50, count=40, max_len=200), 50, path,
                           fingerprint=tokenizer_fingerprint(FakeTokenizer({"a": 0, "b": 1})),
                           tokenizer_name="fake")
    return path


def test_tokenizer_mismatch_is_refused(store_file):
    Datastore.open(store_file, tokenizer=FakeTokenizer({"a": 0, "b": 1}))  # same vocabulary
    with pytest.raises(DatastoreError, match="different tokenizer.*fake.*Rebuild"):
        Datastore.open(store_file, tokenizer=FakeTokenizer({"a": 1, "b": 0}))


def test_truncated_file_is_detected(store_file):
    data = store_file.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 200, 30):
        store_file.write_bytes(data[:keep])
        with pytest.raises(DatastoreError, match="truncated|not a hasten datastore"):
            Datastore.open(store_file)


def test_trailing_bytes_are_detected(store_file):
    with open(store_file, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(DatastoreError, match="unexpected bytes"):
        Datastore.open(store_file)


def test_damaged_header_is_detected(store_file):
    data = bytearray(store_file.read_bytes())
    at = data.index(b'"num_documents"') + len(b'"num_documents": ')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    store_file.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match="checksum"):
        Datastore.open(store_file)


def test_damaged_arrays_are_detected(store_file):
    meta = Datastore.open(store_file).meta
    data_start = int.from_bytes(store_file.read_bytes()[24:32], "little")
    for name in ("tokens", "suffix"):
        data = bytearray(store_file.read_bytes())
        a = meta["arrays"][name]
        at = data_start + a["offset"] + a["nbytes"] // 2
        data[at] ^= 0x01
        damaged = store_file.with_name(f"damaged-{name}.hds")
        damaged.write_bytes(bytes(data))
        with pytest.raises(DatastoreError, match="damaged"):
            Datastore.open(damaged, verify=True)


def test_structure_checks_catch_a_wrong_bucket_table(store_file):
    store = Datastore.open(store_file)
    buckets = store.buckets.copy()
    sep = store.separator
    buckets[1:sep] = buckets[2:sep + 1]  # still cumulative, but every token's range shifted
    bad = store_file.with_name("bad.hds")
    storemod.write_datastore(bad, store.tokens, store.suffix, buckets,
                          {k: v for k, v in store.meta.items() if k != "arrays"})
    with pytest.raises(DatastoreError, match="bucket"):
        Datastore.open(bad)


def test_not_a_datastore(tmp_path):
    (tmp_path / "x.hds").write_bytes(b"hello world" * 10)
    with pytest.raises(DatastoreError, match="not a hasten datastore"):
        Datastore.open(tmp_path / "x.hds")
    with pytest.raises(DatastoreError, match="does not exist"):
        Datastore.open(tmp_path / "missing.hds")


# ---- retrieval -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_find_and_continuations_match_naive(tmp_path, seed):
    vocab = 4  # tiny vocabulary: many repeats, and occurrences at document ends
    docs = random_docs(seed, vocab, count=15)
    store = build_from_token_lists(docs, vocab, tmp_path / "s.hds")
    rng = np.random.default_rng(seed)
    starts = doc_starts(docs)
    for _ in range(60):
        m = int(rng.integers(1, 5))
        pattern = rng.integers(0, vocab, size=m).tolist()
        occ = naive_occurrences(docs, pattern)
        assert store.occurrences(pattern).tolist() == sorted(starts[d] + o for d, o in occ)
        lo, hi = store.find(pattern)
        assert hi - lo == len(occ)
        for depth in (1, 3, 7):
            rows = store.continuations(lo, hi, m, depth)
            assert rows.shape == (len(occ), depth)
            # exactly the continuations inside each document, cut at its end
            assert sorted(cut(r, vocab) for r in rows) == naive_continuations(docs, pattern, depth)
            # a cut row is padded with the separator only
            for r in rows:
                c = cut(r, vocab)
                assert all(x == vocab for x in r[len(c):])
    assert store.find([]) == (0, 0) and store.find([vocab]) == (0, 0) and store.find([-1]) == (0, 0)


def test_even_sampling_of_many_occurrences(tmp_path):
    docs = [[0, 1, i % 7 + 2] for i in range(100)]
    store = build_from_token_lists(docs, 9, tmp_path / "s.hds")
    lo, hi = store.find([0, 1])
    assert hi - lo == 100
    rows = store.continuations(lo, hi, 2, 2, max_count=10)
    assert rows.shape == (10, 2)
    assert all(r[1] == 9 for r in rows)  # each document ends right after
    firsts = rows[:, 0].tolist()
    assert firsts == sorted(firsts) and len(set(firsts)) == 7  # spread over all the variety


@pytest.mark.parametrize("seed", range(3))
def test_longest_match_matches_naive(tmp_path, seed):
    vocab = 3
    docs = random_docs(seed, vocab, count=10, max_len=25)
    store = build_from_token_lists(docs, vocab, tmp_path / "s.hds")
    rng = np.random.default_rng(100 + seed)
    for _ in range(80):
        context = rng.integers(0, vocab, size=int(rng.integers(0, 20))).tolist()
        if rng.random() < 0.2 and context:
            context[int(rng.integers(0, len(context)))] = vocab + 5  # not in the vocabulary
        for max_len, min_len in ((16, 1), (16, 2), (4, 2), (6, 6)):
            want = 0
            for m in range(min(max_len, len(context)), min_len - 1, -1):
                if vocab + 5 not in context[-m:] and naive_occurrences(docs, context[-m:]):
                    want = m
                    break
            m, lo, hi = store.longest_match(context, max_len, min_len)
            assert m == want
            if m:
                assert (lo, hi) == store.find(context[-m:])
            else:
                assert (lo, hi) == (0, 0)


# ---- text sources and the command line -------------------------------------------------------

WORDS = ["def", "return", "x", "y", "(", ")", ":", "hello", "world", "import", "os"]


def test_build_from_text_sources(tmp_path):
    tok = word_tokenizer(WORDS)
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "a.py").write_text("def x ( ) : return y")
    (tree / "pkg" / "b.py").write_text("import os")
    (tree / "pkg" / "notes.txt").write_text("hello hello")  # not matched by *.py
    (tree / "pkg" / "__pycache__").mkdir()
    (tree / "pkg" / "__pycache__" / "c.py").write_text("os os")  # skipped folder
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n\n" +
                                         json.dumps({"text": ["x y", "y x"]}) + "\n" +
                                         json.dumps({"other": "skip me"}) + "\n")
    (tmp_path / "chats.json").write_text(json.dumps([
        {"id": "1", "conversations": [{"from": "human", "value": "import os"},
                                      {"from": "gpt", "value": "return x"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "world"}]}])[:-30])  # truncated
    (tmp_path / "plain.txt").write_text("hello ( world )")
    store = build_datastore([str(tree), str(tmp_path / "rows.jsonl"), str(tmp_path / "chats.json"),
                             str(tmp_path / "plain.txt")], tmp_path / "s.hds", tok,
                            tokenizer_name="words", progress=False)
    texts = [tok.decode(d.tolist()) for d in store.documents()]
    assert texts == ["def x ( ) : return y", "import os", "hello world", "x y", "y x",
                     "return x", "hello ( world )"]
    assert [s["documents"] for s in store.meta["sources"]] == [2, 3, 1, 1]
    assert store.meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert store.meta["tokenizer"]["vocab_size"] == len(tok) == store.separator
    Datastore.open(tmp_path / "s.hds", tokenizer=tok)
    with pytest.raises(DatastoreError, match="different tokenizer"):
        Datastore.open(tmp_path / "s.hds", tokenizer=word_tokenizer(WORDS[::-1]))


def test_build_from_text_source_errors(tmp_path):
    tok = word_tokenizer(WORDS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatastoreError, match="no files matching"):
        build_datastore([str(tmp_path / "empty")], tmp_path / "s.hds", tok, progress=False)
    with pytest.raises(DatastoreError, match="neither a file"):
        build_datastore([str(tmp_path / "nope")], tmp_path / "s.hds", tok, progress=False)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatastoreError, match="--field"):
        build_datastore([str(tmp_path / "rows.jsonl")], tmp_path / "s.hds", tok, progress=False)
    store = build_datastore([str(tmp_path / "rows.jsonl")], tmp_path / "s.hds", tok,
                            field_name="body", progress=False)
    assert store.num_documents == 1


def test_stdlib_source():
    src = dsmod.open_source("stdlib")
    assert "standard library" in src.description and src.size > 0
    first = next(iter(src.texts))
    assert isinstance(first, str)


def test_cli_build_and_info(tmp_path, monkeypatch, capsys):
    tok = word_tokenizer(WORDS)
    from hasten.commands import build_parser
    from hasten.commands import datastore as command
    monkeypatch.setattr(command, "load_tokenizer_only", lambda spec: (tok, "words"))
    (tmp_path / "a.txt").write_text("def x ( ) : return x")
    parser = build_parser()
    out = tmp_path / "a.hds"
    command.run(parser.parse_args(["datastore", "build", str(tmp_path / "a.txt"),
                                           "--output", str(out)]))
    assert "wrote" in capsys.readouterr().err
    command.run(parser.parse_args(["datastore", "info", str(out), "--verify"]))
    info = json.loads(capsys.readouterr().out)
    assert info["num_tokens"] == 7 and info["num_documents"] == 1
    assert info["tokenizer"]["name"] == "words" and info["checked"] == "structure and checksums"
    with pytest.raises(DatastoreError, match="--force"):
        command.run(parser.parse_args(["datastore", "build", str(tmp_path / "a.txt"),
                                               "--output", str(out)]))

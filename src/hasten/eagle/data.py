"""Training data for the EAGLE head: token sequences and the target's features over them.

A record is `{"key", "prompt_ids", "answer_ids"}`: a line of `hasten distill` output, or a
ShareGPT exchange whose answer was written by someone else (`sharegpt_records`: teacher
forcing over existing answers costs one batched forward per batch, far cheaper than having
the model write them; the head still learns the *target's* distribution, because its token
loss is against the target's own prediction at each position, not the data's next token).

The head is trained with the backbone frozen, so the features are computed once (batched,
resumable) and kept on disk:

    tokens.npy    [N] int32       all sequences (prompt + answer) end to end
    features.npy  [N, d] float16  f_i: the target's last hidden state (after the final norm)
    inputs.npy    [N, k d] float16  (heads over k feature layers only) those layers' outputs
    index.npy     [R, 3] int64    per sequence: start, length, prompt length
    meta.json     what it was built from, progress
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import HastenError
from ..medusa.data import _fingerprint, _write_json, batches_by_length, lm_hidden_size, sequence_outputs


def sharegpt_records(tokenizer_encode, eos_id: int | None, limit: int, max_len: int,
                     skip: int = 0, progress: bool = True, turns: str = "first") -> list[dict]:
    """Up to `limit` ShareGPT exchanges as records: `tokenizer_encode(text, chat)` gives the
    prompt's ids (chat template) and the answer's ids; sequences are cut to `max_len`.

    `turns`: "first" takes each chat's opening exchange (about 11k usable); "later" the
    exchanges after it (about 26k more), each as a prompt of its own without the chat before
    it: the head learns the target's distribution over the answer as the target reads it in
    that context, so the missing history changes the text, not what is learnt; "all" both,
    in file order. `skip`: usable exchanges passed over first (a later run on fresh ones)."""
    from ..data.datasets import EXCHANGES, sharegpt_conversations, sharegpt_exchanges
    from ..medusa.distill import prompt_key
    if turns not in EXCHANGES:
        raise HastenError(f"turns must be one of {', '.join(EXCHANGES)}, got {turns!r}")
    records, seen = [], 0
    for conv in sharegpt_conversations(progress=progress):
        for question, answer in sharegpt_exchanges(conv, turns):
            seen += 1
            if seen <= skip:
                continue
            prompt = tokenizer_encode(question, True)
            if len(prompt) >= max_len // 2:
                continue
            ids = tokenizer_encode(answer, False) + ([eos_id] if eos_id is not None else [])
            records.append({"key": prompt_key(question), "prompt_ids": prompt,
                            "answer_ids": ids[:max_len - len(prompt)]})
            if len(records) >= limit:
                return records
    if not records:
        raise HastenError("no usable ShareGPT exchanges found")
    return records


class FeatureCache:
    """Memory-mapped sequences and features of a built cache (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r")
        self.features = np.load(self.folder / "features.npy", mmap_mode="r")
        inputs = self.folder / "inputs.npy"  # the head's input where it is not `features`
        self.inputs = np.load(inputs, mmap_mode="r") if inputs.is_file() else None
        self.index = np.load(self.folder / "index.npy")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        start, length, prompt = (int(x) for x in self.index[i])
        return self.tokens[start:start + length], self.features[start:start + length], prompt


def build_features(backbone, records: list[dict], folder: str | Path, model_key: str,
                   max_tokens: int = 8192, progress: bool = True,
                   feature_layers: tuple[int, ...] = ()) -> FeatureCache:
    """Compute (or reuse, or finish) the feature cache of `records` in `folder`; with
    `feature_layers`, those layers' outputs too (`inputs.npy`). Resumable: batches are written
    in place and the progress saved; rerunning continues."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = {"data": _fingerprint(records), "model": model_key, "records": len(records)}
    if feature_layers:
        key["feature_layers"] = list(feature_layers)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    lengths = [len(r["prompt_ids"]) + len(r["answer_ids"]) for r in records]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    d = int(lm_hidden_size(backbone))
    if meta.get("key") != key:  # new or stale: start over
        meta = {"key": key, "tokens": int(offsets[-1]), "hidden_size": d, "done_batches": 0,
                "complete": False}
        tokens = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.int32, (int(offsets[-1]),))
        for r, rec in enumerate(records):
            tokens[offsets[r]:offsets[r + 1]] = rec["prompt_ids"] + rec["answer_ids"]
        tokens.flush()
        del tokens
        index = np.stack([offsets[:-1], np.asarray(lengths),
                          np.asarray([len(r["prompt_ids"]) for r in records])], axis=1)
        np.save(folder / "index.npy", index.astype(np.int64))
        np.lib.format.open_memmap(folder / "features.npy", "w+", np.float16, (int(offsets[-1]), d))
        (folder / "inputs.npy").unlink(missing_ok=True)
        if feature_layers:
            np.lib.format.open_memmap(folder / "inputs.npy", "w+", np.float16,
                                      (int(offsets[-1]), len(feature_layers) * d))
        _write_json(meta_path, meta)
    if meta.get("complete"):
        return FeatureCache(folder)
    features = np.load(folder / "features.npy", mmap_mode="r+")
    inputs = np.load(folder / "inputs.npy", mmap_mode="r+") if feature_layers else None
    batches = batches_by_length(lengths, max_tokens)
    bar = tqdm(total=int(offsets[-1]), desc="target features", unit="tok", unit_scale=True,
               disable=not progress)
    bar.update(sum(lengths[i] for b in batches[:meta["done_batches"]] for i in b))
    for b, batch in enumerate(batches):
        if b < meta["done_batches"]:
            continue
        seqs = [records[i]["prompt_ids"] + records[i]["answer_ids"] for i in batch]
        for i, (states, taps) in zip(batch, sequence_outputs(backbone, seqs, tuple(feature_layers))):
            features[offsets[i]:offsets[i] + lengths[i]] = states.float().cpu().numpy()
            if inputs is not None:
                inputs[offsets[i]:offsets[i] + lengths[i]] = taps.float().cpu().numpy()
        if b % 20 == 19 or b == len(batches) - 1:
            features.flush()
            if inputs is not None:
                inputs.flush()
            meta["done_batches"] = b + 1
            _write_json(meta_path, meta)
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    meta["complete"] = True
    _write_json(meta_path, meta)
    return FeatureCache(folder)


def training_batch(cache: FeatureCache, indices: list[int], unroll: int, device) -> dict:
    """Right-padded tensors for sequences `indices`:

    tokens [B, L] (pairs use tokens 1..), features [B, L, d] float32, and `answer` [B, L]
    True where position i's output is trained (it predicts a token of the answer, i >= P - 2,
    and its targets exist). Unrolled step s trains i where i + 1 + s < length as well. A cache
    with `inputs` adds them as `inputs` [B, L, k d] float32 (what the head reads)."""
    seqs = [cache.sequence(i) for i in indices]
    width = max(len(t) for t, _, _ in seqs)
    d = cache.features.shape[1]
    tokens = np.zeros((len(seqs), width + unroll), dtype=np.int64)
    feats = np.zeros((len(seqs), width, d), dtype=np.float32)
    lengths, prompts = [], []
    for r, (t, f, p) in enumerate(seqs):
        tokens[r, :len(t)] = t
        feats[r, :len(t)] = f
        lengths.append(len(t))
        prompts.append(p)
    batch = {"tokens": torch.from_numpy(tokens).to(device),
             "features": torch.from_numpy(feats).to(device),
             "lengths": torch.tensor(lengths, device=device),
             "prompts": torch.tensor(prompts, device=device)}
    if cache.inputs is not None:
        inputs = np.zeros((len(seqs), width, cache.inputs.shape[1]), dtype=np.float32)
        for r, i in enumerate(indices):
            start, length, _ = (int(x) for x in cache.index[i])
            inputs[r, :length] = cache.inputs[start:start + length]
        batch["inputs"] = torch.from_numpy(inputs).to(device)
    return batch


def trained_positions(lengths: torch.Tensor, prompts: torch.Tensor, width: int, step: int) -> torch.Tensor:
    """[B, width] bool: pair i of unroll step `step` is trained (it predicts feature
    f_{i+1+step}, which must exist, for a token that lies in the answer)."""
    i = torch.arange(width, device=lengths.device)[None, :]
    return (i + 1 + step < lengths[:, None]) & (i + 2 + step >= prompts[:, None])


def frequent_tokens(cache: FeatureCache, size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (the draft vocabulary), sorted by id."""
    counts = np.zeros(int(cache.tokens.max()) + 1, dtype=np.int64)
    for start, length, prompt in cache.index:
        np.add.at(counts, np.asarray(cache.tokens[start + prompt:start + length]), 1)
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(top)).long()

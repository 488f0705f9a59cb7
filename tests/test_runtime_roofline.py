"""The bench's roofline column: weight bytes read per generated token and the fraction of the
machine's read bandwidth a method achieves."""

import torch

from hasten.bench import roofline
from hasten.bench.runner import markdown_table
from hasten.models.loader import load_backbone
from test_compact import kernel, tiny_gguf  # noqa: F401  (kernel: built before a test moves the cache)


def test_matrix_bytes_counts_what_a_forward_reads(tmp_path, kernel, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    cfg, path = tiny_gguf(tmp_path, tie_word_embeddings=True)
    dense = load_backbone(str(path)).backbone
    compact = load_backbone(str(path), weights="compact").backbone
    h, i, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h
    assert roofline.matrix_bytes(dense) == 4 * (cfg.num_layers * per_layer + h * cfg.vocab_size)
    assert roofline.matrix_bytes(compact) == roofline.gguf_bytes(path)  # the file's blocks
    assert roofline.matrix_bytes(compact) < roofline.matrix_bytes(dense) / 4
    # resident: the tied table once, plus norms
    assert roofline.resident_bytes(compact) < roofline.resident_bytes(dense) / 4


def test_add_roofline_divides_by_tokens_per_step_and_bandwidth():
    summary = {"plain": {"median_tokens_per_second": 50.0, "mean_accepted_per_step": 1.0},
               "lookup": {"median_tokens_per_second": 80.0, "mean_accepted_per_step": 2.0},
               "llamacpp": {"median_tokens_per_second": 100.0, "mean_accepted_per_step": None},
               "hf": {"failed": "not installed", "prompts": 0}}
    roofline.add_roofline(summary, {"plain": 100e6, "lookup": 100e6, "llamacpp": 60e6, "hf": 1},
                          bandwidth=10e9)
    assert summary["plain"]["weight_bytes_per_token"] == 100e6
    assert summary["plain"]["bandwidth_fraction"] == 0.5
    assert summary["lookup"]["weight_bytes_per_token"] == 50e6
    assert summary["lookup"]["bandwidth_fraction"] == 0.4
    assert summary["llamacpp"]["bandwidth_fraction"] == 0.6  # one forward per token
    assert "bandwidth_fraction" not in summary["hf"]


def test_table_shows_the_roofline_columns():
    s = {"median_tokens_per_second": 50.0, "speedup_vs_plain": {"median": 1, "min": 1, "max": 1},
         "mean_accepted_per_step": 1.0, "mismatches_vs_plain": 0, "prompts": 2,
         "weight_bytes_per_token": 96e6, "bandwidth_fraction": 0.25}
    table = markdown_table({"plain": s, "hf": {"failed": "x", "prompts": 0}}, "plain")
    assert "weights MB read per token | of read bandwidth" in table
    assert "| 96 | 25% |" in table
    assert table.splitlines()[-1].count("|") == table.splitlines()[0].count("|")


def test_bandwidth_is_measured_once_per_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(roofline, "read_bandwidth", lambda threads: calls.append(threads) or 7e9)
    assert roofline.cached_read_bandwidth(2) == 7e9
    assert roofline.cached_read_bandwidth(2) == 7e9
    assert roofline.cached_read_bandwidth(1) == 7e9
    assert calls == [2, 1]
    assert (tmp_path / "machine" / f"{roofline.BANDWIDTH_KEY}-t2.json").exists()


def test_read_bandwidth_measures_a_positive_rate():
    assert roofline.read_bandwidth(1, size_mb=8, repeats=2) > 0
    assert torch.get_num_threads() == 1  # restored

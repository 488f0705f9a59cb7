"""`--dtype auto`: plans measured once per machine, the fastest exact one chosen and cached;
`hasten check` shows every candidate and the choice."""

import json

import pytest
import torch

import hasten
from hasten import plans
from hasten.commands import main
from hasten.models import quant_kernels as qk
from test_compact import kernel, tiny_gguf  # noqa: F401  (kernel: built before a test moves the cache)


def test_choose_takes_the_cheapest_exact_plan():
    entries = {"float32": {"exact": False, "plain_step_ms": 5.0},
               "bfloat16": {"exact": True, "plain_step_ms": 9.0},
               "compact": {"exact": True, "plain_step_ms": 4.0}}
    assert plans.choose(entries) == "compact"
    entries["compact"]["exact"] = False
    assert plans.choose(entries) == "bfloat16"  # slower than float32, but float32 is not exact
    entries["bfloat16"]["exact"] = False
    assert plans.choose(entries) == "float32"  # none exact: the reference


def test_plan_args_and_candidates():
    assert plans.plan_args("compact") == {"dtype": "float32", "weights": "compact"}
    assert plans.plan_args("bfloat16") == {"dtype": "bfloat16", "weights": "dense"}
    with pytest.raises(ValueError):
        plans.plan_args("int3")
    q8 = ["compact-q8"] if qk.kernel_module() is not None else []
    bf16 = [] if plans.emulated("bfloat16") else ["bfloat16"]
    assert plans.candidates(has_gguf=True, lean=True) == ["float32", *bf16, "compact", *q8]
    assert plans.plan_args("compact-q8") == {"dtype": "float32", "weights": "compact-q8"}
    assert plans.candidates(has_gguf=False, lean=True) == ["float32", *bf16]
    assert plans.candidates(has_gguf=True, lean=False) == ["float32", *bf16]


def test_half_precision_the_cpu_only_emulates_is_not_a_candidate(monkeypatch):
    """A half-precision product many times float32's (no bfloat16 arithmetic in the CPU: torch
    emulates it) keeps that plan out of --dtype auto; one at float32's cost keeps it in; a GPU
    is never probed."""
    assert plans.half_cost_ratio("bfloat16") > 0
    monkeypatch.setattr(plans, "_emulated", {"bfloat16": 30.0, "float16": 1.2})
    assert plans.emulated("bfloat16") and not plans.emulated("float16")
    assert "bfloat16" not in plans.candidates(has_gguf=True, lean=True)
    assert not plans.emulated("bfloat16", device="cuda") and not plans.emulated("float32")
    monkeypatch.setattr(plans, "_emulated", {"bfloat16": 1.1})
    assert "bfloat16" in plans.candidates(has_gguf=True, lean=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_measures_once_then_reads_the_cached_choice(tmp_path, kernel, cache, monkeypatch):
    _, path = tiny_gguf(tmp_path)
    model = hasten.load(str(path), dtype="auto", progress=False)
    files = list((cache / "plans").glob(f"{plans.PLAN_KEY}-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    bf16 = set() if plans.emulated("bfloat16") else {"bfloat16"}
    assert set(saved["plans"]) == {"float32", "compact", "compact-q8"} | bf16
    assert model.plan == saved["choice"] == plans.choose(saved["plans"])
    measured = []
    monkeypatch.setattr(plans, "measure_plan", lambda *a, **k: measured.append(a))
    again = hasten.load(str(path), dtype="auto", progress=False)
    assert again.plan == model.plan and not measured


def test_auto_is_the_default_and_named_weights_or_other_sources_take_float32(
        tmp_path, tiny_folder, kernel, cache, monkeypatch):
    """The default is `dtype="auto"`: a GGUF gets the measured plan; weights named by the caller
    compute in float32; a Hugging Face folder on a CPU has no plan to choose and loads in
    float32 without measuring."""
    _, path = tiny_gguf(tmp_path)
    chosen = hasten.load(str(path), dtype="auto", progress=False).plan
    measured = []
    monkeypatch.setattr(plans, "measure_plan", lambda *a, **k: measured.append(a))
    assert hasten.load(str(path), progress=False).plan == chosen
    assert hasten.load(str(path), weights="compact", progress=False).plan == "compact"
    dense = hasten.load(str(path), weights="dense", progress=False)
    assert dense.plan == "float32" and dense.backbone.dtype == torch.float32
    folder = hasten.load(str(tiny_folder), progress=False)
    assert folder.plan == "float32" and not measured
    assert not list((cache / "plans").glob(f"*{tiny_folder.name}*"))


def test_commands_default_to_auto_except_where_float32_is_the_point():
    """generate/serve/bench/check take the fastest exact plan; commands whose autograd runs
    through the layers, or whose answers train heads, keep dense float32."""
    from hasten.commands import build_parser
    parser = build_parser()
    for argv in (["generate", "hi"], ["serve"], ["bench"], ["check"]):
        assert parser.parse_args(argv).dtype == "auto", argv
    for argv in (["distill", "--out", "x"], ["train", "medusa", "--data", "d", "--out", "x"],
                 ["redteam", "gcg"], ["export", "medusa", "out"]):
        assert parser.parse_args(argv).dtype == "float32", argv


def test_check_shows_every_plan_and_the_auto_choice(tmp_path, kernel, cache, capsys):
    _, path = tiny_gguf(tmp_path)
    main(["check", "--model", str(path), "--plans", "float32,compact", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["plans"]) == {"float32", "compact"}
    compact = report["plans"]["compact"]
    assert compact["kernel"].startswith(("avx512-", "avx2-", "scalar-", "torch"))
    if not compact["kernel"].startswith("torch"):  # our kernel: one class whatever the rows
        assert all(len(c) == 1 for c in compact["row_classes"].values())
        assert compact["exact"]
    assert report["auto"] == plans.choose(report["plans"])
    assert hasten.load(str(path), dtype="auto", progress=False).plan == report["auto"]

"""`--dtype auto`: plans measured once per machine, the fastest exact one chosen and cached;
`hasten check` shows every candidate and the choice."""

import json

import pytest

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
    assert plans.candidates(has_gguf=True, lean=True) == ["float32", "bfloat16", "compact", *q8]
    assert plans.plan_args("compact-q8") == {"dtype": "float32", "weights": "compact-q8"}
    assert plans.candidates(has_gguf=False, lean=True) == ["float32", "bfloat16"]
    assert plans.candidates(has_gguf=True, lean=False) == ["float32", "bfloat16"]


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
    assert set(saved["plans"]) == {"float32", "bfloat16", "compact", "compact-q8"}
    assert model.plan == saved["choice"] == plans.choose(saved["plans"])
    measured = []
    monkeypatch.setattr(plans, "measure_plan", lambda *a, **k: measured.append(a))
    again = hasten.load(str(path), dtype="auto", progress=False)
    assert again.plan == model.plan and not measured


def test_check_shows_every_plan_and_the_auto_choice(tmp_path, kernel, cache, capsys):
    _, path = tiny_gguf(tmp_path)
    main(["check", "--model", str(path), "--plans", "float32,compact", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["plans"]) == {"float32", "compact"}
    compact = report["plans"]["compact"]
    assert compact["kernel"].startswith(("avx512-", "scalar-", "torch"))
    if not compact["kernel"].startswith("torch"):  # our kernel: one class whatever the rows
        assert all(len(c) == 1 for c in compact["row_classes"].values())
        assert compact["exact"]
    assert report["auto"] == plans.choose(report["plans"])
    assert hasten.load(str(path), dtype="auto", progress=False).plan == report["auto"]

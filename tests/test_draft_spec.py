"""One drafter description for every entry point: validated once, built once per model."""

from __future__ import annotations

import json

import pytest

import hasten
from hasten.commands import main
from hasten.datastore import build_datastore
from hasten.decoding.tree import DraftTree
from hasten.drafters import DraftSpec
from hasten.errors import HastenError

TEXT = "the cat sat on the mat and then the dog sat on the log and it was big " * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "nope"}, "unknown drafter 'nope'"),
    ({"name": "rest"}, "needs a datastore"),
    ({"name": "model", "draft_layers": 0}, "--draft-layers must be"),
    ({"name": "model", "draft_depth": -1}, "--draft-depth must be"),
])
def test_bad_specs_are_refused_naming_the_option(kwargs, message):
    with pytest.raises(HastenError, match=message):
        DraftSpec(**kwargs)


def test_unknown_options_are_named():
    with pytest.raises(HastenError, match="unknown drafter option.*datastor\\b"):
        DraftSpec.of("rest", datastor="x.hds")
    assert DraftSpec.of("lookup", datastore=None) == DraftSpec("lookup")


def test_named_keeps_the_options():
    base = DraftSpec("none", datastore="s.hds", draft_layers=2)
    assert base.named("rest") == DraftSpec("rest", datastore="s.hds", draft_layers=2)
    assert base.named(None) is base
    with pytest.raises(HastenError, match="started without one"):
        DraftSpec().named("rest")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return hasten.load(str(tiny_folder), progress=False)


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "words.txt"
    path.write_text(TEXT)
    out = path.with_suffix(".hds")
    build_datastore([str(path)], out, tiny.tokenizer, progress=False)
    return out


def test_api_takes_every_drafter_with_its_options(tiny, store):
    ids = tiny.encode("the cat sat on the", chat=False)
    want = list(tiny.generate_ids(ids, 24))
    for draft in ("lookup", DraftSpec("rest", datastore=store), hasten.DraftSpec("model", draft_layers=1),
                  DraftSpec("model", draft_layers=1, draft_depth=2)):
        assert list(tiny.generate_ids(ids, 24, draft=draft)) == want, draft
    with pytest.raises(HastenError, match="needs a datastore"):
        list(tiny.generate_ids(ids, 4, draft="rest"))


def test_drafters_are_built_once_per_model(tiny, store, monkeypatch):
    import hasten.api
    built = []
    real = hasten.api.build_drafter
    monkeypatch.setattr(hasten.api, "build_drafter", lambda spec, model: built.append(spec) or real(spec, model))
    spec = DraftSpec("rest", datastore=str(store), draft_depth=3)  # not built before this test
    first = tiny.drafter(spec)
    assert tiny.drafter(DraftSpec("rest", datastore=store, draft_depth=3)) is first  # equal specs
    ids = tiny.encode("the dog", chat=False)
    list(tiny.generate_ids(ids, 4, draft=spec))
    list(tiny.generate_ids(ids, 4, draft=spec))
    assert built == [spec]
    assert tiny.drafter(None) is None and tiny.drafter("none") is None


def test_bench_model_method_takes_draft_options(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the mat\nthe dog ran\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--model", str(tiny_folder), "--methods", "plain,model", "--dataset",
                 str(prompts), "--limit", "2", "--max-new-tokens", "6", "--draft-layers", "1",
                 "--draft-depth", "2", "--threads", "1", "--no-memory", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["draft"]["draft_layers"] == 1
    assert report["summary"]["model"]["mismatches_vs_plain"] == 0
    assert main(["bench", "--model", str(tiny_folder), "--methods", "plain,model", "--draft-layers",
                 "0", "--no-memory", "--dataset", str(prompts)]) == 2
    assert "--draft-layers must be" in capsys.readouterr().err


def test_truncated_to_nothing_is_empty():
    tree = DraftTree.from_sequences([[1, 2, 3]])
    assert tree.truncated(-1).size == 0 and tree.truncated(0).size == 0
    assert tree.truncated(2).token_list == [1, 2]

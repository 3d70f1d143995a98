"""Each kind of bad input is a counted rejection with file:line, or a clear DataError: never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from korcpt.corpus.readers import Record, Rejected, expand_inputs, iter_records
from korcpt.errors import DataError, KorcptError


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _read(path: Path) -> list[Record | Rejected]:
    return list(iter_records(path))


def test_jsonl_good_bad_and_blank_lines(tmp_path):
    path = _write(tmp_path / "a.jsonl", b'{"text": "one"}\r\n\r\n{"text": \n{"text": "\xff\xfe"}\n[1, 2]\n')
    recs = _read(path)
    assert [type(r).__name__ for r in recs] == ["Record", "Rejected", "Rejected", "Record"]
    assert recs[0].value == {"text": "one"} and recs[0].where == f"{path}:1"
    assert (recs[1].where, recs[1].reason) == (f"{path}:3", "malformed_json")
    assert (recs[2].where, recs[2].reason) == (f"{path}:4", "non_utf8")
    assert recs[3].value == [1, 2]  # valid JSON of the wrong shape: the converter rejects it


def test_bom_is_accepted(tmp_path):
    jsonl = _write(tmp_path / "b.jsonl", b'\xef\xbb\xbf{"text": "bom"}\n')
    array = _write(tmp_path / "b.json", b'\xef\xbb\xbf[{"text": "bom"}]')
    txt = _write(tmp_path / "b.txt", b"\xef\xbb\xbf\xeb\xb3\xb8\xeb\xac\xb8")
    assert _read(jsonl)[0].value == {"text": "bom"}
    assert _read(array)[0].value == {"text": "bom"}
    assert _read(txt)[0].value == "본문"


def test_json_array_streams_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr("korcpt.corpus.readers._READ_BYTES", 7)  # force elements across read boundaries
    items = [{"text": f"문서 {i}", "namespace": i % 2 and "0" or 0} for i in range(5)]
    path = _write(tmp_path / "d.json", "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n")
    recs = _read(path)
    assert [r.value for r in recs] == items
    assert [r.where for r in recs] == [f"{path}:{n}" for n in range(2, 7)]


def test_json_array_non_utf8_element_is_rejected_alone(tmp_path):
    path = _write(tmp_path / "d.json", b'[{"text": "ok"},\n{"text": "\xc3\x28"},\n{"text": "ok2"}]')
    recs = _read(path)
    assert [type(r).__name__ for r in recs] == ["Record", "Rejected", "Record"]
    assert (recs[1].where, recs[1].reason) == (f"{path}:2", "non_utf8")


@pytest.mark.parametrize(("content", "where"), [
    ('[{"text": "a"},\n{"text": }]', ":2"),
    ('[{"text": "a"}\n{"text": "b"}]', ":2"),
    ('[{"text": "a"},', ":1"),
    ('[{"text": "a"}] trailing', ":1"),
    ('[]', ""),
    ('[{"text": "a"},]', ":1"),
])
def test_broken_json_array_is_a_data_error_naming_the_file(tmp_path, content, where):
    path = _write(tmp_path / "broken.json", content)
    with pytest.raises(DataError, match=f"^{path}{where}"):
        _read(path)


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", b""), ("empty.json", b""), ("empty.txt", b""), ("space.json", b"  \n\n"),
    ("space.txt", b" \r\n"), ("blank.jsonl", b"\n\n"),
])
def test_empty_files_fail_at_once(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=str(path)):
        _read(path)


def test_missing_file_and_unreadable_directories(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        expand_inputs([tmp_path / "nope.json"])
    with pytest.raises(DataError, match="no such file"):
        _read(tmp_path / "nope.json")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "other").mkdir()
    _write(tmp_path / "other" / "x.csv", "a,b")
    for d in ("empty_dir", "other"):
        with pytest.raises(DataError, match="holds no readable input"):
            expand_inputs([tmp_path / d])
    assert issubclass(DataError, KorcptError)


def test_directory_expansion_is_sorted_and_recursive(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for rel in ("d/b.jsonl", "d/a.txt", "d/sub/c.json", "d/.hidden/x.json", "d/notes.md"):
        _write(tmp_path / rel, "x")
    assert [p.relative_to(tmp_path).as_posix() for p in expand_inputs([tmp_path / "d"])] == ["d/a.txt", "d/b.jsonl", "d/sub/c.json"]


def test_txt_non_utf8_is_rejected_with_line(tmp_path):
    path = _write(tmp_path / "x.txt", "첫 줄\n둘째 줄 ".encode() + b"\xff\n")
    (rec,) = _read(path)
    assert isinstance(rec, Rejected) and rec.where == f"{path}:2" and rec.reason == "non_utf8"


def test_txt_keeps_crlf_text_for_the_cleaner(tmp_path):
    path = _write(tmp_path / "x.txt", "줄 하나\r\n줄 둘\r\n")
    (rec,) = _read(path)
    assert rec.is_text and rec.value == "줄 하나\r\n줄 둘\r\n"


def test_arrow_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"본문 {i}", "title": str(i)} for i in range(2500)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = _read(tmp_path / "ds")
    assert [r.value for r in recs] == rows
    assert recs[2400].where == f"{tmp_path / 'ds'}:row 2400"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:4])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.where.rsplit("/", 1)[-1] for r in _read(tmp_path / "dd")] == ["dd[test]:row 0", "dd[train]:row 0", "dd[train]:row 1", "dd[train]:row 2"]
    assert expand_inputs([tmp_path]) == [tmp_path / "dd", tmp_path / "ds"]  # found inside a directory too
    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(tmp_path / "notext"))
    with pytest.raises(DataError, match="no 'text' column"):
        _read(tmp_path / "notext")

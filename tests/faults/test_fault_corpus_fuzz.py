"""Corpus inputs fuzzed with hypothesis: ``build_corpus`` either writes a corpus whose report accounts
for every record (read = kept + dropped + rejected, per source, and read = the records the files hold)
or raises DataError -- never any other exception.

Generated per source file: random bytes; JSONL or JSON-array records with a field replaced by a value
of the wrong type or deleted; answers 0, 6, "B", null, "3", 2.5, true...; lines cut short (truncated
JSON); invalid UTF-8 inserted; lone surrogate escapes ("\\ud800"); UTF-8 and UTF-16 BOMs; CRLF line
ends; blank lines; NUL bytes; JSON nested 10, 1,000 or 100,000 deep; Korean text with wiki markup and
web emoticons, the Korean file given as PATH, PATH:auto/namu/wiki/plain. A separate test feeds 10 MB lines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from _faults import fault_seed, raised
from korcpt.corpus.build import SOURCES, CorpusOptions, build_corpus
from korcpt.errors import DataError

KO = "당뇨병은 혈당 조절 장애로 인한 대사 질환이며 꾸준한 관리가 필요하다. "
GOOD = {
    "korean": {"text": KO * 4, "title": "당뇨병"},
    "mcq": {"question": "다음 중 인슐린을 분비하는 기관은?", "A": "간", "B": "췌장", "C": "신장", "D": "비장",
            "E": "폐", "answer": 2},
    "medical_dict": {"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태"},
    "char_dict": {"term": "↑", "definition": "증가 또는 상승을 뜻한다"},
}
ANSWERS = [0, 6, "B", None, "3", 2.5, True, -1, 10**30, [], {}, 1, 5]
WRONG = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=True),
                  st.text(max_size=30), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), st.just(KO * 3),
                  st.just("\ud800" + KO * 3), st.sampled_from(ANSWERS),
                  st.just("[[링크|" + KO + "]] 좋아요~~\n" + KO + "~~ ^^ ## " + KO), st.just("#redirect " + KO))
LINE_FAULTS = ["none", "none", "truncate", "bad_utf8", "surrogate_escape", "random_bytes", "deep", "nul", "blank"]
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]


@st.composite
def records(draw, source: str):
    """One record of ``source``: valid, or with one field replaced by a wrong value or deleted."""
    rec = dict(GOOD[source])
    action = draw(st.sampled_from(["keep", "replace", "delete", "answer", "not_an_object"]))
    key = draw(st.sampled_from(sorted(rec)))
    if action == "replace":
        rec[key] = draw(WRONG)
    elif action == "delete":
        rec.pop(key)
    elif action == "answer":
        rec["answer"] = draw(st.sampled_from(ANSWERS))
    elif action == "not_an_object":
        return draw(WRONG), action
    return rec, action if action != "keep" else "none"


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def line(draw, source: str) -> tuple[bytes, str]:
    """One JSONL line (without its end) and the fault put into it."""
    value, field_fault = draw(records(source))
    raw = _dump(value)
    fault = draw(st.sampled_from(LINE_FAULTS))
    if fault == "truncate" and len(raw) > 1:
        raw = raw[: draw(st.integers(1, len(raw) - 1))]
    elif fault == "bad_utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    elif fault == "surrogate_escape":  # valid JSON whose string holds a lone surrogate: "\ud800"
        escaped = json.dumps(value).encode()
        raw = (escaped.replace(b"\\ub2f9", b"\\ud800", 1) if b"\\ub2f9" in escaped  # the first "당"
               else escaped.replace(b'"', b'"\\udc00', 1))
    elif fault == "random_bytes":
        raw = draw(st.binary(min_size=1, max_size=80)).replace(b"\n", b" ").replace(b"\r", b" ")
    elif fault == "deep":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        raw = b"[" * depth + b"]" * depth if draw(st.booleans()) else b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    elif fault == "nul":
        raw = raw.replace(b" ", b"\x00", 1)
    elif fault == "blank":
        raw = draw(st.sampled_from([b"", b"   ", b"\t"]))
    return raw, fault if fault != "none" else field_fault


@st.composite
def input_file(draw, source: str) -> dict:
    """A whole input file: its name, bytes, and how many records a correct reader must count."""
    kind = draw(st.sampled_from(["jsonl", "jsonl", "json_array", "random_bytes"] + (["txt"] if source == "korean" else [])))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    bom = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf", b"\xff\xfe"]))
    faults: list[str] = []
    if kind == "random_bytes":
        data, expected = draw(st.binary(min_size=1, max_size=300)), None
        faults.append("random_bytes_file")
        name = f"{source}.{draw(st.sampled_from(['jsonl', 'json']))}"
    elif kind == "txt":
        body = draw(st.sampled_from([KO * 5, KO * 5 + "\r\n" + KO, "", "   ", "abc"]))
        data = body.encode("utf-8")
        if draw(st.booleans()):
            data = data[:7] + draw(st.sampled_from(INVALID_UTF8)) + data[7:]
            faults.append("bad_utf8")
        expected, name = None, f"{source}.txt"
    elif kind == "jsonl":
        lines = draw(st.lists(line(source), min_size=1, max_size=6))
        data = eol.join(raw for raw, _ in lines) + eol
        faults += [f for _, f in lines if f != "none"]
        # a correct reader yields one record per line holding a non-whitespace byte
        expected = sum(1 for raw, _ in lines if raw.strip())
        name = f"{source}.jsonl"
    else:
        values = [draw(records(source)) for _ in range(draw(st.integers(1, 5)))]
        elements = [_dump(v) for v, _ in values]
        faults += [f for _, f in values if f != "none"]
        cut = draw(st.sampled_from(["none", "none", "bad_utf8_in_element", "truncate", "deep_element", "trailing"]))
        data = b"[" + (b"," + eol).join(elements) + b"]"
        expected = len(elements)
        if cut == "bad_utf8_in_element" and b'"' in data:  # inside the first string: that element is rejected
            first = data.index(b'"') + 1
            data = data[:first] + draw(st.sampled_from(INVALID_UTF8)) + data[first:]
        elif cut == "truncate":
            data, expected = data[: draw(st.integers(1, len(data) - 1))], None
        elif cut == "deep_element":
            depth = draw(st.sampled_from([1000, 100_000]))
            data, expected = b"[" + b"[" * depth + b"]" * depth + b"," + data[1:], None
        elif cut == "trailing":
            data, expected = data + b" x", None
        if cut != "none":
            faults.append(cut)
        name = f"{source}.json"
    if bom:
        faults.append("bom_utf16" if bom == b"\xff\xfe" else "bom_utf8")
        if bom == b"\xff\xfe":
            expected = None  # a UTF-16 BOM is not UTF-8: the first record may be rejected or merge with it
    if eol == b"\r\n":
        faults.append("crlf")
    return {"name": name, "data": bom + data, "expected": expected, "faults": faults}


@st.composite
def source_files(draw) -> dict:
    chosen = draw(st.lists(st.sampled_from(SOURCES), min_size=1, max_size=4, unique=True))
    return {s: draw(input_file(s)) for s in sorted(chosen)}


ANCHOR_RECORDS = 2  # a clean Korean file beside the fuzzed ones, so that a run is not refused as empty

def _check_report(report: dict, out: Path, files: dict) -> None:
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    for source, counts in report["sources"].items():
        assert counts["read"] == counts["kept"] + counts["dropped"] + counts["rejected"], (source, counts)
        assert counts["dropped"] == sum(counts["dropped_by_reason"].values())
        assert counts["rejected"] == sum(counts["rejected_by_reason"].values())
        spec = files.get(source)
        expected = spec["expected"] if spec is not None else (ANCHOR_RECORDS if source == "korean" else 0)
        if expected is not None:
            assert counts["read"] == expected, (source, counts["read"], spec)
    lines = (out / "raw_text_mixed.jsonl").read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    assert len(lines) == report["output"]["lines"] > 0
    for text_line in lines:
        doc = json.loads(text_line)
        assert isinstance(doc["text"], str) and doc["text"] and doc["source"] in SOURCES


def test_fuzzed_corpus_inputs_are_counted_or_refused_with_a_data_error(tally):
    """One seeded campaign of 30 generated source sets. Each outcome is counted (another exception type
    is a crash; a built corpus whose report does not account for every record lost data), the counts go
    to the tally, and then the test asserts on them: a campaign that generated nothing would pass vacuously."""
    runs = {"examples": 0, "bad_inputs": 0, "data_error": 0, "built": 0}
    crashes: list[tuple] = []
    unaccounted: list[tuple] = []

    @seed(fault_seed())
    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(files=source_files(), min_chars=st.sampled_from([0, 20, 100]),
           strict=st.sampled_from([False, False, False, True]),
           korean_format=st.sampled_from(["", ":auto", ":namu", ":wiki", ":plain"]))
    def campaign(files, min_chars, strict, korean_format):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = {}
            for source, spec in files.items():
                paths[source] = tmp / spec["name"]
                paths[source].write_bytes(spec["data"])
            anchor = tmp / "anchor" / "clean.jsonl"
            anchor.parent.mkdir()
            anchor.write_bytes(b"".join(_dump({"text": f"{i}번 문서. " + KO * 4}) + b"\n" for i in range(ANCHOR_RECORDS)))
            if "korean" in files and files["korean"]["expected"] is not None:
                files["korean"]["expected"] += ANCHOR_RECORDS
            korean = [Path(f"{p}{korean_format}") for p in (paths.get("korean"), anchor) if p is not None]
            opts = CorpusOptions(korean=korean, mcq=paths.get("mcq"),
                                 medical_dict=paths.get("medical_dict"), char_dict=paths.get("char_dict"),
                                 min_chars=min_chars, strict=strict, workers=1, progress=False)
            faults = sorted({f for spec in files.values() for f in spec["faults"]})
            runs["examples"] += 1
            runs["bad_inputs"] += sum(len(spec["faults"]) for spec in files.values())
            try:
                report = build_corpus(opts, tmp / "out")
            except DataError as exc:
                runs["data_error"] += 1
                assert "\n" not in str(exc), str(exc)  # one line, fit for the tools
                outcome = f"DataError: {str(exc)[:100]}"
            except Exception as exc:  # any other type is a crash: counted, asserted after the campaign
                crashes.append((sorted(files), faults, repr(exc)[:300]))
                outcome = f"crash: {exc!r}"[:120]
            else:
                runs["built"] += 1
                try:
                    _check_report(report, tmp / "out", files)
                except AssertionError as exc:
                    unaccounted.append((sorted(files), faults, str(exc)[:300]))
                outcome = "built: " + ", ".join(f"{s} {c['read']}={c['kept']}+{c['dropped']}+{c['rejected']}"
                                                for s, c in report["sources"].items() if c["read"])
            print(f"[fuzz] sources={sorted(files)} faults={faults} strict={strict} -> {outcome}")

    try:
        campaign()
    finally:
        print(f"[fuzz summary] {runs}, crashes {len(crashes)}, reports not accounting for every record "
              f"{len(unaccounted)}")
        tally.add("corpus fuzzing", bad_inputs=runs["bad_inputs"], data_lost=len(unaccounted), crashes=len(crashes))
    assert runs["examples"] >= 30 and runs["bad_inputs"] > 0, runs
    assert not crashes, crashes
    assert not unaccounted, unaccounted


def test_ten_megabyte_lines_are_read_counted_and_kept_or_rejected(tmp_path, tally):
    big_text = (KO * (10 * 2**20 // len(KO.encode()) + 1))
    korean = tmp_path / "big.jsonl"
    with open(korean, "wb") as fh:
        fh.write(_dump({"text": big_text}) + b"\n")  # a valid 10 MB record
        fh.write(b'{"text": "' + b"x" * (10 * 2**20) + b"\n")  # a 10 MB line of truncated JSON
        fh.write(b"\xff" * (10 * 2**20) + b"\n")  # 10 MB of bytes that are not UTF-8
    array = tmp_path / "big_dict.json"
    array.write_bytes(b"[" + _dump({"term": "고혈압", "definition": "혈압이 높은 상태 " * (2**20)}) + b","
                      + _dump(GOOD["medical_dict"]) + b"]")
    reports = []
    err = raised(lambda: reports.append(build_corpus(CorpusOptions(korean=[korean], medical_dict=array, workers=1,
                                                                   progress=False), tmp_path / "out")))
    if err is None:
        k, m = reports[0]["sources"]["korean"], reports[0]["sources"]["medical_dict"]
        print(f"[result] 10 MB lines: korean read {k['read']} kept {k['kept']} rejected {k['rejected_by_reason']}; "
              f"medical_dict read {m['read']} kept {m['kept']}")
        # the two valid records (one 10 MB line, one 10 MB array element) that were not kept
        lost = (1 - min(k["kept"], 1)) + (2 - min(m["kept"], 2))
    tally.add("corpus fuzzing", bad_inputs=3, data_lost=lost if err is None else 0, crashes=int(err is not None))
    assert err is None, repr(err)
    assert (k["read"], k["kept"], k["rejected"]) == (3, 1, 2)
    assert k["rejected_by_reason"]["malformed_json"] == 1 and k["rejected_by_reason"]["non_utf8"] == 1
    assert (m["read"], m["kept"]) == (2, 2)
    assert lost == 0


def test_shard_writer_refuses_a_deeply_nested_corpus_line_naming_it(tmp_path, tiny_data, tally):
    """The shard stage reads the corpus JSONL itself: a line nested 100,000 deep is a DataError naming
    file and line (it was a RecursionError traceback from json's decoder)."""
    from korcpt.shards.writer import ShardOptions, write_shards

    corpus = tmp_path / "deep.jsonl"
    corpus.write_bytes(_dump({"text": KO * 5}) + b"\n" + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    errors = {}
    for workers in (1, 2):
        errors[workers] = raised(lambda: write_shards(corpus, tmp_path / f"out{workers}", ShardOptions(
            tokenizer=str(tiny_data[0]), seq_len=8, workers=workers)))
        print(f"[injected] corpus line 2 nested 100,000 deep, workers={workers} -> {errors[workers]!r:.160}")
    crashes = sum(e is not None and not isinstance(e, DataError) for e in errors.values())
    tally.add("corpus fuzzing", bad_inputs=len(errors), crashes=crashes)
    for workers, err in errors.items():
        assert err is not None, "a corpus line nested 100,000 deep was accepted"
        assert isinstance(err, DataError), repr(err)
        assert f"{corpus}:2" in str(err)
        assert not (tmp_path / f"out{workers}" / "manifest.json").exists()

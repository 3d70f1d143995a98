"""A valid tiny run config, mutated by hypothesis: ``load_config`` either succeeds or raises ConfigError
whose message is one line and names what was mutated (``section.key``, the section, the override, or,
for YAML that cannot be read at all, the line of the file).

Mutations: a key or a whole section dropped; a value replaced by one of another type or a random one
(NaN, inf, huge integers, text with newlines, lists, mappings); unknown keys and sections; a section
that is not a mapping; a value replaced in the YAML text by a raw token PyYAML may choke on
(``2001-02-30``, ``!!int abc``, ``!!python/object/apply:...``, unclosed brackets, deep nesting); and
``--set`` overrides, well-formed or not.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from _faults import fault_seed
from korcpt.config import _SECTION_TYPES, load_config
from korcpt.errors import ConfigError
from tinyrun import run_config

FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTION_TYPES.items()}
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["all-linear", "cpu", "cuda:0", "frozen", "letter", "", "a\nb", "2e-5"]),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
RAW_TOKENS = ["2001-02-30", "!!int abc", "!!float x", ".nan", "-.inf", "[1, 2", "{a: 1", '"unterminated', "&a 1",
              "*nowhere", "!!python/object/apply:os.system ['touch /tmp/korcpt-pwned']", "!!binary xx", "~",
              "[" * 3000 + "]" * 3000, "0x1F", "1_000", "yes", "0o17", "1e400", "- a\n- b", "{", "@x", "`x"]
KINDS = ["drop_key", "drop_section", "wrong_type", "wrong_type", "unknown_key", "unknown_section", "not_mapping",
         "raw_text", "raw_text", "override", "bad_override"]


def _base(tmp: Path, tok: Path, shards: Path) -> dict:
    path = run_config(tmp / "base.yaml", tok, shards, tmp / "out")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(KINDS))
    section = draw(st.sampled_from(sorted(FIELDS)))
    key = draw(st.sampled_from(FIELDS[section]))
    if kind == "unknown_key":
        key = draw(st.one_of(st.text(min_size=1, max_size=12), st.integers(),
                             st.sampled_from(["lrr", "max_step", "a\nb", "x\ry", "tab\tkey", "\u2028"])))
    if kind == "unknown_section":
        section = draw(st.one_of(st.text(min_size=1, max_size=8), st.integers()).filter(lambda s: s not in FIELDS))
    if kind in ("raw_text", "override"):
        value = draw(st.one_of(st.sampled_from(RAW_TOKENS), st.text(max_size=12).map(lambda t: t.replace("\n", " "))))
    elif kind == "bad_override":
        value = draw(st.sampled_from(["train.lr", "=3", "train=3", ".lr=3", "train.=3", "lr 3", ""]))
    else:
        value = draw(VALUES)
    return kind, section, key, value


def _apply(base: dict, kind: str, section, key, value, path: Path) -> tuple[list[str], list[str]]:
    """Write the mutated config to ``path``; returns (overrides, strings one of which the error must hold)."""
    cfg = {s: dict(v) for s, v in base.items()}
    overrides: list[str] = []
    names = [f"{section}.{key}"]
    if kind == "drop_key":
        cfg.get(section, {}).pop(key, None)
    elif kind == "drop_section":
        cfg.pop(section, None)
        names = [f"{section}."]
    elif kind == "wrong_type":
        cfg.setdefault(section, {})[key] = value
    elif kind == "unknown_key":
        cfg[section][key] = value
        names = [f"{section}.{key}", f"{section}.{key!r}"]
    elif kind == "unknown_section":
        cfg[section] = {"x": 1}
        names = [repr(section), str(section)]
    elif kind == "not_mapping":
        cfg[section] = value if not isinstance(value, dict) else [value]
        names = [f"{section}:"]
    if kind == "raw_text":
        cfg.setdefault(section, {}).setdefault(key, 0)  # a placeholder line to overwrite with the raw token
    text = yaml.safe_dump(cfg, allow_unicode=True, sort_keys=True)
    if kind == "raw_text":
        lines = text.splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  {key}:") and _section_of(lines, i) == section)
        lines[i] = f"  {key}: {value}"
        text = "\n".join(lines) + "\n"
        # the error names the key, or the line of the token (PyYAML may see the problem a line or two later)
        names = [f"{section}.{key}"] + [f"line {n}{sep}" for n in (i + 1, i + 2, i + 3) for sep in ",:"]
        if "\n" in str(value):  # a raw multi-line token may break the structure anywhere below it
            names.append("not valid YAML")
    if kind == "override":
        overrides = [f"{section}.{key}={value}"]
    if kind == "bad_override":
        overrides = [value]
        names = [repr(value)]
    if kind == "raw_text" and value.startswith("[[["):
        names.append("nested too deeply")
    path.write_text(text, encoding="utf-8")
    return overrides, names


def _section_of(lines: list[str], i: int) -> str | None:
    for j in range(i, -1, -1):
        if lines[j] and not lines[j].startswith(" "):
            return lines[j].rstrip(":")
    return None


def test_mutated_config_loads_or_fails_in_one_line_naming_the_key(tiny_data, tally):
    """One seeded campaign of 30 mutations. Each outcome is counted (another exception type is a crash;
    a ConfigError on several lines or naming nothing mutated is unclear), the counts go to the tally,
    and then the test asserts on them: a campaign that generated nothing would pass vacuously."""
    tok, shards = tiny_data
    runs = {"examples": 0, "loaded": 0, "refused": 0}
    crashes: list[tuple] = []
    unclear: list[tuple] = []

    @seed(fault_seed())
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutation=mutations())
    def campaign(mutation):
        kind, section, key, value = mutation
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            path = tmp / "run.yaml"
            overrides, names = _apply(_base(tmp, tok, shards), kind, section, key, value, path)
            runs["examples"] += 1
            try:
                cfg = load_config(path, overrides)
            except ConfigError as exc:
                runs["refused"] += 1
                message = str(exc)
                print(f"[mutation] {kind} {section}.{key} = {str(value)[:40]!r} -> ConfigError: {message[:160]}")
                if "\n" in message or "\r" in message or not any(name in message for name in names):
                    unclear.append((mutation, names, message))
            except Exception as exc:  # any other type is a crash: counted, asserted after the campaign
                crashes.append((mutation, repr(exc)[:300]))
            else:
                runs["loaded"] += 1
                print(f"[mutation] {kind} {section}.{key} = {str(value)[:40]!r} -> loaded")
                assert cfg.to_dict()  # a config that loads is a complete, typed RunConfig

    try:
        campaign()
    finally:
        print(f"[config fuzz summary] {runs}, crashes {len(crashes)}, unclear errors {len(unclear)}")
        tally.add("config fuzzing", bad_inputs=runs["examples"], crashes=len(crashes))
    assert runs["examples"] >= 30 and runs["refused"] > 0, runs
    assert not crashes, crashes
    assert not unclear, unclear
    assert not Path("/tmp/korcpt-pwned").exists()  # a YAML python tag never runs anything

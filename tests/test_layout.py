"""The package layout follows the data flow: a stage imports only earlier stages and the shared
modules below them (config, errors, log, assets, cli, files, labels), never a later one. Read from the source, so an
import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

from tinyrun import ROOT

# corpus -> shards -> vocab -> model -> eval -> train (the loop evaluates: eval comes before it)
STAGES = ("corpus", "shards", "vocab", "model", "eval", "train")
SHARED = ("config", "errors", "log", "assets", "cli", "files", "labels")


def korcpt_imports(path: Path) -> list[str]:
    """The korcpt modules a file imports, as their first component under korcpt (``korcpt.model.lora`` -> ``model``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        found += [n.split(".")[1] for n in names if n.startswith("korcpt.")]
    return found


def allowed(owner: str) -> set[str]:
    if owner in SHARED:  # below every stage: only each other
        return set(SHARED)
    return set(SHARED) | set(STAGES[: STAGES.index(owner) + 1])


def test_every_stage_imports_only_earlier_stages():
    files = sorted((ROOT / "korcpt").rglob("*.py"))
    forbidden, seen = [], 0
    for path in files:
        parts = path.relative_to(ROOT / "korcpt").parts
        owner = parts[0] if len(parts) > 1 else path.stem
        if owner == "__init__":
            continue
        assert owner in STAGES + SHARED, f"{path}: not a known stage or shared module; add it to this test"
        imports = korcpt_imports(path)
        seen += len(imports)
        forbidden += [f"{path.relative_to(ROOT)} imports korcpt.{m}" for m in imports if m not in allowed(owner)]
    assert seen > 50  # it did read the imports
    assert forbidden == []


def test_the_rule_catches_a_later_stage(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from korcpt.model.lora import unwrap_base\n    import korcpt.train.loop\n")
    assert korcpt_imports(probe) == ["model", "train"]
    assert "model" not in allowed("vocab") and "train" not in allowed("eval") and "vocab" not in allowed("assets")

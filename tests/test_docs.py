"""Every code name the docs cite exists: `module.name` and `module.Class.method` in backticks in
docs/LEDGER.md, docs/DESIGN.md and docs/PAPER_STREAM.md, with module a file of src/trainability."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in (ROOT / "src" / "trainability").glob("*.py")} - {"__init__", "__main__"}
DOCS = ["docs/LEDGER.md", "docs/DESIGN.md", "docs/PAPER_STREAM.md"]


def _config_keys() -> set[str]:
    """Dotted params.yaml keys (`scheduler.beta`, `optim.lr`, ...): module-like, but not code."""
    import yaml
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())["run_defaults"]
    return {f"{k}.{sub}" for k, v in defaults.items() if isinstance(v, dict) for sub in v}


CONFIG_KEYS = _config_keys()


def cited_names(text: str) -> set[str]:
    names = set()
    for span in re.findall(r"`([^`]+)`", text):
        for m in re.finditer(r"\b([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)", span):
            name = f"{m.group(1)}.{m.group(2)}"
            if m.group(1) in MODULES and m.group(2) != "py" and name not in CONFIG_KEYS:
                names.add(name)
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_cited_code_names_exist(doc):
    path = ROOT / doc
    if not path.exists():
        pytest.skip(f"{doc} not written")
    missing = []
    for name in sorted(cited_names(path.read_text())):
        module, *attrs = name.split(".")
        obj = importlib.import_module(f"trainability.{module}")
        for a in attrs:
            if not hasattr(obj, a):
                missing.append(name)
                break
            obj = getattr(obj, a)
    assert not missing, f"{doc} cites names that do not exist: {missing}"


def test_design_table_api_names_exist():
    """The DESIGN.md module table: every `name(` or CamelCase name in a row's API column is in that module."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    missing = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 5 or not cells[1].startswith("`") or ".py`" not in cells[1]:
            continue
        modules = [importlib.import_module(f"trainability.{m}") for m in re.findall(r"`(\w+)\.py`", cells[1])]
        for span in re.findall(r"`([^`]+)`", cells[3] + cells[2]):
            for name in re.findall(r"\b([A-Za-z_]\w*)\(", span) + re.findall(r"^([A-Z]\w+)", span):
                if name in ("python",) or any(hasattr(m, name) for m in modules):
                    continue
                if any(hasattr(getattr(m, c), name) for m in modules for c in dir(m) if c[:1].isupper()):
                    continue   # a method, e.g. DecisionProbe.measure(
                missing.append(f"{cells[1]}: {name}")
    assert not missing, missing

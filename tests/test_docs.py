"""The docs match the code: every code name the docs cite exists where they say (`module.name` and
`module.Class.method` in backticks in docs/LEDGER.md, DESIGN.md, PAPER_STREAM.md and METHOD.md, with
module a file of src/trainability or of its subpackages, `stacked.engine`; a class or function must be
defined in that module, not only imported there), every module has a row in DESIGN.md, DESIGN.md's record layout
names every field a record has, and nothing cites a file outside the repository."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "trainability"


def _module_name(path: Path) -> str:
    """src/trainability/stacked/engine.py -> "stacked.engine"; a package's __init__.py -> its name."""
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PKG.rglob("*.py")} - {"", "__main__"}
DOCS = ["docs/LEDGER.md", "docs/DESIGN.md", "docs/PAPER_STREAM.md", "docs/METHOD.md"]


def _config_keys() -> set[str]:
    """Dotted params.yaml keys (`scheduler.beta`, `optim.lr`, ...): module-like, but not code."""
    import yaml
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())["run_defaults"]
    return {f"{k}.{sub}" for k, v in defaults.items() if isinstance(v, dict) for sub in v}


CONFIG_KEYS = _config_keys()


def cited_names(text: str) -> set[str]:
    """Module-qualified names in backticks: (module, attribute, [attribute]) joined by dots, the module
    the longest dotted prefix that is a module of the package."""
    names = set()
    for span in re.findall(r"`([^`]+)`", text):
        for m in re.finditer(r"(?<![\w./])([a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", span):
            parts = m.group(1).split(".")
            k = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES), default=0)
            if not k or parts[k] == "py" or m.group(1) in CONFIG_KEYS:
                continue
            names.add(".".join(parts[:k + 2]))
    return names


def split_name(name: str) -> tuple[str, list[str]]:
    parts = name.split(".")
    k = max(i for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
    return ".".join(parts[:k]), parts[k:]


@pytest.mark.parametrize("doc", DOCS)
def test_cited_code_names_exist(doc):
    path = ROOT / doc
    if not path.exists():
        pytest.skip(f"{doc} not written")
    missing, imported = [], []
    for name in sorted(cited_names(path.read_text())):
        module, attrs = split_name(name)
        obj = importlib.import_module(f"trainability.{module}")
        for i, a in enumerate(attrs):
            if not hasattr(obj, a):
                missing.append(name)
                break
            obj = getattr(obj, a)
            home = getattr(obj, "__module__", None)
            if i == 0 and callable(obj) and home is not None and home != f"trainability.{module}":
                imported.append(f"{name} (defined in {home})")
    assert not missing, f"{doc} cites names that do not exist: {missing}"
    assert not imported, f"{doc} cites names where they are only imported: {imported}"


def test_design_table_api_names_exist():
    """The DESIGN.md module table: every `name(` or CamelCase name in a row's API column is in that module."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    missing = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 5 or not cells[1].startswith("`") or ".py`" not in cells[1]:
            continue
        modules = [importlib.import_module("trainability." + _module_name(PKG / m))
                   for m in re.findall(r"`([\w/]+\.py)`", cells[1])]
        for span in re.findall(r"`([^`]+)`", cells[3] + cells[2]):
            for name in re.findall(r"\b([A-Za-z_]\w*)\(", span) + re.findall(r"^([A-Z]\w+)", span):
                if name in ("python",) or any(hasattr(m, name) for m in modules):
                    continue
                if any(hasattr(getattr(m, c), name) for m in modules for c in dir(m) if c[:1].isupper()):
                    continue   # a method, e.g. DecisionProbe.measure(
                missing.append(f"{cells[1]}: {name}")
    assert not missing, missing


def test_every_module_has_a_design_row():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    rows = {_module_name(PKG / m) for line in text.splitlines() if line.startswith("| `")
            for m in re.findall(r"`([\w/]+\.py)`", line.split("|")[1])}
    assert MODULES <= rows, f"modules without a row in docs/DESIGN.md: {sorted(MODULES - rows)}"


def test_design_record_layout_names_every_record_field():
    """Every key of a record (record.new_record, the engine's task entries and additions, a decision
    row's fields, provenance) is spelled out in DESIGN.md's `record.json` block."""
    import torch

    from trainability.config import load_params, resolve_run
    from trainability.record import new_record
    from trainability.scheduler import ROW_FIELDS
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    block = text[text.index("## Run record"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    documented = set(re.findall(r'"(\w+)"', block))
    rec = new_record(resolve_run(load_params(ROOT / "params.yaml"), "smoke", "l2-scheduled", 0),
                     torch.device("cpu"), 1)
    src = ROOT / "src" / "trainability"
    writers = (src / "train.py").read_text() + (src / "record.py").read_text()   # record.end_task, finish_record
    task_entry = writers[writers.index('record["tasks"].append({'):]
    task_entry = task_entry[:task_entry.index("})\n")]
    keys = (set(rec) | set(rec["decisions"]) | set(rec["provenance"]) | {"finished"} | set(ROW_FIELDS)
            | set(re.findall(r'"(\w+)":', task_entry))
            | set(re.findall(r"record\.update\((\w+)=", writers)) | set(re.findall(r'record\["(\w+)"\] =', writers)))
    assert keys - documented == set(), f"record fields missing from docs/DESIGN.md: {sorted(keys - documented)}"


def test_nothing_cites_the_spec_outside_the_repository():
    """The project stands on its own: src/ and docs/ cite the paper (section, equation, figure) or
    docs/METHOD.md, never the notes file SPEC.md that lives outside the repository."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("src", "docs") for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".txt", ".rst")
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if "SPEC" in line]
    assert not hits, f"cites SPEC: {hits}"


def test_the_readmes_own_loop_example_runs_and_decides(capsys):
    """The README's example of the probe and the scheduler in a training loop of one's own, run as written:
    ten decisions a layer, finite positive eigenvalues, and Algorithm 1 changing a learning rate."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The measurement and the scheduler in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), ns)
    opt, sched = ns["optimizer"], ns["scheduler"]
    counts = sched.rule_counts
    assert [sum(counts[l].values()) for l in (1, 2)] == [10, 10]
    assert all(0 < r["lam_max"] < float("inf") for r in ns["rows"].values())
    assert sum(counts[1][r] + counts[2][r] for r in ("cool", "warm")) > 0   # the rule fired
    for g in opt.param_groups:   # and acted: each layer's lr is the start's times its cools and warms
        c = counts[g["layer"]]
        assert g["lr"] == pytest.approx(opt.defaults["lr"] * sched.cool ** c["cool"] * sched.warm ** c["warm"])
    assert capsys.readouterr().out.count("\n") == 11   # a line a decision, then the counts

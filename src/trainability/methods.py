"""The paper's three methods against loss of trainability (paper Sec. 5; docs/METHOD.md §3), in the
order every figure and table shows them, and how a run's name encodes its method and arm
(`<method>-<arm>[-<variant>]`, params.yaml `runs`)."""
from __future__ import annotations

METHODS = ("crelu", "l2", "wass")   # the order of the panels and rows of Figs. 5-9 and the appendix
METHOD_NAMES = {"crelu": "CReLU", "l2": "L2", "wass": "Wasserstein"}


def method_of(run: str) -> str:
    """'l2-scheduled-noramp' -> 'l2'."""
    return run.split("-")[0]


def arm_of(run: str) -> str:
    """'l2-scheduled-noramp' -> 'scheduled-noramp'; a run without a dash is its own arm."""
    return run.split("-", 1)[1] if "-" in run else run


def methods_in(runs) -> list[str]:
    """The methods of `runs` in order of first appearance (params.yaml order of an experiment's runs)."""
    return list(dict.fromkeys(method_of(r) for r in runs))

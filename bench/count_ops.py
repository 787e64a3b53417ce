"""ATen operations dispatched per batched step, counted on the CPU: on a GPU each one that is not a view is
a kernel launch, and at the paper's size a launch-bound step costs about its launch count times a few
microseconds. A plain step (forward, backward, Adam) and a decision step (plus the probe, batched
Lanczos and Algorithm 1) of bench_batched.py's stacked MLP (`stacked_step`), with the ops inside `eigen.ritz_step`
(which runs on the host in every case) counted apart, and the decision's host round trips (one sync each).

    .venv/bin/python bench/count_ops.py --models 4
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainability.stacked.lanczos import RowRule
from bench_batched import stacked_step

# no kernel of their own: metadata changes of a tensor
VIEWS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "detach",
         "alias", "as_strided", "permute", "split", "split_with_sizes", "unbind", "_reshape_alias", "reshape",
         "flatten", "lift_fresh"}


class Count(TorchDispatchMode):
    """Counts non-view ops by name; ops while `host` is set go to `host_ops`."""

    def __init__(self):
        super().__init__()
        self.ops, self.host_ops, self.host = collections.Counter(), collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            (self.host_ops if self.host else self.ops)[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=4)
    a = p.parse_args()
    step = stacked_step(a.models, torch.device("cpu"), 256, measure=True)
    for i in range(4):   # Adam state, then a first decision: the counted one warm-starts as in a run
        step(i == 3)
    counter = Count()
    ritz = RowRule.ritz   # the host rule's hook (a static method)

    rounds = [0]

    def host_ritz(*args, **kwargs):
        rounds[0] += 1
        counter.host = True
        try:
            return ritz(*args, **kwargs)
        finally:
            counter.host = False
    with counter:
        step(False)
    plain = sum(counter.ops.values())
    counter.ops.clear()
    RowRule.ritz = host_ritz
    with counter:
        step(True)
    RowRule.ritz = staticmethod(ritz)
    print(f"{a.models} models: plain step {plain} ops; decision step {sum(counter.ops.values())} ops outside "
          f"eigen.ritz_step, {sum(counter.host_ops.values())} inside (host); {rounds[0]} host round trips "
          f"(device-to-host syncs)")
    print("decision step, most frequent:", ", ".join(f"{k} {v}" for k, v in counter.ops.most_common(10)))


if __name__ == "__main__":
    main()

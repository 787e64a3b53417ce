"""CUDA graphs of the stacked engine: a step replayed from one captured graph (`CudaGraphStep`), and a
decision's forward pass and first Lanczos rounds (`DecisionGraph`)."""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch.utils._pytree import tree_flatten

from .lanczos import Krylov, lanczos_ahead, lanczos_more
from .model import clear_grads


class CudaGraphStep:
    """step(idx) captured once as a CUDA graph (torch.cuda.graphs' whole-network capture: forward,
    backward and optimiser step) and replayed: one launch instead of ~110 per step. The first `warmup`
    calls run eagerly on a side stream (capture's prerequisite), the next is captured and replayed, later
    ones copy idx into the captured index tensor and replay. Every call is a real training step, so a
    run's records do not depend on when the capture happens. `step` may only update tensors that outlive
    the graph, in place (parameters, Adam state, accumulators), and idx keeps its shape. A call returns
    what step returned (after the capture: the captured tensors, which each replay writes again).
    keeps_grads: the step leaves its gradients in .grad for the caller (a decision step's forward and
    backward, Adam eager after it), so each replay points .grad back at the captured ones."""

    def __init__(self, step, params: list[torch.Tensor], warmup: int = 3, keeps_grads: bool = False):
        self.step, self.params, self.warmup, self.keeps_grads = step, params, warmup, keeps_grads
        self.graph, self.idx, self.eager_calls, self.out, self.grads = None, None, 0, None, None

    @classmethod
    def for_device(cls, step, params: list[torch.Tensor], device: torch.device, **kwargs):
        """One on CUDA; None elsewhere (no CUDA graphs: the caller runs the step eagerly)."""
        return cls(step, params, **kwargs) if device.type == "cuda" else None

    def __call__(self, idx: torch.Tensor):
        if self.graph is not None:
            self.idx.copy_(idx)
            self.graph.replay()
            if self.keeps_grads:   # .grad may point elsewhere since (an eager step, another graph's capture)
                for p, g in zip(self.params, self.grads):
                    p.grad = g
            return self.out
        clear_grads(self.params)
        if self.eager_calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(idx)
            torch.cuda.current_stream().wait_stream(side)
            # made on the side stream, read on this one: not to be reused before this stream is done with them
            for t in tree_flatten(out)[0] + [p.grad for p in self.params]:
                if isinstance(t, torch.Tensor):
                    t.record_stream(torch.cuda.current_stream())
            self.eager_calls += 1
            return out
        self.idx = idx.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):   # records the step without running it
            self.out = self.step(self.idx)
        self.grads = [p.grad for p in self.params]
        self.graph.replay()
        return self.out


class DecisionGraph:
    """A decision step's device part as one CUDA graph (`decision_graph`): the probe's forward pass on the
    step's minibatch (the layer inputs and activation factors the written-out products read, and the loss
    gradients at the layer outputs for the measure.global models') and ROUNDS rounds of every Lanczos
    problem's products (lanczos_ahead), captured at the job's first full-minibatch decision and replayed at
    every later one. The host then runs the stopping rule over those rounds' alphas and betas, fetched in
    one transfer (batched_lanczos(ahead=...)). Where rows are still going, the next round comes from a
    graph of that one round (up to EXTRA of them, each captured at the first decision that needs it), and
    the rule runs over it, round by round; rows going on past them take their next products eagerly on
    the replayed tensors. No autograd graph, so Adam's in-place steps between decisions leave them valid
    (StackedProbe._r_op_hvps; BatchNorm stacks, whose products are autograd's, do not use this graph).
    Eager, a round is hundreds of kernel launches and a sync: on an H100 one round of products took
    1.9-5.7 ms eager and 0.5-2.5 ms replayed (bench/decision_profile.py), with decisions 72-85% of a
    paper-scale job's time. The extra rounds that rows which have stopped compute are thrown away; the
    records are the eager engine's bits (tests/test_batched.py). Elsewhere than CUDA the same bodies run
    eagerly at every call (a stand-in, for the tests). Partial minibatches stay eager."""
    ROUNDS = 16       # [choice] about the rounds a paper-scale decision takes (8-20 on an H100, 2026-11-27)
    # [choice] rounds past ROUNDS from graphs of one round each: l2-long's decisions went 1-3 rounds past 16
    # (CPU, 2026-11-28), the 69-model job's 0-2 (call 7). One graph of 4 would replay 4 where 1 is needed, at
    # a few ms a round in a job that large (its rounds read a basis of 17-20 vectors): a sync a round is less
    EXTRA = 4
    fallback = True   # a failed capture: a warning, then eager rounds for the rest of the job (tests: raise)

    def __init__(self, engine):   # a stacked.engine.BatchedRuns (which imports this module)
        self.engine, self.graph, self.state, self.failed = engine, None, None, False
        self.more: list = []   # the graphs past ROUNDS: (graph, its output) each, None where a capture failed
        self.capture = engine.device.type == "cuda"

    def _body(self):
        e = self.engine
        xb, yb = e.minibatch(self.idx)
        with torch.no_grad():
            inputs = e.net.forward(xb, keep=True)[1]
        problems = list(zip(e.probe.hvps(inputs, yb, None), self.starts))   # no BatchNorm here: no loss_closure
        return problems, lanczos_ahead(problems, self.rounds, e.probe.eig_max_iter,
                                       capacity=self.rounds + self.extra + 1)   # no growing in the graphs past it

    @property
    def rounds(self) -> int:
        """ROUNDS, but none past eig_max_iter: the rule reads none."""
        return min(self.ROUNDS, self.engine.probe.eig_max_iter)

    @property
    def extra(self) -> int:
        """The rounds replayed past ROUNDS: EXTRA, but none past eig_max_iter."""
        return min(self.EXTRA, self.engine.probe.eig_max_iter - self.rounds)

    def _capture(self, body, what: str):
        """(graph, body's output as the graph wrote it): body run once on a side stream (capture's
        prerequisite: a warm-up), then captured, which records it without running it. None where the
        capture failed (fallback): nothing ran, and the eager path computes the same, more slowly."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                return graph, body()
        except RuntimeError as e:
            if not self.fallback:
                raise
            warnings.warn(f"decision_graph: capture failed ({what}), they stay eager for this job: {e}")
            return None

    def __call__(self, bidx: torch.Tensor, starts: list[torch.Tensor]):
        """(problems, rounds run ahead and the graphs' `more`) of this decision, for
        StackedProbe.measure; None where the capture failed."""
        if not self.capture:
            self.idx, self.starts = bidx, starts
            problems, (kry, alphas, betas) = self._body()
            return problems, (kry, alphas, betas, self._more)   # _more gives None past EXTRA (none at 0)
        if self.failed:
            return None
        if self.graph is None:
            self.idx, self.starts = bidx.clone(), [v.clone() for v in starts]
            got = self._capture(self._body, "the first rounds")
            if got is None:
                self.failed = True
                return None
            self.graph, self.state = got
        else:
            self.idx.copy_(bidx)
            for mine, v in zip(self.starts, starts):
                mine.copy_(v)
        self.graph.replay()
        problems, (kry, alphas, betas) = self.state
        # fresh handles on the replayed Krylov states: rows going on past ROUNDS extend copies of them
        return problems, ([copy.copy(k) for k in kry], alphas, betas, self._more)

    def _more(self, kry: list[Krylov]):
        """(Krylov states, alphas, betas) of the next round of every row from the states `kry` that the
        graphs before left (batched_lanczos' `more`), from that round's own graph; None past EXTRA rounds or
        where its capture failed. The graphs form a chain: each reads the states the one before wrote."""
        j = kry[0].k - self.rounds - 1   # the rounds past ROUNDS so far (every problem's state is as far on)
        if j >= self.extra:
            return None
        body = functools.partial(lanczos_more, kry, 1)   # copies: the warm-up's and the capture's own
        if not self.capture:
            return body()
        if j == len(self.more):   # the first decision to get this far (a None before it stops the chain there)
            self.more.append(self._capture(body, f"round {self.rounds + j + 1}"))
        if self.more[j] is None:
            return None
        graph, (states, alphas, betas) = self.more[j]
        graph.replay()
        return [copy.copy(k) for k in states], alphas, betas

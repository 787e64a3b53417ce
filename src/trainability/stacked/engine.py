"""The stacked engine: M runs of one model shape as one engine of loop.train_stream (`BatchedRuns`), and
`run_batched`, the batched counterpart of train.run."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import config
from ..data import load_mnist
from ..devices import setup_device
from ..indicators import task_start_indicators
from ..loop import acts, measures, steps_per_task, train_stream
from ..models import build_model
from ..optim import ramped_betas
from ..planning import check_batchable
from ..record import (CHECKPOINT_NAME, RECORD_NAME, append_decision, end_task, finish_record, finished_record,
                      new_record, task_online_acc)
from ..regularizers import adam_weight_decay, hessian_shift, wasserstein_lam
from ..streams import epoch_order, input_dim, make_stream, split_batches, sub_seed
from ..wandb_log import replay_record
from .adam import StackedAdam
from .graphs import CudaGraphStep, DecisionGraph
from .model import StackedMLP, clear_grads, evaluate_stack
from .probe import StackedProbe
from .regularizers import StackedWasserstein
from .scheduler import StackedScheduler, no_rules, rows_to_dicts
# 2: BatchNorm buffers and the whole-network column (global_vecs); 3: the scheduler's windows oldest first;
# 4: loop.train_stream's layout; 5: a task clock per model. A checkpoint of another format is ignored
CHECKPOINT_FORMAT = 5


class BatchedRuns:
    """M runs of one model shape as one engine of loop.train_stream: the stacked model, its Adam,
    Wasserstein penalty, probe and scheduler, the runs' streams on the device, and their records (written
    at the end, and replayed into W&B then)."""

    def __init__(self, cfgs: list[dict], device: torch.device, metas: list[dict], out_dirs: list[Path]):
        self.cfgs, self.device, self.metas, self.out_dirs = cfgs, device, metas, out_dirs
        c0 = cfgs[0]
        self.M = M = len(cfgs)
        self.task_epochs = [steps_per_task(c)[0] for c in cfgs]   # a task clock per model (loop.train_stream)
        self.B = B = c0["batch_size"]
        self.n_images = c0["stream"]["n_images"]
        self.drop_last = c0["stream"]["drop_last"]
        self.betas0 = tuple(c0["optim"]["betas"])

        # data: one stream per distinct seed, on the device; model m reads seed slot sidx[m]
        x_all, y_all = load_mnist(c0["data"]["root"], train=True)
        self.seeds = sorted({c["seed"] for c in cfgs})
        self.streams = {s: make_stream(c0["stream"], x_all, y_all, s, device) for s in self.seeds}
        self.sidx = torch.tensor([self.seeds.index(c["seed"]) for c in cfgs], device=device)
        self.xs = torch.stack([self.streams[s].x for s in self.seeds])

        models = []
        for c in cfgs:
            torch.manual_seed(sub_seed(c["seed"], 0))   # as train.Learner
            models.append(build_model(c["model"], input_dim(c["stream"])))
        self.net = net = StackedMLP(models, device)
        self.L = L = net.n_layers
        self.lr0 = [float(c["optim"]["lr"]) for c in cfgs]
        lr = torch.tensor(self.lr0, dtype=torch.float64, device=device).unsqueeze(1).repeat(1, L)
        self.wd = torch.tensor([adam_weight_decay(c["regularizer"]) for c in cfgs], device=device)
        self.adam = StackedAdam(net, lr, self.wd, self.betas0, c0["optim"]["eps"], fused=c0["fused_adam"])
        self.lam_w = [wasserstein_lam(c["regularizer"]) for c in cfgs]
        self.wass = StackedWasserstein(net, self.lam_w) if any(x > 0 for x in self.lam_w) else None
        # the probe runs for every model when any measures (its Lanczos for the measuring ones only); only
        # the measuring ones keep its rows
        self.measuring_m = [measures(c) for c in cfgs]
        self.measuring = any(self.measuring_m)
        init_seeds = [sub_seed(c["seed"], 0) for c in cfgs]
        # the whole network as one more decision column: for measure.global (its lam_max) and the global variant
        global_lam = [c["measure"]["global"] for c in cfgs]
        self.global_variant = [c["scheduler"]["variant"] == "global" for c in cfgs]
        global_column = any(global_lam) or any(self.global_variant)
        self.probe = StackedProbe(net, self.adam, B, init_seeds, c0["measure"]["eig_tol"],
                                  c0["measure"]["eig_max_iter"],
                                  [c["scheduler"]["code_alpha_agg"] for c in cfgs], global_lam,
                                  global_column, self.measuring_m,
                                  torch.tensor([hessian_shift(c["regularizer"]) for c in cfgs], device=device)) \
            if self.measuring else None
        self.sched = StackedScheduler(self.adam, B, [c["scheduler"] for c in cfgs],
                                      [acts(c) for c in cfgs], L + global_column) \
            if self.measuring else None
        # each model's decision rows: its layers, and "global" for the global variant (as scheduler.step)
        self.row_keys = [list(range(1, L + 1)) + (["global"] if g else []) for g in self.global_variant]
        ramp = [c["optim"]["beta_ramp"] for c in cfgs]
        self.ramping = any(ramp)
        self.ramp_rows = None if all(ramp) else torch.tensor(ramp, device=device)
        self.records = [dict(new_record(c, device, L), name=mt.get("run"), scale=mt.get("scale"),
                             batched={"models": M, "position": i}) for i, (c, mt) in enumerate(zip(cfgs, metas))]
        self.rule_counts = [no_rules(L) for _ in cfgs]
        self.alive = [True] * M   # False once a model's run has ended (diverged, or its last task done)
        self.left = []   # the runs that have left the stack (keep): what finish writes for each

        # each model's task labels and counters live as long as the run, updated in place (a CUDA graph
        # reads them); the models' tasks start and end on their own clocks (start_task, end_task)
        self.ys = torch.zeros(M, self.n_images, dtype=torch.long, device=device)
        self.model_rows = torch.arange(M, device=device).unsqueeze(1)
        self.correct = torch.zeros(M, device=device)           # over full minibatches
        self.correct_partial = torch.zeros(M, device=device)   # over last partial ones (stream.drop_last false)
        self.loss_sum = torch.zeros(M, device=device)
        self.indicators, self.gens = [None] * M, [None] * M
        self.steps_done = [0] * M   # per model: a diverged one's stop where train.SingleRun stops
        self.diverged, self.correct_frozen = [False] * M, [None] * M
        # decision rows (step, frac, (F, M, C) on the device) since the earliest open task's start: row
        # rows_base + i is self.rows[i]; a model's task reads its rows from row_start[m] on
        self.rows, self.rows_base, self.row_start, self.open = [], 0, [0] * M, set()
        self.graph = CudaGraphStep.for_device(self.plain_step, net.params(), device) if c0["cuda_graph"] else None
        self.decision_step_graph = CudaGraphStep.for_device(self.decision_forward_backward, net.params(), device,
                                                            keeps_grads=True) \
            if c0["decision_step_graph"] and self.measuring else None
        self.decision_graph = DecisionGraph(self) \
            if c0["decision_graph"] and self.measuring and not c0["model"]["batchnorm"] else None

    def objective(self, xb, yb, keep=False, sub: StackedMLP | None = None):
        """(logits, per-model cross-entropy, their sum, layer inputs, layer outputs) of every model on its
        minibatch; with `sub` (StackedMLP.rows), of that sub-stack's models only. The Wasserstein penalty
        is not in it: the step adds its gradient (StackedWasserstein.add_grad), the probe its Hessian
        (2 lam I, in StackedProbe's shift)."""
        net = self.net if sub is None else sub
        if sub is not None:
            xb, yb = xb[sub.idx], yb[sub.idx]
        logits, inputs, outs = net.forward(xb, keep)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(len(net.models), -1).mean(1)
        return logits, ce, ce.sum(), inputs, outs

    def minibatch(self, bidx):
        """Each model's minibatch bidx (M, b), gathered on the device from its seed's stream: (xb, yb)."""
        return self.xs[self.sidx.unsqueeze(1), bidx], self.ys[self.model_rows, bidx]

    def forward_backward(self, bidx, counts, keep=False):
        """The step up to Adam: gather each model's minibatch bidx (M, b) on the device, forward, backward,
        count hits and sum the losses."""
        xb, yb = self.minibatch(bidx)
        logits, ce, total, inputs, outs = self.objective(xb, yb, keep)
        total.backward()
        if self.wass is not None:
            self.wass.add_grad()
        counts.add_((logits.argmax(2) == yb).sum(1))
        self.loss_sum.add_(ce.detach())
        return xb, yb, inputs, outs

    def plain_step(self, bidx):
        """A full-minibatch step without a decision: what the CUDA graph captures."""
        self.forward_backward(bidx, self.correct)
        self.adam.step()

    def decision_forward_backward(self, bidx, counts=None):
        """A decision step up to the probe: forward_backward with the layer activations kept, as values
        (xb, yb, layer inputs, loss gradients at the layer outputs): what `decision_step_graph` captures.
        Values only: the step's autograd graph goes before the probe builds its own (alive, its
        AccumulateGrad nodes, made on the default stream, break a DecisionGraph capture on CUDA)."""
        xb, yb, inputs, outs = self.forward_backward(bidx, self.correct if counts is None else counts, keep=True)
        return xb, yb, [a.detach() for a in inputs], [z.grad for z in outs]

    def start_task(self, tasks: dict[int, int]) -> None:
        """Models m start their task tasks[m]; the others go on with theirs."""
        net = self.net
        for m, t in tasks.items():
            c = self.cfgs[m]
            if t > 0 and c["arm"] == "reset":   # as train.SingleRun: a fresh model, optimiser, probe and scheduler
                torch.manual_seed(sub_seed(c["seed"], t))
                net.load(m, build_model(c["model"], input_dim(c["stream"])))
                self.adam.reset(m, self.lr0[m])
                if self.wass is not None:
                    self.wass.reset(m)
                if self.probe is not None:
                    self.probe.reset(m, sub_seed(c["seed"], t))
                    self.sched.reset(m)
                    self.rule_counts[m] = no_rules(self.L)
        # each (seed, task)'s labels once: models of one seed at one task share them
        pairs = {(self.cfgs[m]["seed"], t) for m, t in tasks.items()}
        labels = {(seed, t): self.streams[seed].task(t)[1] for seed, t in pairs}
        for m, t in tasks.items():
            c = self.cfgs[m]
            self.ys[m].copy_(labels[c["seed"], t])
            self.indicators[m] = None
            if c["indicators"]["enabled"] and self.alive[m]:
                model = net.extract(m, c["model"])
                reg = self.wass.for_model(m, model) if self.lam_w[m] > 0 else None
                self.indicators[m] = task_start_indicators(c, model, self.xs[self.sidx[m]], self.ys[m], reg,
                                                           float(self.wd[m]))
            self.gens[m] = torch.Generator(device=self.device).manual_seed(sub_seed(c["seed"], t, 1))
            self.steps_done[m], self.diverged[m], self.correct_frozen[m] = 0, False, None
            self.row_start[m] = self.rows_base + len(self.rows)
        self.open |= set(tasks)
        if len(tasks) == self.M:
            for acc in (self.correct, self.correct_partial, self.loss_sum):
                acc.zero_()
        else:
            idx = torch.tensor(sorted(tasks), device=self.device)
            for acc in (self.correct, self.correct_partial, self.loss_sum):
                acc.index_fill_(0, idx, 0)

    def minibatches(self, epoch: int):
        """streams.batches' minibatches for every model: streams.split_batches of one (M, n) order, (M, B)
        views each, then the partial (M, b) one unless drop_last."""
        order = torch.stack([epoch_order(self.n_images, g) for g in self.gens])
        return list(split_batches(order, self.B, self.drop_last))

    def step(self, bidx, *, step: int, frac: list[float] | None, decide: bool) -> None:
        full = bidx.shape[1] == self.B
        if self.graph is not None and full and not decide:
            self.graph(bidx)
            return
        # eager: partial minibatches, and decision steps (the probe needs the step's activations) unless
        # decision_step_graph replays their forward and backward
        counts = self.correct if full else self.correct_partial
        if decide and self.decision_step_graph is not None and full:
            xb, yb, inputs, out_grads = self.decision_step_graph(bidx)
        else:
            clear_grads(self.net.params())
            if decide:
                xb, yb, inputs, out_grads = self.decision_forward_backward(bidx, counts)
            else:
                self.forward_backward(bidx, counts)
        if decide:
            ahead = functools.partial(self.decision_graph, bidx) if self.decision_graph is not None and full else None
            meas = self.probe.measure(inputs, out_grads, yb, lambda sub=None: self.objective(xb, yb, sub=sub)[2], ahead)
            # each model's fraction of its task (Algorithm 1's warm-up window): one number when they agree
            fr = frac[0] if len(set(frac)) == 1 else torch.tensor(frac, dtype=torch.float64).unsqueeze(1)
            self.rows.append((step, frac, self.sched.step(meas, fr)))
        self.adam.step()

    def ramp(self, epochs: list[int]) -> None:
        """The beta ramp's first-layer betas, each model at its epoch `epochs[m]` of its task."""
        if not self.ramping:
            return
        adam = self.adam
        ramped = [ramped_betas(self.betas0, ep, n) for ep, n in zip(epochs, self.task_epochs)]
        if len(set(ramped)) == 1:
            b1, b2 = ramped[0]
        else:   # the models are at other epochs of their tasks
            b1, b2 = torch.tensor(ramped, dtype=torch.float64, device=self.device).T
        if self.ramp_rows is None:
            adam.beta1[:, 0], adam.beta2[:, 0] = b1, b2
        else:
            adam.beta1[:, 0] = torch.where(self.ramp_rows, b1, adam.beta1[:, 0])
            adam.beta2[:, 0] = torch.where(self.ramp_rows, b2, adam.beta2[:, 0])

    def end_epoch(self, *, steps: list[int]) -> bool:
        """The NaN check of every model (one host sync); a diverged model's counts are frozen where
        train.SingleRun stops its task. True when no model is left training in its task."""
        finite = torch.isfinite(self.loss_sum).tolist()
        correct_now = None
        for m in range(self.M):
            if self.alive[m] and not self.diverged[m]:
                self.steps_done[m] = steps[m]
                if not finite[m]:
                    self.diverged[m] = True
                    correct_now = correct_now or list(zip(self.correct.tolist(), self.correct_partial.tolist()))
                    self.correct_frozen[m] = correct_now[m]
        return all(d or not a for d, a in zip(self.diverged, self.alive))

    def end_task(self, tasks: dict[int, int], *, steps: dict[int, int], wall_s: dict[int, float],
                 step: int) -> list[int]:
        L, ending = self.L, sorted(tasks)
        self.wall_s, self.ended = max(wall_s.values()), [m for m in ending if self.alive[m]]
        if len(ending) == self.M:
            end_loss, end_acc = evaluate_stack(self.net, self.xs, self.ys, self.sidx)
        else:   # the ending models only, as a sub-stack
            idx = torch.tensor(ending, device=self.device)
            sub_loss, sub_acc = evaluate_stack(self.net.rows(ending, idx), self.xs, self.ys[idx], self.sidx[idx])
            end_loss, end_acc = dict(zip(ending, sub_loss)), dict(zip(ending, sub_acc))
        first = min(self.row_start[m] for m in ending) - self.rows_base
        # one transfer per task end: the rows since the earliest of the ending tasks' starts
        host_rows = torch.stack([r for _, _, r in self.rows[first:]]).cpu() if self.rows[first:] else None
        correct_h = [f if f is not None else c
                     for f, c in zip(self.correct_frozen, zip(self.correct.tolist(), self.correct_partial.tolist()))]
        lr_h = self.adam.lr.tolist()
        stopped = []
        for m in ending:
            t, c, rec = tasks[m], self.cfgs[m], self.records[m]
            self.open.discard(m)
            if not self.alive[m]:
                continue
            rows_m = []
            lo = self.row_start[m] - self.rows_base
            for i, (s, frac, _) in enumerate(self.rows[lo:] if self.measuring_m[m] else []):
                rows = rows_to_dicts(host_rows[lo - first + i], m, self.row_keys[m])
                rows_m.append(rows)
                append_decision(rec, s, t, frac[m], rows)
                for key in (["global"] if self.global_variant[m] else range(1, L + 1)):   # the rules applied
                    self.rule_counts[m][key][rows[key]["rule"]] += 1
            diverged = end_task(
                rec, t, online_acc=task_online_acc(*correct_h[m], self.steps_done[m], self.n_images, self.B,
                                                   self.drop_last),
                end_loss=end_loss[m], end_acc=end_acc[m], steps=self.steps_done[m], wall_s=wall_s[m], lr=lr_h[m],
                rows=rows_m, indicators=self.indicators[m], diverged=self.diverged[m])
            if diverged:
                stopped.append(m)
            self.alive[m] = not diverged and t + 1 < c["n_tasks"]
        # the rows no open task reads any more
        keep_from = min((self.row_start[m] for m in self.open), default=self.rows_base + len(self.rows))
        del self.rows[:keep_from - self.rows_base]
        self.rows_base = keep_from
        return stopped

    def task_line(self) -> str:
        """The online accuracies of the tasks that just ended, per model (run/seed)."""
        accs = " ".join(f"{self.records[m]['name'] or m}/s{self.cfgs[m]['seed']} "
                        f"{self.records[m]['tasks'][-1]['online_acc']:.3f}" for m in self.ended)
        return f"online acc {accs}  {self.wall_s:.1f}s"

    def state_dict(self) -> dict:
        return {"params": [p.detach() for p in self.net.params()], "buffers": self.net.buffers(),
                "adam": self.adam.state_dict(), "wass": self.wass.sorted_init if self.wass is not None else None,
                "probe": self.probe.state_dict() if self.probe else None,
                "sched": self.sched.state_dict() if self.sched else None, "records": self.records,
                "rule_counts": self.rule_counts, "alive": self.alive, "left": self.left}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            for p, q in zip(self.net.params() + self.net.buffers(), s["params"] + s["buffers"]):
                p.copy_(q)
        self.adam.load_state_dict(s["adam"])
        if self.wass is not None:
            self.wass.sorted_init = [t.clone() for t in s["wass"]]
        if self.probe is not None:
            self.probe.load_state_dict(s["probe"])
            self.sched.load_state_dict(s["sched"])
        if self.decision_graph is not None:   # captured afresh, on the loaded tensors
            self.decision_graph = DecisionGraph(self)
        self.records, self.rule_counts, self.alive, self.left = s["records"], s["rule_counts"], s["alive"], s["left"]

    def keep(self, models: list[int]) -> None:
        """Only `models` train on (at a checkpoint, no task open): the engine is built again for their
        configs (every per-model setting, the Wasserstein and whole-network subsets, graphs captured
        afresh) and their rows of the state are loaded into it. The stack shrinks as the runs of shorter
        task lengths end. The others' records stay in the state (`left`), written by `finish` with the
        rest: a job killed later (whose outputs Snakemake then deletes) writes them when it resumes."""
        s = self.state_dict()
        s["left"] = self.left + [self._run(m) for m in range(self.M) if m not in models]
        wass_models = self.wass.models if self.wass is not None else []
        global_models = self.probe.global_models if self.probe is not None else []
        idx = torch.tensor(models, device=self.device)

        def pick(xs: list) -> list:
            return [xs[m] for m in models]

        def rows(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t[idx] for t in ts]

        def subset_rows(t: torch.Tensor, of: list[int]) -> torch.Tensor:   # t's rows: the models `of`, in order
            return t[[of.index(m) for m in models if m in of]]
        self.__init__(pick(self.cfgs), self.device, pick(self.metas), pick(self.out_dirs))
        s.update(params=rows(s["params"]), buffers=rows(s["buffers"]), records=pick(s["records"]),
                 rule_counts=pick(s["rule_counts"]), alive=pick(s["alive"]),
                 adam={k: rows(v) if isinstance(v, list) else v[idx] for k, v in s["adam"].items()})
        if s["wass"] is not None:
            s["wass"] = [subset_rows(t, wass_models) for t in s["wass"]]
        if s["probe"] is not None:
            p = s["probe"]
            s["probe"] = dict(vecs=rows(p["vecs"]), has_vec=p["has_vec"][models], generators=pick(p["generators"]),
                              global_vecs=subset_rows(p["global_vecs"], global_models))
            columns = self.sched.values.shape[1]   # the whole network's column goes when no survivor has it
            s["sched"] = {k: v[models][:, :columns] for k, v in s["sched"].items()}   # host tensors
        self.load_state_dict(s)

    def _run(self, m: int) -> dict:
        """Model m's record and what finish needs to write it and replay it into W&B."""
        rules = {str(k): v for k, v in self.rule_counts[m].items()} if self.measuring_m[m] else None
        return dict(record=self.records[m], rule_counts=rules, cfg=self.cfgs[m], meta=self.metas[m],
                    out_dir=self.out_dirs[m])

    def finish(self, completed: bool) -> None:
        """Write every record, the stack's and those of the runs that left it, and replay each into W&B."""
        if not completed:
            return
        for run in self.left + [self._run(m) for m in range(self.M)]:
            finish_record(run["record"], run["out_dir"] / RECORD_NAME, run["rule_counts"])
            replay_record(run["record"], run["cfg"], run["meta"])


def run_batched(cfgs: list[dict], out_dirs: list, *, metas: list[dict] | None = None, resume: bool = True,
                progress: bool = True, stop_after_task: int | None = None) -> list[dict]:
    """Train the runs `cfgs` as one batched model; write each record to its out_dir (the layout of
    train.run) and return the records. `stop_after_task` simulates an interruption (resume test)."""
    cfgs = [config.validate_run(c) for c in cfgs]
    check_batchable(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    hashes = [config.config_hash(c) for c in cfgs]
    if resume:
        done = [finished_record(d / RECORD_NAME, h) for d, h in zip(out_dirs, hashes)]
        if all(r is not None for r in done):
            return done
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
    engine = BatchedRuns(cfgs, setup_device(cfgs[0]), metas or [{} for _ in cfgs], out_dirs)
    train_stream(engine, cfgs[0], out_dirs[0] / ("batched-" + CHECKPOINT_NAME), [CHECKPOINT_FORMAT, *hashes],
                 resume=resume, progress=progress, desc=f"batched x{len(cfgs)}", stop_after_task=stop_after_task)
    # the models still in the engine, and those that left it when their runs ended
    mine = dict(zip(engine.out_dirs, engine.records)) | {run["out_dir"]: run["record"] for run in engine.left}
    return [mine[d] for d in out_dirs]

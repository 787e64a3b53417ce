"""measure.DecisionProbe for the stacked model: a decision step's per-layer quantities (Sec. 4) of every
model, its Hessian-vector products written out, its Lanczos in lockstep (stacked.lanczos)."""
from __future__ import annotations

import math

import torch

from ..eigen import mixed_start
from ..measure import buffers_kept, linear_gradient_stats
from .adam import StackedAdam
from .lanczos import batched_lanczos
from .model import StackedMLP


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float64 tensors `tensors` as host copies, in one transfer (one .cpu() each waited for the
    device each time). On the CPU: copies, so the caller may change what they came from."""
    assert all(t.dtype == torch.float64 for t in tensors.values())   # cat would promote, changing the values
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).cpu()
    out, i = {}, 0
    for k, t in tensors.items():
        out[k], i = flat[i:i + t.numel()].view(t.shape), i + t.numel()
    return out


class StackedProbe:
    """measure.DecisionProbe for the stacked model: per (model, layer) grad_sq, sigma2_ps (from the
    step's own layer inputs and output gradients), alpha, alpha_agg and the layer-block lam_max (batched
    Lanczos on the Hessian of the summed loss, which is block-diagonal across models). With
    global_column, the whole network as one more column (the probe's "global" entry): the layers' sums,
    measure._global_effective_step, and the full Hessian's lam_max for the models with measure.global
    (NaN for the others, as DecisionProbe without global_too). With `measuring`, a model that does not
    measure takes no part in the layer blocks' Lanczos, which then runs on the measuring models' sub-stack
    (its lam_max is NaN: nobody reads it), nor in the whole network's (a skipped row there). The
    products are the cross-entropy's Hessian's, written out (`_r_op_hvps`; autograd's for BatchNorm), plus
    `shift` (M,) times V: each model's regulariser adds a multiple of I to its Hessian
    (regularizers.hessian_shift), so the Wasserstein penalty's sort is not differentiated twice in every
    product. `solve`: the Lanczos it runs (batched_lanczos), an attribute so that a profiler can time it
    (bench/decision_profile.py)."""
    solve = staticmethod(batched_lanczos)

    def __init__(self, net: StackedMLP, adam: StackedAdam, B: int, seeds: list[int], eig_tol: float,
                 eig_max_iter: int, code_alpha_agg: list[bool], global_lam: list[bool], global_column: bool,
                 measuring: list[bool] | None, shift: torch.Tensor):
        self.net, self.adam, self.B, self.shift = net, adam, B, shift
        self.eig_tol, self.eig_max_iter = eig_tol, eig_max_iter
        dev = net.W[0].device
        self.code_alpha_agg = code_alpha_agg[0] if len(set(code_alpha_agg)) == 1 else \
            torch.tensor(code_alpha_agg)   # host: the effective steps are computed there
        self.generators = [torch.Generator(dev).manual_seed(s) for s in seeds]   # as DecisionProbe's
        M = len(seeds)
        self.vecs = [torch.zeros(M, sum(p[0].numel() for p in net.layer_params(l)), device=dev)
                     for l in range(net.n_layers)]
        self.has_vec = torch.zeros(M, dtype=torch.bool)   # host: the starts' branch is chosen there
        if any(global_lam) and not global_column:
            raise ValueError("StackedProbe: measure.global models need the whole-network column")
        self.global_column = global_column
        self.global_models = [m for m, g in enumerate(global_lam) if g]
        self.global_idx_host = torch.tensor(self.global_models, dtype=torch.long)   # indexes host results
        self.global_idx = self.global_idx_host.to(dev)   # indexes device tensors
        n_all = sum(p[0].numel() for p in net.params())
        self.global_vecs = torch.zeros(len(self.global_models), n_all, device=dev)
        self.global_problem = global_column and bool(self.global_models)   # the whole network's Lanczos
        self.skip = torch.tensor([not x for x in measuring] if measuring is not None else [False] * M)   # host
        # the layer blocks' Lanczos runs on the measuring models' sub-stack when some do not measure: their
        # products would cost every model's backward pass (on the 69-model paper job, 12 do not measure)
        self.block_models = None if not bool(self.skip.any()) else [m for m in range(M) if not self.skip[m]]
        self.block_idx_host = None if self.block_models is None else torch.tensor(self.block_models)
        self.block_idx = None if self.block_models is None else self.block_idx_host.to(dev)

    def reset(self, m: int, seed: int) -> None:
        self.generators[m] = torch.Generator(self.vecs[0].device).manual_seed(seed)
        self.has_vec[m] = False

    @staticmethod
    def _draws(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
        """A Gaussian row of like's length from each generator, drawn on its device into one (R, n) tensor."""
        r = torch.empty_like(like)
        for g, row in zip(generators, r):
            row.normal_(generator=g)   # torch.randn's own draw, in place: one kernel a row, no stack
        return r

    @staticmethod
    def _mixed_starts(r: torch.Tensor, previous: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """mixed_start of every row: warm (with its previous eigenvector) where the host bools `has` say
        so, cold elsewhere. Only the branches in use are computed (rows are independent: the same bits)."""
        if bool(has.all()):
            return mixed_start(r, previous)
        if not bool(has.any()):
            return mixed_start(r)
        return torch.where(has.to(r.device).unsqueeze(1), mixed_start(r, previous), mixed_start(r))

    def _starts(self, l: int) -> torch.Tensor:
        """eigen._start for every model: a seeded Gaussian, plus the previous eigenvector if any."""
        return self._mixed_starts(self._draws(self.generators, self.vecs[l]), self.vecs[l], self.has_vec)

    def measure(self, inputs, out_grads, labels, loss_closure, ahead=None) -> dict[str, torch.Tensor]:
        """{field: (M, L) float64 on the host} for grad_sq, sigma2_ps, alpha, alpha_agg, lam_max, eig_iters,
        from the step's layer inputs and the loss gradients at the layer outputs, and "lr" (M, L), the
        learning rates they were measured at. The device's sums come to the host in one transfer after the
        Lanczos (whose rule has synced by then); the small arithmetic after them, and Algorithm 1's
        (StackedScheduler), runs there on float64 tensors, as train.run's on floats. `ahead`
        (DecisionGraph): starts -> (problems, lanczos_ahead's rounds) in place of the eager gradient, or
        None where it cannot."""
        net, L = self.net, self.net.n_layers
        B = inputs[0].shape[1]   # this minibatch's size: B, or an epoch's partial last one
        with torch.no_grad():
            grad_sq, sigma2 = [], []
            for l in range(L):   # the layer's group: W, b (and BatchNorm's gamma, beta), as DecisionProbe's
                grad_sq.append(sum(self.adam.grad_with_decay(p).double().pow(2).flatten(1).sum(1)
                                   for p in net.layer_params(l)))
                sigma2.append(linear_gradient_stats(inputs[l], out_grads[l], B)[0])
            code_form = isinstance(self.code_alpha_agg, torch.Tensor) or self.code_alpha_agg
            on_device = {"grad_sq": torch.stack(grad_sq, 1), "sigma2_ps": torch.stack(sigma2, 1),
                         **self.adam.moments(code_form)}
        with buffers_kept(net):   # BatchNorm statistics: the probe's extra pass leaves no trace, as DecisionProbe's
            # every layer's Hessian block (W, b, BatchNorm's gamma, beta), and the whole network's for the
            # measure.global models, as one lockstep Lanczos; the starts drawn in DecisionProbe's order
            all_starts = [self._starts(l) for l in range(L)]
            starts = [v if self.block_models is None else v[self.block_idx] for v in all_starts]
            skip = [self.skip if self.block_models is None else self.skip[self.block_models]] * L
            if self.global_problem:
                starts.append(self._global_start())
                skip.append(self.skip[self.global_models])
            got = ahead(starts) if ahead is not None else None
            if got is None:
                problems, rounds = list(zip(self.hvps(inputs, labels, loss_closure), starts)), None
            else:
                problems, rounds = got
            solved = self.solve(problems, self.eig_tol, self.eig_max_iter, skip=torch.cat(skip), ahead=rounds)
            solved = [self._all_models(sol, v) for sol, v in zip(solved[:L], all_starts)] + solved[L:]
            for l in range(L):
                self.vecs[l] = solved[l][1].detach()
            if self.global_problem:
                self.global_vecs = solved[L][1].detach()
            self.has_vec[:] = True
        return self._fields(_to_host(on_device), solved, B)   # the one transfer; then host tensors

    def _fields(self, host: dict, solved: list, B: int) -> dict[str, torch.Tensor]:
        """measure's fields, on the host, from host copies of the device's sums and the Lanczos results."""
        L = self.net.n_layers
        alpha, agg = self.adam.effective_steps(host, self.code_alpha_agg)
        out = {"grad_sq": host["grad_sq"], "sigma2_ps": host["sigma2_ps"], "alpha": alpha, "alpha_agg": agg,
               "lam_max": torch.stack([th for th, _, _ in solved[:L]], 1),
               "eig_iters": torch.stack([it.double() for _, _, it in solved[:L]], 1)}
        if self.global_column:
            g_alpha, g_agg = self.adam.global_effective_steps(host)
            g_lam, g_iters = self._global_lam(solved[L] if self.global_problem else None)
            whole = {k: sum(out[k][:, l] for l in range(L)) for k in ("grad_sq", "sigma2_ps")}   # in layer order,
            whole.update(alpha=g_alpha, alpha_agg=g_agg, lam_max=g_lam, eig_iters=g_iters)   # as DecisionProbe's
            out = {k: torch.cat([v, whole[k].unsqueeze(1)], 1) for k, v in out.items()}
        return dict(out, batch_size=B, lr=host["lr"])

    def hvps(self, inputs: list[torch.Tensor], labels: torch.Tensor, loss_closure) -> list:
        """The Lanczos problems' operators: every layer block's, on the measuring models (block_models), then
        the whole network's on the measure.global models' sub-stack when there are such models (the order
        of the starts in `measure`). `inputs`: the stack's layer inputs on this minibatch (StackedMLP.forward
        with keep), `labels` (M, b) its labels. Written out (`_r_op_hvps`) without BatchNorm; a BatchNorm
        stack's products differentiate loss_closure(sub) twice: the summed cross-entropy of the whole stack
        (sub None) or of a StackedMLP.rows sub-stack. The regularisers enter as `shift`."""
        wd = self.shift
        net = self.net if self.block_models is None else self.net.rows(self.block_models, self.block_idx)
        wd_b = wd if self.block_models is None else wd[self.block_idx]
        if net.gamma:   # BatchNorm is not piecewise linear in the layer's weights: autograd's second derivative
            grads = torch.autograd.grad(loss_closure(None if net is self.net else net), net.params(), create_graph=True)
            at = [net.weight_pos[l] for l in range(net.n_layers)] + [len(grads)]
            ops = [self._autograd_hvp(net.layer_params(l), grads[at[l]:at[l + 1]], wd_b) for l in range(net.n_layers)]
        else:
            rows = (lambda t: t) if net is self.net else (lambda t: t[net.idx])
            ops = self._r_op_hvps(net, [rows(a) for a in inputs], rows(labels), wd_b,
                                  [(l, l) for l in range(net.n_layers)])
        if self.global_problem:   # on the measure.global models' own sub-stack: the others' products cost nothing
            sub = self.net.rows(self.global_models, self.global_idx)
            if sub.gamma:
                ops.append(self._autograd_hvp(sub.params(), torch.autograd.grad(
                    loss_closure(sub), sub.params(), create_graph=True), wd[sub.idx]))
            else:
                ops += self._r_op_hvps(sub, [a[sub.idx] for a in inputs], labels[sub.idx], wd[sub.idx],
                                       [(0, sub.n_layers - 1)])
        return ops

    @staticmethod
    def _r_op_hvps(net: StackedMLP, inputs: list[torch.Tensor], labels: torch.Tensor, wd: torch.Tensor,
                   spans: list[tuple[int, int]]) -> list:
        """For each span (lo, hi) of layers, the (R, n) -> (R, n) product with the Hessian block of layers
        lo..hi (their W, b in params() order; plus wd I) of a stack without BatchNorm, from its layer inputs
        (R, b, .) and labels (R, b) on the minibatch: Pearlmutter's R-operator written out. The direction V
        goes up from layer lo to the logits (R z_k = R a_(k-1) W_k^T + a_(k-1) dW_k^T + db_k, R a_k = act'(z_k)
        R z_k: the activations are piecewise linear, act'' = 0), through the mean cross-entropy's Hessian in
        the logits, H_CE = (diag(p) - p p^T) / b, and back down to layer lo (R g_(k-1) = act'(z_(k-1))
        (R g_k W_k + g_k dW_k), R grad W_k = R g_k^T a_(k-1) + g_k^T R a_(k-1), R grad b_k = sum R g_k),
        g_k the loss gradient at layer k's output. For one layer (lo = hi) the g terms vanish: the product
        is the Gauss-Newton block's, J^T H_CE J (a layer block's Lanczos); the whole network (0, L - 1)
        adds the cross-layer terms (the measure.global models'). No create_graph gradient and no double
        backward: equal to autograd's second derivative up to rounding (tests/test_batched.py); the whole
        network's product in 27-29 kernels where autograd's took 46-62 (bench/decision_bytes.py)."""
        L, b = net.n_layers, inputs[0].shape[1]
        with torch.no_grad():
            Ws = [W.detach() for W in net.W]
            factors = [net.act_factor(a) for a in inputs[1:]]   # factor k: the activation after layer k
            p = torch.softmax(torch.baddbmm(net.b[-1].detach().unsqueeze(1), inputs[-1], Ws[-1].transpose(1, 2)), -1)
            p_mean = p / b   # the minibatch mean's 1 / b, folded in once
            g = [None] * L   # the loss gradients at the layer outputs k = lo + 1 .. hi of the spans of several layers
            lowest = min((lo + 1 for lo, hi in spans if hi > lo), default=L)
            if lowest < L:
                g[-1] = (p - torch.zeros_like(p).scatter_(-1, labels.unsqueeze(-1), 1.0)) / b
                for k in range(L - 1, lowest, -1):
                    g[k - 1] = net.vjp_act(factors[k - 1], torch.bmm(g[k], Ws[k]))

        def span(lo: int, hi: int):
            sizes = [n for k in range(lo, hi + 1) for n in (Ws[k][0].numel(), Ws[k].shape[1])]

            def hvp(V):
                pieces = V.split(sizes, 1)
                dW = {k: pieces[2 * (k - lo)].reshape(Ws[k].shape) for k in range(lo, hi + 1)}
                db = {k: pieces[2 * (k - lo) + 1] for k in range(lo, hi + 1)}
                ra = {}   # R a_(k-1), layer k's input's direction, for the span's layers above lo
                rz = None   # R z_(k-1), from the layer below (none at lo)
                for k in range(lo, L):   # up: R z_k from below (none at lo) and, inside the span, dW_k and db_k
                    r_in = net.jvp_act(factors[k - 1], rz) if k > lo else None
                    if r_in is not None and k <= hi:
                        ra[k] = r_in
                    own = torch.baddbmm(db[k].unsqueeze(1), inputs[k], dW[k].transpose(1, 2)) if k <= hi else None
                    if r_in is None:
                        rz = own
                    elif own is None:
                        rz = torch.bmm(r_in, Ws[k].transpose(1, 2))
                    else:
                        rz = torch.baddbmm(own, r_in, Ws[k].transpose(1, 2))
                rg = p_mean * (rz - (p * rz).sum(-1, keepdim=True))
                out = []
                for k in range(L - 1, lo - 1, -1):   # down
                    if k <= hi:
                        hw = torch.bmm(rg.transpose(1, 2), inputs[k])
                        if k in ra:
                            hw = torch.baddbmm(hw, g[k].transpose(1, 2), ra[k])
                        out = [hw.flatten(1), rg.sum(1)] + out
                    if k > lo:
                        t = torch.bmm(rg, Ws[k])
                        if k <= hi:
                            t = torch.baddbmm(t, g[k], dW[k])
                        rg = net.vjp_act(factors[k - 1], t)
                hv = torch.cat(out, 1)
                return torch.addcmul(hv, wd.unsqueeze(1).to(hv.dtype), V)
            return hvp
        return [span(lo, hi) for lo, hi in spans]

    def _all_models(self, solved, start):
        """A layer block's (theta, Ritz vectors, products) over block_models -> over all M models, the others'
        as batched_lanczos gives a skipped row: theta NaN, its start vector back, 0 products."""
        if self.block_models is None:
            return solved
        theta, vecs, iters = solved   # theta and products on the host, the vectors on the device
        M, idx = start.shape[0], self.block_idx_host
        return (theta.new_full((M,), math.nan).index_copy(0, idx, theta), start.index_copy(0, self.block_idx, vecs),
                iters.new_zeros(M).index_copy(0, idx, iters))

    @staticmethod
    def _autograd_hvp(ps: list[torch.Tensor], grads, wd: torch.Tensor):
        """(R, n) -> (R, n): autograd's Hessian-vector product for the stacked tensors ps (a layer's group,
        or every tensor of the network), `grads` their create_graph gradient, plus the regularisers' wd I.
        For BatchNorm stacks, whose layers are not piecewise linear in their weights."""
        sizes = [p[0].numel() for p in ps]

        def hvp(V):
            pieces = [x.reshape(p.shape) for x, p in zip(V.split(sizes, 1), ps)]
            hs = torch.autograd.grad(grads, ps, grad_outputs=pieces, retain_graph=True)
            hv = torch.cat([h.detach().flatten(1) for h in hs], 1)
            return hv + wd.unsqueeze(1).to(hv.dtype) * V
        return hvp

    def _global_start(self) -> torch.Tensor:
        """eigen._start of the whole network for the measure.global models (drawn after the layers')."""
        r = self._draws([self.generators[m] for m in self.global_models], self.global_vecs)
        return self._mixed_starts(r, self.global_vecs, self.has_vec[self.global_idx_host])

    def _global_lam(self, solved):
        """(lam_max (M,), products (M,)) on the host: the whole Hessian's top eigenvalue for the measure.global
        models from their Lanczos (`solved`, None without such models); NaN and 0 for the others."""
        M = len(self.generators)
        lam = torch.full((M,), math.nan, dtype=torch.float64)
        iters = torch.zeros(M, dtype=torch.float64)
        if solved is None:
            return lam, iters
        th, _, it = solved
        return lam.index_copy(0, self.global_idx_host, th), iters.index_copy(0, self.global_idx_host, it.double())

    def state_dict(self) -> dict:
        return {"vecs": self.vecs, "global_vecs": self.global_vecs, "has_vec": self.has_vec,
                "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, s: dict) -> None:
        self.vecs = [v.clone() for v in s["vecs"]]
        self.global_vecs = s["global_vecs"].clone()
        self.has_vec.copy_(s["has_vec"])
        for g, st in zip(self.generators, s["generators"]):
            g.set_state(st.cpu())   # RNG states are CPU ByteTensors, whatever map_location did

"""The authors' first-layer Adam-beta ramp (paper Sec. 5 setup as run by the authors' code; docs/METHOD.md §2).

Not in the paper's text, but in every run behind its figures [code]: after every optimiser step the
training loop overwrites the *first* layer's Adam betas with a ramp that is linear in the epoch index e
of the current task (E epochs per task), towards (0.99, 0.75) over 2E epochs:

    beta_i(e) = beta_i + (target_i - beta_i) * e / (2E),   target = (0.99, 0.75)

so a task's last epoch trains with about (0.945, 0.875); the ramp restarts at every task, and the first
step of a task still uses the previous task's last values (they are set *after* a step). In
loop.train_stream the engines write it after each epoch's first step: the same values as after every
step. The switch is `optim.beta_ramp`.
"""
from __future__ import annotations

RAMP_TARGETS = (0.99, 0.75)   # [code] the values the ramp heads for, reached only at e = 2E


def ramped_betas(betas: tuple[float, float], epoch: int, epochs: int) -> tuple[float, float]:
    """The first layer's (beta1, beta2) after a step in epoch `epoch` (0-based) of a task of `epochs`."""
    f = epoch / (2 * epochs)
    return tuple(b + (t - b) * f for b, t in zip(betas, RAMP_TARGETS))

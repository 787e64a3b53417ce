"""Batched training (the stacked engine): M runs of one model shape trained together as one stacked model.

The runs of a batch share the model shape (plain, CReLU or BatchNorm MLP), batch size, stream size and
number of tasks, the measurement cadence and the scheduler's rule constants. Each keeps its own task
length (epochs_factor: its own task clock, loop.train_stream; the stack sheds the runs of the shorter
lengths when they end, `BatchedRuns.keep`), seed (images, labels, shuffles, init), arm (vanilla / reset /
scheduled), activation among relu /
leaky_relu / identity (one LeakyReLU slope per model), learning rate, beta ramp on or off, regulariser
(none / coupled L2 / Wasserstein, own strength; the sort only for the Wasserstein models), measurement
on or off, scheduler variant (per-layer / global), bound (combined / noise / curvature), Eq. 2 statistic
and beta, alpha_agg form, Adam state, per-layer learning rates, volatility windows and eigenvector warm
starts (planning.PER_MODEL_KEYS). Weights are stacked along a leading model dimension and every layer is
one batched matmul, so M models take the kernel launches of one: on a GPU the paper's tiny MLP is
launch-bound, and batching is how it gets near the hardware's limits.

`BatchedRuns` follows the loop of the one-model engine (loop.train_stream) and each model the computation
of `train.run` (same draws from the same seeds, the same Adam arithmetic, the same decision-step
measurement and Algorithm 1), so each record equals the one-model-at-a-time record up to float rounding
(tests/test_batched.py). The step loop has no host synchronisation except, as in `train.run`, one
divergence check per epoch; a decision step runs the Lanczos of every layer block (and of the whole
network, for measure.global) in lockstep, and each round of products sends all their alphas and betas to
the host in one transfer, where the tiny tridiagonal problems are solved and each model's convergence is
decided (one sync per round). The measurement's sums follow in one transfer, and Algorithm 1 runs on
the host (StackedScheduler), as train.run's on floats; the new learning rates go back in one copy. On
CUDA, `cuda_graph` replays the plain steps from one captured graph (`CudaGraphStep`); on any device,
`fused_adam` compiles Adam's update.

One module per concept, each mirroring the one-model module it restates for the stack: `model`
(models.py: StackedMLP), `adam` (torch.optim.Adam: StackedAdam, adam_update), `regularizers`
(regularizers.py: StackedWasserstein), `lanczos` (eigen.py: batched_lanczos), `probe` (measure.py:
StackedProbe), `scheduler` (scheduler.py: StackedScheduler), `graphs` (CUDA graphs: CudaGraphStep,
DecisionGraph), `engine` (train.py: BatchedRuns, run_batched) and `cli` (the command,
`python -m trainability.batched`). None imports train.py: both engines call the same homes.
"""

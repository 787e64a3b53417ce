"""The committed default-scale results are what this code produces.

figures/default/tables/results.csv was written by the pipeline from a clean `snakemake --cores all`;
it keeps each run's per-seed mean online accuracy. Rerunning one (run, seed) of it here must give the
same number bit for bit (CPU runs are deterministic: one thread, every draw seeded).
"""
import csv
from pathlib import Path

import pytest
import yaml

from trainability import config
from trainability.train import run

RESULTS = Path("figures/default/tables/results.csv")
RUN = "l2-scheduled"   # the scheduler, the measurement and coupled L2 in one run (~1-2 min on one core)


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed default-scale results")
def test_rerun_of_one_seed_matches_the_committed_table(tmp_path, mnist_root):
    rows = {r["run"]: r for r in csv.DictReader(RESULTS.open())}
    committed = [float(x) for x in rows[RUN]["mean_acc_per_seed"].split(";")]
    params = yaml.safe_load(open("params.yaml"))
    seed = params["scales"]["default"]["seeds"][0]
    cfg = config.resolve_run(params, "default", RUN, seed)
    cfg = config.deep_merge(cfg, {"data": {"root": mnist_root}, "wandb": {"mode": "disabled"}})
    rec = run(cfg, tmp_path, progress=False)
    ours = sum(t["online_acc"] for t in rec["tasks"]) / len(rec["tasks"])
    assert ours == committed[0], f"{RUN} seed {seed}: rerun {ours!r} != committed {committed[0]!r}"


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed default-scale results")
def test_results_table_rows_cover_every_run_with_all_seeds():
    params = yaml.safe_load(open("params.yaml"))
    n_seeds = len(params["scales"]["default"]["seeds"])
    rows = list(csv.DictReader(RESULTS.open()))
    runs = {r["run"] for r in rows}
    assert runs == set(config.run_names(params, "default"))
    for r in rows:
        assert int(r["n_seeds"]) == n_seeds and len(r["mean_acc_per_seed"].split(";")) == n_seeds

"""The SLURM profile on a real one-node Slurm cluster (tests/slurm/run.sh): installs slurm-wlm, munge,
slurmdbd and mariadb with apt, starts the daemons, runs figures/smoke/fig2.png of the smoke DAG through
`--profile profiles/slurm`, checks sacct, the outputs against a local run and every rule's GPU request,
and stops everything it started (~6-7 minutes). It needs root and the package registry, so it runs in CI
(CI=true) or when TRAINABILITY_SLURM_TEST=1, and is skipped elsewhere."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "slurm" / "run.sh"


@pytest.mark.skipif(not (os.environ.get("CI") == "true" or os.environ.get("TRAINABILITY_SLURM_TEST") == "1"),
                    reason="a real Slurm cluster: set TRAINABILITY_SLURM_TEST=1 (runs in CI)")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                    reason="needs root and apt-get (Debian) to install and start Slurm")
def test_smoke_dag_through_the_slurm_profile():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=2700)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert "slurm test:" in out.stdout and " 0 failed" in out.stdout, tail

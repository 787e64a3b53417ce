"""`python -m trainability.batched`: the batched engine's command, as the Snakefile and dvc.yaml call it.
The engine is the package trainability.stacked (its command: stacked.cli)."""
import sys

from .stacked.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Replication of "A Unified Noise-Curvature View of Loss of Trainability" (arXiv 2509.19698).

One module per paper concept; see docs/DESIGN.md and docs/LEDGER.md.
"""
__version__ = "0.1.0"

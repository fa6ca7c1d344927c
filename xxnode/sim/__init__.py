"""Discrete-event simulator of XX and its baselines (Hermod, ideal EDF), §4.

The schedulers in ``xx``, ``hermod`` and ``edf`` consume the identical job
sequence from ``workload`` and return a ``metrics.Result``.  XX's decisions are
made by ``xxnode.policy`` -- what we simulate is what we ship.
"""

from __future__ import annotations

from .config import Config
from .metrics import Result


def simulate(cfg: Config) -> Result:
    """Run the scheduler ``cfg.scheduler.name`` on the workload ``cfg`` describes."""
    from . import edf, hermod, xx

    return {"xx": xx.run, "hermod": hermod.run, "edf": edf.run}[cfg.scheduler.name](cfg)

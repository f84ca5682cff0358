"""Backbone selection on public data (``backbone = "auto"``): the maths and the
orchestration live in :mod:`common.models.selection`, where the ServerApp can call
it too; this is the command-line face, which prints the table."""

from __future__ import annotations

from common.config import RunConfig
from common.models.selection import (  # noqa: F401 (re-exported for cli/select.py and tests)
    SPLITS,
    apply_selection,
    labelled_split,
    run_selection,
    training_plan_of,
)
from common.models.selection import resolve_auto as _resolve


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """``backbone = "auto"``: select on the public split, print why, return the resolved config."""
    return _resolve(cfg, show=print)

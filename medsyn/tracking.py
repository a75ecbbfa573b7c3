"""Experiment tracking shared by training and evaluation: whether W&B can reach its server."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_offline() -> bool:
    """True when W&B should log offline (to `wandb sync` later): no API key, no login, or WANDB_MODE=offline."""
    if os.environ.get("WANDB_MODE") == "offline":
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))

"""The offline tiny BERT directory: written whole, with the permissions of the user's umask."""

from __future__ import annotations

import os

from medsyn.conditioning import build_tiny_bert

TEXTS = [
    "FINDINGS: Right pleural effusion. IMPRESSION: Effusion.",
    "FINDINGS: Clear lungs. IMPRESSION: Normal.",
]


def test_directory_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = build_tiny_bert(tmp_path / "runs" / "demo" / "bert", TEXTS, hidden_size=16, num_layers=1,
                              num_heads=2, vocab_size=60)  # fmt: skip
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes  # safetensors alone: 0600
    assert [p.name for p in out.parent.iterdir()] == ["bert"]  # no temporary directory left

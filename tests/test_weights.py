"""Exported weights: safetensors with the run config in the metadata, and errors that name the file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medsyn.errors import DataError
from medsyn.weights import FORMAT, export_weights, load_weights, sha256_file, split_state


def state() -> dict[str, torch.Tensor]:
    """A small state: a UNet part (one non-contiguous view, one tensor needing grad) and a text part."""
    conv = torch.nn.Conv3d(2, 3, 3)
    return {
        "net.conv.weight": conv.weight,  # requires grad
        "net.conv.bias": conv.bias,
        "net.proj.weight": torch.randn(4, 6).t(),  # non-contiguous
        "text.null": torch.randn(1, 7, 8, dtype=torch.float16),
    }


def test_round_trip_keeps_tensors_and_config(tmp_path):
    original = state()
    config = {"stage": "sr", "model": {"num_channels": [16, 32]}, "data": Path("/cache")}
    path = export_weights(tmp_path / "model.safetensors", original, config)
    loaded, loaded_config = load_weights(path)
    assert loaded.keys() == original.keys()
    for key, tensor in original.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor.detach())
    assert loaded_config == {"stage": "sr", "model": {"num_channels": [16, 32]}, "data": "/cache"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_files_that_are_not_medsyn_weights_raise_data_error_naming_them(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DataError, match="missing.safetensors: no such"):
        load_weights(missing)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(DataError, match=f"foreign.safetensors: not medsyn weights .*{FORMAT}"):
        load_weights(foreign)
    good = export_weights(tmp_path / "good.safetensors", state(), {"stage": "base"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated.safetensors: not a readable safetensors file"):
        load_weights(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a safetensors file at all")
    with pytest.raises(DataError, match="notes.safetensors"):
        load_weights(text)


def test_split_state_takes_one_prefix():
    parts = split_state(state(), "net")
    assert sorted(parts) == ["conv.bias", "conv.weight", "proj.weight"]
    assert split_state({"network.w": torch.zeros(1)}, "net") == {}  # "net." is the prefix, not "net"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 40  # 10 KiB
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected  # one read
    assert sha256_file(path, chunk=4096) == expected  # two whole chunks and a partial one


def test_checksum_catches_a_flipped_bit_in_tensors_or_metadata(tmp_path):
    good = export_weights(tmp_path / "good.safetensors", state(), {"stage": "base", "note": "abcd"})
    data = good.read_bytes()
    tensors = bytearray(data)
    tensors[-3] ^= 0x01  # the last tensor's bytes (a bit flip that still parses)
    (tmp_path / "flip.safetensors").write_bytes(bytes(tensors))
    with pytest.raises(DataError, match=r"flip.safetensors: damaged \(the sha256"):
        load_weights(tmp_path / "flip.safetensors")
    (tmp_path / "meta.safetensors").write_bytes(data.replace(b"abcd", b"abce", 1))  # a letter of the config
    with pytest.raises(DataError, match=r"meta.safetensors: damaged"):
        load_weights(tmp_path / "meta.safetensors")


def test_files_written_before_the_checksum_still_load(tmp_path):
    old = tmp_path / "old.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in state().items()}
    save_file(tensors, str(old), metadata={"format": FORMAT, "stage": "base", "config": '{"stage": "base"}'})
    loaded, config = load_weights(old)
    assert config == {"stage": "base"} and torch.equal(loaded["text.null"], tensors["text.null"])


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    bad = state()
    bad["net.conv.bias"] = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(DataError, match=r"nan.safetensors: not written: net.conv.bias holds NaN"):
        export_weights(tmp_path / "nan.safetensors", bad, {"stage": "base"})
    assert list(tmp_path.iterdir()) == []
    # as an earlier medsyn wrote a diverged run's weights (sampling gave all-zero volumes)
    diverged = tmp_path / "diverged.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in bad.items()}
    save_file(tensors, str(diverged), metadata={"format": FORMAT, "stage": "base", "config": "{}"})
    with pytest.raises(DataError, match=r"diverged.safetensors: net.conv.bias holds NaN or infinite values"):
        load_weights(diverged)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_weights_file_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = export_weights(tmp_path / "model.safetensors", state(), {"stage": "base"})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == mode  # safetensors' save_file alone makes 0600

"""The SR stage's conditioner: noise-augmentation levels, per-sample randomness, upsampling as trained."""

from __future__ import annotations

import pytest
import torch

from medsyn.conditioning import LowResConditioner
from medsyn.data.channels import decode_lobes, encode_lobe_bits
from medsyn.diffusion import build_schedule
from medsyn.errors import ConfigError


def lowres(b: int = 3) -> torch.Tensor:
    return torch.rand(b, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 4, 4, 4, 4)


def test_training_levels_are_uniform_up_to_noise_max():
    cond = LowResConditioner(noise_max=0.3, noise_sample=0.1)
    out = cond(lowres(2000), train=True, generator=torch.Generator().manual_seed(1))
    assert out["aug_t"].min() >= 0 and out["aug_t"].max() <= 0.3
    assert abs(float(out["aug_t"].mean()) - 0.15) < 0.01  # U(0, 0.3)


def test_sampling_level_and_noise_are_the_forward_process():
    cond = LowResConditioner(noise_max=0.3, noise_sample=0.1)
    x = lowres()
    out = cond(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out["aug_t"], torch.full((3,), 0.1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out["concat"], build_schedule("cosine").add_noise(x, out["aug_t"], noise))
    assert torch.equal(cond(x, generator=None, level=0.0)["aug_t"], torch.zeros(3))


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    cond = LowResConditioner(noise_max=0.3, noise_sample=0.2)
    x = lowres()
    both = cond(x, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = cond(x[1:2], generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(both["concat"][1], alone["concat"][0])


def test_levels_outside_training_are_refused():
    with pytest.raises(ConfigError, match=r"lowres.noise_sample=0.5.*\[0, 0.2\]"):
        LowResConditioner(noise_max=0.2, noise_sample=0.5)
    cond = LowResConditioner(noise_max=0.2, noise_sample=0.05)
    with pytest.raises(ConfigError, match="expected a level in that range"):
        cond(lowres(), level=-0.1)
    with pytest.raises(ConfigError, match="upsample"):
        LowResConditioner(upsample="cubic")
    assert cond.unconditional({}) is None
    assert cond.unet_arguments() == {"augment_embedding": True, "in_channels": 8}  # 4 noisy + 4 concatenated


def test_bits_runs_concatenate_the_bits_of_the_nearest_lobe_labels():
    cond = LowResConditioner(noise_max=0.2, noise_sample=0.1, lobe_encoding="bits")
    x = lowres()  # lobes: any value in [-1, 1], e.g. trilinear upsampled levels
    out = cond(x, generator=torch.Generator().manual_seed(0))
    assert out["concat"].shape == (3, 6, 4, 4, 4) and cond.unet_arguments()["in_channels"] == 12
    net = torch.cat([x[:, :1], encode_lobe_bits(decode_lobes(x[:, 1]), dim=1), x[:, 2:]], 1)
    noise = torch.randn(net.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["concat"], build_schedule("cosine").add_noise(net, out["aug_t"], noise))


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_upsample_is_the_configured_mode(mode):
    x = lowres(1)
    up = LowResConditioner(upsample=mode).upsample(x, 2)
    assert up.shape == (1, 4, 8, 8, 8)
    if mode == "nearest":
        assert torch.equal(up[:, :, ::2, ::2, ::2], x)
    else:
        torch.testing.assert_close(up.mean(), x.mean(), atol=0.02, rtol=0)
        assert not torch.equal(up[:, :, ::2, ::2, ::2], x)

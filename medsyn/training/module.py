"""The LightningModule that trains both stages (sgm habit: one module wiring small swappable parts).

- base: 4-channel volumes (64^3 at paper scale), x0-prediction diffusion, cross-attention to the
  report tokens of a frozen BERT-family encoder, condition dropout for classifier-free guidance;
- sr: 4-channel high-resolution crops, the upsampled low-resolution volume concatenated to the
  input after noise augmentation (its noise level is embedded too), no text.

All randomness of a training step (t, noise, condition dropout, low-resolution augmentation) comes
from one generator per process whose state is saved in the checkpoint, so a resumed run reaches
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from medsyn.diffusion import Denoiser, DiffusionLoss, build_schedule
from medsyn.errors import MedsynError
from medsyn.models import build_model

STAGES = ("base", "sr")


class NonFiniteLossError(MedsynError):
    """The training loss became NaN or infinite; the run stops and the last good checkpoint stays."""


class DiffusionModule(pl.LightningModule):
    """Diffusion training of a medsyn UNet; `stage` is "base" (text-conditioned) or "sr" (super-resolution).

    Args are the sections of the run config: `model` (UNet preset/arguments), `diffusion` (schedule,
    parameterization, loss options, low-resolution noise augmentation), `optim` (AdamW), `text`
    (TextConditioner arguments, base only), `seed` (for the training generator).
    """

    def __init__(
        self,
        stage: str,
        model: Mapping[str, Any],
        diffusion: Mapping[str, Any],
        optim: Mapping[str, Any],
        text: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.save_hyperparameters()
        self.stage = stage
        self.diffusion_cfg = dict(diffusion)
        self.optim_cfg = dict(optim)
        self.seed = seed
        schedule = build_schedule(
            diffusion.get("schedule", "cosine"), shift=diffusion.get("schedule_shift", 1.0)
        )
        text_module = None
        if stage == "base" and text is not None:
            from medsyn.text import TextConditioner

            text_module = TextConditioner(**text)
            model = {**model, "cross_attention_dim": text_module.hidden_size}
        self.denoiser = Denoiser(build_model(model), schedule, diffusion.get("parameterization", "x0"))
        self.text = text_module
        self.loss_fn = DiffusionLoss(
            channel_weights=diffusion.get("channel_weights"),
            time_sampling=diffusion.get("time_sampling", "stratified"),
        )
        self._generator: torch.Generator | None = None
        self._pending_rng_state: torch.Tensor | None = None

    # ---- parts -------------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return self.denoiser.net

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def generator(self) -> torch.Generator:
        """The per-process training generator (seed + global rank), created on the module's device."""
        if self._generator is None or self._generator.device != self.device:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(self.seed) * 1000 + rank)
            if self._pending_rng_state is not None:
                gen.set_state(self._pending_rng_state)
                self._pending_rng_state = None
            self._generator = gen
        return self._generator

    def condition(
        self, batch: Mapping[str, Any], train: bool, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Network conditioning for a batch: text tokens (base) or the noised low-resolution volume (sr)."""
        if self.stage == "base":
            if self.text is None:
                return {}
            return dict(self.text(list(batch["text"]), ucg=train, generator=generator))
        lowres = batch["lowres"]
        b = lowres.shape[0]
        if train:
            max_t = float(self.diffusion_cfg.get("lowres_noise_max", 0.0))
            aug_t = torch.rand(b, device=lowres.device, generator=generator) * max_t
        else:
            aug_t = torch.full(
                (b,), float(self.diffusion_cfg.get("lowres_noise_sample", 0.0)), device=lowres.device
            )
        noise = torch.randn(lowres.shape, device=lowres.device, dtype=lowres.dtype, generator=generator)
        return {"concat": self.schedule.add_noise(lowres, aug_t, noise), "aug_t": aug_t}

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["x"]  # (B, 4, *S)
        cond = self.condition(batch, train=True, generator=self.generator)
        losses = self.loss_fn(self.denoiser, x0, cond, generator=self.generator)  # (B,)
        loss = losses.mean()
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(
                f"the training loss is not finite at step {self.global_step} (batch ids "
                f"{list(batch.get('id', []))}); stopping. The last good checkpoint is left as it was. "
                "Lower optim.lr, check the data, or use trainer.precision=32 to rule out overflow."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        # the same t, noise and augmentation for a batch at every validation: comparable curves
        gen = torch.Generator(device=self.device).manual_seed(10_007 * (batch_idx + 1) + int(self.seed))
        x0 = batch["x"]
        cond = self.condition(batch, train=False, generator=gen)
        loss = self.loss_fn(self.denoiser, x0, cond, generator=gen).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, batch_size=1)  # before clipping

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=float(cfg.get("lr", 1e-4)),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
            eps=float(cfg.get("eps", 1e-8)),
        )
        warmup = int(cfg.get("warmup_steps", 0))
        if warmup <= 0:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- state -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._generator is not None:
            checkpoint["medsyn_rng_state"] = self._generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medsyn_rng_state")
        if state is not None:
            self._pending_rng_state = state
            self._generator = None

    def exported_state(self, denoiser: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The weights inference needs: `net.*` (UNet; of `denoiser` if given, e.g. the EMA copy) and
        `text.*` (trainable text parts, e.g. a learned null)."""
        net = (denoiser or self.denoiser).net
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        if self.text is not None:
            state.update({f"text.{k}": v for k, v in self.text.state_dict().items()})
        return state

    def count_parameters(self) -> dict[str, int]:
        out = {"unet": sum(p.numel() for p in self.net.parameters())}
        if self.text is not None:
            out["text_trainable"] = sum(p.numel() for p in self.text.parameters() if p.requires_grad)
            out["text_frozen"] = sum(p.numel() for p in self.text.parameters() if not p.requires_grad)
        return out


def voxels(x: torch.Tensor) -> int:
    """Voxels in a (B, C, *S) batch, counted per sample and channel-free (B x prod(S))."""
    return int(x.shape[0] * math.prod(x.shape[2:]))

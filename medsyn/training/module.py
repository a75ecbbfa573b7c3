"""The LightningModule that trains a medsyn diffusion model (sgm habit: one module wiring small parts).

The model (denoiser + conditioners) comes from the same builder generation uses
(`medsyn.generation.model.build_diffusion_model`); what a stage conditions on is in its config:
- base: 4-channel volumes (64^3 at paper scale), cross-attention to the report tokens of a frozen
  BERT-family encoder with condition dropout for classifier-free guidance (`text` section);
- sr: 4-channel high-resolution crops, the upsampled low-resolution volume concatenated to the input
  after noise augmentation, whose level is embedded too (`lowres` section).
Batches hold the cache's four channels; the network denoises them as the run's `lobe_encoding` says
(bits: the lobe levels become the three bits of their exact labels here, at batch time).

All randomness of a training step (t, noise, condition dropout, low-resolution augmentation) comes
from one generator per process whose state is saved in the checkpoint, so a resumed run reaches
the same weights as an uninterrupted one. A resumed run trains with the `optim` settings it is given:
where they differ from the checkpoint's, they replace the restored ones (and a line says so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from medsyn.diffusion import Denoiser, DiffusionLoss
from medsyn.errors import MedsynError
from medsyn.generation.model import build_diffusion_model


class NonFiniteLossError(MedsynError):
    """The training loss became NaN or infinite; the run stops and the last good checkpoint stays."""


def build_optimizer(
    params, lr: float = 1e-4, betas=(0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
    warmup_steps: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """AdamW with a linear warm-up over `warmup_steps` (the `optim` section holds these arguments)."""
    optimizer = torch.optim.AdamW(
        params, lr=float(lr), betas=tuple(betas), weight_decay=float(weight_decay), eps=float(eps)
    )
    if int(warmup_steps) <= 0:
        return {"optimizer": optimizer}
    warmup = int(warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def apply_optim_settings(trainer: pl.Trainer, optim: Mapping[str, Any]) -> None:
    """Set `optim`'s lr, betas, weight decay and eps on the trainer's restored optimizer and scheduler
    (whose base learning rate the warm-up scales)."""
    lr = float(optim.get("lr", 1e-4))
    settings = {
        "betas": tuple(float(b) for b in optim.get("betas", (0.9, 0.999))),
        "weight_decay": float(optim.get("weight_decay", 0.0)),
        "eps": float(optim.get("eps", 1e-8)),
    }
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group.update(settings, lr=lr)
            if "initial_lr" in group or trainer.lr_scheduler_configs:
                group["initial_lr"] = lr
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            groups = scheduler.optimizer.param_groups
            for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
                group["lr"] = lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]


class ResumableModule(pl.LightningModule):
    """A LightningModule whose resume is exact for the global random state (dropout draws from it) and
    which applies changed `optim` settings (`self.optim_cfg`) to the restored optimizer on resume."""

    def __init__(self) -> None:
        super().__init__()
        self.optim_cfg: dict[str, Any] = {}
        self._pending_rng_state: torch.Tensor | None = None
        self._restored_optim: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medsyn_rng_state"] = torch.get_rng_state()  # dropout's draws continue on resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_state = checkpoint.get("medsyn_rng_state")
        config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
        self._restored_optim = dict(config.get("optim") or {})

    def on_train_start(self) -> None:
        # loops, optimizer and scheduler are restored by now: continue the random state, apply changed optim
        if self._pending_rng_state is not None:
            torch.set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        restored, self._restored_optim = self._restored_optim, None
        changed = {
            k: v
            for k, v in self.optim_cfg.items()
            if restored and restored.get(k) != v and k != "warmup_steps"
        }
        if changed:
            apply_optim_settings(self.trainer, self.optim_cfg)
            if self.trainer.is_global_zero:
                what = ", ".join(
                    f"optim.{k}={v} (the checkpoint had {restored.get(k)})" for k, v in changed.items()
                )
                print(f"medsyn: resuming with {what}")


class DiffusionModule(pl.LightningModule):
    """Diffusion training of the model a run config describes.

    config: the run config (or any mapping with its `model`, `diffusion` and conditioner sections);
    `loss` holds `DiffusionLoss` arguments, `optim` those of `build_optimizer`, `seed` seeds the
    training generator.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": dict(config)})
        self.model = build_diffusion_model(config)
        self.loss_fn = DiffusionLoss(**(config.get("loss") or {}))
        self.optim_cfg = dict(config.get("optim") or {})
        self.seed = int(config.get("seed", 0))
        self._generator: torch.Generator | None = None
        self._pending_rng_state: torch.Tensor | None = None
        self._restored_optim: dict | None = None  # the checkpoint's optim settings, when resumed

    # ---- parts -------------------------------------------------------------------------------
    @property
    def denoiser(self) -> Denoiser:
        return self.model.denoiser

    @property
    def net(self) -> torch.nn.Module:
        return self.model.denoiser.net

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

    # ---- training ----------------------------------------------------------------------------
    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The conditioners' inputs of a batch: its entries, and the report inputs of its texts with the
        batch's subjects (whose own keypatches are never retrieved for them)."""
        if "text" not in batch:
            return dict(batch)
        return {**batch, **self.model.report_inputs(batch["text"], batch.get("id"))}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.model.to_net(batch["x"])  # (B, 4, *S) -> (B, C, *S)
        cond = self.model.condition(self.inputs(batch), train=True, generator=self.generator)
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
        x0 = self.model.to_net(batch["x"])
        cond = self.model.condition(self.inputs(batch), train=False, generator=gen)
        loss = self.loss_fn(self.denoiser, x0, cond, generator=gen).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # before clipping; torch's fused total norm, no per-parameter host sync
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, norm_type=2.0), batch_size=1)

    def configure_optimizers(self):
        return build_optimizer([p for p in self.parameters() if p.requires_grad], **self.optim_cfg)

    # ---- state -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._generator is not None:
            checkpoint["medsyn_rng_state"] = self._generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medsyn_rng_state")
        if state is not None:
            self._pending_rng_state = state
            self._generator = None
        config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
        self._restored_optim = dict(config.get("optim") or {})

    def on_train_start(self) -> None:
        # the optimizer and scheduler states are restored by now: apply optim settings changed on resume
        restored, self._restored_optim = self._restored_optim, None
        if restored is None:
            return
        changed = {k: v for k, v in self.optim_cfg.items() if restored.get(k) != v and k != "warmup_steps"}
        if not changed:
            return
        apply_optim_settings(self.trainer, self.optim_cfg)
        if self.trainer.is_global_zero:
            what = ", ".join(
                f"optim.{k}={v} (the checkpoint had {restored.get(k)})" for k, v in changed.items()
            )
            print(f"medsyn: resuming with {what}")

    def exported_state(self, denoiser: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The weights inference needs (see `DiffusionModel.exported_state`)."""
        return self.model.exported_state(denoiser)

    def count_parameters(self) -> dict[str, int]:
        return self.model.count_parameters()


def voxels(x: torch.Tensor) -> int:
    """Voxels in a (B, C, *S) batch, counted per sample and channel-free (B x prod(S))."""
    return int(x.shape[0] * math.prod(x.shape[2:]))

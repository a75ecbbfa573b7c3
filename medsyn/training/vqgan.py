"""`train.py vqgan`: train the radiograph VQ-GAN (`medsyn.radiograph.vqgan`) on a radiograph cache.

The generator (MONAI's VQVAE) learns `loss.l1_weight` x L1 reconstruction + `loss.codebook_weight` x the
commitment loss (its codebook follows the encodings by EMA) + optionally `loss.perceptual_weight` x MONAI's
PerceptualLoss, and from `loss.adv_start_step` on `loss.adv_weight` x the least-squares PatchGAN loss of
MONAI's PatchDiscriminator, which then trains beside it. Two optimizers stepped by hand, one generator step
per batch: `trainer.max_steps` and the checkpoint steps count batches.

The run directory follows the other stages: config.yaml, checkpoints/ (exact resume), logs, the generator's
`model.safetensors` (the VQVAE weights and the run config; `load_vqgan` reads it), `metrics.json` with the
held-out split's (test, else val) PSNR and SSIM (on [-1, 1], data range 2), codebook usage and perplexity,
and `reconstructions.png` (original | reconstruction of up to 4 held-out images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from omegaconf import DictConfig

from medsyn.config import to_container
from medsyn.errors import ConfigError, DataError
from medsyn.io import write_json
from medsyn.radiograph.cache import read_radiograph_manifest
from medsyn.radiograph.datamodule import RadiographDataModule
from medsyn.radiograph.vqgan import VQGAN, build_vqgan
from medsyn.training.module import NonFiniteLossError, build_optimizer
from medsyn.training.vqgan_config import build_discriminator
from medsyn.viz import save_png
from medsyn.weights import WEIGHTS_FILE, export_weights

METRICS_FILE = "metrics.json"
PREVIEW_FILE = "reconstructions.png"


class VQGANModule(pl.LightningModule):
    """Adversarial training of the VQ-GAN a vqgan run config describes (manual optimization)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters({"config": dict(config)})
        self.vqgan = build_vqgan(config["model"])
        self.discriminator = build_discriminator(config["discriminator"])
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.loss_cfg = dict(config["loss"])
        self.perceptual = build_perceptual(self.loss_cfg) if self.loss_cfg["perceptual_weight"] else None
        self.optim_cfg = {"generator": dict(config["optim"]), "discriminator": dict(config["disc_optim"])}
        self.restart_threshold = float(config["codebook"]["restart_threshold"])
        self._pending_rng_state: torch.Tensor | None = None

    def generator_losses(
        self, x: torch.Tensor, adversarial: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-image losses (B,) of a batch x (B, 1, H, W), the reconstruction and the encodings: `l1`,
        `codebook` (the batch's, broadcast), `perceptual` and `adversarial` when used, their weighted sum `loss`."""
        cfg = self.loss_cfg
        recon, codebook, z = self.vqgan(x)
        recon = recon.float()  # (B, 1, H, W)
        out = {"l1": (recon - x).abs().flatten(1).mean(1), "codebook": codebook.float().expand(x.shape[0])}
        total = cfg["l1_weight"] * out["l1"] + cfg["codebook_weight"] * out["codebook"]
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(recon, x).float().expand(x.shape[0])
            total = total + cfg["perceptual_weight"] * out["perceptual"]
        if adversarial:
            logits = self.discriminator(recon.contiguous())[-1]  # (B, 1, h', w')
            judged = self.adversarial(logits.float(), target_is_real=True, for_discriminator=False)
            out["adversarial"] = judged.expand(x.shape[0])
            total = total + cfg["adv_weight"] * out["adversarial"]
        out["loss"] = total
        return out, recon, z

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The least-squares PatchGAN loss of the discriminator: real images real, reconstructions fake."""
        fake = self.discriminator(recon.detach().contiguous())[-1]
        real = self.discriminator(x.contiguous())[-1]
        return 0.5 * (self.adversarial(fake.float(), target_is_real=False, for_discriminator=True)
                      + self.adversarial(real.float(), target_is_real=True, for_discriminator=True))  # fmt: skip

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch["x"]  # (B, 1, H, W)
        n = x.shape[0]
        opt_g, opt_d = self.optimizers()
        sched = self._schedulers()
        adversarial = self.global_step >= int(self.loss_cfg["adv_start_step"])  # global_step: generator steps
        self.toggle_optimizer(opt_g)
        losses, recon, z = self.generator_losses(x, adversarial)
        loss = losses["loss"].mean()
        self._check_finite(loss, batch, "generator")
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_g, "generator")
        opt_g.step()
        if sched["generator"] is not None:
            sched["generator"].step()
        self.untoggle_optimizer(opt_g)
        self._restart_dead_codes(z)
        for key, value in losses.items():
            name = "train/loss" if key == "loss" else f"train/{key}_loss"
            self.log(name, value.mean().detach(), prog_bar=key in ("loss", "l1"), batch_size=n)
        self.log("train/perplexity", float(self.vqgan.net.quantizer.perplexity), batch_size=n)
        if adversarial:
            self.toggle_optimizer(opt_d)
            loss_d = self.discriminator_loss(x, recon)
            self._check_finite(loss_d, batch, "discriminator")
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip(opt_d, "discriminator")
            # through the strategy (precision, hooks) but not LightningOptimizer.step: global_step counts
            # generator steps only
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure)
            if sched["discriminator"] is not None:
                sched["discriminator"].step()
            self.untoggle_optimizer(opt_d)
            self.log("train/discriminator_loss", loss_d.detach(), prog_bar=True, batch_size=n)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch["x"]
        losses, recon, _ = self.generator_losses(x, adversarial=False)
        mse = ((recon.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)
        psnr = 10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))  # data range 2
        n = x.shape[0]
        self.log("val/l1_loss", losses["l1"].mean(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/psnr", psnr.mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        return [
            build_optimizer(self.vqgan.parameters(), **_optimizer_args(self.optim_cfg["generator"])),
            build_optimizer(
                self.discriminator.parameters(), **_optimizer_args(self.optim_cfg["discriminator"])
            ),
        ]

    def _schedulers(self) -> dict[str, Any]:
        """The warm-up schedulers by optimizer (None where it has none)."""
        found = self.lr_schedulers()
        found = [] if found is None else found if isinstance(found, list) else [found]
        by_optimizer = {id(s.optimizer): s for s in found}
        opts = self.trainer.optimizers
        return {"generator": by_optimizer.get(id(opts[0])), "discriminator": by_optimizer.get(id(opts[1]))}

    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        """Restart the codes unused of late (`codebook.restart_threshold`), the same on every rank."""
        if not self.restart_threshold:
            return
        dead = self.vqgan.restart_dead_codes(z, self.restart_threshold)
        if self.trainer.world_size > 1:
            q = self.vqgan.net.quantizer.quantizer
            tensors = self.trainer.strategy.broadcast(
                [q.embedding.weight.data, q.ema_w.data, q.ema_cluster_size.data]
            )
            for mine, rank0 in zip((q.embedding.weight, q.ema_w, q.ema_cluster_size), tensors, strict=True):
                mine.data.copy_(rank0)
        self.log("train/restarted_codes", float(dead.numel()), batch_size=z.shape[0])

    def _clip(self, optimizer, which: str) -> None:
        value = self.optim_cfg[which].get("gradient_clip_val")
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=float(value), gradient_clip_algorithm="norm")

    def _check_finite(self, loss: torch.Tensor, batch: Mapping[str, Any], which: str) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(
                f"the {which} loss is not finite at step {self.global_step} (batch ids {list(batch.get('id', []))}); "
                "stopping. The last good checkpoint is left as it was. Lower optim.lr / disc_optim.lr or use "
                "trainer.precision=32."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medsyn_rng_state"] = torch.get_rng_state()  # dropout's draws continue on resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_state = checkpoint.get("medsyn_rng_state")

    def on_train_start(self) -> None:
        if self._pending_rng_state is not None:  # loops and optimizers are restored by now
            torch.set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None

    def exported_state(self) -> dict[str, torch.Tensor]:
        """The weights inference needs: the generator's (the VQVAE's, codebook included)."""
        return {k: v.detach() for k, v in self.vqgan.net.state_dict().items()}


def _no_closure() -> None:
    return None


def _optimizer_args(optim: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in optim.items() if k != "gradient_clip_val"}


def build_perceptual(loss_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """MONAI's PerceptualLoss (2-D) of `loss.perceptual_network`; its network's weights must be downloadable
    or cached, else a ConfigError saying so."""
    from monai.losses import PerceptualLoss

    try:
        return PerceptualLoss(spatial_dims=2, network_type=str(loss_cfg["perceptual_network"]))
    except Exception as err:  # unknown network, lpips missing, no network access for the weights
        raise ConfigError(
            f"loss.perceptual_network={loss_cfg['perceptual_network']!r}: MONAI's PerceptualLoss cannot be built "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); set loss.perceptual_weight=0"
        ) from err


@torch.no_grad()
def held_out_metrics(vqgan: VQGAN, loader) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """PSNR and SSIM of the reconstructions (encode -> decode, clamped to [-1, 1]; data range 2) over a
    loader, the codebook usage (fraction of codes used) and perplexity of its codes, the number of images;
    and the first 4 images (N, 1, H, W) with their reconstructions."""
    was_training = vqgan.training
    vqgan.eval()
    psnr, ssim = PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=2, data_range=2.0)
    counts = torch.zeros(vqgan.num_codes, dtype=torch.float64)
    shown, recons, images, l1 = [], [], 0, 0.0
    for batch in loader:
        x = batch["x"].to(vqgan.device, torch.float32)  # (B, 1, H, W)
        codes = vqgan.encode(x)  # (B, h, w)
        recon = vqgan.decode(codes)
        psnr(recon, x)
        ssim(recon, x)
        counts += torch.bincount(codes.flatten().cpu(), minlength=vqgan.num_codes).double()
        images += x.shape[0]
        l1 += float((recon - x).abs().flatten(1).mean(1).sum())
        if sum(len(s) for s in shown) < 4:
            shown.append(x.cpu())
            recons.append(recon.cpu())
    vqgan.train(was_training)
    if not images:
        raise DataError("no held-out images to measure the VQ-GAN on")
    p = counts / counts.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    metrics = {
        "psnr": float(psnr.aggregate()),
        "ssim": float(ssim.aggregate()),
        "l1": l1 / images,
        "codebook_usage": float((counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
        "perplexity": math.exp(entropy),
        "num_codes": vqgan.num_codes,
        "token_grid": vqgan.token_grid,
        "images": images,
    }
    return metrics, torch.cat(shown)[:4], torch.cat(recons)[:4]


def reconstruction_sheet(images: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """One row per image, original | reconstruction, as an RGB array (N*H, 2*W + gap, 3) in [0, 1]."""
    rows = []
    for x, y in zip(images, recons, strict=True):
        a, b = ((x[0].float().numpy() + 1) / 2).clip(0, 1), ((y[0].float().numpy() + 1) / 2).clip(0, 1)
        gap = np.ones((a.shape[0], max(2, a.shape[1] // 32)), np.float32)
        rows.append(np.concatenate([a, gap, b], axis=1))
        rows.append(np.ones((gap.shape[1], rows[-1].shape[1]), np.float32))
    sheet = np.concatenate(rows[:-1], axis=0)
    return np.repeat(sheet[..., None], 3, axis=-1)


def check_cache(root: Path, image_size: int) -> None:
    """The radiograph cache has training images and at least one held-out one (test, else val), all of
    the model's image size."""
    rows = read_radiograph_manifest(root)  # a DataError naming the file and `medsyn drr` when missing
    counts = {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}
    if counts["train"] < 1 or max(counts["test"], counts["val"]) < 1:
        raise DataError(
            f"{root / 'manifest.csv'}: {counts['train']} train, {counts['val']} val and {counts['test']} test "
            "images; the VQ-GAN needs training images and at least one held out (test, else val)"
        )
    sizes = sorted({int(r["size"]) for r in rows if r.get("size")})
    if sizes != [image_size]:
        raise ConfigError(
            f"model.image_size={image_size}: the radiograph cache at {root} holds {sizes} images; set "
            f"model.image_size (and a token_grid that divides it) to its size, or make a cache of that size "
            f"(`medsyn drr --size {image_size}`)"
        )


def train_vqgan(cfg: DictConfig) -> Path:
    """Run (or resume) `train.py vqgan`; returns the run directory with model.safetensors, metrics.json
    and reconstructions.png."""
    from medsyn.training.run import open_run, plain_trainer, start_run

    cfg, ckpt_path = open_run(cfg)
    run_dir, config = Path(cfg.run_dir), to_container(cfg)
    root = Path(cfg.data.root)
    image_size = build_vqgan(config["model"]).image_size
    check_cache(root, image_size)
    trainer = plain_trainer(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = VQGANModule(config)
    datamodule = RadiographDataModule(root, int(cfg.data.batch_size), int(cfg.data.num_workers), int(cfg.seed),
                                      str(cfg.data.text), image_size)  # fmt: skip
    datamodule.setup()
    start_run(cfg, trainer, module, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        export_weights(
            run_dir / WEIGHTS_FILE, module.exported_state(), {**config, "global_step": trainer.global_step}
        )
        split = "test" if len(datamodule.datasets["test"]) else "val"
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        measured, images, recons = held_out_metrics(module.vqgan, loader)
        metrics = {"split": split, **measured, "global_step": trainer.global_step}
        write_json(run_dir / METRICS_FILE, metrics)
        save_png(run_dir / PREVIEW_FILE, reconstruction_sheet(images, recons))
        print(
            f"medsyn: held-out ({split}, {metrics['images']} images) PSNR {metrics['psnr']:.2f} dB, SSIM "
            f"{metrics['ssim']:.3f}, codebook usage {metrics['codebook_usage']:.3f} ({metrics['codes_used']} of "
            f"{metrics['num_codes']} codes, perplexity {metrics['perplexity']:.1f}) -> {run_dir / METRICS_FILE}"
        )
    return run_dir

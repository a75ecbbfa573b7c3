"""Lightning callbacks of a medsyn run: EMA with export, throughput, previews of samples."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medsyn.training.module import DiffusionModule, voxels
from medsyn.weights import WEIGHTS_FILE, export_weights


class EMA(Callback):
    """Exponential moving average of the denoiser's weights (torch's AveragedModel, multi-tensor lerp).

    Only the denoiser is averaged: the frozen text encoder is not copied (a second BERT would cost
    memory and nothing else). The average lives on the training device unless `device` says otherwise
    (e.g. "cpu" to save GPU memory, at the price of a device-to-host copy of the weights per update). The average is swapped in for validation, saved in checkpoints under
    `medsyn_ema`, and copied into the model when training ends, so the exported weights are EMA.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.decay = float(decay)
        self.update_every_n_steps = max(1, int(update_every_n_steps))
        self.update_starting_at_step = int(update_starting_at_step)
        self.device = device
        self.model: AveragedModel | None = None
        self._pending: dict | None = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.model is None:
            # The module is still on the CPU here (the strategy moves it later): the average goes to the
            # device the module will train on, or it would be copied back to the host at every update.
            device = self.device if self.device is not None else trainer.strategy.root_device
            self.model = AveragedModel(
                pl_module.denoiser,
                device=device,
                multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                use_buffers=True,
            )
            if self._pending is not None:
                self.model.load_state_dict(self._pending)
                self._pending = None

    def averaged(self) -> torch.nn.Module | None:
        """The averaged denoiser, or None before fit starts."""
        return None if self.model is None else self.model.module

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far; unchanged while gradients accumulate
        if step == self._last_step or step <= self.update_starting_at_step:
            return
        self._last_step = step
        if (step - 1) % self.update_every_n_steps == 0:
            self.model.update_parameters(pl_module.denoiser)

    def _swap(self, pl_module) -> None:
        for avg, cur in zip(_tensors(self.model.module), _tensors(pl_module.denoiser), strict=True):
            tmp = avg.detach().clone()
            avg.detach().copy_(cur.detach())
            cur.detach().copy_(tmp)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.model is not None and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.model is not None and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        for avg, cur in zip(_tensors(self.model.module), _tensors(pl_module.denoiser), strict=True):
            cur.detach().copy_(avg.detach())

    def state_dict(self) -> dict:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_step = int(state_dict.get("last_step", -1))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.model is not None:
            checkpoint["medsyn_ema"] = self.model.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get("medsyn_ema")
        if state is None:
            return
        if self.model is None:
            self._pending = state
        else:
            self.model.load_state_dict(state)


def _tensors(module: torch.nn.Module):
    return itertools.chain(module.parameters(), module.buffers())


class SaveLastOnEnd(Callback):
    """Save `checkpoints/last.ckpt` when fit ends after a step no checkpoint holds (a stop that
    `RunCheckpoints` did not see coming, e.g. early stopping), so any run can be continued.

    Must come before the EMA callback, whose `on_train_end` copies the averaged weights into the model.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        saved = trainer.checkpoint_callback
        if (
            saved is not None
            and saved.last_model_path
            and getattr(saved, "_last_global_step_saved", -1) == trainer.global_step
        ):
            return
        trainer.save_checkpoint(self.path)


class ExportWeights(Callback):
    """Write `run_dir/model.safetensors` (EMA weights when EMA is on) every N steps and at the end."""

    def __init__(
        self, run_dir: str | Path, config: Mapping[str, Any], every_n_steps: int, ema: EMA | None
    ) -> None:
        self.path = Path(run_dir) / WEIGHTS_FILE
        self.config, self.every_n_steps, self.ema = dict(config), every_n_steps, ema
        self.exported_step = -1

    @rank_zero_only
    def export(self, pl_module: DiffusionModule, step: int, denoiser: torch.nn.Module | None = None) -> None:
        export_weights(self.path, pl_module.exported_state(denoiser), {**self.config, "global_step": step})
        self.exported_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.exported_step:
            self.export(pl_module, step, self.ema.averaged() if self.ema is not None else None)

    def on_train_end(self, trainer, pl_module) -> None:
        # the EMA callback (earlier in the list) has copied the averaged weights into pl_module
        if trainer.global_step != self.exported_step:
            self.export(pl_module, trainer.global_step)

    def finish(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        """Export the final weights when fit ended without training (the checkpoint was already at
        `max_steps`, e.g. after a kill between the last checkpoint and the last export)."""
        if self.exported_step != trainer.global_step:
            self.export(pl_module, trainer.global_step, self.ema.averaged() if self.ema is not None else None)


class Throughput(Callback):
    """Log voxels (volume batches) or tokens (report batches) per second of training, all ranks
    together, and seconds per step; on a GPU also the allocator's peak memory so far (GiB, this rank),
    with the device synchronized around each batch so that the seconds are the GPU's."""

    def __init__(self) -> None:
        self._start: float | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/gpu_peak_gib", float(peak), batch_size=1)
        unit, amount = (
            ("voxels", voxels(batch["x"])) if "x" in batch else ("tokens", int(batch["attention_mask"].sum()))
        )
        pl_module.log(f"train/{unit}_per_sec", float(amount * trainer.world_size / elapsed), batch_size=1)
        pl_module.log("train/sec_per_batch", float(elapsed), batch_size=1)


class Preview(Callback):
    """Every N steps, sample from fixed prompts and seeds and log a picture of the results.

    Text-conditioned models: volumes from `prompts`; models conditioned on data (SR): samples for the
    first validation items, beside their inputs.
    The picture (axial, coronal, sagittal mid-slices with mask overlays) goes to the logger and to
    `run_dir/previews/step_XXXXXXX.png`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        every_n_steps: int,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int,
        sampler: str,
        guidance: float,
        ema: EMA | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.dir = Path(run_dir) / "previews"
        self.every_n_steps, self.prompts, self.seeds = every_n_steps, list(prompts), list(seeds)
        self.steps, self.sampler, self.guidance, self.ema = steps, sampler, guidance, ema
        self.spacing = tuple(spacing)
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last:
            return
        self._last = step
        self.render(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.render(trainer, pl_module, trainer.global_step)

    @rank_zero_only
    def render(self, trainer: pl.Trainer, pl_module: DiffusionModule, step: int) -> None:
        from medsyn.viz import preview_grid, render_volume, save_png

        averaged = self.ema.averaged() if self.ema is not None else None
        denoiser = averaged if averaged is not None else pl_module.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            volumes, captions = self._generate(trainer, pl_module, denoiser)
        finally:
            denoiser.train(was_training)
        images = [render_volume(v, spacing=self.spacing) for v in volumes]
        grid = preview_grid(images, captions, ncols=min(len(images), 2))
        save_png(self.dir / f"step_{step:07d}.png", grid)
        _log_image(trainer, "preview", grid, step, captions)

    def _generate(
        self, trainer: pl.Trainer, module: DiffusionModule, denoiser: torch.nn.Module
    ) -> tuple[list[np.ndarray], list[str]]:
        """Sample from the preview prompts, or, for a model conditioned on data (e.g. the low-resolution
        volume), from the first validation items; data inputs are shown beside their samples."""
        from medsyn.generation.model import REPORT_KEYS, DiffusionModel
        from medsyn.generation.stages import generate

        model = DiffusionModel(denoiser, module.model.conditioners)
        data_keys = [k for k in model.conditioners if k not in REPORT_KEYS]
        if data_keys:
            split = "val" if len(trainer.datamodule.datasets.get("val", [])) else "train"
            dataset = trainer.datamodule.datasets[split]
            items = [dataset[i] for i in range(min(2, len(dataset)))]
            inputs: dict = {k: torch.stack([it[k] for it in items]).to(module.device) for k in data_keys}
            inputs.update(model.report_inputs([it["text"] for it in items], [it["id"] for it in items]))
            seeds, shape = list(range(len(items))), tuple(items[0]["x"].shape[1:])
            captions = [f"sample for {it['id']}" for it in items]
        else:
            item = trainer.datamodule.datasets["train"][0]
            shape = tuple(item["x"].shape[1:])
            prompts = [p for p in self.prompts for _ in self.seeds]
            seeds = [s for _ in self.prompts for s in self.seeds]
            inputs = model.report_inputs(prompts)
            captions = [f"seed {s}: {p}" for p, s in zip(prompts, seeds, strict=True)]
        with trainer.precision_plugin.forward_context():  # the run's autocast, as in training
            x = generate(model, inputs, seeds, shape, steps=self.steps, sampler=self.sampler,
                         guidance=self.guidance)  # fmt: skip
        for key in data_keys:  # show what the samples were conditioned on
            x = torch.cat([x, inputs[key].to(x.dtype)], dim=0)
            captions += [f"{key} input {it['id']}" for it in items]
        return [v.float().cpu().numpy() for v in x], captions


def _log_image(trainer: pl.Trainer, key: str, image: np.ndarray, step: int, captions: Sequence[str]) -> None:
    """Send an image to whichever logger the run uses (W&B, TensorBoard); CSV keeps the PNG only."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[" | ".join(captions)[:500]], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")

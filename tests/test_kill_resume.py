"""kill -9 and resume: every trial reaches the weights of an uninterrupted run, bit for bit (slow).

Each trial starts `python train.py` in a fresh run directory and kills its process group with SIGKILL,
at a random moment or right after a file event (a checkpoint being written, a step checkpoint or a
new `last.ckpt` appearing, the weights being exported, the checkpoint at an epoch's end), sometimes
twice, sometimes after a clean stop at an epoch's end; then it resumes to the same `max_steps` and
compares `model.safetensors` and the checkpoint's weights and EMA with the uninterrupted run's.
`MEDSYN_KILL_TRIALS` (default 10 per stage) and `MEDSYN_KILL_SEED` change the trials.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import make_cache, make_text_model

from medsyn.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
TRIALS = int(os.environ.get("MEDSYN_KILL_TRIALS", "10"))

# base: 3 batches an epoch, a checkpoint every 2 steps (6 and 12 end an epoch), a loader worker;
# SR: 2 micro-batches a step (the epoch's 3rd batch steps alone), a checkpoint every step (even ones end an epoch)
STAGES = {
    "base": {"max_steps": 12, "epoch_end": 6, "settings": {"checkpoint.every_n_steps": 2, "data.num_workers": 1}},
    "sr": {"max_steps": 8, "epoch_end": 4, "settings": {"checkpoint.every_n_steps": 1, "effective_batch_size": 4,
                                                       "data.crop_size": 16}},
}  # fmt: skip
EVENTS = ["random", "checkpoint written", "step checkpoint", "last moved on", "weights exported", "epoch end",
          "random twice", "clean stop at epoch end", "checkpoint written", "random"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {"cache": make_cache(base / "cache", n=8, size=32), "bert": make_text_model(base / "bert")}


def command(assets, stage: str, run_dir: Path, max_steps: int) -> list[str]:
    args = {
        "run_dir": run_dir, "model.preset": f"{stage}-tiny", "data.root": assets["cache"], "data.batch_size": 2,
        "data.num_workers": 0, "effective_batch_size": 2, "trainer.max_steps": max_steps,
        "trainer.accelerator": "cpu", "trainer.precision": "32", "trainer.val_check_interval": 2,
        "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False, "logger.kind": "csv", "preview.every_n_steps": 0,
        "ema.decay": 0.9, "optim.warmup_steps": 3,
        **STAGES[stage]["settings"],
    }  # fmt: skip
    if stage == "base":
        args["text.model"] = assets["bert"]
    return [sys.executable, str(ROOT / "train.py"), stage, *(f"{k}={v}" for k, v in args.items())]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=log.parent, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def finish(args: list[str], log: Path) -> None:
    proc = start(args, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]


def _listing(run_dir: Path) -> set[str]:
    names = set()
    for folder in (run_dir, run_dir / "checkpoints"):
        try:
            names |= {f"{folder.name}/{e.name}" for e in os.scandir(folder)}
        except FileNotFoundError:
            pass
    return names


def _last_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoints" / "last.ckpt.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return -1


def _happened(
    event: str, run_dir: Path, names: set[str], before: set[str], last: int, epoch_end: int
) -> bool:
    new = names - before
    if event == "checkpoint written":
        return any(n.startswith("checkpoints/.step=") and ".tmp" in n for n in new)
    if event == "step checkpoint":
        return any(n.startswith("checkpoints/step=") and n.endswith(".ckpt") for n in new)
    if event == "last moved on":
        return _last_step(run_dir) > last
    if event == "weights exported":
        return any(n.startswith(f"{run_dir.name}/.model.safetensors.") for n in new)
    if event == "epoch end":
        return f"checkpoints/step={epoch_end:07d}.ckpt" in names
    raise ValueError(event)


def _training(run_dir: Path, since: float) -> bool:
    """Whether the process started at `since` has written config.yaml: it trains from then on."""
    try:
        return (run_dir / "config.yaml").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def kill_at(args: list[str], log: Path, run_dir: Path, event: str, rng: random.Random, span: float,
            epoch_end: int) -> str:  # fmt: skip
    """Start `args` and SIGKILL its process group at `event` (random: a moment of the training, which
    took `span` seconds in the reference run); returns what the kill met."""
    before, last = _listing(run_dir), _last_step(run_dir)
    began = time.time()
    proc = start(args, log)
    deadline = time.monotonic() + 600
    if event == "random":
        while proc.poll() is None and not _training(run_dir, began - 0.05) and time.monotonic() < deadline:
            time.sleep(0.01)
        deadline = time.monotonic() + rng.uniform(0.0, 0.95 * span)
    hit = False
    while proc.poll() is None and time.monotonic() < deadline:
        if event != "random" and _happened(event, run_dir, _listing(run_dir), before, last, epoch_end):
            hit = True
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return f"{event}: missed, the run ended first (step {_last_step(run_dir)})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    temps = sorted(n for n in _listing(run_dir) if "/." in n and ".tmp" in n)
    when = "at" if hit or event == "random" else "after waiting for"
    return (
        f"killed {when} {event} (last.ckpt at step {_last_step(run_dir)}; temporary files: {temps or 'none'})"
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state, _ = load_weights(run_dir / "model.safetensors")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state.update({f"ckpt.{k}": v for k, v in ckpt["state_dict"].items()})
    state.update({f"ema.{k}": v for k, v in ckpt["medsyn_ema"].items()})
    state["global_step"] = torch.tensor(ckpt["global_step"])
    return state


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_then_resume_reaches_identical_weights(assets, tmp_path, stage):
    spec, rng = STAGES[stage], random.Random(int(os.environ.get("MEDSYN_KILL_SEED", "0")) * 7 + len(stage))
    max_steps, epoch_end = spec["max_steps"], spec["epoch_end"]
    reference = tmp_path / "reference"
    reference.mkdir()
    finish(command(assets, stage, reference / "run", max_steps), reference / "log.txt")
    span = time.time() - (reference / "run" / "config.yaml").stat().st_mtime  # the training's duration
    expected = weights(reference / "run")
    results = []
    for trial in range(TRIALS):
        event = EVENTS[trial % len(EVENTS)]
        home = tmp_path / f"trial{trial}"
        home.mkdir()
        run_dir, log = home / "run", home / "log.txt"
        full = command(assets, stage, run_dir, max_steps)
        met = []
        if event == "clean stop at epoch end":
            finish(command(assets, stage, run_dir, epoch_end), log)
            met.append(kill_at(full, log, run_dir, "random", rng, span, epoch_end))
        elif event == "random twice":
            met += [kill_at(full, log, run_dir, "random", rng, span, epoch_end) for _ in range(2)]
        else:
            met.append(kill_at(full, log, run_dir, event, rng, span, epoch_end))
        finish(full, log)
        got = weights(run_dir)
        same = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        leftovers = sorted(n for n in _listing(run_dir) if "/." in n and ".tmp" in n)
        latest = sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt"))
        ok = same and not leftovers and latest == ["last.ckpt"]
        results.append((trial, event, " | ".join(met), ok))
        print(f"{stage} trial {trial}: {event}: {' | '.join(met)} -> {'identical' if same else 'DIFFERENT'}"
              f"{'' if not leftovers else f', leftovers {leftovers}'}{'' if latest == ['last.ckpt'] else f', {latest}'}")  # fmt: skip
    failed = [r for r in results if not r[3]]
    assert not failed, failed

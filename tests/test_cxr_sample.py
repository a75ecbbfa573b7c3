"""`sample.py --cxr RUN`: radiographs from a tiny `train.py cxr` run (a tiny VQ-GAN, keypatch clues): the
output contract (16-bit PNG, contact sheet, meta.json), per-sample seeds, atomic samples, no overwriting,
and the dispatch to the 2D diffusion baseline."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cxr_fixtures import SIZE, cxr_overrides, make_codebook, make_radiographs, make_vqgan
from PIL import Image

from medsyn.errors import DataError
from medsyn.generation.cxr import CXRSampleOptions, KeypatchClues, sample_cxr
from medsyn.radiograph import output
from medsyn.radiograph.lm import load_lm_run
from medsyn.radiograph.output import read_png16, save_png16
from medsyn.radiograph.sample import sample_image_codes
from medsyn.radiograph.sequence import report_ids
from medsyn.radiograph.vqgan import load_vqgan
from medsyn.training.config import load_run_config
from medsyn.training.cxr import train_cxr

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Large right pleural effusion. The heart is enlarged. Right effusion. Cardiomegaly.",
    "No pleural effusion.",
    "Emphysema in the left upper lobe. No effusion. Emphysema.",
]


def run_sample(*argv) -> int:
    """sample.py in-process, as its __main__ runs it (user errors -> exit code 2)."""
    from medsyn.cli import run_cli

    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return run_cli(script.main, "sample.py", script.build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("cxr_sample")
    cache = make_radiographs(base / "cache")
    keypatches = make_codebook(base, cache)
    vqgan = make_vqgan(base / "vqgan")
    return train_cxr(load_run_config("cxr", None, cxr_overrides(cache, vqgan, base / "run", keypatches)))


def options(**kw) -> CXRSampleOptions:
    return CXRSampleOptions(**{"temperature": 1.0, "top_p": 0.95, "guidance": 2.0, **kw})


def test_png16_round_trip(tmp_path):
    image = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    save_png16(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I;16") and im.size == (8, 8)
    back = read_png16(tmp_path / "a.png")
    assert back.shape == (8, 8) and np.abs(back - image[0].numpy()).max() <= 1 / 32767
    assert back.min() == -1.0 and back.max() == 1.0


def test_sample_outputs(run_dir, tmp_path):
    out = tmp_path / "out"
    assert run_sample("--cxr", run_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", out,
                      "--seed", "3", "--temperature", "0.9", "--top-p", "0.9", "--guidance", "1.5") == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    for index in (0, 1):
        folder = out / str(index)
        assert sorted(p.name for p in folder.iterdir()) == ["image.png", "keypatches.png", "meta.json"]
        with Image.open(folder / "image.png") as im:
            assert im.mode.startswith("I;16") and im.size == (SIZE, SIZE)
        with Image.open(folder / "keypatches.png") as im:
            assert im.mode in ("RGB", "RGBA")
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["prompt"] == PROMPTS[index] and meta["seed"] == 3 + index and meta["generator"] == "lm"
        assert meta["options"] == {"temperature": 0.9, "top_p": 0.9, "guidance": 1.5, "batch_size": 1}
        assert set(meta["weights"]) == {"lm", "vqgan", "align", "codebook"}
        assert all(len(w["sha256"]) == 64 for w in meta["weights"].values())
        assert {"torch", "transformers", "python"} <= set(meta["versions"])
        assert 0 < len(meta["keypatches"]) <= 3 and all(k["word"] for k in meta["keypatches"])
    # the image is the VQ-GAN's decoding of the codes the LM samples from the instruction, report and clues
    lm = load_lm_run(run_dir)
    vqgan = load_vqgan(lm.config["vqgan"])
    clues = KeypatchClues.load(lm.config["keypatches"], vqgan)
    found = clues.retrieve(PROMPTS[1])
    assert [c.index for c in found] == [k["index"] for k in meta["keypatches"]]
    condition = lm.layout.condition(report_ids(lm.tokenizer, lm.layout, PROMPTS[1]), clues.codes_of(found))
    codes = sample_image_codes(
        lm.model, lm.layout, [condition], [4], temperature=0.9, top_p=0.9, guidance=1.5
    )
    expected = vqgan.decode(codes)[0, 0].numpy()
    assert np.abs(read_png16(out / "1" / "image.png") - expected).max() <= 1 / 32767 + 1e-6


def test_a_sample_does_not_depend_on_its_batch(run_dir, tmp_path):
    lm = load_lm_run(run_dir)
    layout = lm.layout
    conditions = [layout.condition(list(range(5, 5 + n)), None) for n in (3, 12, 7)]  # three lengths: padding
    for guidance in (1.0, 2.5, 0.0):
        together = sample_image_codes(lm.model, layout, conditions, [11, 12, 13], guidance=guidance)
        alone = sample_image_codes(lm.model, layout, conditions[1:2], [12], guidance=guidance)
        assert together.shape == (3, *layout.image_grid)
        assert torch.equal(together[1], alone[0])
        assert not torch.equal(together[0], together[2])  # other seeds, other images
    # and through the whole path, with keypatch clues: batch of 3 vs one at a time
    requests = [(PROMPTS[0], 5), (PROMPTS[1], 6), (PROMPTS[2], 7)]
    sample_cxr(run_dir, requests, options(batch_size=3), tmp_path / "batch", progress=False)
    sample_cxr(run_dir, requests[1:2], options(batch_size=1), tmp_path / "alone", progress=False)
    assert np.array_equal(
        read_png16(tmp_path / "batch" / "1" / "image.png"), read_png16(tmp_path / "alone" / "0" / "image.png")
    )


def test_samples_are_written_whole(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    requests = [(PROMPTS[0], 1), (PROMPTS[1], 2)]
    real = output.save_png16
    calls = []

    def failing(path, image):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, image)

    monkeypatch.setattr(output, "save_png16", failing)
    with pytest.raises(OSError, match="disk full"):
        sample_cxr(run_dir, requests, options(), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["0"]  # no half-written sample, no temporary folder
    monkeypatch.setattr(output, "save_png16", real)
    before = (out / "0" / "meta.json").stat().st_mtime_ns
    logs = []
    sample_cxr(run_dir, requests, options(), out, log=logs.append, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]
    assert (out / "0" / "meta.json").stat().st_mtime_ns == before  # the finished sample was kept
    assert any("kept" in line for line in logs)


def test_refuses_to_overwrite(run_dir, tmp_path):
    out = tmp_path / "out"
    sample_cxr(run_dir, [(PROMPTS[0], 1)], options(), out, progress=False)
    first = read_png16(out / "0" / "image.png")
    with pytest.raises(DataError, match="--overwrite"):
        sample_cxr(run_dir, [(PROMPTS[0], 2)], options(), out, progress=False)  # another seed
    assert np.array_equal(read_png16(out / "0" / "image.png"), first)
    sample_cxr(run_dir, [(PROMPTS[0], 2)], options(), out, overwrite=True, progress=False)
    assert json.loads((out / "0" / "meta.json").read_text())["seed"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert (
        run_sample("--cxr", run_dir, "--prompt", "x", "--out", tmp_path / "mine") == 2
    )  # not medsyn's files
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (
        tmp_path / "mine" / "0"
    ).exists()


def test_cli_errors(run_dir, tmp_path, capsys):
    assert run_sample("--cxr", run_dir, "--sr", run_dir, "--prompt", "x", "--out", tmp_path / "o") == 2
    assert "CT options" in capsys.readouterr().err
    assert run_sample("--cxr", run_dir, "--prompt", "x", "--out", tmp_path / "o", "--top-p", "0") == 2
    assert "--top-p" in capsys.readouterr().err
    assert run_sample("--cxr", tmp_path, "--prompt", "x", "--out", tmp_path / "o") == 2  # not a run
    assert "config.yaml" in capsys.readouterr().err
    assert run_sample("--prompt", "x", "--out", tmp_path / "o") == 2
    assert not (tmp_path / "o").exists()


def test_prompts_file_from_medsyn_prompts(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[2], "seed": 40, "anatomy": ["lobe"]}) + "\n")
    assert (
        run_sample("--cxr", run_dir, "--prompts-file", prompts, "--num-samples", "2", "--out", tmp_path / "o")
        == 0
    )
    seeds = [json.loads((tmp_path / "o" / str(i) / "meta.json").read_text())["seed"] for i in (0, 1)]
    assert seeds == [40, 41]


def test_a_diffusion_run_is_sampled_by_its_module(tmp_path, monkeypatch):
    run = tmp_path / "diff"
    run.mkdir()
    (run / "config.yaml").write_text("stage: cxr-diffusion\n")
    calls = []

    def sample_images(run_, prompts, seeds, *, steps=None, guidance=None, device="cpu", batch_size=8):
        calls.append((list(prompts), list(seeds), steps, guidance))
        images = torch.stack([torch.full((1, 16, 16), s / 100) for s in seeds])
        return images, {"sampler": "dpmpp-2m", "steps": steps, "guidance": guidance}

    loaded = types.SimpleNamespace(weights=run / "model.safetensors", sha256="d" * 64)
    fake = types.ModuleType("medsyn.generation.diffusion2d")
    fake.sample_images, fake.load_cxr_diffusion = sample_images, lambda run_dir, device="cpu": loaded
    monkeypatch.setitem(sys.modules, "medsyn.generation.diffusion2d", fake)
    sample_cxr(run, [("a", 10), ("b", 20)], options(steps=7, batch_size=2), tmp_path / "o", progress=False)
    assert calls == [(["a", "b"], [10, 20], 7, 2.0)]
    meta = json.loads((tmp_path / "o" / "1" / "meta.json").read_text())
    assert meta["generator"] == "diffusion" and meta["weights"] == {"diffusion": {"path": str(loaded.weights),
                                                                                  "sha256": "d" * 64}}  # fmt: skip
    assert meta["options"] == {"steps": 7, "guidance": 2.0, "batch_size": 2}
    assert not (tmp_path / "o" / "1" / "keypatches.png").exists()
    assert np.allclose(read_png16(tmp_path / "o" / "1" / "image.png"), 0.2, atol=1e-4)

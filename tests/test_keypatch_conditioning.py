"""The keypatch conditioner (`medsyn.alignment.conditioner`): a base run with a `keypatches` section trained
through train.py and sampled through sample.py; no leakage of a subject's own keypatches in training, the
joined tokens and their mask, the null condition, the exported weights, and the refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_sample import run_sample
from training_fixtures import align_overrides, make_cache, make_text_model

import medsyn.alignment.conditioner as conditioner_module
from medsyn.alignment import Codebook, load_align_run
from medsyn.alignment.codebook import JSON_FILE
from medsyn.alignment.conditioner import KeypatchConditioner
from medsyn.data.cache import read_cache_manifest, write_manifest
from medsyn.data.datamodule import report_text
from medsyn.errors import ConfigError
from medsyn.generation.model import build_conditioners
from medsyn.generation.run import load_run
from medsyn.training.align import train_align
from medsyn.training.config import load_run_config
from medsyn.weights import load_weights, sha256_file

ROOT = Path(__file__).resolve().parents[1]
K2, MAX_TOKENS = 6, 8  # k3 = K2: every word retrieves every allowed keypatch, so exclusion is visible


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class RetrievalSpy:
    """Records each `retrieve_for_report` call of the conditioner: (report, excluded subject, indices)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str | None, list[int]]] = []
        real = conditioner_module.retrieve_for_report

        def spy(codebook, run, report, k3, exclude_subject=None, force=False):
            words, found = real(codebook, run, report, k3, exclude_subject, force)
            self.calls.append((report, exclude_subject, found.unique()))
            return words, found

        monkeypatch.setattr(conditioner_module, "retrieve_for_report", spy)


def train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_overrides(assets: dict, run_dir: Path, **extra) -> list[str]:
    args = {
        "run_dir": run_dir, "model.preset": "base-tiny", "text.model": assets["bert"], "text.ucg_rate": 0.5,
        "data.root": assets["cache"], "data.num_workers": 0, "data.batch_size": 2, "effective_batch_size": 2,
        "trainer.max_steps": 2, "trainer.accelerator": "cpu", "trainer.precision": "32",
        "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 1,
        "trainer.enable_model_summary": False, "trainer.enable_progress_bar": False,
        "checkpoint.every_n_steps": 2, "logger.kind": "csv", "preview.every_n_steps": 0, "ema.decay": 0.9,
        "keypatches.align": assets["align"], "keypatches.codebook": assets["codebook"], "keypatches.k3": K2,
        "keypatches.max_tokens": MAX_TOKENS, "keypatches.ucg_rate": 0.0,
    }  # fmt: skip
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("keypatches")
    cache = make_cache(root / "cache", n=8, size=16, factor=2)  # 8^3 base grid: 2^3 patches of 4^3 voxels
    write_manifest(cache, fractions=(0.5, 0.5, 0.0))  # 6 train, 2 val subjects
    bert = make_text_model(root / "bert")
    align = train_align(load_run_config("align", None, align_overrides(cache, bert, root / "align")))
    codebook = Codebook.build(load_align_run(align), cache, k1=4, k2=K2, batch_size=4, progress=False)
    codebook.save(root / "codebook")
    return {"root": root, "cache": cache, "bert": bert, "align": align, "codebook": root / "codebook"}


@pytest.fixture(scope="module")
def trained(assets):
    """A base run trained for 2 steps through train.py, with the retrievals it made."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = RetrievalSpy(monkeypatch)
        run_dir = assets["root"] / "base"
        assert train_script().main(["base", *base_overrides(assets, run_dir)]) == 0
    return {"run_dir": run_dir, "calls": spy.calls}


def conditioner(assets, **extra) -> KeypatchConditioner:
    args = {"align": assets["align"], "codebook": assets["codebook"], "k3": K2, "max_tokens": MAX_TOKENS}
    return KeypatchConditioner(**{**args, **extra}, context_dim=32)


# ---- leakage ---------------------------------------------------------------------------------------
def test_training_never_retrieves_a_subjects_own_keypatches(assets, trained):
    codebook = Codebook.load(assets["codebook"])
    owners = {kp.subject for kp in codebook.keypatches}
    rows = read_cache_manifest(assets["cache"])
    subjects_of: dict[str, set[str]] = {}
    for row in rows:
        subjects_of.setdefault(report_text(row, "both"), set()).add(row["id"])
    calls = trained["calls"]
    assert calls, "training retrieved no keypatches"
    for report, subject, indices in calls:
        assert subject in subjects_of[report]  # the batch's own subject, excluded for its own report
        retrieved = {codebook.keypatches[i].subject for i in indices}
        assert retrieved == owners - {subject}  # k3 = K2: everything allowed, nothing of its own
    assert any(subject in owners for _, subject, _ in calls)  # an exclusion that removed keypatches


def test_exclusion_removes_exactly_the_subjects_own_keypatches(assets):
    cond = conditioner(assets, max_tokens=K2)
    codebook = cond.codebook
    subject = codebook.keypatches[0].subject
    report = report_text(next(r for r in read_cache_manifest(assets["cache"]) if r["id"] == subject), "both")
    everything, excluded = cond.retrieve(report), cond.retrieve(report, subject)
    assert sorted(everything) == list(range(K2))
    assert sorted(excluded) == [i for i, kp in enumerate(codebook.keypatches) if kp.subject != subject]
    assert cond.retrieve(report, subject) == excluded and cond._cache.info().hits == 1  # cached per pair


# ---- tokens, null condition, dropout ---------------------------------------------------------------
def test_context_grows_by_the_keypatch_tokens_with_their_mask(assets, trained):
    model = load_run(trained["run_dir"]).model
    kp = model.conditioners["keypatches"]
    reports = [report_text(r, "both") for r in read_cache_manifest(assets["cache"])[:2]] + ["no words here"]
    cond = model.condition(model.report_inputs(reports))
    text = model.conditioners["text"](reports)
    length = text["context"].shape[1]
    assert cond["context"].shape == (3, length + MAX_TOKENS, 32)
    assert torch.equal(cond["context"][:, :length], text["context"])
    assert torch.equal(cond["context_mask"][:, :length], text["context_mask"])
    for b, report in enumerate(reports):
        found = kp.retrieve(report)  # a new report: nothing excluded
        assert cond["context_mask"][b, length:].tolist() == [True] * len(found) + [False] * (
            MAX_TOKENS - len(found)
        )
        expected = kp.proj(kp.codebook.features[found]) + kp.type_embedding
        assert torch.allclose(cond["context"][b, length : length + len(found)], expected, atol=1e-6)
        assert not cond["context"][b, length + len(found) :].any()
    assert len(kp.retrieve(reports[0])) == K2 and len(kp.retrieve("no words here")) > 0

    null = model.unconditional(cond)
    assert null["context"].shape == cond["context"].shape
    assert not null["context_mask"][:, length:].any() and not null["context"].any()  # no keypatch token
    assert null["context_mask"].sum(1).tolist() == [1, 1, 1]  # the text's zero null: one valid token


def test_keypatch_tokens_drop_with_the_text_and_at_their_own_rate(assets):
    from medsyn.conditioning import TextConditioner

    text = TextConditioner(assets["bert"], ucg_rate=0.0)
    kp = conditioner(assets, ucg_rate=0.0)
    reports = [report_text(r, "both") for r in read_cache_manifest(assets["cache"])[:4]]
    inputs = [(r, None) for r in reports]
    gen = torch.Generator().manual_seed(0)
    kept = text(reports, train=True, generator=gen)
    out = kp(inputs, train=True, generator=gen, joined=kept, joined_null=text.unconditional(kept))
    assert out["context_mask"][:, -MAX_TOKENS:].sum(1).tolist() == [K2] * 4  # nothing dropped
    dropped = text.apply_ucg(text.encode(reports), gen, rate=1.0)
    out = kp(inputs, train=True, generator=gen, joined=dropped, joined_null=text.unconditional(dropped))
    assert not out["context_mask"][:, -MAX_TOKENS:].any() and not out["context"][:, -MAX_TOKENS:].any()
    kp.ucg_rate = 1.0  # dropped on their own, the text kept
    out = kp(inputs, train=True, generator=gen, joined=kept, joined_null=text.unconditional(kept))
    assert not out["context_mask"][:, -MAX_TOKENS:].any()
    assert torch.equal(out["context_mask"][:, : kept["context"].shape[1]], kept["context_mask"])


# ---- weights, sampling -----------------------------------------------------------------------------
def test_exported_weights_hold_the_projection_not_the_align_model(assets, trained):
    state, config = load_weights(trained["run_dir"] / "model.safetensors")
    keys = sorted(k for k in state if k.startswith("keypatches."))
    assert keys == ["keypatches.proj.bias", "keypatches.proj.weight", "keypatches.type_embedding"]
    assert state["keypatches.proj.weight"].shape == (32, 16)  # D_align 16 -> the text tokens' 32
    assert all(k.split(".")[0] in ("net", "text", "keypatches") for k in state)
    assert config["keypatches"]["align"] == os.path.abspath(assets["align"])  # as trained, made absolute
    assert config["keypatches"]["codebook"] == os.path.abspath(assets["codebook"])


def test_sample_py_reloads_the_align_run_and_codebook_from_the_run_config(
    assets, trained, tmp_path, monkeypatch
):
    # the run's stored paths point to moved copies: found from the run directory's parents, as text.model is
    moved = tmp_path / "moved"
    shutil.copytree(trained["run_dir"], moved / "base")
    shutil.copytree(assets["align"], moved / "align")
    shutil.copytree(assets["codebook"], moved / "codebook")
    state, config = load_weights(moved / "base" / "model.safetensors")
    config["keypatches"].update(align="align", codebook="codebook")
    from medsyn.weights import export_weights

    export_weights(moved / "base" / "model.safetensors", state, config)
    spy = RetrievalSpy(monkeypatch)
    prompt = report_text(read_cache_manifest(assets["cache"])[0], "both")
    assert (
        run_sample("--base", moved / "base", "--prompt", prompt, "--out", tmp_path / "out", "--steps", "2")
        == 0
    )
    assert spy.calls and all(subject is None for _, subject, _ in spy.calls)  # a new report excludes nothing
    meta = json.loads((tmp_path / "out" / "0" / "meta.json").read_text())
    provenance = meta["weights"]["base"]["keypatches"]
    assert provenance["align"] == str(moved / "align")
    assert provenance["align_sha256"] == sha256_file(moved / "align" / "model.safetensors")
    assert provenance["codebook_sha256"] == sha256_file(moved / "codebook" / JSON_FILE)


# ---- refusals --------------------------------------------------------------------------------------
def test_missing_paths_and_a_codebook_of_another_align_run_are_one_line_errors(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"^keypatches\.align: .*no such run directory") as err:
        conditioner(assets, align=tmp_path / "none")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^keypatches\.codebook: .*no such codebook folder"):
        conditioner(assets, codebook=tmp_path / "none")
    other = shutil.copytree(assets["codebook"], tmp_path / "other")
    data = json.loads((other / JSON_FILE).read_text())
    data["align_sha256"] = "0" * 64
    (other / JSON_FILE).write_text(json.dumps(data))
    with pytest.raises(
        ConfigError, match=r"^keypatches\.codebook=.*built with the align run .*not with keypatches\.align"
    ) as err:
        conditioner(assets, codebook=other)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="keypatches.max_tokens=0"):
        conditioner(assets, max_tokens=0)
    section = {"align": str(assets["align"]), "codebook": str(assets["codebook"])}
    with pytest.raises(ConfigError, match="needs a text section"):
        build_conditioners({"keypatches": section})
    with pytest.raises(ConfigError, match="keypatches"):
        load_run_config("base", None, base_overrides(assets, tmp_path / "run", **{"keypatches.k4": 1}))

"""The visual codebook (`medsyn.alignment.codebook`): construction on a tiny align run, its files, keypatch
retrieval with subject exclusion, and the `medsyn codebook build` / `medsyn keypatches` commands."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from training_fixtures import align_overrides, make_cache, make_text_model

from medsyn.alignment import Codebook, Keypatch, keypatch_tokens, load_align_run, patch_box
from medsyn.alignment.codebook import JSON_FILE, SHEET_FILE, TENSORS_FILE, retrieve_for_report
from medsyn.cli import main
from medsyn.data.cache import load_array, read_cache_manifest, write_manifest
from medsyn.data.datamodule import report_text
from medsyn.errors import ConfigError, DataError
from medsyn.training.align import train_align
from medsyn.training.config import load_run_config

K1, K2 = 4, 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("codebook")
    cache = make_cache(base / "cache", n=16, size=16, factor=2)  # 8^3 base grid, 2^3 patches of 4^3 voxels
    write_manifest(cache, fractions=(0.5, 0.25, 0.25))  # 11 train, 2 val, 3 test subjects
    bert = make_text_model(base / "bert")
    run_dir = train_align(load_run_config("align", None, align_overrides(cache, bert, base / "run")))
    run = load_align_run(run_dir)
    codebook = Codebook.build(run, cache, k1=K1, k2=K2, batch_size=3, progress=False)
    return {"cache": cache, "run_dir": run_dir, "run": run, "codebook": codebook}


def embed_train_split(run, cache):
    """Per train subject (manifest order): id, lr path, global similarity, words, word feats, patches."""
    text = run.config["data"]["text"]
    out = []
    for row in (r for r in read_cache_manifest(cache) if r["split"] == "train"):
        x = torch.from_numpy(np.asarray(load_array(row["lr"]), dtype=np.float32))[None]
        volume, patches, _ = run.encode_volumes(x)
        report, words, feats = run.encode_reports(report_text(row, text))
        out.append((row["id"], row["lr"], float(report[0] @ volume[0]), words[0], feats[0], patches[0]))
    return out


# ---- construction ----------------------------------------------------------------------------------
def test_build_keeps_the_k1_most_similar_pairs_and_their_k2_best_word_max_patches(built):
    run, codebook = built["run"], built["codebook"]
    subjects = embed_train_split(run, built["cache"])
    by_id = {s[0]: s for s in subjects}
    expected = sorted(subjects, key=lambda s: -s[2])[:K1]
    assert [p["subject"] for p in codebook.pairs] == [s[0] for s in expected]
    assert [p["similarity"] for p in codebook.pairs] == pytest.approx([s[2] for s in expected], abs=1e-5)
    assert len(codebook) == K2 and codebook.features.shape == (K2, 16)
    assert codebook.patches.shape == (K2, 4, 4, 4, 4) and codebook.patches.dtype == torch.float16
    assert codebook.info["k1"] == K1 and codebook.info["k2"] == K2 and codebook.info["subjects"] == 11
    assert codebook.info["align_sha256"] == run.sha256 and codebook.info["grid"] == [2, 2, 2]

    # every word of a kept pair proposes its maximum-similarity patch; the K2 best distinct patches are kept
    candidates = {}
    for subject, *_ in expected:
        _, _, _, words, feats, patches = by_id[subject]
        scores, best = (feats @ patches.T).max(1)
        for w in range(len(words)):
            key = (subject, int(best[w]))
            candidates[key] = max(candidates.get(key, -2.0), float(scores[w]))
    chosen = {(kp.subject, kp.patch_index) for kp in codebook.keypatches}
    assert len(chosen) == K2  # no patch twice
    left_out = [s for key, s in candidates.items() if key not in chosen]
    assert min(kp.score for kp in codebook.keypatches) >= max(left_out, default=-2.0) - 1e-6
    assert [kp.score for kp in codebook.keypatches] == sorted(
        (kp.score for kp in codebook.keypatches), reverse=True
    )

    for i, kp in enumerate(codebook.keypatches):
        _, lr, _, words, feats, patches = by_id[kp.subject]
        similarity = feats[kp.word_position] @ patches.T  # (P,)
        assert words[kp.word_position] == kp.word
        assert kp.patch_index == int(similarity.argmax()) and kp.score == pytest.approx(
            float(similarity.max()), abs=1e-5
        )
        assert kp.score == pytest.approx(
            candidates[(kp.subject, kp.patch_index)], abs=1e-6
        )  # the best word's
        assert torch.allclose(codebook.features[i], patches[kp.patch_index], atol=1e-5)
        assert kp.slices == patch_box(kp.patch_index, (2, 2, 2), 4)
        voxels = torch.from_numpy(np.array(load_array(lr)[(slice(None), *kp.slices)]))
        assert torch.equal(codebook.patches[i], voxels)  # the cache's own voxels, bit for bit
        assert codebook.pairs[kp.pair_rank]["subject"] == kp.subject


def test_k1_and_k2_beyond_the_split_keep_every_pair_and_patch(built):
    codebook = Codebook.build(built["run"], built["cache"], k1=100, k2=10_000, progress=False)
    assert len(codebook.pairs) == 11
    words = sum(len(s[3]) for s in embed_train_split(built["run"], built["cache"]))
    assert 0 < len(codebook) <= min(words, 11 * 8)  # one per distinct (subject, word-max patch)
    assert len({(kp.subject, kp.patch_index) for kp in codebook.keypatches}) == len(codebook)
    with pytest.raises(ConfigError, match="k1=0"):
        Codebook.build(built["run"], built["cache"], k1=0)
    with pytest.raises(DataError, match="manifest.csv"):
        Codebook.build(built["run"], built["run_dir"])


# ---- files -----------------------------------------------------------------------------------------
def test_save_and_load_round_trip(built, tmp_path):
    codebook = built["codebook"]
    codebook.save(tmp_path / "cb")
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == [JSON_FILE, TENSORS_FILE]  # no temporaries
    loaded = Codebook.load(tmp_path / "cb")
    assert torch.equal(loaded.features, codebook.features) and torch.equal(loaded.patches, codebook.patches)
    assert loaded.keypatches == codebook.keypatches and loaded.pairs == codebook.pairs
    assert loaded.info == codebook.info and loaded.path == tmp_path / "cb"
    data = json.loads((tmp_path / "cb" / JSON_FILE).read_text())
    for key in ("align_run", "align_sha256", "cache", "split", "k1", "k2", "tensors"):
        assert key in data, key
    assert data["keypatches"][0].keys() >= {"index", "word", "score", "subject", "patch_index", "box"}


def _edit_json(folder: Path, edit) -> None:
    data = json.loads((folder / JSON_FILE).read_text())
    edit(data)
    (folder / JSON_FILE).write_text(json.dumps(data))


def test_load_refuses_inconsistent_files_with_one_line_errors(built, tmp_path):
    codebook = built["codebook"]
    with pytest.raises(DataError, match="no such codebook folder"):
        Codebook.load(tmp_path / "none")
    a, b = codebook.save(tmp_path / "a"), tmp_path / "b"
    small = Codebook(
        codebook.features[:2], codebook.patches[:2], codebook.keypatches[:2], dict(codebook.info)
    )
    small.save(b)
    shutil.copy(b / TENSORS_FILE, a / TENSORS_FILE)  # a's json with b's tensors
    with pytest.raises(DataError, match=f"{TENSORS_FILE}: its sha256 differs .* different builds"):
        Codebook.load(a)

    cases = [
        (lambda d: d.update(format="other"), f"{JSON_FILE}: format 'other'"),
        (lambda d: d["keypatches"].pop(), f"{JSON_FILE}: count=2 but 1 keypatch records"),
        (
            lambda d: d["keypatches"][1].update(box=[[0, 4], [0, 4], [0, 4]], patch_index=7),
            "is not the box of patch 7",
        ),
        (lambda d: d["keypatches"][0].pop("subject"), r"keypatches\[0\] lacks \['subject'\]"),
        (lambda d: d["keypatches"][0].update(patch_index=8), "patch_index=8, outside the grid"),
        (lambda d: d["keypatches"][0].update(score="high"), r"keypatches\[0\] has a malformed value"),
        (lambda d: d.update(grid=[2, "2", 2]), "grid=\\[2, '2', 2\\], expected positive"),
        (lambda d: d.update(dim=32), f"{TENSORS_FILE}: features \\(2, 16\\).*expected float \\(2, 32\\)"),
        (lambda d: d.update(patch_size=2), f"{TENSORS_FILE}: patches \\(2, 4, 4, 4, 4\\), expected"),
    ]
    for edit, message in cases:
        small.save(b, overwrite=True)
        _edit_json(b, edit)
        with pytest.raises(DataError, match=message) as err:
            Codebook.load(b)
        assert "\n" not in str(err.value)
    (b / JSON_FILE).write_text("{")
    with pytest.raises(DataError, match="not readable JSON"):
        Codebook.load(b)
    (b / JSON_FILE).unlink()
    with pytest.raises(DataError, match=f"{JSON_FILE}: missing"):
        Codebook.load(b)


def test_save_refuses_a_used_folder_and_overwrites_only_its_own_files(built, tmp_path, monkeypatch):
    codebook = built["codebook"]
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not a medsyn codebook; pass --overwrite"):
        codebook.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    codebook.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and Codebook.load(
        folder
    ).keypatches == codebook.keypatches
    with pytest.raises(DataError, match="holds a medsyn codebook; pass --overwrite"):
        codebook.save(folder)
    with pytest.raises(DataError, match="is a file"):
        codebook.save(folder / "notes.txt", overwrite=True)

    # a failed write leaves the previous codebook whole and no temporary files
    (folder / SHEET_FILE).write_bytes(b"old sheet")
    small = Codebook(
        codebook.features[:2], codebook.patches[:2], codebook.keypatches[:2], dict(codebook.info)
    )

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("medsyn.alignment.codebook.write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        small.save(folder, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [JSON_FILE, SHEET_FILE, TENSORS_FILE, "notes.txt"]
    )
    assert len(Codebook.load(folder)) == K2
    small.save(folder, overwrite=True)
    assert len(Codebook.load(folder)) == 2 and not (folder / SHEET_FILE).exists()  # the old sheet is stale


# ---- retrieval -------------------------------------------------------------------------------------
def hand_built(subjects=("a", "a", "b", "c", "b")) -> Codebook:
    """Keypatch k has the unit feature e_k (D = 5) so that similarities are known exactly."""
    k = len(subjects)
    records = [
        Keypatch(f"w{i}", 0, 1.0, s, 0, 1.0, 0, ((0, 2), (0, 2), (0, 2))) for i, s in enumerate(subjects)
    ]
    info = {"align_sha256": "abc", "align_run": "runs/x", "grid": [1, 1, 1], "patch_size": 2, "dim": k}
    return Codebook(torch.eye(k), torch.zeros(k, 4, 2, 2, 2), records, info)


def test_retrieve_ranks_keypatches_by_cosine_similarity_per_word():
    codebook = hand_built()
    words = torch.tensor([[0.0, 0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    found = codebook.retrieve(words, k3=2)
    assert found.indices.tolist() == [[2, 3], [4, 0], [1, 2]]  # the last word ties: the lower index first
    expected = F.normalize(words, dim=-1)
    assert torch.allclose(found.scores, expected.gather(1, found.indices))
    assert codebook.retrieve(words, k3=50).indices.shape == (3, 5)
    assert found.unique() == [2, 3, 4, 0, 1]
    with pytest.raises(ConfigError, match="k3=0"):
        codebook.retrieve(words, k3=0)
    with pytest.raises(ValueError, match=r"expected shape \(W, 5\)"):
        codebook.retrieve(words[:, :4])


def test_retrieve_never_returns_an_excluded_subjects_keypatches_even_when_they_score_best():
    codebook = hand_built()
    words = torch.eye(5)[[0, 1, 2, 4]] + 0.1  # each word is closest to a keypatch of a or b
    found = codebook.retrieve(words, k3=5, exclude_subjects="a")
    assert found.indices.shape == (4, 3)  # only the 3 keypatches of b and c are left
    assert not {0, 1} & set(found.indices.flatten().tolist())
    assert set(codebook.retrieve(words, k3=5, exclude_subjects=["a", "b"]).indices.flatten().tolist()) == {3}
    assert codebook.retrieve(words, k3=5, exclude_subjects=["a", "b", "c"]).indices.shape == (4, 0)


def test_the_preview_sheet_shows_the_most_frequent_words_best_keypatches_first():
    from medsyn.alignment.sheet import frequent_words, keypatch_sheet

    codebook = hand_built()
    for i, (word, score) in enumerate(
        [("No", 0.2), ("effusion", 0.5), ("no", 0.9), ("heart", 0.3), ("Effusion", 0.6)]
    ):
        codebook.keypatches[i] = Keypatch(word, 0, score, "a", 0, 1.0, 0, ((0, 2), (0, 2), (0, 2)))
    assert frequent_words(codebook, 2) == [("no", [2, 0]), ("effusion", [4, 1])]  # tie: the better best first
    volume = np.zeros((4, 8, 8, 8), np.float32)
    image = keypatch_sheet(codebook, {"a": volume}, words=3, per_word=2)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@dataclass
class FakeRun:
    """What `keypatch_tokens` asks of an align run: its sha256 and the words of a report."""

    words: dict[str, torch.Tensor]
    sha256: str = "abc"
    run_dir: Path = Path("runs/fake")
    weights: Path = Path("runs/fake/model.safetensors")

    def encode_reports(self, text):
        feats = self.words[text]
        return None, [[f"w{i}" for i in range(len(feats))]], [feats]


def test_keypatch_tokens_dedupes_in_a_fixed_order_and_excludes_the_subject():
    codebook = hand_built()
    e = torch.eye(5)
    words = [
        e[2] + 0.5 * e[0] + 0.01 * e[4],
        e[2] + 0.4 * e[0] + 0.01 * e[4],
        e[0] + 0.1 * e[3] + 0.05 * e[4],
    ]
    run = FakeRun({"r": torch.stack(words), "": torch.zeros(0, 5)})
    tokens = keypatch_tokens(codebook, run, "r", k3=2)
    assert torch.equal(tokens, codebook.features[[2, 0, 3]])  # words 1 and 2 find the same two keypatches
    assert torch.equal(keypatch_tokens(codebook, run, "r", k3=2), tokens)
    excluded = keypatch_tokens(codebook, run, "r", k3=2, exclude_subject="a")
    assert torch.equal(
        excluded, codebook.features[[2, 4, 3]]
    )  # keypatch 0 (subject a) scored best for word 3
    assert keypatch_tokens(codebook, run, "", k3=2).shape == (0, 5)
    with pytest.raises(DataError, match="built with the align run runs/x .* pass --force"):
        keypatch_tokens(codebook, FakeRun(run.words, sha256="def"), "r")
    assert keypatch_tokens(codebook, FakeRun(run.words, sha256="def"), "r", k3=2, force=True).shape == (3, 5)


def test_keypatch_tokens_of_a_subjects_own_report_hold_none_of_its_patches(built):
    codebook, run = built["codebook"], built["run"]
    subject = codebook.keypatches[0].subject
    row = next(r for r in read_cache_manifest(built["cache"]) if r["id"] == subject)
    report = report_text(row, run.config["data"]["text"])
    words, found = retrieve_for_report(codebook, run, report, k3=len(codebook), exclude_subject=subject)
    own = {i for i, kp in enumerate(codebook.keypatches) if kp.subject == subject}
    assert own and not own & set(found.indices.flatten().tolist())
    assert found.indices.shape == (len(words), len(codebook) - len(own))
    tokens = keypatch_tokens(codebook, run, report, k3=len(codebook), exclude_subject=subject)
    assert torch.equal(tokens, codebook.features[found.unique()])
    assert tokens.shape == (len(codebook) - len(own), 16)  # every other keypatch, each once


# ---- commands --------------------------------------------------------------------------------------
def test_cli_builds_a_codebook_and_retrieves_keypatches(built, tmp_path, capsys):
    out = tmp_path / "cb"
    args = [
        "codebook",
        "build",
        "--align",
        str(built["run_dir"]),
        "--data",
        str(built["cache"]),
        "--out",
        str(out),
    ]
    assert main([*args, "--k1", str(K1), "--k2", str(K2), "--batch-size", "5"]) == 0
    assert "6 keypatches from 4 of 11 train pairs" in capsys.readouterr().out
    loaded, codebook = Codebook.load(out), built["codebook"]  # the same, whatever the batch size
    assert [(kp.subject, kp.patch_index, kp.word) for kp in loaded.keypatches] == [
        (kp.subject, kp.patch_index, kp.word) for kp in codebook.keypatches
    ]
    assert torch.allclose(loaded.features, codebook.features, atol=1e-5)
    from matplotlib.image import imread

    sheet = imread(out / SHEET_FILE)
    assert sheet.ndim == 3 and sheet.shape[0] > 50 and float(sheet[..., :3].std()) > 0.01

    found = tmp_path / "kp.json"
    prompt = "Large right pleural effusion. The heart is enlarged."
    assert main(["keypatches", "--align", str(built["run_dir"]), "--codebook", str(out), "--prompt", prompt,
                 "--k3", "2", "--out", str(found)]) == 0  # fmt: skip
    data = json.loads(found.read_text())
    assert data.keys() >= {"prompt", "align_run", "align_sha256", "codebook", "codebook_align_sha256", "k3",
                           "exclude_subject", "words", "tokens"}  # fmt: skip
    assert [w["word"] for w in data["words"]] == [
        "Large",
        "right",
        "pleural",
        "effusion",
        "The",
        "heart",
        "is",
        "enlarged",
    ]
    for word in data["words"]:
        assert len(word["keypatches"]) == 2
        hit = word["keypatches"][0]
        assert hit.keys() == {"index", "score", "built_by", "build_score", "subject", "patch_index", "box"}
        kp = built["codebook"].keypatches[hit["index"]]
        assert (
            hit["subject"] == kp.subject
            and hit["box"] == [list(b) for b in kp.box]
            and hit["built_by"] == kp.word
        )
        assert word["keypatches"][0]["score"] >= word["keypatches"][1]["score"]
    tokens = keypatch_tokens(built["codebook"], built["run"], prompt, k3=2)
    assert torch.equal(built["codebook"].features[data["tokens"]], tokens)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_one_line_errors(built, tmp_path, capsys):
    folder = built["codebook"].save(tmp_path / "cb")
    out = tmp_path / "kp.json"
    keypatches = ["keypatches", "--codebook", str(folder), "--prompt", "Effusion.", "--out", str(out)]
    assert main([*keypatches, "--align", str(tmp_path / "no-run")]) == 2
    assert "no-run: no such run directory" in _error_line(capsys)
    assert main([*keypatches, "--align", str(built["run_dir"]), "--k3", "0"]) == 2
    assert "--k3 0" in _error_line(capsys)

    _edit_json(folder, lambda d: d.update(align_sha256="0" * 64))  # as if built by another run
    assert main([*keypatches, "--align", str(built["run_dir"])]) == 2
    line = _error_line(capsys)
    assert (
        f"{folder / JSON_FILE}: built with the align run" in line and "--force" in line and not out.exists()
    )
    assert main([*keypatches, "--align", str(built["run_dir"]), "--force"]) == 0 and out.exists()

    build = ["codebook", "build", "--align", str(built["run_dir"]), "--data", str(built["cache"])]
    assert main([*build, "--out", str(folder)]) == 2
    assert "holds a medsyn codebook; pass --overwrite" in _error_line(capsys)
    assert main([*build, "--out", str(tmp_path / "new"), "--k2", "0"]) == 2
    assert "--k2 0" in _error_line(capsys) and not (tmp_path / "new").exists()
    assert main(["keypatches", "--align", str(built["run_dir"]), "--codebook", str(tmp_path / "x"),
                 "--prompt", "Effusion.", "--out", str(out)]) == 2  # fmt: skip
    assert "no such codebook folder" in _error_line(capsys)

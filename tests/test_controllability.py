"""medsyn controllability: statistics on known numbers, pairs files and their errors, a run on tiny models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from medsyn.cli import run_cli
from medsyn.commands import controllability as command
from medsyn.errors import DataError
from medsyn.evaluation.controllability import (
    DEFAULT_PAIRS,
    Measure,
    load_pairs,
    measure_value,
    pair_statistics,
    prompt_id,
)

# --- statistics ------------------------------------------------------------------------------------------


def test_clear_shift_is_significant_in_its_direction_only():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, 12)
    b = rng.normal(3.0, 1.0, 12)
    up = pair_statistics(a, b, "greater")
    assert up["p"] < 1e-4 and up["in_direction"] and up["effect"] == pytest.approx(b.mean() - a.mean())
    assert up["mean_a"] == pytest.approx(a.mean()) and up["sd_b"] == pytest.approx(b.std(ddof=1))
    down = pair_statistics(a, b, "less")
    assert down["p"] > 0.9999 and down["p_paired"] > 0.999 and not down["in_direction"]
    assert down["p"] == pytest.approx(1 - up["p"])


def test_paired_test_uses_the_shared_seeds():
    # seeds spread the values widely; each B is its A plus about 0.5: unpaired weak, paired strong
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 5.0, 10)
    a = base + rng.normal(0.0, 0.1, 10)
    b = base + 0.5 + rng.normal(0.0, 0.1, 10)
    st = pair_statistics(a, b, "greater")
    assert st["p"] > 0.3 and st["p_paired"] < 1e-5 and st["n_paired"] == 10 and st["seeds_in_direction"] == 10
    assert pair_statistics(a, b, "less")["seeds_in_direction"] == 0
    shuffled = pair_statistics(a, b[::-1], "greater")  # the same values, pairing broken
    assert shuffled["p"] == pytest.approx(st["p"]) and shuffled["p_paired"] > 0.01


def test_zero_variance_and_missing_values_give_null_p_with_a_reason():
    st = pair_statistics([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert st["p"] is None and st["p_paired"] is None and "no variance" in st["p_note"]
    assert "every difference" in st["p_paired_note"] and not st["in_direction"] and st["effect"] == 0.0
    st = pair_statistics([0.0, 0.0], [2.0, 2.0])
    assert st["p"] is None and st["in_direction"] and st["effect"] == 2.0
    st = pair_statistics([1.0, 2.0, 4.0], [2.0, 3.0, 5.0])  # constant paired difference
    assert st["p"] is not None and st["p_paired"] is None and "is 1" in st["p_paired_note"]
    st = pair_statistics([1.0, None, 3.0, float("nan")], [2.0, 5.0, None, 4.0])
    assert (st["n_a"], st["n_b"], st["n_paired"]) == (2, 3, 1)
    assert st["p_paired"] is None and "fewer than 2" in st["p_paired_note"]
    st = pair_statistics([1.0], [2.0, 3.0])
    assert st["p"] is None and st["sd_a"] is None and st["mean_a"] == 1.0


def test_derived_nodule_measures():
    m = {"nodule_count": 2, "ctr": None,
         "nodules": [{"lobe": 3, "volume_ml": 1.5}, {"lobe": 3, "volume_ml": 0.5}, {"lobe": 1, "volume_ml": 9}]}  # fmt: skip
    assert measure_value(m, "nodule_count_right_upper") == 2.0
    assert measure_value(m, "nodule_ml_right_upper") == 2.0
    assert measure_value(m, "nodule_count_left_lower") == 0.0
    assert measure_value(m, "ctr") is None
    m["lobe_ml"] = {"left upper": 10.0, "right upper": 12.5}
    assert (
        measure_value(m, "lobe_ml_right_upper") == 12.5
        and measure_value(m, "mask_lobe_ml_left_upper") is None
    )
    with pytest.raises(DataError, match="'lobe_ml' is a mapping; expected a scalar"):
        measure_value(m, "lobe_ml")
    with pytest.raises(DataError, match="'effusion_ml' is not in measure_volume's output"):
        measure_value(m, "effusion_ml")


def test_default_pairs_are_full_reports_differing_in_one_finding():
    names = [p.name for p in DEFAULT_PAIRS]
    assert len(set(names)) == len(names) == 5
    side = next(p for p in DEFAULT_PAIRS if p.name == "effusion_side")
    assert side.measures == (Measure("effusion_left_ml", "less"), Measure("effusion_right_ml", "greater"))
    for pair in DEFAULT_PAIRS:
        assert "patent" in pair.a and "patent" in pair.b  # the airway sentence every phantom report has
        differ = set(pair.a.split(". ")) ^ set(pair.b.split(". "))
        assert 2 <= len(differ) <= 6, pair.name  # one finding sentence (and its impression) swapped


# --- pairs files -----------------------------------------------------------------------------------------

YAML_PAIRS = """\
- name: effusion
  a: No pleural effusion.
  b: Large pleural effusion.
  measure: effusion_ml
- name: side
  a: Left pleural effusion.
  b: Right pleural effusion.
  measures:
    - {measure: effusion_left_ml, direction: less}
    - effusion_right_ml
"""


def test_pairs_from_yaml_and_jsonl(tmp_path):
    path = tmp_path / "pairs.yaml"
    path.write_text(YAML_PAIRS)
    pairs = load_pairs(path)
    assert [p.name for p in pairs] == ["effusion", "side"]
    assert pairs[0].measures == (Measure("effusion_ml", "greater"),)
    assert pairs[1].measures == (Measure("effusion_left_ml", "less"), Measure("effusion_right_ml"))
    rows = [{"name": "n", "a": "No nodule.", "b": "A nodule.", "measure": "nodule_count_right_upper",
             "direction": "greater"}, {"name": "c", "a": "Normal.", "b": "Cardiomegaly.", "measure": "ctr"}]  # fmt: skip
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = load_pairs(jsonl)
    assert [(p.name, p.a, p.b, p.measures[0].key) for p in pairs] == [
        ("n", "No nodule.", "A nodule.", "nodule_count_right_upper"), ("c", "Normal.", "Cardiomegaly.", "ctr")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "row, message",
    [
        ({"a": "x", "b": "y", "measure": "ctr"}, 'pairs.jsonl:2: missing key "name"'),
        ({"name": "p", "a": "x", "b": "y"}, 'pairs.jsonl:2: neither of "measure" and "measures"'),
        ({"name": "p", "a": "x", "b": "y", "measure": "heart_size"}, "pairs.jsonl:2: \"measure\" 'heart_size' is unknown"),
        ({"name": "p", "a": "x", "b": "y", "measure": "ctr", "direction": "up"}, "pairs.jsonl:2: \"direction\" 'up'"),
        ({"name": "p", "a": "x", "b": "y", "measure": "ctr", "directon": "less"}, "unknown key(s) 'directon'"),
        ({"name": "p", "a": "x", "b": " x ", "measure": "ctr"}, '"a" and "b" are the same text'),
        ({"name": "first", "a": "x", "b": "y", "measure": "ctr"}, "'first' is used already at"),
        (["not", "a", "mapping"], "pairs.jsonl:2: got list"),
    ],
)  # fmt: skip
def test_pairs_file_errors_name_file_line_and_key(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    first = {"name": "first", "a": "No effusion.", "b": "Effusion.", "measure": "effusion_ml"}
    path.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_pairs_file_errors_yaml_and_unreadable(tmp_path):
    path = tmp_path / "pairs.yml"
    path.write_text(YAML_PAIRS.replace("effusion_right_ml", "effusion_right_l"))
    with pytest.raises(
        DataError, match=r"pairs\.yml:5 \(pair 2\): \"measure\" 'effusion_right_l' is unknown"
    ):
        load_pairs(path)
    path.write_text("name: x\na: y\n")
    with pytest.raises(DataError, match=r"pairs\.yml: got dict; expected a YAML list of pairs"):
        load_pairs(path)
    path.write_text("- [unclosed\n")
    with pytest.raises(DataError, match=r"pairs\.yml: not valid YAML"):
        load_pairs(path)
    with pytest.raises(DataError, match=r"missing\.yaml: cannot read the pairs file"):
        load_pairs(tmp_path / "missing.yaml")
    with pytest.raises(DataError, match=r"pairs\.txt: unknown pairs file type '\.txt'"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "bad.jsonl").write_text('{"name": "x"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not a JSON object"):
        load_pairs(tmp_path / "bad.jsonl")


# --- the command on tiny runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from test_sample import make_runs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny 3-D convolutions run faster on one thread than on two busy cores
    yield make_runs(tmp_path_factory.mktemp("runs"))
    torch.set_num_threads(threads)


def run_command(*argv) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return run_cli(command.run, "medsyn controllability", parser.parse_args([str(a) for a in argv]))


FAST = ("--steps", "2", "--sr-steps", "1", "--n", "2", "--seed", "5")
NORMAL = "No pleural effusion. Heart size is normal. No acute cardiopulmonary abnormality."
TWO_PAIRS = [
    {"name": "effusion", "a": NORMAL, "b": "There is a large right pleural effusion. Large right pleural effusion.",
     "measure": "effusion_ml"},
    {"name": "heart", "a": NORMAL, "b": "There is marked cardiomegaly. Cardiomegaly.",
     "measures": [{"measure": "ctr"}, {"measure": "lung_ml", "direction": "less"}]},
]  # fmt: skip


def test_command_end_to_end_and_rerun_reuses_samples(runs, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in TWO_PAIRS))
    out = tmp_path / "out"
    assert run_command("--base", runs["base"], "--pairs", pairs, "--out", out, *FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "boxplots.png", "controllability.json", "measures", "report.md", "samples"
    ]  # fmt: skip
    # three prompts (NORMAL is shared by both pairs), two seeds each
    ids = sorted(prompt_id(p) for p in {NORMAL, TWO_PAIRS[0]["b"], TWO_PAIRS[1]["b"]})
    assert sorted(p.name for p in (out / "samples").iterdir()) == ids
    for pid in ids:
        assert sorted(p.name for p in (out / "samples" / pid).iterdir()) == ["0", "1"]
        assert [json.loads((out / "samples" / pid / i / "meta.json").read_text())["seed"] for i in "01"] == [
            5,
            6,
        ]

    result = json.loads((out / "controllability.json").read_text())
    assert result["n"] == 2 and result["seeds"] == [5, 6] and result["backend"] == "threshold"
    assert result["provenance"]["base"]["run_dir"] == str(runs["base"]) and result["provenance"]["sr"] is None
    assert result["provenance"]["options"]["steps"] == 2
    assert [p["name"] for p in result["pairs"]] == ["effusion", "heart"]
    heart = result["pairs"][1]
    assert heart["prompts"] == {"a": NORMAL, "b": TWO_PAIRS[1]["b"]}
    assert [m["measure"] for m in heart["measures"]] == ["ctr", "lung_ml"]
    lung = heart["measures"][1]
    keys = {"measure", "direction", "values", "mean_a", "sd_a", "mean_b", "sd_b", "effect", "in_direction",
            "t", "p", "p_note", "t_paired", "p_paired", "p_paired_note", "n_paired", "seeds_in_direction", "significant"}  # fmt: skip
    assert keys <= set(lung) and lung["direction"] == "less"
    assert [v["seed"] for v in lung["values"]["b"]] == [5, 6]
    sample = lung["values"]["a"][1]["sample"]
    assert sample == f"samples/{prompt_id(NORMAL)}/1" and (out / sample / "ct.nii.gz").is_file()
    cached = json.loads((out / "measures" / prompt_id(NORMAL) / "1.json").read_text())
    assert lung["values"]["a"][1]["value"] == pytest.approx(cached["measures"]["lung_ml"])
    # the generated masks were given: mask-CT consistency is measured
    assert {"lobe_lung_dice", "airway_dice", "vessel_dice"} <= set(cached["measures"])
    values = [v["value"] for v in lung["values"]["a"]]
    assert lung["mean_a"] == pytest.approx(np.mean(values))

    report = (out / "report.md").read_text()
    assert "| pair | measure | expected | A mean ± sd | B mean ± sd |" in report
    rows = [
        line
        for line in report.splitlines()
        if line.startswith("| heart |") or line.startswith("| effusion |")
    ]
    assert len(rows) == 3 and rows[2].startswith("| heart | lung_ml | B < A |")
    assert rows[2].endswith("| yes |") == lung["in_direction"]
    assert "`threshold`" in report and "p < 0.01" in report
    image = imread(out / "boxplots.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # three panels side by side

    # a rerun of the same command keeps every sample and every measure
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "controllability.json"}
    capsys.readouterr()
    assert run_command("--base", runs["base"], "--pairs", pairs, "--out", out, *FAST) == 0
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("2 of 2 sample(s) already made by an earlier run") == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "controllability.json").read_text())["pairs"] == result["pairs"]

    # measures cached under an older definition of the measures are taken again; the samples are kept
    stale = out / "measures" / prompt_id(NORMAL) / "1.json"
    entry = json.loads(stale.read_text())
    entry["version"] -= 1
    entry["measures"]["lung_ml"] = -1.0
    stale.write_text(json.dumps(entry))
    assert run_command("--base", runs["base"], "--pairs", pairs, "--out", out, *FAST) == 0
    assert json.loads(stale.read_text())["measures"]["lung_ml"] == cached["measures"]["lung_ml"]
    assert json.loads((out / "controllability.json").read_text())["pairs"] == result["pairs"]


def test_command_with_sr_and_refusals(runs, tmp_path, capsys):
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text(
        f"- name: effusion\n  a: '{NORMAL}'\n  b: '{TWO_PAIRS[0]['b']}'\n  measure: effusion_ml\n"
    )
    out = tmp_path / "out"
    args = ("--base", runs["base"], "--sr", runs["sr"], "--pairs", pairs, "--out", out)
    assert run_command(*args, *FAST) == 0
    result = json.loads((out / "controllability.json").read_text())
    assert result["provenance"]["sr"]["run_dir"] == str(runs["sr"])
    assert len(result["pairs"][0]["measures"][0]["values"]["a"]) == 2
    capsys.readouterr()
    # another request into the same folders is refused without --overwrite, and n < 2 always
    assert run_command(*args, "--steps", "3", "--sr-steps", "1", "--n", "2", "--seed", "5") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_command(*args, "--n", "1") == 2
    assert "--n 1: expected at least 2" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert run_command("--base", runs["base"], "--pairs", pairs, "--out", tmp_path / "foreign", *FAST) == 2
    assert "notes.txt" in capsys.readouterr().err

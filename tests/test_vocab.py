"""`medsyn vocab build`: negation rules, term counting, categories, output files and the review round trip."""

import argparse
import csv
import json

import pytest
import yaml

from medsyn.cli import run_cli
from medsyn.commands import vocab as vocab_command
from medsyn.prompting.corpus import read_corpus
from medsyn.prompting.lexicon import categorize
from medsyn.prompting.negation import affirmed
from medsyn.prompting.text import mentions, sentences, singular
from medsyn.prompting.vocab import analyse, build_vocabulary, count_candidates

REPORTS = [
    ("No pleural effusion. Small nodule in the right upper lobe.", "Pulmonary nodule."),
    ("There is no evidence of nodules, but consolidation in the left lower lobe. Pneumothorax is absent.",
     "Pneumonia has resolved."),
    ("Negative for pulmonary embolism. Moderate right pleural effusion with compressive atelectasis.",
     "Effusion without pneumothorax."),
    ("Ground-glass opacities in the left lower lobe. Emphysema, no bullae.", "Emphysema."),
]  # fmt: skip


def _affirmed_words(text: str) -> list[str]:
    (tokens,) = sentences(text)
    return [t.text for t, ok in zip(tokens, affirmed(tokens), strict=True) if ok]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No pleural effusion or pneumothorax.", []),
        (
            "There is no evidence of nodules, but a mass in the lingula.",
            ["a", "mass", "in", "the", "lingula"],
        ),
        ("Normal heart without pericardial effusion.", ["normal", "heart"]),
        ("No effusion, pneumothorax or consolidation.", []),
        ("No effusion, mild cardiomegaly.", ["mild", "cardiomegaly"]),
        ("Cardiomegaly, the effusion has resolved.", ["cardiomegaly"]),
        ("Pneumothorax is absent.", []),
        ("Negative for embolism; small nodule.", ["small", "nodule"]),
        ("No change in the nodule.", ["in", "the", "nodule"]),
        ("No nodule however emphysema is seen.", ["emphysema", "is", "seen"]),
    ],
)
def test_negation_rules(text, expected):
    assert _affirmed_words(text) == expected


def test_plurals_and_mentions():
    assert [singular(w) for w in ["opacities", "bullae", "bronchi", "masses", "atelectasis", "airways"]] == [
        "opacity", "bulla", "bronchus", "mass", "atelectasis", "airway",
    ]  # fmt: skip
    assert mentions("Bilateral pleural EFFUSIONS.", "pleural effusion")
    assert mentions("ground glass opacities", "ground-glass opacity")
    assert not mentions("an effusion", "pleural effusion")


def test_categories():
    assert categorize("right upper lobe") == ("anatomy", None)
    assert categorize("left lung") == ("anatomy", None)
    assert categorize("ground-glass opacities") == ("pathology", None)
    assert categorize("moderate") == ("modifier", None)
    assert categorize("small right pleural effusion") == ("pathology", "pleural effusion")
    assert categorize("patent") == ("other", None)


def test_counts_skip_negated_mentions():
    texts = ["\n\n".join(r) for r in REPORTS]
    terms = {t.term: t for t in count_candidates(analyse(texts))}
    assert (terms["nodule"].count, terms["nodule"].doc_freq) == (2, 1)  # "no evidence of nodules" skipped
    assert (terms["effusion"].count, terms["effusion"].doc_freq) == (2, 1)  # "No pleural effusion" skipped
    assert terms["pleural effusion"].count == 1
    assert terms["ground-glass opacity"].count == 1  # a 3-word phrase with a hyphen
    assert terms["consolidation"].count == 1  # after "but" the scope has ended
    assert terms["emphysema"].count == 2  # "Emphysema, no bullae": the comma ends nothing before it
    for negated in ("pneumothorax", "pneumonia", "embolism", "bulla", "pulmonary embolism"):
        assert negated not in terms
    vocab = build_vocabulary(texts, top_k=200)
    anatomy, pathology = {t.term for t in vocab.kept("anatomy")}, {t.term for t in vocab.kept("pathology")}
    assert {"right upper lobe", "left lower lobe", "pleural"} <= anatomy
    assert {"nodule", "effusion", "compressive atelectasis", "ground-glass opacity"} <= pathology
    assert not anatomy & pathology and "small" not in anatomy | pathology
    assert vocab.cooccurrence[("left lower lobe", "consolidation")] == 1
    assert vocab.cooccurrence[("right upper lobe", "nodule")] == 1
    assert ("right upper lobe", "effusion") not in vocab.cooccurrence  # negated
    assert ("left lower lobe", "emphysema") not in vocab.cooccurrence  # same report, different sentences


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "findings", "impression"])
        writer.writerows([f"s{i}", *r] for i, r in enumerate(rows))


def _parser():
    parser = argparse.ArgumentParser(prog="medsyn vocab")
    vocab_command.add_arguments(parser)
    return parser


def _vocab(*argv) -> int:
    return run_cli(vocab_command.run, "medsyn vocab", _parser().parse_args(list(argv)))


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_build_files_and_review_round_trip(tmp_path, capsys):
    reports, out = tmp_path / "manifest.csv", tmp_path / "vocab"
    _write_csv(reports, REPORTS)
    assert _vocab("build", "--reports", str(reports), "--out", str(out), "--top-k", "60") == 0
    anatomy = {r["term"]: r for r in _read_csv(out / "anatomy.csv")}
    pathology = {r["term"]: r for r in _read_csv(out / "pathology.csv")}
    assert (pathology["nodule"]["count"], pathology["nodule"]["doc_freq"]) == ("2", "1")
    assert "right upper lobe" in anatomy and "pneumothorax" not in pathology
    matrix = {r["anatomy"]: r for r in _read_csv(out / "cooccurrence.csv")}
    assert matrix["left lower lobe"]["consolidation"] == "1" and matrix["right upper lobe"]["effusion"] == "0"
    data = json.loads((out / "vocab.json").read_text())
    assert data["format"] == "medsyn-vocab" and data["documents"] == 4
    assert {"anatomy": "right upper lobe", "pathology": "nodule", "count": 1} in data["cooccurrence"]

    # a second build into the same folder is refused without --overwrite
    assert _vocab("build", "--reports", str(reports), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    review = yaml.safe_load((out / "review.yaml").read_text())
    entries = {e["term"]: e for e in review["terms"]}
    assert (
        entries["right upper lobe"]["category"] == "anatomy" and entries["moderate"]["category"] == "modifier"
    )
    entries["nodule"]["keep"] = False  # drop
    entries["consolidation"]["category"] = "anatomy"  # move (an odd move, but visible)
    review["terms"] = list(entries.values()) + [{"term": "pneumothorax", "category": "pathology"},
                                                {"term": "lingula", "category": "anatomy"}]  # fmt: skip
    (out / "review.yaml").write_text(yaml.safe_dump(review, sort_keys=False))
    assert _vocab("build", "--review", str(out / "review.yaml")) == 0  # reports and --out from the review
    assert "never affirmed" in capsys.readouterr().out
    anatomy = {r["term"]: r for r in _read_csv(out / "anatomy.csv")}
    pathology = {r["term"]: r for r in _read_csv(out / "pathology.csv")}
    assert "nodule" not in pathology and "consolidation" in anatomy and "consolidation" not in pathology
    assert pathology["pneumothorax"]["count"] == "0"  # added, measured: every mention is negated
    assert anatomy["lingula"]["count"] == "0"
    data = json.loads((out / "vocab.json").read_text())
    assert all(p["pathology"] != "nodule" for p in data["cooccurrence"])
    rewritten = {e["term"]: e for e in yaml.safe_load((out / "review.yaml").read_text())["terms"]}
    assert rewritten["nodule"]["keep"] is False and rewritten["pneumothorax"]["count"] == 0


def test_folder_of_reports_and_errors(tmp_path, capsys):
    for i, (findings, impression) in enumerate(REPORTS):
        folder = tmp_path / "reports" / f"group{i % 2}" / f"s{i}"
        folder.mkdir(parents=True)
        (folder / "report.txt").write_text(f"FINDINGS: {findings}\n\nIMPRESSION: {impression}\n")
    texts = read_corpus(tmp_path / "reports")
    assert len(texts) == 4 and not any("FINDINGS" in t for t in texts)
    terms = {t.term for t in count_candidates(analyse(texts))}
    assert "nodule" in terms and "finding" not in terms and "impression" not in terms

    out = tmp_path / "out"
    assert _vocab("build", "--reports", str(tmp_path / "missing.csv"), "--out", str(out)) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("reports: x\nterms:\n  - {term: heart, category: organ}\n")
    assert _vocab("build", "--review", str(bad), "--reports", str(tmp_path / "reports")) == 2
    err = capsys.readouterr().err
    assert "category 'organ'" in err and "bad.yaml" in err and len(err.strip().splitlines()) == 1
    bad.write_text(
        "terms:\n  - {term: nodule, category: pathology}\n  - {term: Nodules, category: anatomy}\n"
    )
    assert _vocab("build", "--review", str(bad), "--reports", str(tmp_path / "reports")) == 2
    assert "repeats terms entry 1" in capsys.readouterr().err

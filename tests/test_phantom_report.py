"""Phantom reports state exactly the sampled findings and negate the absent ones."""

import numpy as np

from medsyn.data.phantom import Lesion, PathologyParams, write_report


def report(params, seed=0):
    return write_report(params, np.random.default_rng(seed))


def test_normal_report_negates_everything():
    r = report(PathologyParams())
    text = r.findings.lower()
    assert "no pleural effusion" in text or "pleural spaces are clear" in text
    assert "consolidation" in text and ("no " in text)
    assert "cardiomegaly" not in r.impression.lower() and "effusion" not in r.impression.lower()


def test_positive_findings_are_all_stated():
    params = PathologyParams(effusion="moderate", effusion_side="left", ctr=0.62, emphysema_lobe=3,
                             emphysema_fraction=0.2, lesions=[Lesion(5, 15.0)], consolidation=[2],
                             ground_glass=[4])  # fmt: skip
    for seed in range(10):
        r = report(params, seed)
        text = r.findings.lower()
        assert "moderate" in text and "left" in text and "effusion" in text
        assert "cardiomegaly" in text and "emphysema" in text and "right upper lobe" in text
        assert "nodule" in text and "right lower lobe" in text
        assert (
            "consolidation of the left lower lobe" in text or "consolidation in the left lower lobe" in text
        )
        assert "ground-glass" in text and "right middle lobe" in text
        assert "Cardiomegaly." in r.impression and "effusion" in r.impression


def test_wording_varies_across_seeds():
    params = PathologyParams(effusion="large", effusion_side="right")
    assert len({report(params, s).findings for s in range(20)}) > 5


def test_bilateral_grammar():
    r = report(PathologyParams(effusion="small", effusion_side="bilateral"))
    assert "effusions" in r.findings and "bilateral" in r.impression


def test_every_topic_is_stated_or_negated_for_sampled_pathology():
    from medsyn.data.phantom import sample_pathology

    rng = np.random.default_rng(1)
    for seed in range(150):
        p = sample_pathology(rng)
        text = report(p, seed).findings.lower()
        negated_effusion = "no pleural effusion" in text or "pleural spaces are clear" in text
        assert negated_effusion == (p.effusion == "none")
        if p.effusion != "none":
            sides = ("bilateral", "both sides") if p.effusion_side == "bilateral" else (p.effusion_side,)
            assert p.effusion in text and any(side in text for side in sides)
        assert ("cardiomegaly" in text and "no cardiomegaly" not in text) == p.cardiomegaly
        assert ("no emphysema" in text or "no bullous" in text) == (not p.emphysema_lobe and not p.bullae)
        assert ("nodule" in text or "mass" in text) and (("no " in text) or p.lesions)
        for lesion in p.lesions:
            assert lesion.kind in text
        negated_consolidation = (
            "no consolidation" in text
            or "no evidence of consolidation" in text
            or ("no focal airspace consolidation" in text)
        )
        assert negated_consolidation == (not p.consolidation)
        assert ("ground-glass" in text) == bool(p.ground_glass)


def test_articles_before_sizes():
    texts = {report(PathologyParams(lesions=[Lesion(1, 11.0)]), s).findings for s in range(12)}
    assert not any("A 11 mm" in t or "a 11 mm" in t for t in texts)
    assert any("n 11 mm" in t for t in texts)

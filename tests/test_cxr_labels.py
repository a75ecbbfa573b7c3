"""report_labels: effusion side and cardiomegaly read from report text, negations respected."""

import numpy as np
import pytest

from medsyn.data.phantom.pathology import sample_pathology
from medsyn.data.phantom.report import write_report
from medsyn.radiograph.labels import EFFUSION_SIDES, report_labels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("text", "effusion"),
    [
        ("Moderate right-sided pleural effusion.", "right"),
        ("Small left pleural effusion with adjacent compressive atelectasis.", "left"),
        ("A small pleural effusion is present on the left.", "left"),
        ("Bilateral effusions.", "bilateral"),
        ("Small pleural effusions are present on both sides.", "bilateral"),
        ("Small right and trace left pleural effusions.", "bilateral"),
        ("Small pleural effusions.", "bilateral"),  # plural, no side: both
        ("Small pleural effusion.", None),  # side not stated
        ("No effusion.", "none"),
        ("There is no pleural effusion or pneumothorax.", "none"),
        ("The pleural spaces are clear.", "none"),
        ("Normal cardiac size without pericardial effusion.", "none"),
        ("Small pericardial effusion.", "none"),  # not pleural
        ("Left pleural effusion has resolved.", "none"),
        ("No left effusion. Small right pleural effusion.", "right"),
        ("Right pleural effusion and left lower lobe atelectasis.", "right"),
        ("No change in the small left pleural effusion.", "left"),  # pseudo-negation
        ("Findings: Clear lungs.\n\nImpression: Large right pleural effusion.", "right"),
    ],
)
def test_effusion_side(text, effusion):
    assert report_labels(text)["effusion"] == effusion


@pytest.mark.parametrize(
    ("text", "cardiomegaly"),
    [
        ("The heart is enlarged.", True),
        ("Cardiomegaly.", True),
        ("Enlarged cardiac silhouette.", True),
        ("The cardiac silhouette is mildly enlarged.", True),
        ("Heart size is increased.", True),
        ("There is mild cardiomegaly.", True),
        ("Heart size is normal.", False),
        ("The heart is normal in size.", False),
        ("No cardiomegaly.", False),
        ("The heart is not enlarged.", False),
        ("Normal cardiac size without pericardial effusion.", False),
        ("No acute cardiopulmonary abnormality.", False),
        ("Enlarged mediastinal lymph nodes. Heart size is normal.", False),
        ("Large left pleural effusion obscuring the heart border.", False),
    ],
)
def test_cardiomegaly(text, cardiomegaly):
    assert report_labels(text)["cardiomegaly"] is cardiomegaly


def test_unmentioned_findings_are_absent():
    assert report_labels("Lungs are clear.") == {"effusion": "none", "cardiomegaly": False}
    assert report_labels("") == {"effusion": "none", "cardiomegaly": False}


def test_phantom_reports_match_their_truth():
    """Every phantom report states its effusion side and cardiomegaly in one of several wordings: the labels
    read back must equal the sampled pathology (the reports of `medsyn phantom`, without the volumes)."""
    seen = set()
    for seed in range(400):
        rng = np.random.default_rng(seed)
        params = sample_pathology(rng)
        report = write_report(params, rng)
        truth = {
            "effusion": "none" if params.effusion == "none" else params.effusion_side,
            "cardiomegaly": bool(params.cardiomegaly),
        }
        assert report_labels(report.text()) == truth, report.text()
        seen.add(truth["effusion"])
    assert seen == set(EFFUSION_SIDES)  # every class was exercised

"""Radiology reports for phantoms: Findings and Impression describing exactly the sampled pathology.

Wording varies (several phrasings per finding, synonyms, sizes in mm or cm, shuffled order) and
absent findings are stated as negations, as in real reports, so a text encoder must read
"no effusion" differently from "effusion".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsyn.data.channels import LOBE_NAMES
from medsyn.data.phantom.pathology import PathologyParams


@dataclass
class Report:
    findings: str
    impression: str

    def text(self) -> str:
        """The report as a file: FINDINGS and IMPRESSION sections."""
        return f"FINDINGS: {self.findings}\n\nIMPRESSION: {self.impression}\n"


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _lobe(lobe: int) -> str:
    return f"{LOBE_NAMES[lobe]} lobe"


def _size(rng: np.random.Generator, mm: float) -> str:
    return f"{mm / 10:.1f} cm" if mm >= 20 and rng.uniform() < 0.5 else f"{mm:.0f} mm"


def _article(number: str) -> str:
    """'an' before numbers read with a leading vowel sound (8, 11, 18, 80-89 ...), else 'a'."""
    head = number.split()[0].split(".")[0]
    return "an" if head.startswith("8") or head in ("11", "18") else "a"


def _effusion(rng, p: PathologyParams) -> tuple[str, str]:
    if p.effusion == "none":
        return _pick(rng, ["No pleural effusion.", "There is no pleural effusion.",
                           "No pleural effusion or pneumothorax.", "The pleural spaces are clear."]), ""  # fmt: skip
    size, side = p.effusion, p.effusion_side
    if side == "bilateral":
        options = [f"There are {size} bilateral pleural effusions.",
                   f"{size.capitalize()} bilateral pleural effusions with adjacent compressive atelectasis.",
                   f"{size.capitalize()} pleural effusions are present on both sides."]  # fmt: skip
        return _pick(rng, options), f"{size.capitalize()} bilateral pleural effusions."
    options = [f"There is a {size} {side} pleural effusion.",
               f"{size.capitalize()} {side} pleural effusion with adjacent compressive atelectasis.",
               f"A {size} pleural effusion is present on the {side}."]  # fmt: skip
    return _pick(rng, options), f"{size.capitalize()} {side} pleural effusion."


def _heart(rng, p: PathologyParams) -> tuple[str, str]:
    if not p.cardiomegaly:
        return _pick(rng, ["Heart size is normal.", "The heart is normal in size.",
                           "No cardiomegaly.", "Normal cardiac size without pericardial effusion."]), ""  # fmt: skip
    grade = "marked" if p.ctr >= 0.65 else "mild" if p.ctr < 0.6 else "moderate"
    return _pick(rng, [f"The heart is enlarged ({grade} cardiomegaly).", f"There is {grade} cardiomegaly.",
                       f"Cardiomegaly, {grade}.",
                       f"Cardiomegaly with a cardiothoracic ratio of about {p.ctr:.2f}."]), "Cardiomegaly."  # fmt: skip


def _emphysema(rng, p: PathologyParams) -> tuple[str, str]:
    parts, impression = [], []
    if p.emphysema_lobe:
        where = _lobe(p.emphysema_lobe)
        grade = (
            "severe"
            if p.emphysema_fraction >= 0.22
            else "moderate"
            if p.emphysema_fraction >= 0.14
            else "mild"
        )
        parts.append(_pick(rng, [f"{grade.capitalize()} centrilobular emphysema in the {where}.",
                                 f"There is {grade} emphysema predominantly in the {where}."]))  # fmt: skip
        impression.append("Emphysema.")
    if p.bullae:
        where = _lobe(p.emphysema_lobe or 3)
        count = "A bulla" if p.bullae == 1 else "Several bullae"
        parts.append(_pick(rng, [f"{count} in the {where}.", f"{count} noted in the {where}."]))
        impression.append("Bullous disease." if not impression else "Bullous emphysema.")
        impression = impression[-1:]
    if not parts:
        parts.append(_pick(rng, ["No emphysema.", "There is no emphysema or bullae.", "No bullous changes."]))
    return " ".join(parts), " ".join(impression)


def _lesions(rng, p: PathologyParams) -> tuple[str, str]:
    if not p.lesions:
        return _pick(rng, ["No pulmonary nodules or masses.", "There are no suspicious pulmonary nodules.",
                           "No focal lung mass."]), ""  # fmt: skip
    parts, kinds = [], set()
    for lesion in p.lesions:
        kinds.add(lesion.kind)
        size, where = _size(rng, lesion.size_mm), _lobe(lesion.lobe)
        article = _article(size)
        parts.append(_pick(rng, [f"{article.capitalize()} {size} solid {lesion.kind} in the {where}.",
                                 f"There is {article} {size} {lesion.kind} in the {where}.",
                                 f"{lesion.kind.capitalize()} measuring {size} in the {where}."]))  # fmt: skip
    impression = (
        "Pulmonary mass." if "mass" in kinds else "Pulmonary nodule" + ("s." if len(p.lesions) > 1 else ".")
    )
    return " ".join(parts), impression + " Follow-up recommended."


def _airspace(rng, p: PathologyParams) -> tuple[str, str]:
    parts, impression = [], []
    for lobe in p.consolidation:
        parts.append(_pick(rng, [f"Consolidation in the {_lobe(lobe)} with air bronchograms.",
                                 f"There is airspace consolidation of the {_lobe(lobe)}."]))  # fmt: skip
        impression.append(f"{LOBE_NAMES[lobe].capitalize()} lobe consolidation, possibly pneumonia.")
    if p.ground_glass:
        where = " and ".join(_lobe(lobe) for lobe in p.ground_glass)
        parts.append(
            _pick(
                rng,
                [f"Ground-glass opacity in the {where}.", f"Patchy ground-glass opacities in the {where}."],
            )
        )
        impression.append("Ground-glass opacities.")
    if not p.consolidation:
        parts.insert(0, _pick(rng, ["No consolidation.", "There is no evidence of consolidation.",
                                    "No focal airspace consolidation."]))  # fmt: skip
    return " ".join(parts), " ".join(impression)


def write_report(params: PathologyParams, rng: np.random.Generator) -> Report:
    """A report whose Findings state every finding of `params` (and negate the absent ones)."""
    sections = [_effusion(rng, params), _heart(rng, params), _emphysema(rng, params),
                _lesions(rng, params), _airspace(rng, params)]  # fmt: skip
    order = rng.permutation(len(sections))
    findings = " ".join(sections[i][0] for i in order)
    positives = [s[1] for s in sections if s[1]]
    impression = (
        " ".join(positives)
        if positives
        else _pick(
            rng,
            ["No acute cardiopulmonary abnormality.", "Normal chest CT.", "No acute intrathoracic process."],
        )
    )
    airway = _pick(rng, ["The central airways are patent.", "Trachea and main bronchi are patent."])
    return Report(f"{findings} {airway}", impression)

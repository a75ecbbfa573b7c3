"""The built-in dataset: phantom chest CTs with lobes, airway and vessel masks, reports and truth.

Each phantom has a body wall, ribs and spine, two lungs split into five lobes by fissures, a branching
airway tree from the trachea, pulmonary vessel trees from the hila, heart and aorta, CT noise, and
pathology set by parameters (pleural effusion, cardiomegaly, emphysema and bullae, nodules and
masses, consolidation, ground glass) that its report describes and its truth measures.
"""

from medsyn.data.phantom.dataset import (
    Phantom,
    generate_phantom,
    phantom_from_truth,
    phantom_report,
    save_phantom,
    write_dataset,
    write_reports,
)
from medsyn.data.phantom.pathology import FindingRegions, Lesion, PathologyParams, sample_pathology
from medsyn.data.phantom.report import Report, write_report

__all__ = [
    "FindingRegions",
    "Lesion",
    "PathologyParams",
    "Phantom",
    "Report",
    "generate_phantom",
    "phantom_from_truth",
    "phantom_report",
    "sample_pathology",
    "save_phantom",
    "write_dataset",
    "write_report",
    "write_reports",
]

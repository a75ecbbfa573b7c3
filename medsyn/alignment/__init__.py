"""Fine-grained report-image alignment (the second seed paper's section 2.2), for CT volumes (3D) and
radiographs (2D) with the same code: a dual encoder of image patches and report words (`model`), its
contrastive losses (`losses`), held-out measures (`metrics`), the pairs of either kind of cache (`data`),
the loader of a trained run (`run`), the visual codebook of keypatches with their retrieval for a report
and their pixel crops (`codebook`), and, for CT only, word maps (`maps`) and the pointing game on
phantoms (`pointing`, imported on its own: it needs the phantom package). `train.py align` trains it
(medsyn.training.align).
"""

from medsyn.alignment.codebook import (
    Codebook,
    Keypatch,
    Retrieval,
    keypatch_crops,
    keypatch_tokens,
    retrieve_for_report,
)
from medsyn.alignment.losses import (
    LOCAL_POOLS,
    global_contrastive_loss,
    info_nce,
    local_contrastive_loss,
    word_patch_scores,
)
from medsyn.alignment.metrics import chance_accuracy, report_positives, retrieval_accuracy
from medsyn.alignment.model import (
    POOLS,
    PRESETS,
    AlignmentModel,
    ReportEncoder,
    VolumeEncoder,
    build_alignment_model,
    patch_box,
)
from medsyn.alignment.run import AlignRun, load_align_run
from medsyn.alignment.words import tokenize_words, word_pooling

__all__ = [
    "LOCAL_POOLS",
    "POOLS",
    "PRESETS",
    "AlignRun",
    "AlignmentModel",
    "Codebook",
    "Keypatch",
    "ReportEncoder",
    "Retrieval",
    "VolumeEncoder",
    "build_alignment_model",
    "chance_accuracy",
    "global_contrastive_loss",
    "info_nce",
    "keypatch_crops",
    "keypatch_tokens",
    "load_align_run",
    "local_contrastive_loss",
    "patch_box",
    "report_positives",
    "retrieval_accuracy",
    "retrieve_for_report",
    "tokenize_words",
    "word_patch_scores",
    "word_pooling",
]

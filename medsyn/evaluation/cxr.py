"""`medsyn evaluate-cxr`: generated radiographs against real ones, by distribution and by findings.

Two questions, as the second seed paper asks them:

- Do the samples look like real radiographs? FID and MMD between each sample set and the real held-out
  split on pooled features of a 2D ResNet (`medsyn.evaluation.features`: trained weights from
  `--features`, or a fixed random ResNet-18 whose scores are named "(random features)").
- Do the findings the prompt asks for survive (the paper's Table 2)? A small CNN with two heads, effusion
  side (none / left / right / bilateral) and cardiomegaly, is trained on the real training split, its
  accuracy measured on the real held-out split (the reference), then applied to every sample, whose
  expected labels are read from its prompt with `medsyn.radiograph.labels.report_labels`. The real
  held-out images scored the same way, against their own reports, give the ceiling.

The classifier is kept in `--classifier DIR` (classifier.safetensors with its config, classifier.json)
and reused while the training split and settings it was trained on are unchanged (`train_hash`).
The outputs are written by `medsyn.evaluation.cxr_report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medsyn.errors import DataError
from medsyn.evaluation import features as features_lib
from medsyn.io import atomic_dir, write_json
from medsyn.radiograph.cache import EFFUSION_LABELS, load_image, read_radiograph_manifest
from medsyn.radiograph.labels import report_labels
from medsyn.radiograph.output import read_png16
from medsyn.weights import export_weights, load_weights

FORMAT = "medsyn-evaluate-cxr-1"
CLASSIFIER_FORMAT = "medsyn-cxr-classifier-1"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"
# finding -> its classes, in the order of the classifier's outputs
FINDINGS: dict[str, tuple[str, ...]] = {
    "effusion": EFFUSION_LABELS,
    "cardiomegaly": ("absent", "present"),
}
SAMPLE_IMAGE = "image.png"
SAMPLE_META = "meta.json"


@dataclass
class CxrOptions:
    """How to measure: image size, feature weights, classifier training settings."""

    size: int = 128  # every image is resized (area averaging) to size^2 for the features and classifier
    features: str | None = None  # 2D ResNet weights; None: a fixed random ResNet-18 (labelled so)
    classifier: str | None = None  # classifier folder; None: OUT/classifier (set by the command)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    progress: bool | None = None  # tqdm bars (None: on a terminal)


@dataclass
class ImageSet:
    """Images of one group (a sample set, or a split of a radiograph cache) with the labels they should show."""

    name: str
    source: str
    ids: list[str]
    images: torch.Tensor  # (N, 1, size, size) in [-1, 1]
    expected: list[dict]  # per image: report_labels of its prompt / report (effusion None: side unstated)
    texts: list[str]  # the prompt or report each image goes with
    truth: list[dict] | None = None  # cache labels (None entries: not known); real sets only
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def resize_image(x: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(1, S, S) -> (1, size, size): area averaging when shrinking, bilinear when growing."""
    x = torch.as_tensor(x, dtype=torch.float32)[None]
    return features_lib.resize_volume(x, (size, size))[0]


def _index_key(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _read_sample_meta(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing (expected the sample's meta.json with its prompt)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    prompt = meta.get("prompt") if isinstance(meta, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{path}: no `prompt` (expected the report text the sample was generated from)")
    return meta


def read_sample_set(folder: str | os.PathLike, size: int, name: str | None = None) -> ImageSet:
    """The samples in `folder` (OUT/<index>/image.png + meta.json, from `sample.py --cxr`), resized."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--samples {folder}: no such folder")
    dirs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
         and ((p / SAMPLE_IMAGE).exists() or (p / SAMPLE_META).exists())),
        key=_index_key,
    )  # fmt: skip
    if not dirs:
        raise DataError(
            f"--samples {folder}: no sample folders (expected <index>/{SAMPLE_IMAGE} with {SAMPLE_META}, "
            "as `sample.py --cxr` writes them)"
        )
    ids, images, texts, generators = [], [], [], Counter()
    for d in dirs:
        meta = _read_sample_meta(d / SAMPLE_META)
        if not (d / SAMPLE_IMAGE).is_file():
            raise DataError(f"{d / SAMPLE_IMAGE}: missing (each sample folder holds its image.png)")
        images.append(resize_image(read_png16(d / SAMPLE_IMAGE)[None], size))
        ids.append(d.name)
        texts.append(meta["prompt"])
        generators[str(meta.get("generator", "unknown"))] += 1
    return ImageSet(
        name=name or folder.name,
        source=str(folder),
        ids=ids,
        images=torch.stack(images),
        expected=[report_labels(t) for t in texts],
        texts=texts,
        meta={"generators": dict(generators)},
    )


def _report(row: dict) -> str:
    return f"{row['findings']}\n\n{row['impression']}"


def read_cache_split(root: str | os.PathLike, split: str, size: int, role: str) -> ImageSet:
    """The `split` rows of a radiograph cache, resized, with their cache labels and report labels."""
    rows = read_radiograph_manifest(root, split)
    if not rows:
        raise DataError(
            f"{Path(root) / 'manifest.csv'}: no images in split {split!r} (--{role}-split); "
            "choose a split the cache has"
        )
    images = [resize_image(load_image(r), size) for r in tqdm(rows, desc=f"read {role}", unit="image",
                                                                  leave=False, disable=None)]  # fmt: skip
    return ImageSet(
        name=f"real {split}",
        source=str(root),
        ids=[r["id"] for r in rows],
        images=torch.stack(images),
        expected=[report_labels(_report(r)) for r in rows],
        texts=[_report(r) for r in rows],
        truth=[{"effusion": r["effusion"], "cardiomegaly": r["cardiomegaly"]} for r in rows],
        meta={"split": split, "image_sha256": [_file_sha256(r["image"]) for r in rows]},
    )


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def label_indices(labels: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Class indices per finding (-100 where a label is not known, e.g. an effusion of unstated side)."""
    out = {}
    for finding, classes in FINDINGS.items():
        values = []
        for label in labels:
            value = label.get(finding)
            if finding == "cardiomegaly" and value is not None:
                value = "present" if value else "absent"
            values.append(classes.index(value) if value in classes else -100)
        out[finding] = torch.tensor(values, dtype=torch.long)
    return out


def training_labels(real: ImageSet) -> list[dict]:
    """Cache labels where known, else the labels read from the image's report."""
    truth = real.truth or [{}] * len(real.ids)
    return [
        {k: t.get(k) if t.get(k) is not None else e[k] for k in FINDINGS}
        for t, e in zip(truth, real.expected, strict=True)
    ]


# ---------------------------------------------------------------- 2D features and distances


def feature_network(path: str | os.PathLike | None, seed: int = 0) -> tuple[nn.Module, str, bool]:
    """The 2D ResNet of `medsyn evaluate`'s slice features: (network, label, trained)."""
    if path is not None:
        net, label = features_lib.load_resnet(path, 2)
        return net, label, True
    net, label = features_lib.random_resnet(2, seed, depth=18)
    return net, label, False


@torch.no_grad()
def image_features(
    net: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 32
) -> np.ndarray:
    """Pooled features (N, D) of images (N, 1, S, S) in [-1, 1]: a 3-channel network gets them replicated
    and ImageNet-normalised from [0, 1], a 1-channel one as they are (as `FeatureExtractor.features_25d`)."""
    net = net.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = features_lib.network_input_2d((images[start : start + batch_size] + 1) / 2, net.conv1.in_channels)
        out.append(net(x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def distances(a: np.ndarray, b: np.ndarray, trained: bool) -> dict[str, Any]:
    """FID and MMD between feature sets, named after the features (None with fewer than 2 per set)."""
    if min(len(a), len(b)) < 2:
        return {"fid": None, "mmd": None, "note": "FID and MMD need at least 2 images per set"}
    return {
        "fid": features_lib.fid(a, b),
        "mmd": features_lib.mmd(a, b),
        "metric_fid": features_lib.metric_name("FID", trained),
        "metric_mmd": features_lib.metric_name("MMD", trained),
    }


# ---------------------------------------------------------------- the finding classifier


class FindingClassifier(nn.Module):
    """A small CNN with two heads: effusion side (4 classes) and cardiomegaly (absent / present).

    The image is first area-averaged to `input_size`^2 (both findings are coarse: fluid at a lung base, the
    width of the heart), which keeps training to a minute on a CPU; then stride-2 convolution blocks and
    average pooling to a `grid` x `grid` map that is flattened, so the heads still see where (left or
    right) a finding is.
    """

    def __init__(
        self,
        channels: Sequence[int] = (8, 16, 32, 64),
        grid: int = 4,
        input_size: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels={tuple(channels)}: expected positive channel counts")
        if input_size < 8:
            raise ValueError(f"input_size={input_size}: expected at least 8 pixels")
        self.input_size = input_size
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            groups = 4 if c % 4 == 0 else 1
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, c), nn.ReLU(True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups, c), nn.ReLU(True),
            ]  # fmt: skip
            c_in = c
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Dropout(dropout))
        width = c_in * grid * grid
        self.heads = nn.ModuleDict(
            {name: nn.Linear(width, len(classes)) for name, classes in FINDINGS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] != self.input_size:  # (B, 1, S, S) -> (B, 1, input_size, input_size)
            x = features_lib.resize_volume(x, (self.input_size, self.input_size))
        h = self.trunk(x)  # (B, C * grid^2)
        return {name: head(h) for name, head in self.heads.items()}  # name -> (B, n_classes)


def classifier_config(size: int) -> dict[str, Any]:
    """FindingClassifier arguments for images of `size`^2 (its input is at most 64^2)."""
    return {"channels": [8, 16, 32, 64], "grid": 4, "input_size": min(size, 64)}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small shifts, zoom and contrast changes (no flips: the side of an effusion is a label)."""
    b = len(x)
    scale = 1 + (torch.rand(b, generator=g) - 0.5) * 0.1
    shift = (torch.rand(b, 2, generator=g) - 0.5) * 0.12
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    bias = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.2
    return x * gain + bias


def _class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights over the known labels, so rare classes count (balanced accuracy)."""
    known = y[y >= 0]
    counts = torch.bincount(known, minlength=n_classes).float()
    weights = torch.where(counts > 0, len(known) / (n_classes * counts.clamp_min(1)), torch.zeros(()))
    return weights.clamp(max=10.0)


def train_classifier(
    images: torch.Tensor, labels: dict[str, torch.Tensor], options: CxrOptions
) -> tuple[FindingClassifier, list[float]]:
    """Train a FindingClassifier on images (N, 1, S, S) and class indices per finding; returns it (in eval
    mode) and the mean loss of each epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = FindingClassifier(**classifier_config(options.size)).to(options.device)
    g = torch.Generator().manual_seed(options.seed)
    weights = {k: _class_weights(y, len(FINDINGS[k])).to(options.device) for k, y in labels.items()}
    steps_per_epoch = -(-len(images) // options.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch, pct_start=0.2
    )
    history = []
    bar = tqdm(range(options.epochs), desc="train classifier", unit="epoch",
               disable=None if options.progress is None else not options.progress)  # fmt: skip
    model.train()
    for _ in bar:
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for start in range(0, len(images), options.batch_size):
            idx = order[start : start + options.batch_size]
            x = _augment(images[idx], g).to(options.device)
            logits = model(x)
            loss = torch.zeros((), device=options.device)
            for name, y in labels.items():
                y = y[idx].to(options.device)
                known = y >= 0
                if known.any():
                    loss = loss + F.cross_entropy(logits[name][known], y[known], weight=weights[name])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(images))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return model.eval(), history


@torch.no_grad()
def predict(
    model: FindingClassifier, images: torch.Tensor, device: str = "cpu", batch_size: int = 64
) -> dict:
    """Predicted class indices per finding: {finding: (N,) LongTensor}."""
    model = model.to(device).eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FINDINGS}
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))
        for name in FINDINGS:
            out[name].append(logits[name].argmax(1).cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def train_hash(train: ImageSet, options: CxrOptions) -> str:
    """What the classifier depends on: the training images and labels, the image size and training settings."""
    digest = hashlib.sha256()
    settings = {"format": CLASSIFIER_FORMAT, "size": options.size, "epochs": options.epochs,
                "batch_size": options.batch_size, "lr": options.lr, "seed": options.seed,
                "model": classifier_config(options.size)}  # fmt: skip
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for row in zip(train.ids, train.meta["image_sha256"], training_labels(train), strict=True):
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def _is_classifier_dir(path: Path) -> bool:
    try:
        return (
            json.loads((path / CLASSIFIER_META).read_text(encoding="utf-8")).get("format")
            == CLASSIFIER_FORMAT
        )
    except (OSError, ValueError, AttributeError):
        return False


def load_or_train_classifier(
    directory: str | os.PathLike, train: ImageSet, options: CxrOptions, log: Callable[[str], None] = print
) -> tuple[FindingClassifier, dict]:
    """The classifier in `directory` when it was trained on this training split with these settings;
    otherwise one trained now and written there (replacing only an earlier medsyn classifier)."""
    directory = Path(directory)
    expected = train_hash(train, options)
    if _is_classifier_dir(directory):
        info = json.loads((directory / CLASSIFIER_META).read_text(encoding="utf-8"))
        if info.get("train_hash") == expected:
            state, config = load_weights(directory / CLASSIFIER_WEIGHTS)
            if config.get("train_hash") != expected:
                raise DataError(f"{directory / CLASSIFIER_WEIGHTS}: does not belong to {CLASSIFIER_META}")
            model = FindingClassifier(**config["model"])
            model.load_state_dict(state)
            log(f"medsyn evaluate-cxr: reusing the classifier in {directory}")
            return model.eval(), {**info, "reused": True, "directory": str(directory)}
        log(f"medsyn evaluate-cxr: the classifier in {directory} was trained on other data or settings; "
            "retraining")  # fmt: skip
    elif directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DataError(
            f"--classifier {directory}: exists and is not a medsyn classifier folder (no {CLASSIFIER_META}); "
            "choose a new or empty folder"
        )
    began = time.perf_counter()
    labels = label_indices(training_labels(train))
    model, history = train_classifier(train.images, labels, options)
    info = {
        "format": CLASSIFIER_FORMAT,
        "train_hash": expected,
        "train": {"cache": train.source, "split": train.meta["split"], "n": len(train.ids)},
        "class_counts": {
            name: {c: int((labels[name] == i).sum()) for i, c in enumerate(FINDINGS[name])}
            for name in FINDINGS
        },
        "model": classifier_config(options.size),
        "size": options.size,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "seed": options.seed,
        "final_loss": history[-1] if history else None,
        "train_seconds": round(time.perf_counter() - began, 1),
    }
    with atomic_dir(directory, overwrite=True) as tmp:
        export_weights(tmp / CLASSIFIER_WEIGHTS, model.state_dict(), {"stage": "cxr-classifier", **info})
        write_json(tmp / CLASSIFIER_META, info)
    log(f"medsyn evaluate-cxr: classifier trained in {info['train_seconds']:.0f} s, written to {directory}")
    return model, {**info, "reused": False, "directory": str(directory)}


# ---------------------------------------------------------------- scores


def finding_scores(true: torch.Tensor, pred: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class recall, balanced accuracy (mean recall over the classes present) and the
    confusion matrix (rows: expected, columns: predicted) over the images with a known label."""
    known = true >= 0
    t, p = true[known], pred[known]
    k = len(classes)
    matrix = (
        torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if len(t)
        else torch.zeros(k, k, dtype=torch.long)
    )
    recall = {
        c: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None) for i, c in enumerate(classes)
    }
    present = [r for r in recall.values() if r is not None]
    return {
        "n": int(known.sum()),
        "n_unlabelled": int((~known).sum()),
        "accuracy": float((t == p).float().mean()) if len(t) else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "chance_balanced_accuracy": 1 / len(present) if present else None,
        "recall": recall,
        "classes": list(classes),
        "confusion": matrix.tolist(),
    }


def score_set(pred: dict[str, torch.Tensor], labels: Sequence[dict]) -> dict[str, dict]:
    """finding_scores of each finding for predictions against `labels`."""
    true = label_indices(labels)
    return {name: finding_scores(true[name], pred[name], FINDINGS[name]) for name in FINDINGS}


# ---------------------------------------------------------------- the evaluation


@dataclass
class CxrEvaluation:
    """metrics.json's contents and the image sets and predictions the plots show."""

    metrics: dict[str, Any]
    sets: list[ImageSet]  # the real held-out split first, then the sample sets
    predictions: list[dict[str, torch.Tensor]]


def clean_name(name: str) -> str:
    """A sample set's name as a metrics key (letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "samples"


def _unique_names(folders: Sequence[str]) -> list[str]:
    names, seen = [], Counter()
    for folder in folders:
        base = clean_name(Path(folder).resolve().name)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def evaluate_cxr(
    samples: Sequence[str | os.PathLike], real: str | os.PathLike, train: str | os.PathLike,
    options: CxrOptions, real_split: str = "test", train_split: str = "train",
    log: Callable[[str], None] = print,
) -> CxrEvaluation:  # fmt: skip
    """Score each sample set in `samples` against the `real_split` of the cache `real`, with a finding
    classifier trained on the `train_split` of the cache `train` (see the module docstring)."""
    if not samples:
        raise DataError("--samples: give at least one sample folder")
    if options.classifier is None:
        raise DataError("no classifier folder given")
    began = time.perf_counter()
    sample_sets = [
        read_sample_set(f, options.size, n) for f, n in zip(samples, _unique_names(samples), strict=True)
    ]
    real_set = read_cache_split(real, real_split, options.size, "real")
    train_set = read_cache_split(train, train_split, options.size, "train")
    sets = ", ".join(f"{s.name} ({len(s.ids)})" for s in sample_sets)
    log(f"medsyn evaluate-cxr: {sets}; {len(real_set.ids)} real {real_split}, {len(train_set.ids)} "
        f"{train_split} images at {options.size}^2")  # fmt: skip

    model, classifier_info = load_or_train_classifier(options.classifier, train_set, options, log)
    net, feature_label, trained = feature_network(options.features, options.seed)
    groups = [real_set, *sample_sets]
    bar = tqdm(groups + [train_set], desc="features", unit="set", disable=None if options.progress is None
               else not options.progress)  # fmt: skip
    feats = [image_features(net, s.images, options.device) for s in bar]
    predictions = [predict(model, s.images, options.device) for s in groups]

    real_truth = real_set.truth or []
    pairs = list(zip(real_truth, real_set.expected, strict=True))
    agreement = {
        name: {"n": sum(t[name] is not None for t, _ in pairs),
               "agree": sum(t[name] is not None and t[name] == e[name] for t, e in pairs)}
        for name in FINDINGS
    }  # fmt: skip
    metrics: dict[str, Any] = {
        "format": FORMAT,
        "inputs": {
            "samples": [str(f) for f in samples],
            "real": str(real),
            "real_split": real_split,
            "train": str(train),
            "train_split": train_split,
            "size": options.size,
            "features": options.features,
        },  # fmt: skip
        "features": {"label": feature_label, "trained": trained},
        "classifier": classifier_info,
        "real": {
            "source": real_set.source,
            "split": real_split,
            "n": len(real_set.ids),
            "reference": score_set(predictions[0], real_truth),  # against the cache's labels
            "ceiling": score_set(predictions[0], real_set.expected),  # against labels read from reports
            "report_label_agreement": agreement,
            "train_vs_real": {"n_train": len(train_set.ids), **distances(feats[-1], feats[0], trained)},
        },
        "samples": {},
    }
    for s, f, pred in zip(sample_sets, feats[1 : len(groups)], predictions[1:], strict=True):
        metrics["samples"][s.name] = {
            "source": s.source,
            "n": len(s.ids),
            "generators": s.meta["generators"],
            **distances(f, feats[0], trained),
            "findings": score_set(pred, s.expected),
        }
    metrics["seconds"] = round(time.perf_counter() - began, 1)
    return CxrEvaluation(metrics, groups, predictions)

"""Lobe label maps with the lungs in mind: each lung holds only its own lobes, each lobe is one piece.

A generated lobe channel decoded voxel by voxel carries the errors of a smooth, slightly noisy field: a
border between two labels passes through the labels between them (a ring of another lobe around a lung,
a sheet along a fissure), and noise leaves specks of one lobe inside another and of lung in the
background. `clean_lobes` removes them with what is known of lungs:
- the lungs are the non-background voxels; a component smaller than `min_lung` of the largest is a speck
  (background again), and so is a sheet or shell that a 1-voxel erosion all but removes (generated
  volumes draw such a ring of labels along the skin); background enclosed by lung is lung;
- each lung component is the patient's left or right lung by the side its labels mostly name; one that
  holds both (touching lungs) is split at the sagittal plane that best separates its left and right
  labels (RAS: axis 0 points to the patient's right, so the left lung lies at smaller x), and what the
  split leaves of a bridge between them is a speck too;
- a lung holds only its own lobes (left 1-2, right 3-5): another label becomes the nearest of its lung's
  lobes by the decoded value (`nearest`, from the channel's encoding);
- the 1-voxel border ring of the lungs and every piece of a lobe but its largest are filled from the
  nearest kept interior label.
The module knows labels only; `medsyn.data.channels` supplies `nearest` for its encodings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

LEFT_LOBES = (1, 2)  # left upper, left lower
RIGHT_LOBES = (3, 4, 5)  # right upper, right middle, right lower
MIN_LUNG = 1e-2  # lung components below this fraction of the largest one are specks
MIN_CORE = 0.2  # a lung keeps at least this fraction of its voxels under a 1-voxel erosion; a shell does not
MIXED = 0.2  # a component whose smaller side holds more than this fraction of its labels is both lungs
_CONN = ndimage.generate_binary_structure(3, 1)  # 6-connectivity, as the threshold segmenter's

# (where: an index tuple of voxels, allowed labels) -> the allowed label nearest to each voxel's value
Nearest = Callable[[tuple[np.ndarray, ...], Sequence[int]], np.ndarray]


def lungs(nonzero: np.ndarray, min_lung: float = MIN_LUNG) -> np.ndarray:
    """The lung mask of a (*S) non-background mask: specks dropped, enclosed background filled.
    Background touching the array's faces counts as outside the body."""
    comp, n = ndimage.label(nonzero, _CONN)
    if n == 0:
        return nonzero.copy()
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    core = np.bincount(comp[ndimage.binary_erosion(nonzero, _CONN)], minlength=n + 1)
    keep = (sizes >= min_lung * sizes.max()) & (core >= MIN_CORE * sizes)
    keep[0] = False
    lung = keep[comp]
    outside, _ = ndimage.label(~lung, _CONN)
    faces = [outside[(slice(None),) * a + (end,)] for a in range(lung.ndim) for end in (0, -1)]
    enclosed = np.ones(outside.max() + 1, bool)
    enclosed[np.concatenate([f.ravel() for f in faces])] = False  # (0, the lung itself, is on no face)
    return lung | enclosed[outside]


def right_lung(labels: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """True where `lung` is the patient's right lung: per 6-connected component, the side its labels
    (`labels`, 0 where unknown) mostly name; a component holding both lungs is split along axis 0."""
    comp, n = ndimage.label(lung, _CONN)
    n_right = np.bincount(comp[labels >= RIGHT_LOBES[0]], minlength=n + 1)
    n_left = np.bincount(comp[(labels > 0) & (labels < RIGHT_LOBES[0])], minlength=n + 1)
    right = (n_right > n_left)[comp]
    mixed = np.minimum(n_left, n_right) > MIXED * (n_left + n_right)
    boxes = ndimage.find_objects(comp)
    for c in np.nonzero(mixed[1:])[0] + 1:
        box = boxes[c - 1]
        inside, sub = comp[box] == c, labels[box]
        per_x_right = ((sub >= RIGHT_LOBES[0]) & inside).sum(axis=(1, 2))
        per_x_left = ((sub > 0) & (sub < RIGHT_LOBES[0]) & inside).sum(axis=(1, 2))
        # errors of splitting before plane s: right labels below it plus left labels from it on
        errors = np.concatenate([[0], np.cumsum(per_x_right)]) + per_x_left.sum()
        errors -= np.concatenate([[0], np.cumsum(per_x_left)])
        plane = int(np.argmin(errors))
        side = np.broadcast_to((np.arange(inside.shape[0]) >= plane)[:, None, None], inside.shape)
        right[box][inside] = side[inside]
    return right & lung


def _own_lobes(labels: np.ndarray, right: np.ndarray, offset: Sequence[int], nearest: Nearest) -> None:
    """Give every labelled voxel of a lung a lobe of that lung (in place): others become the nearest one."""
    for side, allowed in ((right, RIGHT_LOBES), (~right, LEFT_LOBES)):
        wrong = side & (labels > 0) & ((labels < allowed[0]) | (labels > allowed[-1]))
        where = np.nonzero(wrong)
        if where[0].size:
            labels[where] = nearest(tuple(w + o for w, o in zip(where, offset, strict=True)), allowed)


def _grow(lab: np.ndarray, kept: np.ndarray, lung: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Labels for all of `lung` from those of the `kept` voxels, grown one face-neighbour layer at a time
    inside the lung: a voxel takes the label of its nearest kept voxel when a neighbour already has it,
    else its neighbours' largest, of its own lung's lobes only. Growing from neighbours keeps each lobe
    in one piece; a lung component without kept voxels takes the nearest labels as they are."""
    nearest_kept = ndimage.distance_transform_edt(~kept, return_distances=False, return_indices=True)
    target = np.pad(lab[tuple(nearest_kept)], 1).ravel()
    out = np.pad(np.where(kept, lab, 0).astype(np.uint8), 1)  # a frame of 0: every voxel has 6 neighbours
    flat, is_right = out.ravel(), np.pad(right, 1).ravel()
    steps = np.array([s // out.itemsize for s in out.strides])
    offsets = np.concatenate([steps, -steps])
    todo = np.flatnonzero(np.pad(lung & ~kept, 1))
    while todo.size:
        n = flat[todo[:, None] + offsets]  # (voxels, 6) neighbour labels
        n = np.where((n > 0) & ((n >= RIGHT_LOBES[0]) == is_right[todo, None]), n, 0)  # of this lung
        best = n.max(1)
        new = best > 0
        if not new.any():
            break
        own = (n == target[todo, None]).any(1)
        flat[todo[new]] = np.where(own, target[todo], best)[new]
        todo = todo[~new]
    flat[todo] = target[todo]
    return out[(slice(1, -1),) * out.ndim]


def clean_lobes(labels: np.ndarray, nearest: Nearest, min_lung: float = MIN_LUNG) -> np.ndarray:
    """Lobe labels 0..5 (*S, 3-D RAS) decoded voxel by voxel -> labels as lungs have them (uint8; see the
    module docstring). `nearest(where, allowed)` picks, for the voxels `where` (indices into `labels`),
    the allowed label nearest to their decoded values. A few seconds at 256^3."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    lung = lungs(labels > 0, min_lung)
    found = ndimage.find_objects(lung.astype(np.uint8))
    if not found:
        return out
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in found[0])  # a voxel of margin where there is
    offset = [s.start for s in box]
    lung = lung[box]  # the lungs' box: the rest is background
    right = right_lung(np.where(lung, labels[box], 0), lung)
    lung = lungs(lung & right, min_lung) | lungs(lung & ~right, min_lung)  # bridges a split left behind
    right &= lung
    lab = np.where(lung, labels[box], 0).astype(np.uint8)  # (holes: 0 until filled)
    _own_lobes(lab, right, offset, nearest)
    kept = ndimage.binary_erosion(lung, _CONN) & (lab > 0)  # the interior, without the border ring
    if not kept.any():  # lungs too thin for an interior: keep their labels
        kept = lab > 0
    for label, where in enumerate(ndimage.find_objects(np.where(kept, lab, 0)), 1):
        if where is None:
            continue
        pieces, n = ndimage.label(kept[where] & (lab[where] == label), _CONN)
        if n > 1:
            largest = 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
            kept[where] &= (pieces == 0) | (pieces == largest)
    lab = _grow(lab, kept, lung, right)
    _own_lobes(lab, right, offset, nearest)  # a lung component without kept voxels of its own lobes
    out[box] = lab
    return out

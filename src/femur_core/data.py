"""Subjects on disk, cross-validation folds, and training samples.

Two folder layouts are understood:

- ``subNN_image.nii.gz`` + ``subNN_femur.nii.gz`` pairs (the development data);
- nnU-Net style ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz``.

In the first layout a subject may also have a label map of the structures
around the femur, ``subNN_bones.nii.gz`` or ``subNN_labels.nii.gz`` (0
background, 1 femur, 2 and up other bones such as ilium or sacrum). Training
recipes with ``aux_labels`` use it as an extra target, so that the network
learns the pelvis as a class of its own (see ``training.TrainConfig``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import Volume
from .volume_io import check_image, check_labels, check_mask, read_volume

__all__ = ["SubjectFiles", "Subject", "SUBJECT_FILE", "subject_file", "next_subject_id", "find_subjects",
           "load_subject", "load_subjects", "make_folds", "inner_split"]

#: The one definition of a data folder's file names: ``<id>_<kind>.nii[.gz]``, with kind ``image``
#: (the scan), ``femur`` (its binary mask) or ``bones`` / ``labels`` (a label map), e.g.
#: ``sub01_image.nii.gz`` + ``sub01_femur.nii.gz``.
SUBJECT_FILE = re.compile(r"^(?P<id>.+)_(?P<kind>image|femur|bones|labels)(?P<ext>\.nii(\.gz)?)$")
_LABEL_KINDS = ("bones", "labels")
_EXTS = (".nii.gz", ".nii")


def subject_file(folder: "str | os.PathLike", sid: str, kind: str) -> Path:
    """The file a subject's ``kind`` (image, femur, bones, labels) is written to (``.nii.gz``)."""
    if kind not in ("image", "femur", *_LABEL_KINDS):
        raise ValueError(f"unknown subject file kind {kind!r}")
    return Path(folder) / f"{sid}_{kind}.nii.gz"


def _existing(folder: Path, sid: str, kinds: tuple[str, ...]) -> Path | None:
    """The first existing ``<sid>_<kind>.nii.gz`` / ``.nii`` for the kinds in order, or None."""
    return next((folder / f"{sid}_{k}{e}" for k in kinds for e in _EXTS if (folder / f"{sid}_{k}{e}").exists()),
                None)


def next_subject_id(folder: "str | os.PathLike") -> str:
    """The next free ``subNN`` id of a data folder (``sub01`` for an empty or missing one).

    Any subject file (image, mask or label map, in any letter case) takes its number.
    """
    root = Path(folder)
    used = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.match(SUBJECT_FILE.pattern, p.name, re.IGNORECASE)
            if m and (n := re.fullmatch(r"sub(\d+)", m["id"], re.IGNORECASE)):
                used.append(int(n.group(1)))
    return f"sub{(max(used) + 1) if used else 1:02d}"


@dataclass(frozen=True)
class SubjectFiles:
    """Where one subject's image, femur mask and optional label map live."""

    id: str
    image: Path
    mask: Path
    labels: Path | None = None


@dataclass
class Subject:
    """One subject in memory: image, binary femur mask and optional label map, all on one grid."""

    id: str
    image: Volume
    mask: Volume
    labels: Volume | None = None


def _strip_nii(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name)


def find_subjects(folder: "str | os.PathLike") -> list[SubjectFiles]:
    """List the subjects of a data folder, sorted by id.

    Raises
    ------
    InputError
        The folder is missing, holds no subjects, or an image has no mask.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(root, "permission denied (folder not readable)")
    out: list[SubjectFiles] = []
    if (root / "imagesTr").is_dir():
        labels = root / "labelsTr"
        for img in sorted((root / "imagesTr").iterdir()):
            if not img.name.endswith((".nii", ".nii.gz")):
                continue
            case = re.sub(r"_0000$", "", _strip_nii(img.name))
            lab = next((labels / f"{case}{ext}" for ext in (".nii.gz", ".nii") if (labels / f"{case}{ext}").exists()), None)
            if lab is None:
                raise InputError(img, f"subject {case} has no mask in {labels}")
            out.append(SubjectFiles(case, img, lab))
    else:
        for img in sorted(root.iterdir()):
            m = SUBJECT_FILE.match(img.name)
            if not m or m["kind"] != "image":
                continue
            sid = m["id"]
            lab = _existing(root, sid, ("femur",))
            if lab is None:
                raise InputError(img, f"subject {sid} has no mask ({subject_file(root, sid, 'femur').name} missing)")
            out.append(SubjectFiles(sid, img, lab, _existing(root, sid, _LABEL_KINDS)))
    if not out:
        raise InputError(root, "no subjects found (expected subNN_image.nii.gz + subNN_femur.nii.gz pairs, "
                               "or imagesTr/ + labelsTr/)")
    return out


def load_subject(files: SubjectFiles) -> Subject:
    """Read and check one subject (3D, finite, binary mask and label map on the image grid)."""
    image = check_image(read_volume(files.image))
    mask = check_mask(read_volume(files.mask), image)
    labels = check_labels(read_volume(files.labels), image) if files.labels is not None else None
    return Subject(files.id, image, mask, labels)


def load_subjects(files: list[SubjectFiles]) -> list[Subject]:
    return [load_subject(f) for f in files]


def make_folds(ids: list[str], n_folds: int, seed: int = 0, strata: dict[str, float] | None = None) -> list[list[str]]:
    """Stratified random folds.

    Subjects are sorted by the stratification value (the femur volume in ml,
    when given) and dealt in blocks of ``n_folds``: each block is shuffled and
    spread over the folds, so every fold gets small and large femurs alike.
    Fold sizes differ by at most one. Deterministic for a given seed.
    """
    if n_folds < 2:
        raise ValueError("need at least 2 folds")
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} subjects cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = sorted(ids, key=lambda s: (strata or {}).get(s, 0.0)) if strata else list(rng.permutation(ids))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    start = 0
    for b in range(0, len(order), n_folds):
        block = list(order[b:b + n_folds])
        rng.shuffle(block)
        # rotate the starting fold so that leftovers do not always land in fold 0
        for j, sid in enumerate(block):
            folds[(start + j) % n_folds].append(sid)
        start = (start + len(block)) % n_folds
    return [sorted(f) for f in folds]


def inner_split(ids: list[str], fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split training subjects into (train, early-stopping validation), at least one each."""
    if len(ids) < 2:
        raise ValueError("need at least 2 subjects for an inner validation split")
    rng = np.random.default_rng(seed + 7919)
    perm = list(rng.permutation(sorted(ids)))
    n_val = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    return sorted(perm[n_val:]), sorted(perm[:n_val])

"""Pretraining on the synthetic generator, before the members learn the real scans.

Fifteen real scans are few. :func:`pretrain_synthetic` first trains one network
of the run's own architecture and grid on a cohort made by
:func:`femur_core.synthetic.make_cohort` (whole-pelvis scans like the
development data, with bone label maps when the run trains the "other bone"
class), for ``TrainConfig.pretrain_minutes`` of the run's budget; every
ensemble member then starts from its weights at the recipe's learning rate
(:func:`femur_core.ensemble.fit` does this when ``pretrain_minutes > 0``).

The synthetic network alone does not segment real scans (its femur class takes
in most of a real pelvis); what it passes on is a start: members that begin from
it reach a given validation DSC in fewer epochs. bench/README.md ("Accuracy V")
has the measurement.

Everything lives in one folder (``<run>/pretrain/``): the cohort
(``synthetic/``), the network (``net/``, resumable like any run) and
``pretrain.json`` (its minutes, written last: a folder without it is
unfinished and is resumed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .progress import CancelToken, ProgressCallback, ProgressEvent, emit
from .training import BUDGET_CLOCKS, TrainConfig
from .volume_io import write_json

__all__ = ["PRETRAIN_SEED", "PRETRAIN_GEOMETRY", "Pretrained", "pretrain_synthetic"]

#: Cohort seed of the synthetic pretraining scans (fixed: the same cohort for every run).
PRETRAIN_SEED = 7
#: Geometry preset and in-plane downsampling of the pretraining cohort
#: (:data:`femur_core.synthetic.GEOMETRIES`): whole-pelvis scans like the development data.
PRETRAIN_GEOMETRY = ("dev", 1)


@dataclass
class Pretrained:
    """What :func:`pretrain_synthetic` left: the network's model file and what it cost."""

    model: Path
    minutes: float  # of the run's budget clock, generation included
    epochs: int


def _cohort_complete(folder: Path, n: int, bones: bool, geometry: str, downsample: int) -> bool:
    from .data import subject_file
    from .synthetic import SYNTHETIC_MARKER

    marker = folder / SYNTHETIC_MARKER
    if not marker.exists():
        return False
    try:
        m = json.loads(marker.read_text())
    except ValueError:
        return False
    kinds = ("image", "femur", "bones") if bones else ("image", "femur")
    return (m.get("n") == n and m.get("seed") == PRETRAIN_SEED and bool(m.get("bones")) == bones
            and m.get("geometry") == geometry and m.get("downsample") == downsample
            and all(subject_file(folder, f"sub{i + 1:02d}", k).exists() for i in range(n) for k in kinds))


def pretrain_synthetic(
    config: TrainConfig,
    out_dir: "str | os.PathLike",
    *,
    bones: bool | None = None,
    geometry: str | None = None,
    downsample: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    fold: int | None = None,
) -> Pretrained:
    """Train one network of ``config``'s architecture and grid on a synthetic cohort.

    Parameters
    ----------
    config : TrainConfig
        The run's configuration: its model, grid, loss, augmentation and
        ``budget_clock``; ``pretrain_minutes`` is this network's budget and
        ``pretrain_subjects`` the cohort's size.
    out_dir : path-like
        Folder for the cohort, the network and ``pretrain.json``; an unfinished
        one is resumed, a finished one is returned as it is.
    bones : bool, optional
        Generate bone label maps and train the "other bone" class (default:
        ``config.aux_labels``). It must match the real run's resolved setting,
        or the weights do not fit its last layer.
    geometry, downsample
        Of :func:`femur_core.synthetic.make_cohort`; default
        :data:`PRETRAIN_GEOMETRY` (``"dev"`` at full size, the measured one).
    progress, cancel
        As in :func:`femur_core.training.train_model`.
    fold : int, optional
        Outer cross-validation fold, for progress messages.

    Returns
    -------
    Pretrained
    """
    from .data import find_subjects, load_subjects
    from .ensemble import fit
    from .synthetic import make_cohort

    out = Path(out_dir)
    done = out / "pretrain.json"
    if done.exists():
        d = json.loads(done.read_text())
        return Pretrained(out / "net" / "model.pt", float(d["minutes"]), int(d["epochs"]))
    bones = config.aux_labels if bones is None else bool(bones)
    geometry = PRETRAIN_GEOMETRY[0] if geometry is None else geometry
    downsample = PRETRAIN_GEOMETRY[1] if downsample is None else int(downsample)
    n = int(config.pretrain_subjects)
    if n < 2:
        raise ValueError(f"pretraining needs at least 2 synthetic subjects, got pretrain_subjects={n}")
    clock = BUDGET_CLOCKS[config.budget_clock]
    t0 = clock()
    cohort = out / "synthetic"
    if not _cohort_complete(cohort, n, bones, geometry, downsample):
        emit(progress, ProgressEvent("info", fold=fold, message=(
            f"pretraining: generating {n} synthetic scans{' with bone maps' if bones else ''}")))
        make_cohort(cohort, n=n, seed=PRETRAIN_SEED, geometry=geometry, downsample=downsample,
                    overwrite=True, bones=bones)
    subjects = load_subjects(find_subjects(cohort))
    pcfg = config.replace(ensemble=1, max_minutes=float(config.pretrain_minutes), pretrain_minutes=0.0,
                          aux_labels=bones)
    emit(progress, ProgressEvent("info", fold=fold, message=(
        f"pretraining on {n} synthetic scans for {config.pretrain_minutes:g} min ({config.budget_clock} clock)")))
    res = fit(subjects, pcfg, out / "net", progress=progress, cancel=cancel, fold=fold)
    minutes = (clock() - t0) / 60.0
    epochs = int(res.epochs)
    write_json(done, {"minutes": minutes, "epochs": epochs, "subjects": n, "seed": PRETRAIN_SEED,
                      "bones": bones, "geometry": geometry, "downsample": downsample,
                      "budget_minutes": float(config.pretrain_minutes), "budget_clock": config.budget_clock})
    return Pretrained(res.model_file, minutes, epochs)

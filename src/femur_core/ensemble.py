"""Fitting a model on a set of subjects: one network, or an ensemble of fold networks.

:func:`fit` is what ``python -m femur_core.train``, the cross-validation and
the GUI call to turn a list of subjects into a model file:

- ``config.ensemble == 1``: one network trained on an inner split of the
  subjects and early-stopped on the rest (the study's way); the threshold is
  the PRC-optimal one on the early-stopping subjects.
- ``config.ensemble == k > 1``: the subjects are dealt into ``k`` folds
  (stratified on femur volume) and one member network is trained per fold, on
  the other folds, early-stopped on its own fold (nnU-Net's way). Every
  subject is then predicted once by the member that never saw it; the
  threshold is the PRC-optimal one on those out-of-fold predictions of all
  subjects (not of the 2-3 of one inner split). ``config.max_minutes`` is the
  budget of the whole ensemble: each member gets ``max_minutes / k``.

The model file (``model.pt``) holds every member's weights (loaded without
unpickling); :func:`femur_core.inference.load_model` gives a
:class:`~femur_core.inference.LoadedModel` whose prediction averages the
members' probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as _dist
from .checkpoint import load_checkpoint, save_ensemble
from .data import Subject, inner_split, make_folds
from .errors import InputError
from .metrics import volume_ml
from .progress import CancelToken, ProgressCallback, ProgressEvent, emit
from .training import TrainConfig, TrainResult, train_model

__all__ = ["FitResult", "fit", "member_split"]


@dataclass
class FitResult:
    """A fitted model: the model file and how it was made."""

    model_file: Path
    threshold: float
    threshold_source: str
    members: list[TrainResult]
    split: list[dict]  # per member: {"train": [...], "early_stopping": [...]}
    minutes: float
    config: TrainConfig
    #: ensembles: per subject, the DSC of the member that never trained on it, at ``threshold``
    out_of_fold: list[dict] = dataclasses.field(default_factory=list)
    #: with ``pretrain_minutes``: the synthetic pretraining's minutes (budget clock), epochs and cohort size
    pretrain: dict | None = None

    @property
    def checkpoint(self) -> Path:
        return self.model_file

    @property
    def epochs(self) -> int:
        return int(sum(m.epochs for m in self.members))

    @property
    def stop_reason(self) -> str:
        return ",".join(sorted({m.stop_reason for m in self.members}))

    @property
    def history(self) -> list[dict]:
        return [dict(h, member=j) for j, m in enumerate(self.members) for h in m.history]


def member_split(subjects: list[Subject], config: TrainConfig, seed: int) -> list[tuple[list[str], list[str]]]:
    """(training ids, early-stopping ids) of every member.

    One member: the inner split of ``config.val_fraction``. ``k`` members:
    ``k`` folds stratified on femur volume, member ``j`` early-stopping on fold ``j``.
    """
    ids = [s.id for s in subjects]
    k = int(config.ensemble)
    if k <= 1:
        return [inner_split(ids, config.val_fraction, seed)]
    if len(ids) < k:
        raise InputError(None, f"an ensemble of {k} members needs at least {k} subjects, got {len(ids)}")
    strata = {s.id: volume_ml(s.mask.data, s.mask.spacing) for s in subjects}
    folds = make_folds(ids, k, seed + 104729, strata)
    return [(sorted(i for f, fi in enumerate(folds) if f != j for i in fi), sorted(folds[j])) for j in range(k)]


def _out_of_fold(results: list[TrainResult], splits, by_id: dict[str, Subject], config: TrainConfig,
                 cancel: CancelToken | None) -> tuple[float, list[dict]]:
    """Threshold and scores of the members' predictions of the subjects they never trained on.

    Every subject is predicted by the member that early-stopped on it, on the
    subject's own grid, as ``predict`` would (flip averaging, cleanup). The
    threshold is the PRC-optimal one of all these predictions together,
    kept within ``calibration.THRESHOLD_BOUNDS``; each subject's DSC at that threshold is
    an honest cross-validation estimate of one member (the averaged ensemble
    is not scored here: every subject was seen by the other members).
    """
    from .inference import load_model, predict_volume
    from .calibration import threshold_from_counts
    from .metrics import dice, histogram_counts

    preds, pos, neg = {}, None, None
    for res, (_, es) in zip(results, splits):
        model = load_model(res.checkpoint)
        for sid in es:
            s = by_id[sid]
            p = predict_volume(model, s.image, flip_tta=config.flip_tta, cleanup=config.cleanup,
                               device=config.device, precision=config.precision, cancel=cancel)
            ps, ns = histogram_counts(p.prob.data, s.mask.data.astype(bool))
            pos, neg = (ps, ns) if pos is None else (pos + ps, neg + ns)
            preds[sid] = p
    thr = threshold_from_counts(pos, neg) if pos is not None else 0.5
    scores = [{"subject": sid, "member": j,
               "dsc": float(dice(preds[sid].mask_at(thr).data > 0, by_id[sid].mask.data > 0))}
              for j, (_, es) in enumerate(splits) for sid in es]
    return thr, scores


def _pretrain(subjects, config: TrainConfig, out: Path, progress, cancel, fold):
    """Synthetic pretraining for :func:`fit`: (its model file, its record, the members' budget)."""
    from .pretrain import pretrain_synthetic
    from .training import _effective_config

    budget = config.max_minutes
    if budget and config.pretrain_minutes >= budget:
        raise ValueError(f"pretrain_minutes ({config.pretrain_minutes:g}) must be less than the budget "
                         f"({budget:g} min): the members need the rest")
    pre = pretrain_synthetic(config, out / "pretrain", bones=_effective_config(config, subjects).aux_labels,
                             progress=progress, cancel=cancel, fold=fold)
    if budget:  # the members share what the pretraining left (at least a minute)
        budget = max(budget - pre.minutes, 1.0)
    return pre.model, {"minutes": pre.minutes, "epochs": pre.epochs, "subjects": int(config.pretrain_subjects)}, budget


def fit(
    subjects: list[Subject],
    config: TrainConfig,
    out_dir: "str | os.PathLike",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    cache: dict | None = None,
    seed: int | None = None,
    fold: int | None = None,
    init_from: "str | os.PathLike | None" = None,
) -> FitResult:
    """Train the model of ``config`` on ``subjects``; resumable.

    Parameters
    ----------
    subjects : list of Subject
        Every subject the model may learn from (early stopping included).
    config : TrainConfig
        The recipe; ``config.ensemble`` members.
    out_dir : path-like
        Work folder: ``member<j>/`` (or the folder itself for one network)
        with each member's checkpoints, and ``model.pt``, the model file.
    seed : int, optional
        Seed of the inner split / member folds (default ``config.seed``).
    fold : int, optional
        Outer cross-validation fold, for progress messages.
    init_from : path-like, optional
        Fine-tune: every member starts from this model's weights.

    Returns
    -------
    FitResult
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = config.seed if seed is None else seed
    k = max(1, int(config.ensemble))
    if len(subjects) < 2:
        raise InputError(None, f"training needs at least 2 subjects (one for early stopping), got {len(subjects)}")
    if k > len(subjects):  # a small folder: as many members as subjects (each early-stops on one)
        emit(progress, ProgressEvent("info", fold=fold, message=(
            f"{len(subjects)} subjects are too few for {k} ensemble members: training {len(subjects)}")))
        k = len(subjects)
        config = config.replace(ensemble=k)
    from .inference import resolve_device

    resolve_device(config.device)  # an unavailable device is refused before any work
    # a folder holding a run of the other kind (one network <-> members) is never mixed into
    stale = (out / "last.pt") if k > 1 else next(iter(sorted(out.glob("member*/last.pt"))), None)
    if stale is not None and stale.exists():
        raise InputError(stale, "an earlier run with different settings is in this folder; "
                                "choose another output folder or delete it")
    splits = member_split(subjects, config, seed)
    by_id = {s.id: s for s in subjects}
    budget, pretrain = config.max_minutes, None
    if config.pretrain_minutes and config.pretrain_minutes > 0 and init_from is None:
        init_from, pretrain, budget = _pretrain(subjects, config, out, progress, cancel, fold)
    member_cfg = config.replace(max_minutes=budget / k if budget else budget)  # the members share the budget
    results: list[TrainResult] = []
    for j, (tr, es) in enumerate(splits):
        if k > 1 and j > 0:  # (not before the first: a refusal of the run stays the only line printed)
            emit(progress, ProgressEvent("info", fold=fold, message=(
                f"ensemble member {j + 1} of {k}: {len(tr)} training, {len(es)} early-stopping subjects")))
        cfg_j = member_cfg.replace(seed=config.seed + j) if k > 1 else member_cfg
        res = train_model([by_id[i] for i in tr], [by_id[i] for i in es], cfg_j, out / f"member{j}" if k > 1 else out,
                          progress=progress, cancel=cancel, resume=True, cache=cache, fold=fold,
                          init_from=init_from)
        results.append(res)
    eff = results[0].config
    oof: list[dict] = []
    if k > 1:
        thr, oof = _out_of_fold(results, splits, by_id, eff, cancel)
        source = f"out-of-fold predictions of {len(subjects)} subjects ({k} members)"
    else:
        thr = results[0].threshold
        source = f"early-stopping subjects ({len(splits[0][1])})"
    eff = dataclasses.replace(eff, seed=config.seed, max_minutes=config.max_minutes)
    model_file = out / "model.pt"
    states = [load_checkpoint(r.checkpoint)["state_dict"] for r in results]
    if _dist.is_main():  # under torchrun rank 0 alone writes
        save_ensemble(model_file, states, eff.to_dict(), threshold=thr, threshold_source=source,
                      out_of_fold_json=json.dumps(oof), members_json=json.dumps([{"train": tr, "early_stopping": es,
                                                "epochs": r.epochs, "stop_reason": r.stop_reason,
                                                "minutes": r.minutes, "threshold": r.threshold}
                                               for (tr, es), r in zip(splits, results)]))
    _dist.barrier()
    del states
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return FitResult(model_file, thr, source, results,
                     [{"train": tr, "early_stopping": es} for tr, es in splits],
                     float(sum(r.minutes for r in results)), eff, oof, pretrain)


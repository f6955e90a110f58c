"""Accuracy benchmark driver: our model and nnU-Net v2 on the same folds, budget and metrics.

Run by ``bench/accuracy/run.sh`` with the project's ``.venv`` python (see bench/README.md):

1. ours: ``python -m femur_core.cv --data DIR --folds K --budget-minutes B --out WORK/ours``
   (the honest protocol and the real-data default recipe, cpu-2d, untouched);
2. the peer: the subjects as a nnU-Net raw dataset (symlinks), ``nnUNetv2_plan_and_preprocess -c 2d``,
   ``splits_final.json`` = OUR folds from ``WORK/ours/splits.json``, then per fold
   ``nnUNetv2_train ... -tr nnUNetTrainer_TimeBudget -device cpu`` under the same budget and
   ``nnUNetv2_predict`` of the fold's held-out cases from ``checkpoint_final.pth``;
3. both systems' predicted masks are scored here by the same function, femur_core.metrics.evaluate
   on each subject's original grid with the image spacing (both femurs as one label);
4. table.py prints the table and writes the JSON (bench/results/accuracy-<date>.json).

Every step is resumable: run the same command again and finished folds are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from femur_core.volume_io import write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER_BIN = HERE / ".venv-peer" / "bin"
DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_Femur"
TRAINER = "nnUNetTrainer_TimeBudget"
FULL_PROTOCOL = (4, 30.0)

sys.path.insert(0, str(HERE))
import convergence  # noqa: E402  (bench/accuracy/convergence.py)
import peer_plans  # noqa: E402  (bench/accuracy/peer_plans.py)
import table  # noqa: E402  (bench/accuracy/table.py)


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# running a step: wall clock and peak memory (resident set of the whole process tree, sampled)
# --------------------------------------------------------------------------------------------

class _TreeRSS(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self._halt = pid, every_s, 0, threading.Event()

    def run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            self._halt.wait(self.every_s)

    def stop(self) -> float:
        self._halt.set()
        self.join(timeout=5)
        return round(self.peak / 2**30, 2)


def run_step(cmd: list[str], env: dict | None = None, what: str = "") -> tuple[float, float]:
    """Run a command (output to this terminal); return (wall minutes, peak tree RSS in GiB)."""
    log(f"{what}: {' '.join(map(str, cmd))}")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], env=env)
    mon = _TreeRSS(proc.pid)
    mon.start()
    rc = proc.wait()
    minutes = (time.monotonic() - t0) / 60
    peak = mon.stop()
    if rc != 0:
        raise SystemExit(f"error: {what} failed (exit code {rc}) after {minutes:.1f} min: {' '.join(map(str, cmd))}")
    log(f"{what}: done in {minutes:.2f} min, peak memory {peak:.2f} GiB")
    return minutes, peak


# --------------------------------------------------------------------------------------------
# scoring: one function for both systems
# --------------------------------------------------------------------------------------------

def score_masks(preds: dict[str, Path], files: dict) -> list[dict]:
    """femur_core.metrics.evaluate of each predicted mask file against the reference mask, on the
    subject's original grid with the image spacing (HD95: femur_core's default, the MONAI max)."""
    from femur_core.data import load_subject
    from femur_core.volume_io import read_volume
    from femur_core.metrics import evaluate

    rows = []
    for sid in sorted(preds):
        s = load_subject(files[sid])
        pred = read_volume(preds[sid])
        if pred.shape != s.mask.shape:
            raise SystemExit(f"error: {preds[sid]}: shape {pred.shape} is not the reference's {s.mask.shape}")
        if not np.allclose(pred.affine, s.image.affine, atol=1e-3):
            raise SystemExit(f"error: {preds[sid]}: its affine differs from the image's (not on the original grid)\n"
                             f"{pred.affine}\nvs\n{s.image.affine}")
        m = evaluate(np.asarray(pred.data) > 0, s.mask.data.astype(bool), s.image.spacing)
        rows.append({"subject": sid, **{k: round(v, 6) for k, v in m.to_dict().items()}})
    return rows


# --------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------

def ours_extra_args(args) -> list:
    """femur_core.cv options beyond the recipe's defaults that the benchmark passes through."""
    extra: list = []
    if args.ours_ensemble is not None:
        extra += ["--ensemble", args.ours_ensemble]
    if args.budget_clock != "wall":
        extra += ["--budget-clock", args.budget_clock]
    return extra


def run_ours(args, data: Path, work: Path, files: dict) -> dict:
    run = work / "ours"
    extra = ours_extra_args(args)
    cmd = [sys.executable, "-m", "femur_core.cv", "--data", data, "--folds", args.folds,
           "--budget-minutes", args.budget_minutes, "--out", run, *extra]
    if (run / "config.json").exists():
        log(f"ours: resuming {run} (femur_core.cv refuses it if the recipe changed since; then remove that "
            f"folder or pass --work NEW)")
    minutes, peak = run_step(cmd, dict(os.environ), "ours: femur_core.cv")
    report = json.loads((run / "report.json").read_text())
    if not report["summary"].get("complete", True):
        raise SystemExit(f"error: {run} is missing folds {report['summary'].get('missing_folds')}")
    config = json.loads((run / "config.json").read_text())
    folds, max_diff = [], 0.0
    for f in sorted(report["folds"], key=lambda f: f["fold"]):
        preds = {s["subject"]: run / "predictions" / f"{s['subject']}_mask.nii.gz" for s in f["subjects"]}
        missing = [p for p in preds.values() if not p.exists()]
        if missing:
            raise SystemExit(f"error: ours: no prediction file {missing[0]}")
        rows = score_masks(preds, files)
        by_id = {s["subject"]: s for s in f["subjects"]}
        for r in rows:  # the same numbers as femur_core.cv's own scoring, re-read from the mask files
            for k in ("dsc", "precision", "recall", "hd95_mm", "assd_mm"):
                a, b = r[k], by_id[r["subject"]][k]
                if np.isfinite(a) and np.isfinite(b):
                    max_diff = max(max_diff, abs(a - b))
        curve = convergence.ours_curve(run / f"fold{f['fold']}")
        folds.append({"fold": f["fold"], "test_subjects": f["test_subjects"],
                      "train_subjects": f["train_subjects"],
                      "early_stopping_subjects": f.get("early_stopping_subjects"),
                      "train_minutes": round(f["train_minutes"], 3), "epochs": f.get("epochs"),
                      "stop_reason": f.get("stop_reason"), "threshold": f.get("threshold"),
                      "budget_minutes": args.budget_minutes, "curve": curve, "subjects": rows})
    if max_diff > 1e-4:
        log(f"warning: ours re-scored from the mask files differs from femur_core.cv's report by up to {max_diff:.2g}")
    train = config.get("train", {})
    return {
        "system": "ours",
        "description": f"femur_core {config.get('environment', {}).get('femur_core')}, "
                       f"model {train.get('model', {}).get('name')}, protocol {config.get('protocol')}, "
                       f"default real-data recipe (cpu-2d)",
        "command": " ".join(["python -m femur_core.cv", "--data", str(data), "--folds", str(args.folds),
                             "--budget-minutes", str(args.budget_minutes), "--out", str(run), *map(str, extra)]),
        "budget_clock": args.budget_clock, "ensemble": train.get("ensemble"),
        "train_minutes_definition": "femur_core's training-loop clock (after the subjects are resampled "
                                    "to the model grid); the budget caps it",
        "wall_minutes_total": round(minutes, 2),
        "peak_rss_gib": peak,
        "rescore_max_abs_diff": max_diff,
        "settings": {"protocol": config.get("protocol"), "model": train.get("model"),
                     "grid": train.get("grid"), "loss": train.get("loss"), "lr": train.get("lr"),
                     "batch_size": train.get("batch_size"), "augment": train.get("augment"),
                     "max_minutes": train.get("max_minutes"), "flip_tta": train.get("flip_tta"),
                     "cleanup": train.get("cleanup"), "torch_threads": config.get("environment", {}).get("torch_threads")},
        "folds": folds,
    }


# --------------------------------------------------------------------------------------------
# the peer: nnU-Net v2, 2d configuration, CPU
# --------------------------------------------------------------------------------------------

def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def peer_budget(args) -> float:
    """The peer's per-fold budget: --peer-budget-minutes, else the same as ours."""
    return args.peer_budget_minutes if args.peer_budget_minutes is not None else args.budget_minutes


def peer_configuration(args) -> str:
    return peer_plans.CPU_CONFIGURATION if args.peer_plans == "cpu" else "2d"


def peer_env(args, nn: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(nn / "raw"), "nnUNet_preprocessed": str(nn / "preprocessed"),
        "nnUNet_results": str(nn / "results"),
        "nnUNet_n_proc_DA": str(args.peer_da_workers),  # nnU-Net's data-augmentation worker processes
        "nnUNet_def_n_proc": str(args.peer_np),
        "nnUNet_compile": "f",
        "FEMUR_BENCH_BUDGET_MINUTES": str(peer_budget(args)),
        "FEMUR_BENCH_BUDGET_CLOCK": args.budget_clock,
        "FEMUR_BENCH_ITERS_PER_EPOCH": str(args.peer_iters_per_epoch),
        "FEMUR_BENCH_VAL_ITERS": str(args.peer_val_iters),
        "FEMUR_BENCH_BATCH_SIZE": str(args.peer_batch_size or ""),
        "PATH": f"{PEER_BIN}{os.pathsep}{env.get('PATH', '')}",
        "MPLBACKEND": "Agg",
    })
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


class PlansView:
    """One configuration of nnU-Net plans with its inheritance resolved (a shallow update, as nnU-Net does)."""

    def __init__(self, plans: dict, name: str):
        confs = plans["configurations"]
        chain, c = [], name
        while c is not None:
            chain.append(confs[c])
            c = confs[c].get("inherits_from")
        self.conf: dict = {}
        for d in reversed(chain):
            self.conf.update(d)

    def get(self, key, default=None):
        return self.conf.get(key, default)


def run_peer(args, work: Path, files: dict, folds: list[list[str]]) -> dict:
    nn = work / "nnunet"
    env = peer_env(args, nn)
    ids = sorted(files)
    # 1. raw dataset (symlinks to the data folder; nothing copied)
    raw = nn / "raw" / DATASET
    for sid in ids:
        _link(files[sid].image, raw / "imagesTr" / f"{sid}_0000.nii.gz")
        _link(files[sid].mask, raw / "labelsTr" / f"{sid}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "femur": 1},
        "numTraining": len(ids), "file_ending": ".nii.gz",
        "name": "Femur", "description": "proximal femurs (both sides, one label), napari-femur accuracy benchmark",
    }, indent=2))
    # 2. plan and preprocess (2d only), once per work folder
    conf = peer_configuration(args)
    pre_done = nn / "preprocess.json"
    pre = json.loads(pre_done.read_text()) if pre_done.exists() else {}
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0
    plan_env = dict(env, nnUNet_n_proc_DA=str(max(1, args.peer_da_workers)))
    if conf != "2d" and not pre:  # the edited plans only: fingerprint and plans, no 2d preprocessing
        pre_done = nn / "plan.json"
        pre = json.loads(pre_done.read_text()) if pre_done.exists() else {}
    if pre.get("subjects") == ids:
        log(f"nnU-Net: planning/preprocessing already done ({pre['minutes']:.1f} min)")
    else:
        cmd = ["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", args.peer_np,
               "-npfp", args.peer_np, "--verify_dataset_integrity"]
        if conf != "2d":
            cmd.append("--no_pp")
        minutes, peak = run_step(cmd, plan_env, "nnU-Net: plan" + (" and preprocess" if conf == "2d" else ""))
        pre = {"minutes": round(minutes, 2), "peak_rss_gib": peak, "subjects": ids}
        write_json(pre_done, pre)
    plans_file = nn / "preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    if conf != "2d":  # the plans edited to this CPU: our grid, patch, batch and network size
        pre_cpu_done = nn / f"preprocess-{conf}.json"
        pre_cpu = json.loads(pre_cpu_done.read_text()) if pre_cpu_done.exists() else {}
        edited = peer_plans.add_cpu_configuration(plans, base="2d", name=conf)
        if pre_cpu.get("subjects") == ids and plans["configurations"].get(conf) == edited["configurations"][conf]:
            log(f"nnU-Net: {conf} preprocessing already done ({pre_cpu['minutes']:.1f} min)")
        else:
            write_json(plans_file, edited, indent=4)  # atomically: nnU-Net reads it
            plans = edited
            log(f"nnU-Net: added configuration {conf} to {plans_file}: "
                f"{json.dumps(peer_plans.describe(plans['configurations'][conf]))}")
            minutes, peak = run_step(["nnUNetv2_preprocess", "-d", DATASET_ID, "-c", conf, "-np", args.peer_np],
                                     plan_env, f"nnU-Net: preprocess {conf}")
            pre_cpu = {"minutes": round(minutes, 2), "peak_rss_gib": peak, "subjects": ids}
            write_json(pre_cpu_done, pre_cpu)
        pre = {**pre, "minutes": round(pre["minutes"] + pre_cpu["minutes"], 2),
               "peak_rss_gib": max(pre.get("peak_rss_gib") or 0, pre_cpu.get("peak_rss_gib") or 0)}
    # 3. OUR folds as nnU-Net's splits_final.json (train = the other folds, val = the fold)
    splits = [{"train": sorted(i for j, f in enumerate(folds) if j != k for i in f), "val": sorted(folds[k])}
              for k in range(len(folds))]
    splits_file = nn / "preprocessed" / DATASET / "splits_final.json"
    write_json(splits_file, splits, indent=2)
    if args.peer_prepare_only:
        log("nnU-Net: --peer-prepare-only: planned and preprocessed; no training")
        raise SystemExit(0)
    c2d = PlansView(plans, conf)
    # 4. per fold: train under the budget, predict the fold's cases, score
    budget = peer_budget(args)
    out_folds = []
    fold_settings = {"budget_minutes": budget, "tta": bool(args.peer_tta),
                     "batch_size": args.peer_batch_size, "iters_per_epoch": args.peer_iters_per_epoch,
                     "val_iters": args.peer_val_iters, "da_workers": args.peer_da_workers}
    if conf != "2d" or args.budget_clock != "wall":  # keys only where they differ from older runs' records
        fold_settings.update(configuration=conf, budget_clock=args.budget_clock)
    # a run with other settings keeps its own records and results (e.g. a longer peer budget)
    tag = "" if fold_settings.get("configuration", "2d") == "2d" and budget == args.budget_minutes \
        else f"-{conf}-b{budget}"
    results_root = nn / f"results{tag}"
    env["nnUNet_results"] = str(results_root)
    which = list(range(len(folds))) if args.peer_folds is None else [k for k in args.peer_folds if k < len(folds)]
    for k in which:
        test_ids = folds[k]
        done = nn / f"fold{k}{tag}.json"
        if done.exists():
            r = json.loads(done.read_text())
            if r["test_subjects"] == sorted(test_ids) and r.get("settings") == fold_settings:
                log(f"nnU-Net: fold {k} already done")
                out_folds.append(r)
                continue
        fold_dir = results_root / DATASET / f"{TRAINER}__nnUNetPlans__{conf}" / f"fold_{k}"
        if fold_dir.exists():
            shutil.rmtree(fold_dir)  # an interrupted earlier attempt: start the fold afresh
        train_min, train_peak = run_step(
            ["nnUNetv2_train", DATASET_ID, conf, k, "-tr", TRAINER, "-device", "cpu"], env,
            f"nnU-Net: train fold {k} ({budget} min budget, {args.budget_clock} clock, configuration {conf})")
        tb = json.loads((fold_dir / "time_budget.json").read_text())
        pin, pout = nn / f"predict_in{tag}" / f"fold_{k}", nn / f"predictions{tag}" / f"fold_{k}"
        for d in (pin, pout):
            if d.exists():
                shutil.rmtree(d)
        for sid in test_ids:
            _link(files[sid].image, pin / f"{sid}_0000.nii.gz")
        cmd = ["nnUNetv2_predict", "-i", pin, "-o", pout, "-d", DATASET_ID, "-c", conf, "-tr", TRAINER,
               "-f", k, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "0", "-nps", "0"]
        if not args.peer_tta:
            cmd.append("--disable_tta")
        pred_min, pred_peak = run_step(cmd, env, f"nnU-Net: predict fold {k}")
        rows = score_masks({sid: pout / f"{sid}.nii.gz" for sid in test_ids}, files)
        best = fold_dir / "checkpoint_best.pth"  # unused (we predict from checkpoint_final); 270 MB
        if best.exists():
            best.unlink()
        # "train min": on the budget's clock, as ours reports it (CPU clock: the trainer loop's CPU
        # minutes; wall clock: the wall clock around nnUNetv2_train, as before)
        train_minutes = tb["loop_minutes"] if args.budget_clock == "cpu" else train_min
        r = {"fold": k, "test_subjects": sorted(test_ids), "train_subjects": splits[k]["train"],
             "train_minutes": round(train_minutes, 3), "train_wall_minutes": round(train_min, 3),
             "loop_minutes": round(tb["loop_minutes"], 3), "loop_cpu_minutes": tb.get("loop_cpu_minutes"),
             "loop_wall_minutes": tb.get("loop_wall_minutes"), "budget_minutes": budget,
             "epochs": tb["epochs"], "iterations": tb["iterations"], "stop_reason": tb["stop_reason"],
             "best_ema_pseudo_dice": tb.get("best_ema_pseudo_dice"),
             "last_ema_pseudo_dice": tb.get("last_ema_pseudo_dice"),
             "torch_threads": tb.get("torch_threads"),
             "predict_minutes": round(pred_min, 2), "peak_rss_gib_train": train_peak,
             "peak_rss_gib_predict": pred_peak, "settings": fold_settings,
             "curve": convergence.peer_curve(fold_dir / "time_budget.json"), "subjects": rows}
        write_json(done, r, indent=2)
        out_folds.append(r)
        log(f"nnU-Net: fold {k}: DSC {np.mean([s['dsc'] for s in rows]):.4f} ({tb['iterations']} iterations "
            f"in {tb['epochs']} epochs, {train_minutes:.1f} {args.budget_clock} min)")
    peer_version = subprocess.run([str(PEER_BIN / "python"), "-c",
                                   "import importlib.metadata as m, torch; print(m.version('nnunetv2'), torch.__version__)"],
                                  capture_output=True, text=True).stdout.split()
    return {
        "system": "nnU-Net",
        "description": f"nnU-Net v2 {peer_version[0] if peer_version else '?'} (torch "
                       f"{peer_version[1] if len(peer_version) > 1 else '?'}), {conf} configuration"
                       f"{' (plans edited to this CPU: our grid, patch, batch and network size)' if conf != '2d' else ''}"
                       f", CPU, {TRAINER} (nnUNetTrainer + {args.budget_clock}-clock budget)",
        "train_minutes_definition": (
            "CPU minutes of the trainer's loop (time.process_time of the training process, data augmentation "
            "in it: nnUNet_n_proc_DA=0), the clock the budget caps, as femur_core's --budget-clock cpu"
            if args.budget_clock == "cpu" else
            "wall clock around nnUNetv2_train (process start to exit); the budget caps "
            "the trainer's own loop (loop_minutes), as femur_core's budget does"),
        "budget_minutes": budget, "budget_clock": args.budget_clock,
        "plans": args.peer_plans, "configuration_settings": peer_plans.describe(c2d.conf),
        "preprocessing_minutes": pre["minutes"],
        "preprocessing_peak_rss_gib": pre.get("peak_rss_gib"),
        "settings": {
            "configuration": conf, "trainer": TRAINER, "checkpoint": "checkpoint_final.pth",
            "tta_mirroring": bool(args.peer_tta), "iterations_per_epoch": args.peer_iters_per_epoch,
            "val_iterations_per_epoch": args.peer_val_iters, "nnUNet_n_proc_DA": args.peer_da_workers,
            "patch_size": c2d.get("patch_size"), "batch_size": args.peer_batch_size or c2d.get("batch_size"),
            "batch_size_from_plans": args.peer_batch_size is None,
            "spacing": c2d.get("spacing"), "normalization": c2d.get("normalization_schemes"),
            "lr_schedule": "poly (exponent 0.9) over the elapsed share of the budget, from 1e-2",
            "budget_clock": args.budget_clock,
            "torch_threads": os.environ.get("OMP_NUM_THREADS") or os.cpu_count(),
        },
        "folds": out_folds,
    }


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pelvic_mri"))
    ap.add_argument("--folds", type=int, default=FULL_PROTOCOL[0])
    ap.add_argument("--budget-minutes", type=float, default=FULL_PROTOCOL[1])
    ap.add_argument("--skip-peer", action="store_true", help="run and report our side only")
    ap.add_argument("--subset", type=int, help="smoke tests only: the first N subjects (sorted ids)")
    ap.add_argument("--work", help="work folder (default bench/accuracy/work/k<K>-b<B>[-n<N>])")
    ap.add_argument("--results", default=str(REPO / "bench" / "results"), help="where the JSON goes")
    ap.add_argument("--peer-tta", choices=["on", "off"], default="on",
                    help="nnU-Net's test-time mirroring (its default: on)")
    ap.add_argument("--peer-da-workers", type=int, default=1, help="nnUNet_n_proc_DA")
    ap.add_argument("--peer-np", type=int, default=2, help="nnU-Net preprocessing processes")
    ap.add_argument("--peer-iters-per-epoch", type=int, default=10)
    ap.add_argument("--peer-val-iters", type=int, default=1)
    ap.add_argument("--peer-batch-size", type=int,
                    help="replace the batch size of nnU-Net's plans (default: keep it; a CPU concession, recorded)")
    ap.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                    help="what the per-fold budget counts, for both systems: wall clock (default) or the "
                         "training process's CPU time (ours: femur_core.cv --budget-clock cpu; the peer: "
                         "FEMUR_BENCH_BUDGET_CLOCK=cpu, use with --peer-da-workers 0)")
    ap.add_argument("--ours-ensemble", type=int,
                    help="femur_core.cv --ensemble N (default: the recipe's; 1 = one member of it per fold)")
    ap.add_argument("--peer-plans", choices=["default", "cpu"], default="default",
                    help="nnU-Net's own plans (2d configuration; default) or the plans edited to this CPU: a "
                         "configuration 2d_cpu with our grid (1.8 mm in-plane), patch 128 x 128, batch 4 and a "
                         "5-stage U-Net with 24-384 features (bench/accuracy/peer_plans.py)")
    ap.add_argument("--peer-budget-minutes", type=float,
                    help="the peer's per-fold budget when it differs from ours (default: --budget-minutes); "
                         "its records and results are kept apart from the equal-budget run's")
    ap.add_argument("--peer-folds", type=int, nargs="+",
                    help="train and predict the peer on these folds only, in this order (default: all); the table says so")
    ap.add_argument("--peer-prepare-only", action="store_true",
                    help="plan and preprocess the peer's data (needs our splits.json), then stop")
    args = ap.parse_args(argv)
    args.peer_tta = args.peer_tta == "on"
    if args.budget_minutes == int(args.budget_minutes):
        args.budget_minutes = int(args.budget_minutes)
    if args.peer_budget_minutes is not None and args.peer_budget_minutes == int(args.peer_budget_minutes):
        args.peer_budget_minutes = int(args.peer_budget_minutes)
    if args.budget_clock == "cpu" and not args.skip_peer and args.peer_da_workers != 0:
        log("warning: --budget-clock cpu with --peer-da-workers > 0: the peer's augmentation workers' CPU time is "
            "not counted (use --peer-da-workers 0)")

    data = Path(args.data)
    if not data.is_dir():
        print(f"skip: the data folder {data} is absent; nothing was run (pass --data DIR)")
        return 0
    from femur_core.data import find_subjects

    files = {f.id: f for f in find_subjects(data)}
    tag = f"k{args.folds}-b{args.budget_minutes}" + (f"-n{args.subset}" if args.subset else "")
    work = Path(args.work) if args.work else HERE / "work" / tag
    work.mkdir(parents=True, exist_ok=True)
    if args.subset:
        keep = sorted(files)[: args.subset]
        sub = work / "data"
        for sid in keep:
            _link(files[sid].image, sub / files[sid].image.name)
            _link(files[sid].mask, sub / files[sid].mask.name)
        files = {f.id: f for f in find_subjects(sub)}
        data = sub
    full = (args.folds, float(args.budget_minutes)) == FULL_PROTOCOL and not args.subset
    systems = "ours" if args.skip_peer else f"ours and nnU-Net v2 ({peer_configuration(args)}, CPU)"
    clock = "" if args.budget_clock == "wall" else f" {args.budget_clock}"
    protocol = (f"{args.folds}-fold CV x {args.budget_minutes}{clock} min training per fold on {len(files)} subjects, "
                f"{systems}" + ("" if full else f"; SHRUNK (the full protocol is {FULL_PROTOCOL[0]} folds x "
                                                 f"{FULL_PROTOCOL[1]:.0f} min per fold)")
                + (f"; SMOKE subset of {args.subset} subjects" if args.subset else ""))
    if not args.skip_peer and peer_budget(args) != args.budget_minutes:
        protocol += (f"; the peer given {peer_budget(args)}{clock} min per fold "
                     f"({peer_budget(args) / args.budget_minutes:g} x ours)")
    if not args.skip_peer and args.peer_folds is not None:
        protocol += f"; the peer on fold(s) {', '.join(map(str, args.peer_folds))} only"
    n_sys = 1 if args.skip_peer else 2
    log(f"protocol: {protocol}")
    log(f"training alone: {args.folds} x {args.budget_minutes} min x {n_sys} = "
        f"{args.folds * args.budget_minutes * n_sys / 60:.1f} h, plus set-up, preprocessing and prediction")
    log(f"work folder: {work}")
    t0 = time.monotonic()

    if args.peer_prepare_only:  # our folds must exist already (our run makes them first)
        folds = json.loads((work / "ours" / "splits.json").read_text())["folds"]
        run_peer(args, work, files, folds)
    ours = run_ours(args, data, work, files)
    write_json(work / "results-ours.json", ours, indent=2)
    folds = json.loads((work / "ours" / "splits.json").read_text())["folds"]
    peer = None
    if not args.skip_peer:
        peer = run_peer(args, work, files, folds)
        tag = "" if peer["plans"] == "default" and peer["budget_minutes"] == args.budget_minutes \
            else f"-{peer_configuration(args)}-b{peer['budget_minutes']}"
        write_json(work / f"results-nnunet{tag}.json", peer, indent=2)

    meta = {"protocol": protocol, "folds": args.folds, "budget_minutes": args.budget_minutes,
            "budget_clock": args.budget_clock, "ours_ensemble": args.ours_ensemble,
            "peer_plans": None if args.skip_peer else args.peer_plans,
            "peer_budget_minutes": None if args.skip_peer else peer_budget(args),
            "full_protocol": full, "subset": args.subset, "n_subjects": len(files),
            "data": str(Path(args.data).resolve()), "splits": folds,
            "total_wall_minutes": round((time.monotonic() - t0) / 60, 1),
            "command": "bash bench/accuracy/run.sh " + " ".join(sys.argv[1:])}
    result = table.build(ours, peer, meta)
    out = table.write_json(result, Path(args.results) if not args.subset else work)  # before printing
    write_json(work / ("accuracy.json" if peer is None or not tag else f"accuracy{tag}.json"), result, indent=2)
    print(table.format_text(result))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

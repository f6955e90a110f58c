"""Where the time of ``python -m femur_core.predict`` goes, one model against an ensemble.

Measures, on one scan (a real one where ../shared/data/pelvic_mri exists, else a
synthetic hip MRI):

- the whole command as a user runs it (``python -m femur_core.predict MODEL SCAN``),
  process start-up included, wall-clock, median of ``--reps`` runs;
- inside one process: importing femur_core and torch, loading the model, reading the
  scan, bringing it to the model grid, the network (per member, flip averaging
  included), back to the source grid with threshold and cleanup, writing the two
  NIfTI files.

The peer is a single network of the same architecture (the default before the
ensemble), timed in the same run. A third row times the same model inside one process
with its batch norm left unfolded (as ``load_model`` loaded it before 2026-11-30 05:30;
:func:`femur_core.models.fuse.fold_batch_norm`). Without ``--model`` the models are built with
random weights from the default recipe (timing does not depend on the weights).

    python bench/predict_time.py [--model MODEL_DIR] [--scan SCAN] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_process(model_path: str, scan: str, out: str, fold: bool = True) -> dict:
    t = {}
    t0 = time.perf_counter()
    import numpy as np
    import torch  # noqa: F401

    import femur_core.model_loading

    from femur_core.inference import load_model, postprocess, predict_array, resolve_amp, resolve_device
    from femur_core.preprocess import prepare
    from femur_core.volume import from_canonical, to_canonical
    from femur_core.volume_io import PROB_SLOPE, read_volume, write_volume  # noqa: F401
    t["import"] = time.perf_counter() - t0

    if not fold:  # the peer row: the checkpoint's networks as they are
        femur_core.model_loading.fold_batch_norm = lambda net: net.eval()
    t0 = time.perf_counter()
    model = load_model(model_path)
    t["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = read_volume(scan)
    t["read_scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep = prepare(image, model.grid)
    t["to_model_grid"] = time.perf_counter() - t0
    dev = resolve_device("auto")
    amp = resolve_amp("auto", dev)
    t0 = time.perf_counter()
    prob = None
    for net in model.members:
        p = predict_array(net, model.model_config, prep.image, device=dev, amp=amp, flip_tta=True)
        prob = p if prob is None else prob + p
    prob /= len(model.members)
    t["network"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob_c = prep.restore_canonical(prob)
    mask_c = postprocess(prob_c, model.threshold, True, to_canonical(image)[0].data)
    prob_v, mask_v = from_canonical(prob_c, prep.reorientation), from_canonical(mask_c, prep.reorientation)
    t["to_source_grid_threshold_cleanup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_volume(prob_v, Path(out) / "x_prob.nii.gz", dtype=np.uint8, slope=PROB_SLOPE, overwrite=True)
    write_volume(mask_v, Path(out) / "x_mask.nii.gz", dtype=np.uint8, overwrite=True)
    t["write_outputs"] = time.perf_counter() - t0
    t["members"] = len(model.members)
    t["slices_on_model_grid"] = int(prep.image.shape[0])
    t["model_grid_yx"] = list(prep.image.shape[1:])
    return t


def _make_models(folder: Path, members: int) -> Path:
    from femur_core.checkpoint import save_ensemble
    from femur_core.models.registry import build_model
    from femur_core.training import recipe

    cfg = recipe("cpu-2d").replace(ensemble=members)
    cfg.model.n_classes = 3
    states = [build_model(cfg.model).state_dict() for _ in range(members)]
    path = folder / f"random-{members}.pt"
    save_ensemble(path, states, cfg.to_dict(), threshold=0.5)
    return path


def _scan(arg: str | None, tmp: Path) -> str:
    if arg:
        return arg
    real = ROOT.parent / "shared" / "data" / "pelvic_mri" / "sub01_image.nii.gz"
    if real.exists():
        return str(real)
    from femur_core.synthetic import make_cohort

    make_cohort(tmp / "syn", n=1, seed=0)
    return str(sorted((tmp / "syn").glob("*_image.nii.gz"))[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model (file or folder); default: random-weight default recipe")
    ap.add_argument("--peer-model", help="single-network model to compare with (default: random weights)")
    ap.add_argument("--scan")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--in-process", nargs=3, metavar=("MODEL", "SCAN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--no-fold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.in_process:
        print(json.dumps(_in_process(*args.in_process, fold=not args.no_fold)))
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = _scan(args.scan, tmp)
        ours = args.model or str(_make_models(tmp, 3))
        peer = args.peer_model or str(_make_models(tmp, 1))
        res["scan"] = Path(scan).name
        res["weights"] = "trained" if args.model else "random (timing only)"
        for name, model in (("ours", ours), ("single network", peer)):
            walls, parts = [], []
            for r in range(args.reps):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "femur_core.predict", model, scan, "--out", str(tmp / f"o{r}"),
                                "--overwrite"], check=True, capture_output=True)
                walls.append(time.perf_counter() - t0)
                out = subprocess.run([sys.executable, __file__, "--in-process", model, scan, str(tmp)], check=True,
                                     capture_output=True, text=True)
                parts.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(p[k] for p in parts) for k in parts[0] if isinstance(parts[0][k], float)}
            res[name] = {"whole_command_s": statistics.median(walls), "whole_command_all_s": walls,
                         "parts_s": med, "members": parts[0]["members"],
                         "slices": parts[0]["slices_on_model_grid"], "grid_yx": parts[0]["model_grid_yx"]}
        parts = [json.loads(subprocess.run([sys.executable, __file__, "--in-process", ours, scan, str(tmp), "--no-fold"],
                                           check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                 for _ in range(args.reps)]
        res["ours, batch norm unfolded"] = {
            "parts_s": {k: statistics.median(p[k] for p in parts) for k in parts[0] if isinstance(parts[0][k], float)},
            "members": parts[0]["members"]}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"predict-time-{stamp}.json").write_text(json.dumps(res, indent=2))
    print(f"scan {res['scan']} ({res['weights']} weights), median of {args.reps}")
    for name in ("ours", "single network"):
        r = res[name]
        print(f"{name:15s} {r['members']} member(s): whole command {r['whole_command_s']:.2f} s; in process: " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["parts_s"].items()))
    r = res["ours, batch norm unfolded"]
    print("ours, batch norm unfolded: in process: " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts_s"].items()))
    print(f"network, folded / unfolded: {res['ours']['parts_s']['network'] / r['parts_s']['network']:.2f}")
    print(f"ratio ours / single network, whole command: {res['ours']['whole_command_s'] / res['single network']['whole_command_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

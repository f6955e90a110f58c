"""Where the time of ``python -m femur_core.predict`` goes: the ensemble with and without ROI restriction,
against one network.

Rows (each model predicted by the real command, ``predict --roi-restrict on|off``):

- ``ours, ROI on``: the model (an ensemble with flip averaging), the views after the first
  restricted to the first view's region of interest (:mod:`femur_core.roi`);
- ``ours, ROI off``: the same model, every view over the whole volume;
- ``single network``: one network of the same architecture, flip averaging, every view in full
  (the default before the ensemble).

For every row, on real scans where ../shared/data/pelvic_mri exists (else synthetic hip MRIs):

- the whole command for one scan as a user runs it (``python -m femur_core.predict MODEL SCAN``),
  process start-up included, wall-clock, median of ``--reps`` runs;
- inside one process, for that scan: importing femur_core and torch, loading the model, reading
  the scan, bringing it to the model grid, the views (network passes:
  :func:`femur_core.inference.predict_views` less the separately timed model grid), back to the
  source grid with threshold and cleanup, writing the two NIfTI files (median of ``--reps``);
- one command over ``--batch`` scans (``python -m femur_core.predict MODEL s1 s2 ...``): start-up
  and model load paid once; per scan the time ``predict`` itself records (read, predict with the
  uncertainty map, write every output: ``OUT/.status/<name>.json``), and the command's wall-clock
  less their sum (start-up, import, model load).

Without ``--model`` the models are built with random weights from the default recipe: timing of the
full passes does not depend on the weights, but the ROI of random weights is meaningless (use a
trained model for the ROI rows).

    python bench/predict_time.py --model /work/runs/final-crop [--peer-model M] [--scan S] [--reps 3]
        [--batch 5] [--rows roi-on,roi-off,single]
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
DATA = ROOT.parent / "shared" / "data" / "pelvic_mri"


def _in_process(model_path: str, scan: str, out: str, roi: bool) -> dict:
    t = {}
    t0 = time.perf_counter()
    import numpy as np
    import torch  # noqa: F401

    from femur_core.inference import load_model, postprocess, predict_views
    from femur_core.preprocess import prepare
    from femur_core.roi import box_fraction
    from femur_core.volume import from_canonical, to_canonical
    from femur_core.volume_io import PROB_SLOPE, read_volume, write_volume
    t["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(model_path)
    t["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = read_volume(scan)
    t["read_scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep = prepare(image, model.grid)
    t["to_model_grid"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = predict_views(model, image, flip_tta=True, roi=roi)
    t["network"] = time.perf_counter() - t0 - t["to_model_grid"]
    t0 = time.perf_counter()
    prob_c = prep.restore_canonical(run.mean)
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
    t["roi_box_fraction"] = 1.0 if run.roi is None else box_fraction(run.roi, prep.image.shape)
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


def _scans(arg: str | None, n: int, tmp: Path, data: Path = DATA) -> list[str]:
    """``n`` scans: ``arg`` first where given, then the real subjects of ``data``, else synthetic ones."""
    real = sorted(str(p) for p in data.glob("sub*_image.nii.gz")) if data.is_dir() else []
    if not real:
        from femur_core.synthetic import make_cohort

        make_cohort(tmp / "syn", n=max(n, 1), seed=0)
        real = sorted(str(p) for p in (tmp / "syn").glob("*_image.nii.gz"))
    first = [arg] if arg else []
    return (first + [s for s in real if s != arg])[:max(n, 1)]


def _command(model: str, scans: list[str], out: Path, flags: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "femur_core.predict", model, *scans, "--out", str(out), "--overwrite",
                    *flags], check=True, capture_output=True)
    return time.perf_counter() - t0


def _batch(model: str, scans: list[str], out: Path, flags: list[str]) -> dict:
    """One command over every scan: its wall-clock, each scan's own seconds, and the rest."""
    wall = _command(model, scans, out, flags)
    per = [json.loads(p.read_text())["seconds"] for p in sorted((out / ".status").glob("*.json"))]
    return {"scans": len(scans), "wall_s": wall, "per_scan_s": per, "per_scan_median_s": statistics.median(per),
            "per_scan_after_first_median_s": statistics.median(per[1:]) if len(per) > 1 else per[0],
            "startup_import_load_s": wall - sum(per)}


def _python_start(reps: int) -> float:
    """Median wall-clock of a bare ``python -c pass``: the interpreter's own start-up."""
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def _row(model: str, flags: list[str], roi: bool, scans: list[str], reps: int, tmp: Path) -> dict:
    walls, parts = [], []
    for r in range(reps):
        walls.append(_command(model, scans[:1], tmp / f"o{r}", flags))
        out = subprocess.run([sys.executable, __file__, "--in-process", model, scans[0], str(tmp),
                              "on" if roi else "off"], check=True, capture_output=True, text=True)
        parts.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0] if isinstance(parts[0][k], float)}
    batch = _batch(model, scans, Path(tempfile.mkdtemp(dir=tmp, prefix="batch-")), flags)
    return {"flags": flags, "whole_command_s": statistics.median(walls), "whole_command_all_s": walls,
            "parts_s": med, "members": parts[0]["members"], "slices": parts[0]["slices_on_model_grid"],
            "grid_yx": parts[0]["model_grid_yx"], "batch": batch}


def _print(res: dict) -> None:
    print(f"scan {res['scan']} ({res['weights']} weights), median of {res['reps']}; batch of {res['batch_scans']}")
    print(f"bare python start-up {res['python_start_s']:.2f} s")
    for name, r in res["rows"].items():
        b = r["batch"]
        print(f"{name:15s} {r['members']} member(s): whole command {r['whole_command_s']:.2f} s; in process: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["parts_s"].items()))
        print(f"{'':15s} batch of {b['scans']}: {b['wall_s']:.1f} s = start-up+import+load {b['startup_import_load_s']:.1f}"
              f" + per scan median {b['per_scan_median_s']:.2f} s (after the first {b['per_scan_after_first_median_s']:.2f};"
              f" all {', '.join(f'{s:.2f}' for s in b['per_scan_s'])})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model (file or folder); default: random-weight default recipe")
    ap.add_argument("--peer-model", help="single-network model to compare with (default: random weights)")
    ap.add_argument("--scan")
    ap.add_argument("--data", default=str(DATA), help="folder of real scans (subNN_image.nii.gz)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5, help="scans in the one-command batch")
    ap.add_argument("--rows", default="roi-on,roi-off,single", help="rows to time (default: all three)")
    ap.add_argument("--in-process", nargs=4, metavar=("MODEL", "SCAN", "OUT", "ROI"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.in_process:
        m, s, o, roi = args.in_process
        print(json.dumps(_in_process(m, s, o, roi == "on")))
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps, "rows": {},
                 "command": " ".join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = _scans(args.scan, args.batch, tmp, Path(args.data))
        res["python_start_s"] = _python_start(args.reps)
        ours = args.model or str(_make_models(tmp, 3))
        peer = args.peer_model or str(_make_models(tmp, 1))
        res.update(scan=Path(scans[0]).name, batch_scans=[Path(s).name for s in scans],
                   weights="trained" if args.model else "random (timing only)")
        rows = {"roi-on": ("ours, ROI on", ours, True), "roi-off": ("ours, ROI off", ours, False),
                "single": ("single network", peer, False)}
        for key in args.rows.split(","):
            name, model, roi = rows[key]
            flags = ["--roi-restrict", "on" if roi else "off"]
            res["rows"][name] = _row(model, flags, roi, scans, args.reps, tmp)
            print(f"{name}: done", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from femur_core.volume_io import write_json
    write_json(Path(args.out) / f"predict-time-{stamp}.json", res, indent=2)
    _print(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Segment scans with a trained model: ``python -m femur_core.predict MODEL IMAGE... --out DIR``.

MODEL is a checkpoint (``.pt``) or a model / run folder. Each IMAGE (a NIfTI
file, TIFF stack or DICOM series folder; a folder of NIfTI files is a cohort)
gives ``<name>_prob.nii.gz`` (femur probability, stored as uint8 in 1/255 steps
with the NIfTI scaling slope) and ``<name>_mask.nii.gz`` in DIR, on the input's
own grid with its affine. ``--format`` writes the mask as NRRD, MHA or a DICOM
SEG referencing the source series instead (or as well: ``--format nii.gz,seg``).
Beside it: ``<name>_sides.nii.gz`` (1 = the subject's right femur, 2 = the left,
from the scan's orientation) and ``<name>_uncertainty.nii.gz`` (the disagreement
of the model's views, 0 - 1 in 1/255 steps); one row per scan is appended to
``femur_measurements.csv`` (per-femur volumes in mL and voxels, threshold, model,
uncertainty score; safe to share between shards). ``--mesh`` adds
``<name>_femur_right.stl`` / ``.ply`` (and left) in world millimetres (RAS+), and
``--report`` writes ``report.html``, a cohort page sorted worst first.
``--series UID-or-number`` picks one series of a DICOM folder that holds several. Existing outputs are kept unless ``--overwrite``.
``--shard i/n`` processes a deterministic 1/n of the inputs; ``--summary``
lists what is done, missing or failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .analysis import LABEL_NAMES, append_csv_rows, check_csv_header, measurement_row, side_labels
from .cli import TqdmProgress, dump_json, run_main
from .errors import FemurError, InputError
from .export import MASK_FORMATS, output_path, write_mask
from .inference import load_model, predict_volume
from .uncertainty import predict_with_views
from .volume_io import NIFTI_SUFFIXES, PROB_SLOPE, TIFF_SUFFIXES, atomic_write_bytes, read_volume, write_volume

__all__ = ["main", "expand_inputs", "output_name", "select_shard"]


def output_name(path: Path) -> str:
    """Base name of the outputs of one input (``sub01_image.nii.gz`` -> ``sub01_image``)."""
    return re.sub(r"(\.nii(\.gz)?|\.tiff?|\.dcm)$", "", path.name, flags=re.I)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given; a folder holding NIfTI/TIFF files is expanded (sorted), a DICOM folder kept."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES)
                           and not re.search(r"_(femur|bones|mask|prob|sides|uncertainty)\.nii", f.name))
            out.extend(files if files else [p])
        else:
            out.append(p)
    return out


def select_shard(inputs: list[Path], i: int, n: int) -> list[Path]:
    """Shard ``i`` of ``n`` (0-based): every n-th input in the order of the output names.

    Deterministic on every machine that lists the same inputs, and balanced
    (shard sizes differ by at most one), so the jobs of an array finish together.
    """
    order = sorted(range(len(inputs)), key=lambda j: output_name(inputs[j]))
    return [inputs[j] for j in sorted(order[i::n])]


def _parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or int(m.group(2)) < 1 or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise InputError(None, f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m femur_core.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint file or model / run folder")
    ap.add_argument("images", nargs="+", help="scans: NIfTI, TIFF, DICOM folder, or a folder of scans")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--threshold", type=float, help="default: the model's PRC-optimal threshold")
    ap.add_argument("--no-tta", action="store_true",
                    help="no left-right flip averaging (default: the model's own setting, TrainConfig.flip_tta)")
    ap.add_argument("--no-cleanup", action="store_true",
                    help="keep every connected component (default: the model's own setting, TrainConfig.cleanup)")
    ap.add_argument("--roi-restrict", choices=["on", "off"],
                    help="on: the first view (member 0) runs over the whole scan, the other views (members, "
                         "mirror) only over the box where it found the femur; off: every view over the whole "
                         "scan (default: the model's own setting, else on; off with --no-cleanup)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--format", default="nii.gz",
                    help="mask format(s), comma-separated: " + ", ".join(MASK_FORMATS)
                    + " (seg = DICOM SEG, needs a DICOM input); default nii.gz")
    ap.add_argument("--series", help="DICOM folder with several series: the SeriesInstanceUID or SeriesNumber to read")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--shard", help="i/n: process only shard i of n (0-based)")
    ap.add_argument("--summary", action="store_true", help="list done / missing / failed inputs and exit")
    ap.add_argument("--csv", help="measurements table to append to (default: OUT/femur_measurements.csv)")
    ap.add_argument("--no-uncertainty", action="store_true",
                    help="no uncertainty map / score (the views are averaged as usual)")
    ap.add_argument("--mesh", action="store_true", help="also write a surface per femur as STL and PLY (mm, RAS+)")
    ap.add_argument("--mesh-smooth", type=int, default=10, metavar="N",
                    help="Taubin smoothing iterations of the meshes, volume kept (default 10; 0: none)")
    ap.add_argument("--report", action="store_true", help="write OUT/report.html: the cohort, worst first")
    return ap


def _status_path(out: Path, name: str) -> Path:
    return out / ".status" / f"{name}.json"


def _parse_formats(text: str) -> list[str]:
    fmts = [f.strip().lower().lstrip(".") for f in (text or "").split(",") if f.strip()]
    bad = [f for f in fmts if f not in MASK_FORMATS]
    if bad or not fmts:
        raise InputError(None, f"--format: unknown format {', '.join(bad) or repr(text)} "
                               f"(choose from {', '.join(MASK_FORMATS)})")
    return list(dict.fromkeys(fmts))


def _summary(inputs: list[Path], out: Path, formats: tuple[str, ...] = ("nii.gz",)) -> int:
    done, missing, failed = [], [], []
    for p in inputs:
        name = output_name(p)
        if all(output_path(out / f"{name}_mask", f).exists() for f in formats):
            done.append(name)
        elif _status_path(out, name).exists() and json.loads(_status_path(out, name).read_text()).get("error"):
            failed.append((name, json.loads(_status_path(out, name).read_text())["error"]))
        else:
            missing.append(name)
    print(f"done {len(done)}, missing {len(missing)}, failed {len(failed)} of {len(inputs)}")
    for n in missing:
        print(f"missing: {n}")
    for n, e in failed:
        print(f"failed: {n}: {e}")
    return 0 if not missing and not failed else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    inputs = expand_inputs(args.images)
    names = [output_name(p) for p in inputs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(None, f"several inputs would write the same outputs: {', '.join(sorted(dup))}")
    formats = _parse_formats(args.format)
    if args.summary:
        return _summary(inputs, out, tuple(formats))
    if args.shard:
        i, n = _parse_shard(args.shard)
        inputs = select_shard(inputs, i, n)
    model = load_model(args.model)
    csv_path = Path(args.csv) if args.csv else out / "femur_measurements.csv"
    check_csv_header(csv_path)  # another table there: stop before any work
    bar = TqdmProgress()
    n_fail = 0
    for p in inputs:
        name = output_name(p)
        prob_path = out / f"{name}_prob.nii.gz"
        mask_paths = [output_path(out / f"{name}_mask", f) for f in formats]
        mask_path = mask_paths[0]
        if not args.overwrite and (prob_path.exists() or any(m.exists() for m in mask_paths)):
            print(f"{mask_path}: exists, kept (use --overwrite to replace)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        written: list[Path] = []
        try:
            image = read_volume(p, series=args.series)
            if "seg" in formats and not image.meta.get("dicom"):
                raise InputError(p, "--format seg needs a DICOM input (a DICOM SEG references its source series)")
            opts = dict(flip_tta=False if args.no_tta else None, cleanup=False if args.no_cleanup else None,
                        threshold=args.threshold, roi=None if args.roi_restrict is None else args.roi_restrict == "on",
                        device=args.device, precision=args.precision, progress=bar)
            if args.no_uncertainty:
                pred, views = predict_volume(model, image, **opts), None
            else:
                views = predict_with_views(model, image, **opts)
                pred = views.prediction
                if views.n_views < 2:  # one view (--no-tta, one network): nothing to compare
                    views = None
            bar.close()
            written.append(write_volume(pred.prob, prob_path, overwrite=args.overwrite, dtype=np.uint8, slope=PROB_SLOPE))
            for m in mask_paths:
                written.append(write_mask(pred.mask, m, source=image, overwrite=args.overwrite))
            row = _write_analysis(out, name, p, pred, views, model, args, written)
            append_csv_rows(csv_path, [row])  # last: a row only for a scan whose outputs all exist
        except BaseException as exc:
            for w in written:  # never leave half a result (a prob map without its mask)
                w.unlink(missing_ok=True)
            if not isinstance(exc, FemurError):
                raise
            bar.close()
            n_fail += 1
            print(f"error: {exc}", file=sys.stderr)
            try:
                atomic_write_bytes(_status_path(out, name), dump_json({"input": str(p), "error": str(exc)}),
                                   overwrite=True)
            except OSError:
                pass  # best effort: the disk may be full; the error is printed above
            continue
        atomic_write_bytes(_status_path(out, name), dump_json({"input": str(p), "error": None,
                                                               "seconds": time.perf_counter() - t0}), overwrite=True)
        unc = f", uncertainty {row['uncertainty']}" if row["uncertainty"] else ""
        print(f"{mask_path}  femur right {row['right_ml']} ml, left {row['left_ml']} ml, "
              f"threshold {pred.threshold:.3f}{unc}, {time.perf_counter() - t0:.1f} s")
    if args.report and csv_path.exists():
        from .cohort_report import write_cohort_report

        print(f"report: {write_cohort_report(out, csv_path=csv_path)}")
    return 2 if n_fail else 0


def _write_analysis(out: Path, name: str, src: Path, pred, views, model, args, written: list[Path]) -> dict:
    """Label map, uncertainty map and meshes of one scan (appended to ``written``); its CSV row."""
    from datetime import datetime, timezone

    labels = side_labels(pred.mask)
    written.append(write_volume(labels, out / f"{name}_sides.nii.gz", overwrite=args.overwrite, dtype=np.uint8))
    if views is not None:
        written.append(write_volume(views.uncertainty, out / f"{name}_uncertainty.nii.gz", overwrite=args.overwrite,
                                    dtype=np.uint8, slope=PROB_SLOPE))
    if args.mesh:
        from .mesh import femur_meshes, save_mesh

        for k, mesh in femur_meshes(labels, smooth_iterations=args.mesh_smooth).items():
            side = LABEL_NAMES[k].split()[0]
            for ext in ("stl", "ply"):
                written.append(save_mesh(mesh, out / f"{name}_femur_{side}.{ext}", overwrite=args.overwrite))
    return measurement_row(
        name, labels, input_path=str(src.resolve()), threshold=pred.threshold,
        model=str(getattr(model, "path", "") or ""), uncertainty=None if views is None else views.score,
        written_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


if __name__ == "__main__":
    run_main(main)

"""Segment scans with a trained model: ``python -m femur_core.predict MODEL IMAGE... --out DIR``.

MODEL is a checkpoint (``.pt``) or a model / run folder. Each IMAGE (a NIfTI
file, TIFF stack or DICOM series folder; a folder of NIfTI files is a cohort)
gives ``<name>_prob.nii.gz`` (femur probability, stored as uint8 in 1/255 steps
with the NIfTI scaling slope) and ``<name>_mask.nii.gz`` in DIR, on the input's
own grid with its affine. ``--format`` writes the mask as NRRD, MHA or a DICOM
SEG referencing the source series instead (or as well: ``--format nii.gz,seg``).
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

from .cli import TqdmProgress, dump_json, run_main
from .errors import FemurError, InputError
from .export import MASK_FORMATS, output_path, write_mask
from .inference import load_model, predict_volume
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
                           and not re.search(r"_(femur|bones|mask|prob)\.nii", f.name))
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
    ap.add_argument("--no-tta", action="store_true", help="no left-right flip averaging")
    ap.add_argument("--no-cleanup", action="store_true", help="keep every connected component")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--format", default="nii.gz",
                    help="mask format(s), comma-separated: " + ", ".join(MASK_FORMATS)
                    + " (seg = DICOM SEG, needs a DICOM input); default nii.gz")
    ap.add_argument("--series", help="DICOM folder with several series: the SeriesInstanceUID or SeriesNumber to read")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--shard", help="i/n: process only shard i of n (0-based)")
    ap.add_argument("--summary", action="store_true", help="list done / missing / failed inputs and exit")
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
            pred = predict_volume(model, image, flip_tta=not args.no_tta, cleanup=not args.no_cleanup,
                                  threshold=args.threshold, device=args.device, precision=args.precision,
                                  progress=bar)
            bar.close()
            written.append(write_volume(pred.prob, prob_path, overwrite=args.overwrite, dtype=np.uint8, slope=PROB_SLOPE))
            for m in mask_paths:
                written.append(write_mask(pred.mask, m, source=image, overwrite=args.overwrite))
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
        vox = int(pred.mask.data.sum())
        ml = vox * float(np.prod(image.spacing)) / 1000
        print(f"{mask_path}  femur {ml:.1f} ml, threshold {pred.threshold:.3f}, {time.perf_counter() - t0:.1f} s")
    return 2 if n_fail else 0


if __name__ == "__main__":
    run_main(main)

"""How sensitive is the DSC of these references to the smallest possible disagreements?

For every reference mask of a data folder, the DSC of the mask against itself changed by:

* one in-plane pixel everywhere on its boundary (dilated / eroded by the in-plane 4-neighbourhood
  within each slice: the smallest change of a binary mask on the scan's own grid);
* one end slice: its first or last femur slice (along the thickest axis) dropped, or the last
  femur slice repeated on the next one.

It reads the references only (no model). The point: a mean DSC goal of 0.95 leaves room for less
than one pixel of disagreement on every boundary voxel together with no end-slice disagreement::

    python bench/accuracy/sensitivity.py --data ../shared/data/pelvic_mri [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from femur_core.data import find_subjects
from femur_core.metrics import dice
from femur_core.volume_io import read_volume, write_json

ROWS = ("dilate 1 px", "erode 1 px", "drop first slice", "drop last slice", "add a slice")


def changes(mask: np.ndarray, slice_axis: int) -> dict[str, float]:
    """DSC of ``mask`` against each of its smallest changes (see the module text)."""
    m = np.moveaxis(mask > 0, slice_axis, 0)
    st = np.zeros((1, 3, 3), dtype=bool)
    st[0] = ndi.generate_binary_structure(2, 1)
    zs = np.flatnonzero(m.any(axis=(1, 2)))
    first, last = m.copy(), m.copy()
    first[zs[0]] = False
    last[zs[-1]] = False
    added = m.copy()
    if zs[-1] + 1 < m.shape[0]:
        added[zs[-1] + 1] = m[zs[-1]]
    variants = (ndi.binary_dilation(m, st), ndi.binary_erosion(m, st), first, last, added)
    return {name: dice(v, m) for name, v in zip(ROWS, variants)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "pelvic_mri"))
    ap.add_argument("--out", help="folder for the results JSON (default: print only)")
    a = ap.parse_args(argv)
    if not Path(a.data).is_dir():
        print(f"skip: the data folder {a.data} is absent; this benchmark reads real reference masks. Nothing was run.")
        return 0
    rows = []
    print(f"{'subject':8s} " + " ".join(f"{r:>16s}" for r in ROWS) + "   slices")
    for files in find_subjects(a.data):
        ref = read_volume(files.mask)
        axis = int(np.argmax(ref.spacing))
        row = changes(ref.data, axis)
        n = int(np.moveaxis(ref.data > 0, axis, 0).any(axis=(1, 2)).sum())
        rows.append({"subject": files.id, "femur_slices": n, **row})
        print(f"{files.id:8s} " + " ".join(f"{row[r]:16.4f}" for r in ROWS) + f"   {n}")
    mean = {r: float(np.mean([x[r] for x in rows])) for r in ROWS}
    lo = {r: float(np.min([x[r] for x in rows])) for r in ROWS}
    print(f"{'mean':8s} " + " ".join(f"{mean[r]:16.4f}" for r in ROWS))
    print(f"{'lowest':8s} " + " ".join(f"{lo[r]:16.4f}" for r in ROWS))
    if a.out:
        path = write_json(Path(a.out) / f"reference-sensitivity-{time.strftime('%Y%m%d-%H%M%S')}.json",
                          {"rows": rows, "mean": mean, "lowest": lo, "command": " ".join(["python", *sys.argv])})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How reliable is the single-femur side rule? (femur_core.analysis.side_from_shape)

For every reference mask of a data folder holding both femurs, the two-femur rule
(the femur towards RAS +x is the right one) labels the femurs; then each femur is
given ALONE to the single-femur rule (head top medial to the bone's centre), as a
single-hip scan would be. Also 40 synthetic single-hip scans whose side is known.
Prints agreement and the smallest |offset| (the rule's margin, mm)::

    nice -n 10 python bench/sides.py --data ../shared/data/pelvic_mri
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pelvic_mri"))
    args = ap.parse_args(argv)

    from femur_core.analysis import LEFT, RIGHT, side_from_shape, side_labels
    from femur_core.synthetic import make_subject
    from femur_core.volume_io import read_volume

    def world(vol, sel):
        a = vol.affine
        return np.argwhere(sel).astype(float) @ a[:3, :3].T + a[:3, 3]

    results = []  # (what, truth, got, offset)
    data = Path(args.data)
    for f in sorted(data.glob("sub*_femur.nii.gz")) if data.is_dir() else []:
        m = read_volume(f)
        lab = side_labels(m)
        if lab.meta["side_method"] != "pair":
            print(f"{f.name}: not two femurs ({lab.meta['side_method']}), skipped")
            continue
        for k in (RIGHT, LEFT):
            got, off = side_from_shape(world(m, lab.data == k))
            results.append((f"{f.name[:5]} {'right' if k == RIGHT else 'left'}", k, got, off))
    for geometry, ds in (("tiny", 1), ("dev", 2)):
        for seed in range(10):
            for hips, k in (("right", RIGHT), ("left", LEFT)):
                _, m = make_subject(seed, geometry, hips=hips, downsample=ds)
                got, off = side_from_shape(world(m, m.data > 0))
                results.append((f"synthetic {geometry} seed {seed} {hips}", k, got, off))
    for what, k, got, off in results:
        print(f"{what:34s} offset {off:+7.1f} mm {'ok' if got == k else 'WRONG'}")
    real = [r for r in results if not r[0].startswith("synthetic")]
    syn = [r for r in results if r[0].startswith("synthetic")]
    for name, rs in (("real", real), ("synthetic", syn)):
        if rs:
            ok = sum(r[1] == r[2] for r in rs)
            print(f"{name}: {ok} of {len(rs)} right; smallest |offset| {min(abs(r[3]) for r in rs):.1f} mm")
    return 0 if all(r[1] == r[2] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

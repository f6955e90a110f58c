"""GUI speed: the Femur Threshold widget in a real napari viewer on a 60 x 512 x 512 map.

Run under a virtual X server (bench/run_gui_speed.sh does it):
  threshold update = slider value -> mask layer + curve point + scores (goal <= 50 ms);
  PR-curve recomputation = a new reference chosen -> histogram curves + plot (goal <= 200 ms).
Prints medians with min-max and writes bench/results/gui-speed-<date>.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stats(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def main() -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_femur._threshold_widget import ThresholdWidget

    viewer = napari.Viewer(show=True)
    rng = np.random.default_rng(0)
    shape = (60, 512, 512)
    zz, yy, xx = np.ogrid[:60, :512, :512]
    d = np.sqrt(((zz - 30) / 10.0) ** 2 + ((yy - 300) / 60.0) ** 2 + ((xx - 200) / 50.0) ** 2)
    prob = np.clip(1.5 - d + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    ref = (d < 1.0).astype(np.uint8)
    viewer.add_image(prob, name="p", metadata={"femur": {"role": "probability", "mask_layer": "m"}})
    viewer.add_labels(np.zeros(shape, np.uint8), name="m")
    refs = [viewer.add_labels(ref, name="ref"), viewer.add_labels(np.roll(ref, 3, axis=2), name="ref2")]
    panel = ThresholdWidget(viewer)
    viewer.window.add_dock_widget(panel)
    app = QApplication.instance()
    upd, curve = [], []
    for i in range(6):
        t0 = time.perf_counter()
        panel.ref_combo.set_layer(refs[i % 2])
        app.processEvents()
        curve.append(time.perf_counter() - t0)
    for t in np.linspace(0.2, 0.8, 15):
        t0 = time.perf_counter()
        panel.set_threshold(float(t), cleanup=False)
        app.processEvents()
        upd.append(time.perf_counter() - t0)
    res = {"threshold_update": stats(upd), "pr_curve_recompute": stats(curve), "shape": list(shape),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for k, goal in (("threshold_update", 0.05), ("pr_curve_recompute", 0.2)):
        s = res[k]
        print(f"{k:<20} median {1000 * s['median_s']:7.1f} ms ({1000 * s['min_s']:.1f}-{1000 * s['max_s']:.1f})"
              f"  goal <= {1000 * goal:.0f} ms")
    out = ROOT / "bench" / "results" / f"gui-speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from femur_core.volume_io import write_json
    write_json(out, res, indent=2)
    print(f"written {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

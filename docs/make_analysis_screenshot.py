"""Screenshots of the Femur Analysis dock on SYNTHETIC data, in a real napari viewer.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1920x1200x24" \\
        python docs/make_analysis_screenshot.py --model MODEL_DIR

MODEL_DIR: a model trained on a synthetic cohort drawn at a quarter of the
development matrix, e.g. the one ``docs/make_report_screenshot.sh`` trains
(``WORKDIR/model``). Opens a synthetic scan at that size, segments it with
Segment Femur, then in Femur Analysis labels right / left, meshes, computes the
uncertainty and jumps to the most uncertain slice. Saves
``docs/femur_analysis.png`` (2D: sides and uncertainty) and
``docs/femur_surfaces.png`` (3D: the two surfaces).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wait_for(app, predicate, timeout_s: float = 600.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError("work did not finish")
    for _ in range(30):
        app.processEvents()
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seed", type=int, default=504)
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_femur._analysis_widget import FemurAnalysisWidget
    from napari_femur._sample_data import synthetic_subject_layers
    from napari_femur._segment_widget import SegmentFemurWidget

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1700, 1000)
    app = QApplication.instance()
    for data, kwargs, kind in synthetic_subject_layers(seed=args.seed, geometry="dev", downsample=4,
                                                       name="synthetic hip"):
        if kind == "image":
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    seg = SegmentFemurWidget(viewer)
    viewer.window.add_dock_widget(seg, name="Segment Femur", area="right")
    seg.select_model_path(args.model)
    seg.device_combo.setCurrentText("cpu")
    seg.run()
    wait_for(app, lambda: seg.worker is None)
    viewer.window.remove_dock_widget(viewer.window.dock_widgets["Segment Femur"].parent())
    widget = FemurAnalysisWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Femur Analysis", area="right")
    mask = next(ly for ly in viewer.layers if isinstance(ly, napari.layers.Labels))
    widget.mask_combo.set_layer(mask)
    widget.label_sides()
    mask.visible = False
    widget.run_uncertainty()
    wait_for(app, lambda: widget.worker is None)
    widget.make_surfaces()
    wait_for(app, lambda: widget.worker is None)
    for ly in viewer.layers:
        if isinstance(ly, napari.layers.Surface):
            ly.visible = False
    viewer.reset_view()
    widget.next_uncertain_slice()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    wait_for(app, lambda: True)
    viewer.screenshot(path=str(HERE / "femur_analysis.png"), canvas_only=False, flash=False)
    for ly in viewer.layers:
        ly.visible = isinstance(ly, napari.layers.Surface)
    viewer.dims.ndisplay = 3
    viewer.scene.camera.angles = (0, 0, 90)
    viewer.reset_view()
    wait_for(app, lambda: True)
    viewer.screenshot(path=str(HERE / "femur_surfaces.png"), canvas_only=True, flash=False)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

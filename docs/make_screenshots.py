"""Screenshots of the napari-femur widgets, taken in a real napari viewer.

Run it on a display, or under a virtual one::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1920x1200x24" \\
        python docs/make_screenshots.py [--real /work/shared/data/pelvic_mri [--model RUN_OR_CHECKPOINT]]

What it does, on synthetic data (femur_core.synthetic; nothing is downloaded):

1. makes a small synthetic cohort in a temporary folder and opens the
   "Synthetic hip MRI" sample (image + reference femur mask);
2. docks **Train Fold**, runs a cross-validation ("all folds", 3 folds of about
   4 minutes on the synthetic-quick recipe the panel picks for a synthetic
   cohort; the panel trains in a child process) and saves
   ``docs/train_fold.png``, scrolled to the results (status, loss and
   validation-DSC curves, the per-fold table);
3. docks **Segment Femur**, segments the sample with the model just trained,
   picks the reference mask in the threshold section and saves
   ``docs/segment_femur.png`` (mask over the image, PR curve with the current
   and the PRC-optimal point) and ``docs/threshold_panel.png`` (the widget alone).

With ``--real DIR`` it also opens one real scan of DIR (read in place, never
copied) and saves screenshots to ``--real-out`` (default
``/tmp/napari-femur-real-screenshots``), *outside* the repository: the real
data may not be redistributed, so neither may pictures of it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: The training cohort is drawn at a quarter of the development matrix (96 x 96,
#: 3.6 mm pixels) so that a short CPU run learns something; the model grid uses
#: that spacing, so the model also applies to the finer sample and real scans.
COHORT_DOWNSAMPLE = 4
MODEL_PIXEL_MM = 0.911458 * COHORT_DOWNSAMPLE


def wait_for(app, predicate, timeout_s: float = 900.0, what: str = "work") -> None:
    """Process Qt events until ``predicate()`` is true."""
    t0 = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    for _ in range(20):  # let the last redraws happen
        app.processEvents()
        time.sleep(0.02)


def show_slice_with_most(viewer, labels_layer) -> None:
    """Move the slice slider to the coronal slice with the most femur voxels."""
    data = np.asarray(labels_layer.data)
    z = int(np.argmax(data.reshape(data.shape[0], -1).sum(axis=1)))
    world = labels_layer.data_to_world((z, data.shape[1] / 2, data.shape[2] / 2))
    viewer.dims.set_point(0, float(world[0]))


def scroll_to_results(dock, app) -> None:
    """Scroll every scroll area of a dock (napari's around the widget and the panel's own) to its end.

    The Train panel is taller than the window: its results (status, curves, per-fold table) are at
    the bottom. Scrolling only the panel's inner area left them below the fold, as napari's outer
    area had given the inner one its whole height.
    """
    from qtpy.QtWidgets import QScrollArea

    wait_for(app, lambda: True, what="layout")
    for _ in range(2):  # inner areas first change size, then the outer ones can scroll
        for area in dock.findChildren(QScrollArea):
            bar = area.verticalScrollBar()
            bar.setValue(bar.maximum())
        wait_for(app, lambda: True, what="scrolling")


def close_notifications(viewer) -> None:
    """Close napari's notification toasts, so that they do not cover the picture."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def shoot(viewer, app, path: Path) -> Path:
    """Save a screenshot of the whole window (canvas, layer list and docks)."""
    close_notifications(viewer)
    wait_for(app, lambda: True, what="redraw")
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(path), canvas_only=False, flash=False)
    print(f"saved {path}")
    return path


def grab_widget(widget, app, path: Path) -> Path:
    """Save a picture of one widget."""
    wait_for(app, lambda: True, what="redraw")
    widget.grab().save(str(path))
    print(f"saved {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE), help="folder for the synthetic screenshots (default docs/)")
    ap.add_argument("--real", help="folder of real subNN_image / subNN_femur scans (read in place)")
    ap.add_argument("--real-subject", default="sub01", help="which real subject to show")
    ap.add_argument("--real-out", default="/tmp/napari-femur-real-screenshots",
                    help="where real-scan screenshots go (keep it outside the repository)")
    ap.add_argument("--model", help="checkpoint or run folder for the real scan (default: the synthetic model)")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of each fold")
    ap.add_argument("--patience", type=int, default=15, help="early-stopping patience")
    ap.add_argument("--folds", type=int, default=3, help="folds of the cross-validation")
    ap.add_argument("--budget-minutes", type=float, default=4.0,
                    help="time budget of each fold (2 idle CPU cores: about 25 epochs, test DSC about 0.8; "
                         "2-minute folds stayed under 0.2)")
    ap.add_argument("--size", default="1680x1050", help="window size WxH")
    ap.add_argument("--keep", action="store_true", help="keep the temporary synthetic data and run folder")
    ap.add_argument("--work", help="reuse a kept work folder (its synthetic data; its newest cv-* run is "
                                   "continued: finished folds are kept, an interrupted one resumes)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import napari
    from qtpy.QtWidgets import QApplication

    from femur_core.preprocess import GridSpec

    from femur_core.synthetic import make_cohort
    from napari_femur._segment_widget import SegmentFemurWidget
    from napari_femur._threshold_state import prediction_names
    from napari_femur._train_widget import TrainFoldWidget

    out = Path(args.out)
    real_out = Path(args.real_out)
    if args.real and real_out.resolve().is_relative_to(HERE.parent.resolve()):
        ap.error("--real-out must lie outside the repository (real data may not be redistributed)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="napari-femur-shots-"))
    data_dir = work / "synthetic_data"
    print(f"synthetic cohort in {data_dir}")
    if not data_dir.is_dir():
        make_cohort(data_dir, n=6, seed=0, geometry="dev", downsample=COHORT_DOWNSAMPLE)
    earlier = sorted((work / "synthetic_data-runs").glob("cv-*"))

    viewer = napari.Viewer(title="napari-femur")
    app = QApplication.instance()
    w, h = (int(v) for v in args.size.split("x"))
    qt_window = viewer.window._qt_window
    qt_window.resize(w, h)
    qt_window.show()
    wait_for(app, lambda: True, what="window")

    # ---- sample data
    layers = viewer.open_sample("napari-femur", "synthetic_hip")
    image = next(layer for layer in layers if isinstance(layer, napari.layers.Image))
    reference = next(layer for layer in layers if isinstance(layer, napari.layers.Labels))
    show_slice_with_most(viewer, reference)

    # ---- Train Fold
    train = TrainFoldWidget(viewer)
    train_dock = viewer.window.add_dock_widget(train, name="Train Fold", area="right")
    train.data_dir.set_path(data_dir)  # recipe synthetic-quick (the folder is a synthetic cohort), output beside it
    train.set_mode("cv")
    train.n_folds.setValue(args.folds)
    train.epochs.setValue(args.epochs)
    train.patience.setValue(args.patience)
    train.budget.setValue(args.budget_minutes)
    train.device_combo.setCurrentText("cpu")
    train.config_overrides = {"grid": GridSpec(in_plane_spacing=MODEL_PIXEL_MM)}
    if earlier:
        train.out_dir.set_path(earlier[-1])
    t0 = time.monotonic()
    if train.start() is None:
        print(train.status.text(), file=sys.stderr)
        return 1
    wait_for(app, lambda: train.worker is None, timeout_s=args.folds * (args.budget_minutes + 5) * 60,
             what="training")
    if train.last_outcome is None:
        print(f"training failed: {train.status.text()}", file=sys.stderr)
        return 1
    print(f"trained in {time.monotonic() - t0:.0f} s: {train.status.text()}")
    scroll_to_results(train_dock, app)
    shoot(viewer, app, out / "train_fold.png")
    train_dock.hide()
    reference.visible = False

    # ---- Segment Femur + threshold section with the reference
    segment = SegmentFemurWidget(viewer)
    segment_dock = viewer.window.add_dock_widget(segment, name="Segment Femur", area="right")
    segment.image_combo.set_layer(image)
    segment.device_combo.setCurrentText("cpu")
    if segment.run() is None:
        print(segment.status.text(), file=sys.stderr)
        return 1
    wait_for(app, lambda: segment.worker is None, what="segmentation")
    mask_name = prediction_names(image.name)[1]
    if mask_name not in viewer.layers:
        print(f"segmentation failed: {segment.status.text()}", file=sys.stderr)
        return 1
    panel = segment.threshold_panel
    panel.ref_combo.set_layer(reference)  # drawn as an outline over the filled prediction
    reference.visible = True
    opt = panel.optimal_threshold
    if opt is not None:  # the current point a little below the optimum, to see both markers
        panel.set_threshold(max(0.02, opt - 0.12))
    viewer.layers.selection.active = viewer.layers[mask_name]
    show_slice_with_most(viewer, reference)
    shoot(viewer, app, out / "segment_femur.png")
    grab_widget(segment_dock, app, out / "threshold_panel.png")

    # ---- a real scan (screenshots outside the repository)
    if args.real:
        real = Path(args.real)
        for layer in list(viewer.layers):
            viewer.layers.remove(layer)
        [real_image] = viewer.open(str(real / f"{args.real_subject}_image.nii.gz"), plugin="napari-femur")
        [real_ref] = viewer.open(str(real / f"{args.real_subject}_femur.nii.gz"), plugin="napari-femur")
        show_slice_with_most(viewer, real_ref)
        viewer.reset_view()
        # the reference mask over the scan, both through the plugin's reader: checks the geometry
        shoot(viewer, app, real_out / f"real_{args.real_subject}_reference_overlay.png")
        if args.model:  # the synthetic model does not transfer to real scans: only with --model
            real_ref.visible = False
            segment.select_model_path(args.model)
            segment.image_combo.set_layer(real_image)
            segment.run()
            wait_for(app, lambda: segment.worker is None, what="segmentation of the real scan")
            name = prediction_names(real_image.name)[1]
            if name in viewer.layers:
                panel.ref_combo.set_layer(real_ref)
                panel.jump_to_optimal()
                shoot(viewer, app, real_out / f"real_{args.real_subject}_segment_femur.png")
            else:
                print(f"real scan: {segment.status.text()}", file=sys.stderr)
    viewer.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept the synthetic data and the run in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The study's Table 2 rows (Deniz et al. 2018) and the two extra rows, as cross-validation runs.

A *run* is one ``python -m femur_core.cv`` run folder (one set of trained fold models). A *row*
of the table reads one run, scored with or without the largest-component cleanup: the study's
2D rows "with and without post-processing" are the same models scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Settings every study run shares: the study's grid (256 in-plane, 48 central slices, recipes
#: study-2d / study-3d), architecture (F, L, 2D valid convolutions with mirrored tiles / padded 3D
#: U-Net, no normalisation, Xavier init, biases 0.1), batch 1, flip augmentation, one network, no flip
#: averaging at inference (the study had none). Departures, every study row alike: the loss and the
#: learning-rate schedule (LOSS_NOTE) and bf16 autocast (measured faster here for both kinds: training
#: step, 1 thread, 2D F64 L3 on its 184 x 184 tile 0.35 s against 0.8 s in fp32; 3D F16 L3 on
#: 16 x 128 x 128 0.67 s against 2.5 s).
STUDY_COMMON = ("--loss", "dice_ce", "--lr-schedule", "poly", "--flip-tta", "off", "--ensemble", "1",
                "--precision", "bf16")
LOSS_NOTE = ("Dice+CE loss with a poly learning-rate schedule over the budget (study: class-weighted CE, constant "
             "lr 5e-5): with slices or patches instead of whole one-hip volumes, the study's per-image class weights "
             "give a sample without femur zero background loss, and the weighted loss skews the probabilities high "
             "(3 CPU-min diagnosis, 3D F16 L3: DSC 0.02 with it, 0.32 with Dice+CE); the budget buys a few hundred "
             "steps, not the study's 30-200 GPU epochs")
#: 2D: Adam lr 1e-3; one slice without femur per five with femur (these scans hold both hips in about
#: 45 slices, the femur in about 11 of them; the study's 48 central slices of one hip nearly all held
#: femur): with every background slice drawn (half of the samples empty) the Dice term drove the 2D
#: network to an empty output that it did not leave within 3 CPU-minutes (diagnosis runs, bench/README).
STUDY_2D = ("--lr", "1e-3", "--bg-slice-ratio", "0.2")
NOTE_2D = "lr 1e-3; one femur-free slice drawn per 5 slices with femur (study: every slice of one hip)"
#: 3D training on random patches (Z, Y, X) of the model grid (half of them centred on a femur voxel),
#: batch 1 as in the study, 4 patches per volume and epoch, Adam lr 2e-3: a whole 48 x 256 x 256
#: volume costs tens of CPU-seconds per step here. 24 slices (125 mm of 5.2-mm slices, the femur's
#: whole extent in Z): on 16-slice patches bf16 conv3d backward gave NaN gradients for F32 L4, F32 L3
#: and F16 L4 on this CPU (torch 2.13, oneDNN; not at 24 or 32 slices, not in fp32).
PATCH_3D = ("--lr", "2e-3", "--patch-size", "24,128,128", "--batch-size", "1", "--patches-per-volume", "4")
PATCH_NOTE = ("lr 2e-3; random 24x128x128 patches, half femur-centred, 4 per volume and epoch "
              "(study: whole 48x256x256 volumes)")


@dataclass(frozen=True)
class Run:
    """One set of cross-validation fold models."""

    name: str
    flags: tuple[str, ...]
    departs: str


@dataclass(frozen=True)
class Row:
    """One line of the table: a run, scored with (``cleanup``) or without the largest-component cleanup."""

    label: str
    run: str
    cleanup: bool
    study: tuple[float, float, float, float, float, float] | None  # DSC, sd, precision, sd, recall, sd


def _study_2d(f: int, levels: int) -> Run:
    return Run(f"2d-f{f}-l{levels}", ("--recipe", "study-2d", "--model", "2d", "--features", str(f),
                                      "--levels", str(levels), *STUDY_COMMON, *STUDY_2D), f"{LOSS_NOTE}; {NOTE_2D}")


def _study_3d(f: int, levels: int) -> Run:
    return Run(f"3d-f{f}-l{levels}", ("--recipe", "study-3d", "--model", "3d", "--features", str(f),
                                      "--levels", str(levels), *STUDY_COMMON, *PATCH_3D),
               f"{LOSS_NOTE}; {PATCH_NOTE}")


#: In the order they are trained (fold-major: every run's fold 0 first): the headline 3D network and the
#: 2D study network, the other study runs, the extras. (The study's literal 3D training, whole volumes at
#: lr 5e-5, is no longer a row: it learned nothing in a few CPU-minutes, see bench/README.md.)
RUNS: list[Run] = [
    _study_3d(32, 4), _study_2d(64, 3), _study_3d(16, 3), _study_3d(32, 3), _study_3d(16, 4), _study_2d(64, 4),
    Run("default", ("--recipe", "cpu-2d", "--ensemble", "1"),
        "the project's default recipe (cpu-2d: 2D U-Net with padded convolutions and batch norm, 1.8 mm grid, "
        "Dice+CE, poly lr 2e-3, augmentation, 'other bone' class, flip averaging) as one network "
        "(its default is an ensemble of 3 sharing the budget)"),
    Run("3d-aniso", ("--recipe", "study-3d", "--model", "3d-aniso", "--features", "16", "--levels", "4",
                     *STUDY_COMMON, *PATCH_3D),
        f"3D U-Net for thick slices: in-plane-only pooling at the first two levels, instance norm; {LOSS_NOTE}; "
        f"{PATCH_NOTE}"),
]

#: The table: the study's eight rows (its numbers, mean and sd over subjects) and the extras.
ROWS: list[Row] = [
    Row("2D F64 L4", "2d-f64-l4", False, (0.864, 0.044, 0.872, 0.061, 0.860, 0.060)),
    Row("2D F64 L3", "2d-f64-l3", False, (0.886, 0.055, 0.890, 0.080, 0.889, 0.056)),
    Row("2D F64 L4 + largest component", "2d-f64-l4", True, (0.920, 0.040, 0.991, 0.010, 0.861, 0.060)),
    Row("2D F64 L3 + largest component", "2d-f64-l3", True, (0.935, 0.034, 0.990, 0.010, 0.889, 0.056)),
    Row("3D F32 L4", "3d-f32-l4", False, (0.940, 0.054, 0.946, 0.024, 0.939, 0.082)),
    Row("3D F32 L3", "3d-f32-l3", False, (0.939, 0.041, 0.943, 0.023, 0.938, 0.072)),
    Row("3D F16 L4", "3d-f16-l4", False, (0.930, 0.057, 0.937, 0.027, 0.930, 0.085)),
    Row("3D F16 L3", "3d-f16-l3", False, (0.924, 0.048, 0.929, 0.029, 0.924, 0.082)),
    Row("ours: default recipe (cpu-2d, 1 network)", "default", True, None),
    Row("ours: 3d-aniso F16 L4", "3d-aniso", True, None),
]

#: The study's curve summaries (3D F32 L4; its 2D networks), for the figure's caption.
STUDY_CURVES = {"3D F32 L4": {"roc_auc": 0.998, "average_precision": 0.982},
                "2D": {"roc_auc": 0.994, "average_precision": 0.952}}


def run_by_name(name: str) -> Run:
    for r in RUNS:
        if r.name == name:
            return r
    raise KeyError(f"unknown run {name!r}; choose from {', '.join(r.name for r in RUNS)}")

"""The study's Table 2 rows (Deniz et al. 2018) and the two extra rows, as cross-validation runs.

A *run* is one ``python -m femur_core.cv`` run folder (one set of trained fold models). A *row*
of the table reads one run, scored with or without the largest-component cleanup: the study's
2D rows "with and without post-processing" are the same models scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Settings every study run shares: the study's grid (256 in-plane, 48 central slices, recipes
#: study-2d / study-3d), no flip averaging at inference (the study had none), one network.
#: Departure, every study row alike: learning rate 1e-3 instead of 5e-5 (see LR_NOTE). bf16
#: autocast for every row: measured faster here for both kinds (training step, 1 thread: 2D F64 L3
#: on its 184 x 184 tile 0.35 s against 0.8 s in fp32; 3D F16 L3 on 16 x 128 x 128 0.67 s against 2.5 s).
STUDY_COMMON = ("--lr", "1e-3", "--flip-tta", "off", "--ensemble", "1", "--precision", "bf16")
LR_NOTE = ("lr 1e-3 (study 5e-5): the CPU budget buys a few hundred steps, not the study's 30-200 GPU epochs; "
           "at 5e-5 no 3D row left the all-background start within it")
#: 3D training on random patches (Z, Y, X) of the model grid (half of them centred on the femur),
#: batch 1 as in the study, 4 patches per volume and epoch: a whole 48 x 256 x 256 volume costs
#: tens of CPU-seconds per step here, so a few-minute budget held a handful of steps, and each
#: epoch's validation (a whole-volume pass per early-stopping subject) would cost as much as its steps.
PATCH_3D = ("--patch-size", "16,128,128", "--batch-size", "1", "--patches-per-volume", "4")
PATCH_NOTE = "random 16x128x128 patches, 4 per volume and epoch (study: whole 48x256x256 volumes)"


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
                                      "--levels", str(levels), *STUDY_COMMON), LR_NOTE)


def _study_3d(f: int, levels: int) -> Run:
    return Run(f"3d-f{f}-l{levels}", ("--recipe", "study-3d", "--model", "3d", "--features", str(f),
                                      "--levels", str(levels), *STUDY_COMMON, *PATCH_3D),
               f"{LR_NOTE}; {PATCH_NOTE}")


#: In the order they are trained (fold-major: every run's fold 0 first): the 2D study network, the
#: cheapest 3D one and the same 3D network trained as the study did (the diagnosis), the other study
#: runs, the extras.
RUNS: list[Run] = [
    _study_2d(64, 3), _study_3d(16, 3),
    Run("3d-f16-l3-literal", ("--recipe", "study-3d", "--model", "3d", "--features", "16", "--levels", "3",
                              "--lr", "5e-5", "--flip-tta", "off", "--ensemble", "1", "--precision", "bf16"),
        "diagnosis: the study's literal 3D training (whole volumes, batch 1, lr 5e-5) in the same budget"),
    _study_3d(32, 4), _study_3d(32, 3), _study_3d(16, 4), _study_2d(64, 4),
    Run("default", ("--recipe", "cpu-2d", "--ensemble", "1"),
        "the project's default recipe (cpu-2d: 2D U-Net with padded convolutions and batch norm, 1.8 mm grid, "
        "Dice+CE, poly lr 2e-3, augmentation, 'other bone' class, flip averaging) as one network "
        "(its default is an ensemble of 3 sharing the budget)"),
    Run("3d-aniso", ("--recipe", "study-3d", "--model", "3d-aniso", "--features", "16", "--levels", "4",
                     *STUDY_COMMON, *PATCH_3D),
        f"3D U-Net for thick slices: in-plane-only pooling at the first two levels, instance norm; {LR_NOTE}; "
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
    Row("diagnosis: 3D F16 L3, the study's literal training", "3d-f16-l3-literal", False, None),
]

#: The study's curve summaries (3D F32 L4; its 2D networks), for the figure's caption.
STUDY_CURVES = {"3D F32 L4": {"roc_auc": 0.998, "average_precision": 0.982},
                "2D": {"roc_auc": 0.994, "average_precision": 0.952}}


def run_by_name(name: str) -> Run:
    for r in RUNS:
        if r.name == name:
            return r
    raise KeyError(f"unknown run {name!r}; choose from {', '.join(r.name for r in RUNS)}")

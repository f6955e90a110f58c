"""nnU-Net v2 plans edited to this CPU: a configuration that matches our real-data recipe.

nnU-Net's default planner sizes the 2d configuration for a GPU (here: the image's own 0.91 mm
in-plane spacing, patch 384 x 384, batch 9, a 7-stage U-Net with 32-512 features). On a 2-core
CPU that takes 20-40 s per iteration and does not converge in any budget we can run.
:func:`add_cpu_configuration` adds a configuration (``2d_cpu``, ``inherits_from`` ``2d``) with the
grid, patch, batch and network size of femur_core's ``cpu-2d`` recipe:

* in-plane spacing 1.8 mm (our model grid); the spacing of the slice axis stays the data's;
* patch 128 x 128, batch 4;
* a plain convolutional U-Net of 5 stages with 24, 48, 96, 192, 384 features (ours: F24, L5),
  3 x 3 kernels, stride 1 at the first stage and 2 x 2 after (our 2 x 2 max pooling), two
  convolutions per stage in the encoder and the decoder (as ours);
* everything else inherited from nnU-Net's 2d plan: the network class (PlainConvUNet), its
  convolution, instance norm and leaky ReLU, deep supervision, normalisation scheme and
  resampling functions; the trainer keeps nnU-Net's loss, augmentation and SGD.

The configuration gets its own ``data_identifier`` so that ``nnUNetv2_preprocess -c 2d_cpu``
writes a separate preprocessed folder. Pure functions on the plans dict (no nnU-Net import):
tests/test_bench_peer.py checks them; accuracy.py applies them to the planner's nnUNetPlans.json.

Keys as in nnU-Net v2.8.1 (``nnunetv2/experiment_planning/experiment_planners/
default_experiment_planner.py`` writes them, ``nnunetv2/utilities/plans_handling/plans_handler.py``
reads them; ``inherits_from`` is resolved by a shallow ``dict.update`` of the parent, so the
``architecture`` entry is given whole).
"""

from __future__ import annotations

import copy

CPU_CONFIGURATION = "2d_cpu"

#: femur_core's cpu-2d recipe, as nnU-Net plan values (kept here, checked against the recipe in the tests).
OURS = {"in_plane_spacing": 1.8, "patch_size": [128, 128], "batch_size": 4, "features": 24, "levels": 5,
        "convs_per_stage": 2}


def unet_arch_kwargs(base_kwargs: dict, features: int, levels: int, convs_per_stage: int) -> dict:
    """``arch_kwargs`` of nnU-Net's PlainConvUNet with our stage count and widths.

    The conv, norm, dropout and nonlinearity entries of ``base_kwargs`` (nnU-Net's choice) are kept.
    """
    kw = copy.deepcopy(base_kwargs)
    kw.update({
        "n_stages": levels,
        "features_per_stage": [features * 2**i for i in range(levels)],
        "kernel_sizes": [[3, 3] for _ in range(levels)],
        "strides": [[1, 1]] + [[2, 2] for _ in range(levels - 1)],
        "n_conv_per_stage": [convs_per_stage] * levels,
        "n_conv_per_stage_decoder": [convs_per_stage] * (levels - 1),
    })
    return kw


def add_cpu_configuration(plans: dict, base: str = "2d", name: str = CPU_CONFIGURATION,
                          in_plane_spacing: float = OURS["in_plane_spacing"],
                          patch_size: list[int] | None = None, batch_size: int = OURS["batch_size"],
                          features: int = OURS["features"], levels: int = OURS["levels"],
                          convs_per_stage: int = OURS["convs_per_stage"]) -> dict:
    """A copy of nnU-Net ``plans`` with the configuration ``name`` added (``inherits_from`` ``base``).

    Parameters
    ----------
    plans : dict
        nnUNetPlans.json as written by ``nnUNetv2_plan_and_preprocess`` (not modified).
    base : str
        The configuration it inherits from (nnU-Net's ``2d``).
    in_plane_spacing : float
        mm; replaces the last two entries of the base spacing (nnU-Net's 2d configuration works on
        slices of the first axis after its ``transpose_forward``; that axis keeps its spacing).
    patch_size, batch_size, features, levels, convs_per_stage
        The network's input and size (defaults: femur_core's cpu-2d recipe).

    Returns
    -------
    dict
        The new plans. Raises ValueError when ``base`` is missing or not a 2D configuration, or
        when the patch does not divide by the network's total stride.
    """
    patch_size = list(patch_size or OURS["patch_size"])
    confs = plans.get("configurations", {})
    if base not in confs:
        raise ValueError(f"the plans have no configuration {base!r} (have: {', '.join(confs) or 'none'})")
    parent = confs[base]
    spacing = list(parent.get("spacing", []))
    if len(spacing) != 2 and len(spacing) != 3:
        raise ValueError(f"configuration {base!r}: spacing {spacing} is not 2D/3D")
    if len(parent.get("patch_size", [])) != 2:
        raise ValueError(f"configuration {base!r} is not a 2D configuration (patch {parent.get('patch_size')})")
    if len(patch_size) != 2 or any(p % 2 ** (levels - 1) for p in patch_size):
        raise ValueError(f"patch {patch_size} must be 2D and divisible by {2 ** (levels - 1)} ({levels} stages)")
    arch = copy.deepcopy(parent.get("architecture"))
    if not arch or "arch_kwargs" not in arch:
        raise ValueError(f"configuration {base!r} has no architecture/arch_kwargs (not an nnU-Net v2.4+ plan)")
    arch["arch_kwargs"] = unet_arch_kwargs(arch["arch_kwargs"], features, levels, convs_per_stage)
    new_spacing = spacing[:-2] + [float(in_plane_spacing)] * 2
    conf = {
        "inherits_from": base,
        "data_identifier": f"{plans.get('plans_name', 'nnUNetPlans')}_{name}",
        "spacing": new_spacing,
        "patch_size": patch_size,
        "batch_size": int(batch_size),
        "architecture": arch,
    }
    if "median_image_size_in_voxels" in parent:  # the same field of view on the coarser grid
        med = list(parent["median_image_size_in_voxels"])
        conf["median_image_size_in_voxels"] = [
            float(round(m * s / n)) if i >= len(med) - 2 else float(m)
            for i, (m, s, n) in enumerate(zip(med, spacing[-len(med):], new_spacing[-len(med):]))]
    out = copy.deepcopy(plans)
    out["configurations"][name] = conf
    return out


def describe(conf: dict) -> dict:
    """The settings of a configuration worth recording in the results JSON."""
    kw = conf.get("architecture", {}).get("arch_kwargs", {})
    return {"spacing": conf.get("spacing"), "patch_size": conf.get("patch_size"), "batch_size": conf.get("batch_size"),
            "network": conf.get("architecture", {}).get("network_class_name"),
            "n_stages": kw.get("n_stages"), "features_per_stage": kw.get("features_per_stage"),
            "strides": kw.get("strides"), "kernel_sizes": kw.get("kernel_sizes"),
            "n_conv_per_stage": kw.get("n_conv_per_stage"),
            "n_conv_per_stage_decoder": kw.get("n_conv_per_stage_decoder"),
            "norm_op": kw.get("norm_op"), "nonlin": kw.get("nonlin"),
            "normalization_schemes": conf.get("normalization_schemes"),
            "inherits_from": conf.get("inherits_from"), "data_identifier": conf.get("data_identifier")}

"""napari sample data: a synthetic hip MRI with its exact femur mask.

Built by :func:`femur_core.synthetic.make_subject` (a downsampled version of
the development geometry, so it appears in about a second), shown in the
canonical coronal layout with the same geometry metadata the reader stores.
"""

from __future__ import annotations

from typing import Any

from ._reader import volume_layer_data

__all__ = ["make_sample_data", "synthetic_subject_layers"]

#: Defaults of the sample: development geometry, halved in-plane.
SAMPLE_SEED = 7
SAMPLE_GEOMETRY = "dev"
SAMPLE_DOWNSAMPLE = 2


def synthetic_subject_layers(
    seed: int = SAMPLE_SEED,
    geometry: str = SAMPLE_GEOMETRY,
    downsample: int = SAMPLE_DOWNSAMPLE,
    name: str = "synthetic hip",
) -> list[tuple[Any, dict, str]]:
    """Layer data tuples of one synthetic subject: image, then reference mask.

    Parameters
    ----------
    seed : int
        Random seed of the subject.
    geometry : str
        A :mod:`femur_core.synthetic` geometry preset (``"dev"``, ``"tiny"``, ...).
    downsample : int
        In-plane downsampling factor passed to ``make_subject``.
    name : str
        Base name of the two layers.
    """
    from femur_core.synthetic import make_subject

    image, mask = make_subject(seed, geometry=geometry, downsample=downsample)
    img = volume_layer_data(image, name=f"{name} MRI", as_labels=False)
    ref = volume_layer_data(mask, name=f"{name} reference femur", as_labels=True)
    return [img, ref]


def make_sample_data() -> list[tuple[Any, dict, str]]:
    """npe2 sample data contribution "Synthetic hip MRI" (image + reference labels)."""
    return synthetic_subject_layers()

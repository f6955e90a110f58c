"""femur_core: proximal femur segmentation in hip MRI, without any GUI.

A library first: read a scan with its geometry, bring it to the model grid,
predict, clean up, map back, score and write. Never imports napari or Qt.
"""

from .errors import Cancelled, FemurError, InputError, ModelFileError, OutputExistsError
from .volume_io import check_image, check_mask, read_pair, read_volume, write_volume
from .volume import Reorientation, Volume, from_canonical, to_canonical

__version__ = "0.1.0"

__all__ = [
    "Volume",
    "Reorientation",
    "to_canonical",
    "from_canonical",
    "read_volume",
    "write_volume",
    "read_pair",
    "check_image",
    "check_mask",
    "FemurError",
    "InputError",
    "ModelFileError",
    "OutputExistsError",
    "Cancelled",
]

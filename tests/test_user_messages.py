"""Messages a user reads when the input is not what the program expects."""

from __future__ import annotations

import pytest

from femur_core.errors import InputError
from femur_core.volume_io import read_volume


def test_a_folder_of_text_files_says_which_formats_are_accepted(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text("not an image\n")
    with pytest.raises(InputError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "notes" in msg and "no DICOM image files found" in msg
    for fmt in ("NIfTI", ".nii.gz", "TIFF", ".tif"):
        assert fmt in msg, f"{fmt} missing from: {msg}"

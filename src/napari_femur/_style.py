"""Colours that tell a prediction from a reference at a glance.

Predictions (made by Segment Femur or the threshold slider) are filled in warm
colours, references (masks opened from files, the sample's reference) in cool
ones; when a mask is chosen as the reference of the Femur Threshold panel it
is drawn as an outline, so that the filled prediction under it stays visible.
The colours come from the Okabe-Ito palette, which stays distinct for the
common colour-vision deficiencies. Label values follow the plugin's label
maps: 1 femur (or right femur), 2 left femur.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PREDICTION_COLORS", "REFERENCE_COLORS", "style_prediction", "style_reference",
           "show_as_reference_outline", "colors_legend", "reference_kwargs"]

#: label value -> RGBA hex of predicted masks (orange; reddish purple for the left femur)
PREDICTION_COLORS = {1: "#e69f00", 2: "#cc79a7"}
#: label value -> RGBA hex of reference masks (sky blue; bluish green for the left femur)
REFERENCE_COLORS = {1: "#56b4e9", 2: "#009e73"}

#: outline width (data pixels) of a mask chosen as reference
REFERENCE_OUTLINE = 2


def _colormap(colors: dict[int, str]) -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    mapping: dict[Any, Any] = {0: "transparent", None: "#bbbbbb"}
    mapping.update(colors)
    return DirectLabelColormap(color_dict=mapping)


def _max_label(layer: Any) -> int:
    data = np.asarray(layer.data)
    return int(data.max()) if data.size else 0


def reference_kwargs(data: np.ndarray) -> dict:
    """``add_labels`` keyword arguments of a reference mask (the reader's labels layers)."""
    data = np.asarray(data)
    if data.size and int(data.max()) > 2:
        return {"opacity": 0.6}  # a multi-label map: styled by style_reference once added
    return {"colormap": _colormap(REFERENCE_COLORS), "opacity": 0.6}


def style_prediction(layer: Any) -> None:
    """Colour a predicted mask (labels layer): filled, warm, half transparent."""
    layer.colormap = _colormap(PREDICTION_COLORS)
    layer.opacity = 0.55
    layer.contour = 0


def style_reference(layer: Any) -> None:
    """Colour a reference mask (labels layer) in the cool reference colours.

    A multi-label map with more than two labels (e.g. ``subNN_bones``: 1 femur,
    2 and up other bones) keeps napari's colours for the other bones and gets
    the reference colour for the femur.
    """
    if _max_label(layer) <= 2:
        layer.colormap = _colormap(REFERENCE_COLORS)
    else:
        from napari.utils.colormaps import DirectLabelColormap, label_colormap

        cyc = label_colormap(49)
        mapping: dict[Any, Any] = {0: "transparent", 1: REFERENCE_COLORS[1]}
        for v in range(2, _max_label(layer) + 1):
            mapping[v] = cyc.map(np.array([v]))[0]
        layer.colormap = DirectLabelColormap(color_dict=mapping)
    layer.opacity = 0.6


def show_as_reference_outline(layer: Any, on: bool = True) -> None:
    """Draw a reference mask as an outline over the filled prediction (or filled again)."""
    layer.contour = REFERENCE_OUTLINE if on else 0
    if on:
        layer.opacity = 1.0


def colors_legend() -> str:
    """HTML line for the panels: which colour is which."""
    p, r = PREDICTION_COLORS[1], REFERENCE_COLORS[1]
    return (f"<span style='color:{p}'>&#9632; prediction (filled)</span> &nbsp; "
            f"<span style='color:{r}'>&#9633; reference (outline)</span>")

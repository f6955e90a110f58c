"""Checkpoints that load without unpickling.

A checkpoint is a ``torch.save`` file holding only tensors, numbers, strings,
lists and dicts: the weights, optionally the optimizer state, and the training
configuration as a JSON string. It is read with ``torch.load(weights_only=True)``,
so a file with pickled Python objects (which could run code) is refused, and the
weights are checked against the architecture the configuration names.
Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .errors import ModelFileError
from .volume_io import atomic_write_bytes

__all__ = ["save_checkpoint", "save_ensemble", "load_checkpoint", "resolve_model_path", "FORMAT"]

FORMAT = "napari-femur/1"


def save_checkpoint(path: "str | os.PathLike", model: nn.Module, config: dict, **extra) -> Path:
    """Write weights + JSON config (+ extra tensors/numbers) atomically, replacing ``path``."""
    payload = {
        "format": FORMAT,
        "config_json": json.dumps(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def save_ensemble(path: "str | os.PathLike", state_dicts: list[dict], config: dict, **extra) -> Path:
    """Write a model of one or more member networks of one architecture atomically.

    ``state_dict`` holds the first member (so a single-network reader still
    loads a working model); with several members, ``member_state_dicts`` holds
    them all, in order.
    """
    if not state_dicts:
        raise ValueError("an ensemble needs at least one member")
    payload = {
        "format": FORMAT,
        "config_json": json.dumps(config),
        "state_dict": {k: v.detach().cpu() for k, v in state_dicts[0].items()},
        **extra,
    }
    if len(state_dicts) > 1:
        payload["member_state_dicts"] = [{k: v.detach().cpu() for k, v in sd.items()} for sd in state_dicts]
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def load_checkpoint(path: "str | os.PathLike") -> dict:
    """Read a checkpoint safely; returns the payload with ``config`` parsed.

    Raises
    ------
    ModelFileError
        Unreadable, not a napari-femur checkpoint, or holding pickled objects.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc))
        if m or "GLOBAL" in str(exc):
            what = m.group(1) if m else "a Python object"
            raise ModelFileError(f"{p}: refused, the file holds pickled Python code ({what}) that loading "
                                 "would run; only weights are accepted") from None
        raise ModelFileError(f"{p}: unreadable model file (not a PyTorch checkpoint)") from None
    except Exception as exc:
        raise ModelFileError(f"{p}: unreadable model file ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise ModelFileError(f"{p}: not a napari-femur checkpoint (format {FORMAT} expected)")
    try:
        payload["config"] = json.loads(payload["config_json"])
    except Exception:
        raise ModelFileError(f"{p}: checkpoint configuration is not valid JSON") from None
    return payload


def load_weights_into(model: nn.Module, payload: dict, path: "str | os.PathLike") -> nn.Module:
    """Load a checkpoint's weights, refusing any mismatch with the architecture."""
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ModelFileError(f"{path}: weights do not match the architecture in its configuration "
                             f"({' '.join(lines[1:3])[:200]})") from None
    return model


def resolve_model_path(path: "str | os.PathLike") -> Path:
    """A checkpoint file, or the model inside a run / model folder.

    In a folder, ``model.pt`` wins, then ``best.pt``, then the first
    ``fold*/best.pt``.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / "model.pt", p / "best.pt"):
            if cand.is_file():
                return cand
        folds = sorted(p.glob("fold*/best.pt"))
        if folds:
            return folds[0]
        raise ModelFileError(f"{p}: no model in this folder (model.pt, best.pt or fold*/best.pt)")
    raise ModelFileError(f"{p}: no such model file or folder")

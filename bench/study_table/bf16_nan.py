"""Non-finite gradients of bf16 conv3d backward on this CPU, by network and patch shape.

    OMP_NUM_THREADS=1 python bench/study_table/bf16_nan.py [--shapes 16x128x128,24x128x128] [--out bench/results]

For each study 3D network (F32/F16 x L4/L3) and ``3d-aniso`` F16 L4: one forward in bf16 autocast (and
in fp32) on a random one-channel patch, the Dice + cross-entropy loss against a box-shaped femur, one
backward; it counts the parameters whose gradient holds a NaN or an infinity. Found on torch 2.13 /
oneDNN on an Intel Xeon with AMX: NaN gradients at the first bf16 step for 3D F32 L4, F32 L3 and F16 L4
on 16 x 128 x 128 patches, none in fp32 and none on 24- or 32-slice patches; hence the study table's
24-slice patches. Writes ``bench/results/bf16-nan-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
from pathlib import Path

import torch

from femur_core.volume_io import write_json
from femur_core.loss import dice_cross_entropy
from femur_core.models.registry import build_model, default_config

NETS = (("3d", 32, 4), ("3d", 32, 3), ("3d", 16, 4), ("3d", 16, 3), ("3d-aniso", 16, 4))


def bad_gradients(name: str, f: int, levels: int, shape: tuple[int, int, int], bf16: bool, seed: int = 0) -> int:
    """Parameters with a non-finite gradient after one forward + backward on a random patch."""
    torch.manual_seed(seed)
    net = build_model(default_config(name, features=f, levels=levels))
    x = torch.randn(1, 1, *shape)
    y = torch.zeros(1, *shape, dtype=torch.long)
    z, h, w = shape
    y[:, z // 4: 3 * z // 4, h // 6: h // 2, w // 6: w // 2] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    dice_cross_entropy(out, y).backward()
    return sum(1 for p in net.parameters() if p.grad is not None and not torch.isfinite(p.grad).all())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16x128x128,24x128x128", help="comma list of ZxYxX patch shapes")
    ap.add_argument("--fp32", action="store_true", help="also run every case in fp32")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for s in args.shapes.split(","):
        shape = tuple(int(v) for v in s.lower().split("x"))
        for name, f, levels in NETS:
            for bf16 in (True, False) if args.fp32 else (True,):
                n = bad_gradients(name, f, levels, shape, bf16)
                rows.append({"model": name, "features": f, "levels": levels, "patch": list(shape),
                             "precision": "bf16" if bf16 else "fp32", "non_finite_gradients": n})
                print(f"{name} F{f} L{levels} {s} {'bf16' if bf16 else 'fp32'}: {n} parameter(s) with "
                      f"non-finite gradients", flush=True)
    out = {"benchmark": "bf16 conv3d backward, non-finite gradients (bench/study_table/bf16_nan.py)",
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__}, "rows": rows}
    path = write_json(args.out / f"bf16-nan-{out['date'][:10]}.json", out)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

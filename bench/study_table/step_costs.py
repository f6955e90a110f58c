"""Why the study's 3D U-Net learned nothing in minutes on this CPU: CPU-seconds per training step.

    OMP_NUM_THREADS=1 python bench/study_table/step_costs.py [--out bench/results] [--quick]

One thread, process CPU time (what the study table's budget counts), one forward + backward +
Adam step with the study's class-weighted cross-entropy, after one warm-up step: the 3D U-Net on
a whole 48 x 256 x 256 volume (the study's input) and on a 16 x 128 x 128 patch, in bf16 autocast
and fp32; the 3D whole-volume forward pass that each early-stopping subject costs per epoch; the
2D U-Net on its training tile for comparison; and what ``precision="auto"`` picks for 3D training
here (``femur_core.inference.cpu_bf16_conv3d_training_is_faster``). Random inputs: the cost of a
step does not depend on the data. Writes ``bench/results/study-step-costs-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from femur_core.volume_io import write_json
from femur_core.inference import (autocast, cpu_bf16_conv3d_training_is_faster, memory_format, predict_array,
                                  tile_plan, to_format)
from femur_core.loss import get_loss
from femur_core.models.registry import MODELS, build_model, default_config


def train_step(name: str, f: int, levels: int, shape: tuple[int, ...], amp) -> float:
    """CPU seconds of one training step (after a warm-up step)."""
    cfg = default_config(name, features=f, levels=levels)
    kind = MODELS[name].kind
    fmt = memory_format(kind, torch.device("cpu"), amp)
    net = build_model(cfg)
    if fmt is not None:
        net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = get_loss("wce")
    x = to_format(torch.randn(1, *shape), fmt)
    cost = float("nan")
    for _ in range(2):
        t0 = time.process_time()
        with autocast(torch.device("cpu"), amp):
            out = net(x)
        y = (torch.rand(1, *out.shape[2:]) > 0.95).long()
        loss = loss_fn(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cost = time.process_time() - t0
    return round(cost, 3)


def forward_cost(f: int, levels: int, shape: tuple[int, ...], amp) -> float:
    cfg = default_config("3d", features=f, levels=levels)
    net = build_model(cfg)
    vol = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    t0 = time.process_time()
    predict_array(net, cfg, vol, device="cpu", amp=amp)
    return round(time.process_time() - t0, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    ap.add_argument("--quick", action="store_true", help="F16 L3 only (a few CPU-seconds less)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bf16 = torch.bfloat16
    res = {"benchmark": "training-step CPU cost, study U-Nets (bench/study_table/step_costs.py)",
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
           "threads": 1, "auto_3d_training_uses_bf16": cpu_bf16_conv3d_training_is_faster(), "rows": []}
    nets = [(16, 3)] if args.quick else [(16, 3), (32, 4)]
    for f, levels in nets:
        for shape, what in (((1, 48, 256, 256), "whole volume"), ((1, 16, 128, 128), "patch")):
            for amp, pname in ((bf16, "bf16"), (None, "fp32")):
                row = {"net": f"3D F{f} L{levels}", "input": what, "shape": list(shape[1:]), "precision": pname,
                       "train_step_cpu_s": train_step("3d", f, levels, shape, amp)}
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
        for amp, pname in ((bf16, "bf16"), (None, "fp32")):
            row = {"net": f"3D F{f} L{levels}", "input": "whole-volume prediction (validation)",
                   "shape": [48, 256, 256], "precision": pname, "forward_cpu_s": forward_cost(f, levels, (48, 256, 256), amp)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    plan = tile_plan(256, 256, 3)
    for amp, pname in ((bf16, "bf16"), (None, "fp32")):
        row = {"net": "2D F64 L3", "input": "training tile", "shape": [3, plan.tile_in, plan.tile_in],
               "precision": pname, "train_step_cpu_s": train_step("2d", 64, 3, (3, plan.tile_in, plan.tile_in), amp)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    path = write_json(args.out / f"study-step-costs-{time.strftime('%Y%m%d-%H%M')}.json", res)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

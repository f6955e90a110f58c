"""Seconds per training step of the cpu-2d network (F24 L5, 3 classes, batch 4, bf16, channels-last)
on square inputs of several sizes: what a random crop saves against a whole slice.

    python bench/step_cost_2d.py [--threads 2] [--sizes 128,160,192]
"""

from __future__ import annotations

import argparse
import time

import torch

from femur_core.inference import autocast
from femur_core.loss import get_loss
from femur_core.models import build_model, default_config


def step_seconds(size: int, features: int = 24, levels: int = 5, batch: int = 4, repeats: int = 4) -> float:
    cfg = default_config("2d-same", features=features, levels=levels, n_classes=3)
    net = build_model(cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = get_loss("dice_ce")
    x = torch.randn(batch, cfg.in_slices, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch, size, size))
    for i in range(repeats + 2):
        if i == 2:
            t0 = time.perf_counter()
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = net(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="128,160,192")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.sizes.split(",")]
    step_seconds(sizes[0], repeats=1)  # warm-up: oneDNN builds its kernels on the first calls
    for s in sizes:
        print(f"{s} x {s}: {step_seconds(s):.3f} s per step (batch 4, bf16, {args.threads} threads)", flush=True)


if __name__ == "__main__":
    main()

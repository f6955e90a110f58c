"""The study's 3D U-Net on a CUDA GPU: inference time, one training epoch, bf16 correctness.

    bash bench/gpu.sh [--subjects 8] [--out bench/results]

What it measures (the study: one 16 GB Tesla P100):
- inference of the 3D F32 L4 U-Net on one 48 x 256 x 256 volume, bf16 autocast (what ``predict``
  picks on CUDA) and fp32, median of 5 after a warm-up (the study: about 5 s per subject);
- one training epoch of the ``study-3d`` recipe (whole volumes, batch 1, bf16 autocast) on
  synthetic ``study``-geometry subjects (one hip, 512 x 512 x 60 of 0.234 x 0.234 x 1.5 mm, on the
  study's 48 x 256 x 256 grid), through ``femur_core.training.train_model``; the seconds per volume
  times 64 (a training fold of the study) against its about 7 minutes per epoch;
- bf16 correctness: the probabilities of the network after that epoch in bf16 and fp32 (max
  difference, DSC of the 0.5 masks), and one training step's gradient in bf16 against fp32 from
  the same weights (cosine similarity, relative loss difference).

Writes ``bench/results/gpu-<date>.json``. Without CUDA it prints why and exits 0 (nothing run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeat: int = 5) -> dict:
    fn()  # warm-up: cuDNN autotuning, allocator
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(float(np.median(times)), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4)}


def inference(dev: torch.device) -> dict:
    """Median time of one 48 x 256 x 256 prediction (random weights) in bf16 and fp32."""
    from femur_core.inference import predict_array
    from femur_core.models.registry import build_model, default_config

    cfg = default_config("3d", features=32, levels=4)
    net = build_model(cfg).to(dev)
    vol = np.random.default_rng(0).normal(size=(48, 256, 256)).astype(np.float32)
    out = {}
    for name, amp in (("bf16", torch.bfloat16), ("fp32", None)):
        out[name] = _timed(lambda amp=amp: predict_array(net, cfg, vol, device=dev, amp=amp))
    out["study_s"] = 5.0
    return out


def training_epoch(dev: torch.device, n_subjects: int, work: Path) -> tuple[dict, object, list]:
    """One ``study-3d`` epoch on synthetic study-geometry subjects; the trained net and its validation data."""
    from femur_core.data import find_subjects, load_subjects
    from femur_core.synthetic import make_cohort
    from femur_core.training import prepare_subjects, recipe, train_model

    t0 = time.perf_counter()
    make_cohort(work / "data", n=n_subjects, seed=0, geometry="study")
    subjects = load_subjects(find_subjects(work / "data"))
    gen_s = time.perf_counter() - t0
    train, val = subjects[:-2], subjects[-2:]
    cfg = recipe("study-3d", device=str(dev), max_epochs=1, min_epochs=1)
    t0 = time.perf_counter()
    res = train_model(train, val, cfg, work / "train")
    wall = time.perf_counter() - t0
    epoch_s = res.history[-1]["minutes"] * 60 if res.history else float("nan")
    from femur_core.inference import load_model

    model = load_model(res.checkpoint)
    val_p = prepare_subjects(val, cfg.grid)
    info = {"subjects_generated": n_subjects, "generation_s": round(gen_s, 1), "train_volumes": len(train),
            "epoch_s_with_validation": round(epoch_s, 2), "train_model_wall_s": round(wall, 2),
            "grid": list(val_p[0].image.shape), "val_dsc": res.history[-1]["val_dsc"] if res.history else None}
    per_volume = epoch_s / max(len(train), 1)
    info["s_per_volume_incl_validation"] = round(per_volume, 3)
    info["study_epoch_estimate_min"] = round(per_volume * 64 / 60, 3)
    info["study_epoch_min"] = 7.0
    return info, model, val_p


def bf16_correctness(dev: torch.device, model, val_p: list) -> dict:
    """bf16 vs fp32: probabilities of the trained net, and one training step's gradient."""
    from femur_core.inference import autocast, predict_array
    from femur_core.loss import get_loss
    from femur_core.metrics import dice

    net, cfg = model.members[0].to(dev), model.model_config
    p16 = predict_array(net, cfg, val_p[0].image, device=dev, amp=torch.bfloat16)
    p32 = predict_array(net, cfg, val_p[0].image, device=dev, amp=None)
    out = {"max_abs_prob_diff": float(np.abs(p16 - p32).max()),
           "mask_dsc_bf16_vs_fp32": float(dice(p16 >= 0.5, p32 >= 0.5)) if (p32 >= 0.5).any() else None,
           "fp32_mask_voxels": int((p32 >= 0.5).sum())}
    x = torch.from_numpy(val_p[0].image)[None, None].to(dev)
    y = torch.from_numpy(val_p[0].mask.astype(np.int64))[None].to(dev)
    loss_fn, grads, losses = get_loss("wce"), [], []
    net.train()
    for amp in (torch.bfloat16, None):
        net.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten().float() for p in net.parameters()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    out["grad_cosine_bf16_vs_fp32"] = round(float(cos), 6)
    out["loss_rel_diff"] = abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=8, help="synthetic study subjects (2 of them validate)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skip: no CUDA device here (torch.cuda.is_available() is False); bench/gpu.sh measures the "
              "study's 3D U-Net on a GPU and ran nothing.")
        return 0
    dev = torch.device("cuda")
    t_start = time.perf_counter()
    result = {"benchmark": "study 3D U-Net on a GPU (bench/gpu.sh)",
              "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "bf16_supported": torch.cuda.is_bf16_supported()}
    result["inference_48x256x256_f32_l4"] = inference(dev)
    print(json.dumps(result["inference_48x256x256_f32_l4"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        info, model, val_p = training_epoch(dev, args.subjects, Path(tmp))
        result["training_epoch_study_3d"] = info
        print(json.dumps(info), flush=True)
        result["bf16_correctness"] = bf16_correctness(dev, model, val_p)
        print(json.dumps(result["bf16_correctness"]), flush=True)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    from femur_core.volume_io import write_json
    path = write_json(args.out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json", result)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

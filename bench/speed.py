"""Speed benchmark: inference and training on this machine, against peers in the same run.

Run from the repository root (after ``bash scripts/setup.sh``):

    bash bench/run_speed.sh            # full benchmark, 5-15 min on 2 CPU cores
    bash bench/run_speed.sh --quick    # small sizes, a smoke check of the script

Every figure is the median of ``--reps`` runs with min-max, every ratio is
computed from figures of this same run, and the table is also written as JSON
to bench/results/ with the machine description. Peers: fp32 eager PyTorch and
MONAI's ``sliding_window_inference`` driving the same network with the same
weights on the same input. Correctness of each fast path is checked against
fp32 on the same weights (max |p - p_fp32| and DSC of the masks at 0.5); a
path that fails DSC >= 0.999 is reported as failing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from femur_core.volume_io import write_json
from femur_core.inference import autocast, predict_array
from femur_core.metrics import dice
from femur_core.models import build_model, default_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def timed(fn, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": reps}


def fmt(t: dict) -> str:
    return f"{t['median_s']:8.3f} s ({t['min_s']:.3f}-{t['max_s']:.3f})"


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "platform": platform.platform(), "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def flops_of(net, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(x)
    return float(fc.get_total_flops())


def matmul_flops(dtype, n: int, reps: int) -> dict:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = timed(lambda: torch.mm(a, b), reps, warmup=2)
    t["tflops"] = 2 * n**3 / t["median_s"] / 1e12
    return t


def synthetic_input(shape_zyx: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A normalised synthetic hip MRI of the requested model-grid size."""
    from femur_core.preprocess import GridSpec, prepare
    from femur_core.synthetic import make_subject

    img, msk = make_subject(seed, geometry="dev")
    prep = prepare(img, GridSpec(in_plane_size=shape_zyx[1], central_slices=shape_zyx[0]), msk)
    x = prep.image
    if x.shape[0] < shape_zyx[0]:  # pad slices by reflection when the subject has fewer
        x = np.pad(x, ((0, shape_zyx[0] - x.shape[0]), (0, 0), (0, 0)), mode="reflect")
    return np.ascontiguousarray(x[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]), prep


def quick_train(net, cfg, prep, steps: int, patch) -> None:
    """A few Adam steps on synthetic patches so the weights are not random (for the
    correctness comparison of fast paths: random weights give probabilities near 0.5)."""
    from femur_core.loss import dice_cross_entropy

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x, y = prep.image, prep.mask
    net.to(memory_format=torch.channels_last_3d)  # bf16 conv3d backward is very slow in NCDHW on CPU
    net.train()
    for _ in range(steps):
        if cfg.name.startswith("3d"):
            z0 = int(rng.integers(0, max(1, x.shape[0] - patch[0] + 1)))
            yy = int(rng.integers(0, x.shape[1] - patch[1] + 1))
            xx = int(rng.integers(0, x.shape[2] - patch[2] + 1))
            xb = torch.from_numpy(x[None, None, z0:z0 + patch[0], yy:yy + patch[1], xx:xx + patch[2]].copy())
            xb = xb.contiguous(memory_format=torch.channels_last_3d)
            yb = torch.from_numpy(y[None, z0:z0 + patch[0], yy:yy + patch[1], xx:xx + patch[2]].astype(np.int64))
        else:
            raise NotImplementedError
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = net(xb)
        loss = dice_cross_entropy(out.float(), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def compare(p: np.ndarray, ref: np.ndarray) -> dict:
    a, b = p >= 0.5, ref >= 0.5
    return {"max_abs_diff": float(np.abs(p - ref).max()), "mask_dsc": float(dice(a, b)),
            "ok": bool(dice(a, b) >= 0.999), "fg_voxels": int(b.sum())}


# ----------------------------------------------------------------------------- sections
def bench_3d(args, res: dict) -> None:
    Z, H = args.z, args.hw
    cfg = default_config("3d", features=32, levels=4)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    x, prep = synthetic_input((Z, H, H))
    if args.train_steps:  # bf16 conv3d backward is slow on this CPU: off by default (random weights)
        quick_train(net, cfg, prep, args.train_steps, (min(16, Z), min(128, H), min(128, H)))
    xt = torch.from_numpy(x)[None, None]
    res["unet3d_gflop"] = flops_of(net, xt) / 1e9
    print(f"3D U-Net F32 L4 on {Z}x{H}x{H}: {res['unet3d_gflop']:.0f} GFLOP per forward")

    def fp32():
        with torch.inference_mode():
            return torch.softmax(net(xt), 1)[0, 1].numpy()

    p32 = fp32()
    res["3d_fp32_eager"] = timed(fp32, args.reps_slow)
    print(f"  fp32 eager           {fmt(res['3d_fp32_eager'])}")

    def ours():
        return predict_array(net, cfg, x, device="cpu", amp=torch.bfloat16)

    pours = ours()
    res["3d_ours"] = timed(ours, args.reps)
    res["3d_ours"]["gflops"] = res["unet3d_gflop"] / res["3d_ours"]["median_s"]
    res["3d_ours_vs_fp32"] = compare(pours, p32)
    print(f"  ours (bf16, channels_last_3d) {fmt(res['3d_ours'])}  {res['3d_ours']['gflops']:.0f} GFLOP/s; "
          f"vs fp32 max|dp| {res['3d_ours_vs_fp32']['max_abs_diff']:.4f} mask DSC {res['3d_ours_vs_fp32']['mask_dsc']:.5f}")
    net.to(memory_format=torch.contiguous_format)

    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        res["3d_monai"] = None
        print("  MONAI not installed (bench/run_speed.sh installs it): skipped")
    else:
        roi = (Z, min(H, args.monai_roi), min(H, args.monai_roi))

        def monai():
            with torch.inference_mode():
                out = sliding_window_inference(xt, roi, 1, net, overlap=0.25, mode="gaussian")
                return torch.softmax(out, 1)[0, 1].numpy()

        pm = monai()
        res["3d_monai"] = timed(monai, args.reps_slow)
        res["3d_monai"]["roi"] = list(roi)
        res["3d_monai_vs_fp32"] = compare(pm, p32)
        print(f"  MONAI sliding_window_inference fp32 roi {roi} {fmt(res['3d_monai'])}")
    res["3d_flops_fraction_of_bf16_matmul"] = res["3d_ours"]["gflops"] / 1000 / res["matmul_bf16"]["tflops"]
    net = None  # released before the next benchmark (closures above read it)
    gc.collect()


def bench_2d(args, res: dict) -> None:
    """The study's 2D path: mirrored 3 x 3 tiles per slice, averaged. Peers: the literal nine tiles
    in fp32 eager (the reference) and in bf16; ours: one pass over the tiles' union (equal output)."""
    Z, H = args.z, args.hw
    cfg = default_config("2d", features=64, levels=3)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    x, _ = synthetic_input((Z, H, H))

    def fp32_literal():
        return predict_array(net, cfg, x, device="cpu", amp=None, literal_tiles=True)

    def bf16_literal():
        return predict_array(net, cfg, x, device="cpu", amp=torch.bfloat16, literal_tiles=True)

    def ours():
        return predict_array(net, cfg, x, device="cpu", amp=torch.bfloat16)

    def fp32_single():
        return predict_array(net, cfg, x, device="cpu", amp=None)

    print(f"2D U-Net F64 L3, {Z} slices {H}x{H}, 9 mirrored tiles per slice:")
    p32 = fp32_literal()
    res["2d_fp32_eager"] = timed(fp32_literal, 1, warmup=0)
    print(f"  fp32 eager, 9 tiles one by one   {fmt(res['2d_fp32_eager'])}")
    pl = bf16_literal()
    res["2d_bf16_literal"] = timed(bf16_literal, 1, warmup=0)
    res["2d_bf16_literal_vs_fp32"] = compare(pl, p32)
    print(f"  bf16 + channels-last, 9 tiles   {fmt(res['2d_bf16_literal'])}")
    res["2d_fp32_single_pass_vs_fp32_literal"] = compare(fp32_single(), p32)
    po = ours()
    res["2d_ours"] = timed(ours, args.reps, warmup=0)
    res["2d_ours_vs_fp32"] = compare(po, p32)
    print(f"  ours (bf16, one pass over the union of the 9 tiles) {fmt(res['2d_ours'])}  vs fp32 9 tiles: "
          f"max|dp| {res['2d_ours_vs_fp32']['max_abs_diff']:.4f} mask DSC {res['2d_ours_vs_fp32']['mask_dsc']:.5f}; "
          f"fp32 one pass vs fp32 9 tiles max|dp| {res['2d_fp32_single_pass_vs_fp32_literal']['max_abs_diff']:.1e}")


_TRAIN_STEP = r"""
import json, sys, time, torch
from femur_core.inference import autocast
from femur_core.loss import get_loss
from femur_core.models import MODELS, build_model
from femur_core.training import recipe
rec, shape, mode, reps, warmup = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cfg = recipe(rec)
loss_fn = get_loss(cfg.loss)
kind = MODELS[cfg.model.name].kind
amp = torch.bfloat16 if mode == "bf16" else None
torch.manual_seed(0)
net = build_model(cfg.model)
xb = torch.randn(*shape)
if amp is not None:
    cl = torch.channels_last_3d if kind == "3d" else torch.channels_last
    net, xb = net.to(memory_format=cl), xb.contiguous(memory_format=cl)
yb = (torch.rand(shape[0], *shape[2:]) < 0.1).long()
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
ts = []
for i in range(warmup + reps):
    t = time.perf_counter()
    with autocast(torch.device("cpu"), amp):
        lo = net(xb)
    loss = loss_fn(lo.float(), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i >= warmup:
        ts.append(time.perf_counter() - t)
        print(json.dumps(ts), flush=True)
"""


def _train_step_times(rec: str, shape, mode: str, reps: int, warmup: int, limit_s: float) -> dict:
    """Seconds per training step, measured in a fresh process stopped after ``limit_s``."""
    cmd = [sys.executable, "-c", _TRAIN_STEP, rec, json.dumps(list(shape)), mode, str(reps), str(warmup)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, check=True).stdout
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        lines = [ln for ln in done.splitlines() if ln.startswith("[")]
        return {"timed_out_after_s": limit_s, "steps_done": len(json.loads(lines[-1])) if lines else 0}
    ts = json.loads([ln for ln in out.splitlines() if ln.startswith("[")][-1])
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts),
            "steps_per_s": 1 / statistics.median(ts)}


def _fmt_step(t: dict) -> str:
    return fmt(t) if "median_s" in t else f"> {t['timed_out_after_s']:.0f} s (stopped; {t['steps_done']} steps done)"


def bench_train(args, res: dict) -> None:
    """Seconds per step of the default 2D (cpu-2d recipe) and 3D (study-3d) training steps:
    fp32 eager, bf16 autocast + channels-last, and ours = what train_model picks by default.
    Each path runs in its own process with a time limit (bf16 conv3d backward can take minutes)."""
    from femur_core.inference import resolve_amp
    from femur_core.models import MODELS
    from femur_core.training import recipe

    limit = 20 if args.quick else 45
    for name, rec, shape, reps in (("2d", "cpu-2d", (4, 3, 192, 192), 3),
                                   ("3d", "study-3d", (1, 1, 16, args.hw // 2, args.hw // 2), 2)):
        kind = MODELS[recipe(rec).model.name].kind
        out = {"shape": list(shape)}
        for mode in ("fp32", "bf16"):
            out[mode] = _train_step_times(rec, shape, mode, reps, 1, limit)
        picked = "bf16" if resolve_amp("auto", torch.device("cpu"), train_kind=kind) is not None else "fp32"
        out["ours"] = dict(out[picked], path=picked)
        if "median_s" in out["ours"] and "median_s" in out["fp32"]:
            out["speedup"] = out["fp32"]["median_s"] / out["ours"]["median_s"]
        res[f"train_{name}"] = out
        print(f"training step {name} ({rec}, batch {shape[0]} of {tuple(shape[2:])}): fp32 {_fmt_step(out['fp32'])}, "
              f"bf16+channels-last {_fmt_step(out['bf16'])}; ours = {picked}")


def bench_gui_ops(args, res: dict) -> None:
    """Threshold update and PR-curve recomputation on 60 x 512 x 512 (array work the widget does)."""
    from femur_core.metrics import curves_from_histogram

    rng = np.random.default_rng(0)
    shape = (60, 512, 512)
    zz, yy, xx = np.ogrid[:60, :512, :512]
    d = np.sqrt(((zz - 30) / 10.0) ** 2 + ((yy - 300) / 60.0) ** 2 + ((xx - 200) / 50.0) ** 2)
    prob = np.clip(1.5 - d + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    ref = d < 1.0
    labels = np.zeros(shape, np.uint8)
    res["gui_threshold_update"] = timed(lambda: np.greater_equal(prob, 0.5, out=labels.view(bool)), args.reps * 3)
    res["gui_pr_curve"] = timed(lambda: curves_from_histogram(prob, ref), args.reps * 3)
    print(f"GUI on 60x512x512: threshold update {fmt(res['gui_threshold_update'])}; "
          f"PR-curve recomputation {fmt(res['gui_pr_curve'])}  (the widget itself: bench/gui_speed.py)")


def bench_memory(args, res: dict) -> None:
    """Peak RSS of segmenting a 60 x 512 x 512 scan with the 3D U-Net on its native grid
    (sliding windows), in a fresh process."""
    code = r"""
import resource, sys, numpy as np, torch
from femur_core.models import build_model, default_config
from femur_core.inference import predict_array
cfg = default_config("3d", features=32, levels=4)
net = build_model(cfg).eval()
x = np.random.default_rng(0).normal(size=(60, 512, 512)).astype(np.float32)
p = predict_array(net, cfg, x, device="cpu", amp=torch.bfloat16, max_voxels=48 * 256 * 256)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss_gb = int(out.stdout.strip().splitlines()[-1]) / 1024**2
    res["memory_60x512x512_peak_rss_gb"] = rss_gb
    res["memory_60x512x512_seconds"] = time.perf_counter() - t0
    print(f"60x512x512 scan, 3D F32 L4 sliding windows (48x256x256), bf16: peak RSS {rss_gb:.2f} GB "
          f"({res['memory_60x512x512_seconds']:.1f} s)")


def bench_predict(args, res: dict) -> None:
    """Whole predict (read, preprocess, infer, cleanup, write) of a real scan with the default model."""
    scan = Path(args.scan)
    if not scan.exists():
        print(f"real scan {scan} absent: whole-predict timing skipped")
        res["predict_real"] = None
        return
    if not args.model or not Path(args.model).exists():
        print("no --model given (a folder from python -m femur_core.train): whole-predict timing skipped")
        res["predict_real"] = None
        return
    from femur_core.inference import load_model, predict_volume
    from femur_core.volume_io import PROB_SLOPE, read_volume, write_volume

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        k = [0]

        def once():
            img = read_volume(scan)
            pred = predict_volume(model, img)
            k[0] += 1
            write_volume(pred.prob, Path(tmp) / f"p{k[0]}_prob.nii.gz", dtype=np.uint8, slope=PROB_SLOPE)  # as predict
            write_volume(pred.mask, Path(tmp) / f"p{k[0]}_mask.nii.gz", dtype=np.uint8)

        res["predict_real"] = timed(once, args.reps)
        # the default (bf16) path against fp32 on a real scan with trained weights
        img = read_volume(scan)
        fast, ref = predict_volume(model, img), predict_volume(model, img, precision="fp32")
        res["predict_real_vs_fp32"] = compare(fast.prob.data, ref.prob.data)
        res["predict_real_vs_fp32"]["final_mask_dsc"] = float(dice(fast.mask.data > 0, ref.mask.data > 0))
    res["predict_real"]["scan"] = scan.name
    res["predict_real"]["model"] = str(args.model)
    print(f"whole predict of {scan.name} with {args.model} (flip TTA, cleanup, read+write): {fmt(res['predict_real'])}")
    c = res["predict_real_vs_fp32"]
    print(f"  same scan, default (bf16) vs --precision fp32: max|dp| {c['max_abs_diff']:.4f}, "
          f"mask DSC {c['final_mask_dsc']:.5f}")


def _other_path(step: dict) -> str:
    """'<picked>; <the other path> <its time>' for a training-step summary line."""
    other = "bf16" if step["ours"]["path"] == "fp32" else "fp32"
    return f"{step['ours']['path']}; {other} {_fmt_step(step[other]).strip()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the machine")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=str(ROOT / "models" / "femur"), help="default model folder for predict timing")
    ap.add_argument("--scan", default=str(ROOT.parent / "shared" / "data" / "pelvic_mri" / "sub01_image.nii.gz"))
    ap.add_argument("--out", help="results folder (default bench/results; --quick: a temporary folder)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up in logs as it happens
    args.z, args.hw, args.reps_slow, args.train_steps, args.monai_roi = 48, 256, 2, 0, 128
    if args.quick:
        args.z, args.hw, args.reps, args.reps_slow, args.train_steps, args.monai_roi = 16, 64, 2, 1, 3, 32
    res: dict = {"machine": machine(), "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    n = 2048 if args.quick else 4096
    res["matmul_bf16"] = matmul_flops(torch.bfloat16, n, args.reps)
    res["matmul_fp32"] = matmul_flops(torch.float32, n, args.reps)
    print(f"matmul {n}^3: bf16 {res['matmul_bf16']['tflops']:.2f} TFLOP/s, fp32 {res['matmul_fp32']['tflops']:.2f} TFLOP/s")
    bench_3d(args, res)
    bench_2d(args, res)
    bench_train(args, res)
    bench_gui_ops(args, res)
    if not args.quick:
        bench_memory(args, res)
    bench_predict(args, res)
    res["total_minutes"] = (time.perf_counter() - t0) / 60
    # ratios, all from this run
    r = {
        "3d_speedup_vs_fp32_eager": res["3d_fp32_eager"]["median_s"] / res["3d_ours"]["median_s"],
        "3d_speedup_vs_monai": (res["3d_monai"]["median_s"] / res["3d_ours"]["median_s"]) if res.get("3d_monai") else None,
        "3d_fraction_of_bf16_matmul_flops": res["3d_flops_fraction_of_bf16_matmul"],
        "2d_over_3d_time": res["2d_ours"]["median_s"] / res["3d_ours"]["median_s"],
        "2d_speedup_vs_fp32_eager": res["2d_fp32_eager"]["median_s"] / res["2d_ours"]["median_s"],
    }
    res["ratios"] = r
    print("\n== summary (medians; ratios from this run) ==")
    rows = [
        (f"3D F32 L4 {args.z}x{args.hw}x{args.hw} ours", fmt(res["3d_ours"]), "goal ~1.5 s"),
        ("  fraction of bf16 matmul FLOP/s", f"{r['3d_fraction_of_bf16_matmul_flops']:.2f}", "goal >= 0.60"),
        ("  speed-up vs fp32 eager", f"x{r['3d_speedup_vs_fp32_eager']:.2f}", "goal >= 5"),
        ("  speed-up vs MONAI sliding window", f"x{r['3d_speedup_vs_monai']:.2f}" if r["3d_speedup_vs_monai"] else "n/a", "goal >= 2"),
        ("  bf16 vs fp32 mask DSC", f"{res['3d_ours_vs_fp32']['mask_dsc']:.5f}", "goal >= 0.999"),
        (f"2D 9-tile {args.z} slices ours", fmt(res["2d_ours"]), ""),
        ("  2D / 3D time", f"{r['2d_over_3d_time']:.2f}", "goal <= 2"),
        ("  speed-up vs fp32 eager 9 tiles", f"x{r['2d_speedup_vs_fp32_eager']:.2f}", ""),
        ("  bf16 vs fp32 mask DSC", f"{res['2d_ours_vs_fp32']['mask_dsc']:.5f}", "goal >= 0.999"),
        *[(f"train step {k.upper()} ({name}) ours", _fmt_step(res[f"train_{k}"]["ours"]), _other_path(res[f"train_{k}"]))
          for k, name in (("2d", "cpu-2d"), ("3d", "study-3d"))],
        ("GUI threshold update 60x512x512", fmt(res["gui_threshold_update"]), "goal <= 0.050 s"),
        ("GUI PR curve 60x512x512", fmt(res["gui_pr_curve"]), "goal <= 0.200 s"),
    ]
    if "memory_60x512x512_peak_rss_gb" in res:
        rows.append(("peak RSS 60x512x512 segmentation", f"{res['memory_60x512x512_peak_rss_gb']:.2f} GB", "goal <= 4 GB"))
    if res.get("predict_real"):
        rows.append(("whole predict, real scan, default model", fmt(res["predict_real"]), "goal <= 5 s"))
        rows.append(("  bf16 vs fp32 final mask DSC (trained model)", f"{res['predict_real_vs_fp32']['final_mask_dsc']:.5f}",
                     "goal >= 0.999"))
    w = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>28}  {c}")
    out = Path(args.out or (tempfile.gettempdir() if args.quick else ROOT / "bench" / "results"))
    path = write_json(out / f"speed-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}.json", res, indent=2)
    print(f"\nwritten {path} ({res['total_minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""nnU-Net v2 trainer with a wall-clock training budget, for napari-femur's accuracy benchmark.

bench/accuracy/setup_peer.sh copies this file into ``nnunetv2/training/nnUNetTrainer/`` of the
peer's own virtual environment, where ``nnUNetv2_train ... -tr nnUNetTrainer_TimeBudget`` and
``nnUNetv2_predict ... -tr nnUNetTrainer_TimeBudget`` find it by class name.

It is nnU-Net's default trainer (network, loss, data augmentation, SGD with Nesterov momentum,
initial learning rate 1e-2, poly schedule, deep supervision, patch and batch size from the plans)
with four changes, all for a CPU under a fixed per-fold time budget:

* training stops at the first training iteration that starts past the budget
  ``FEMUR_BENCH_BUDGET_MINUTES`` (the same rule as femur_core's ``max_minutes``); the budget
  counts from the start of ``run_training`` (data loaders, network set-up and the training loop;
  not preprocessing, process start-up or the final checkpoint). The epoch in progress then
  finishes its bookkeeping (its validation batches, the log) and ``checkpoint_final.pth`` is
  written as usual;
* the poly learning-rate schedule runs on the elapsed share of the budget instead of the epoch
  count, ``lr = 1e-2 * (1 - t / budget) ** 0.9``, set before every iteration, so that the learning
  rate anneals to ~0 at the end of the budget as it does at the end of nnU-Net's 1000 epochs;
* short epochs, ``FEMUR_BENCH_ITERS_PER_EPOCH`` training iterations (default 10, nnU-Net: 250)
  and ``FEMUR_BENCH_VAL_ITERS`` validation batches (default 1, nnU-Net: 50), so that logs, the
  pseudo-Dice curve and checkpoints come at a useful rate on a CPU; ``num_epochs`` is
  effectively unbounded;
* nnU-Net's final full-image validation of the fold (``perform_actual_validation``) is skipped
  unless ``FEMUR_BENCH_NNUNET_VALIDATION=1``: the benchmark predicts the fold's cases with
  ``nnUNetv2_predict`` and scores them with femur_core's metrics instead.

``FEMUR_BENCH_BUDGET_CLOCK`` says what the budget counts: ``wall`` (default, ``time.monotonic``) or
``cpu``, the CPU time of the training process (``time.process_time``, all its threads), as
femur_core's ``--budget-clock cpu`` does; with ``cpu``, run with ``nnUNet_n_proc_DA=0`` so that the
data augmentation runs in this process (nnU-Net then uses a single-threaded augmenter) and its
CPU time is counted too. The per-epoch training loss, validation loss and pseudo-Dice, with the
budget clock, the wall clock and the CPU clock at each epoch's end, go to ``time_budget.json``
(``curve``) for the benchmark's loss-curve figure and convergence rule.

``FEMUR_BENCH_BATCH_SIZE`` (unset by default) replaces the plans' batch size, an optional CPU
concession that the benchmark records when used. ``OMP_NUM_THREADS``, when set, caps torch's CPU threads (``nnUNetv2_train -device cpu`` otherwise
uses every core). A summary (iterations, epochs, loop seconds, stop reason) goes to
``time_budget.json`` in the fold's output folder.
"""

from __future__ import annotations

import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


BUDGET_CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


class _TimePolyLR:
    """Poly learning rate over the elapsed share of the time budget (nnU-Net's exponent 0.9)."""

    def __init__(self, optimizer, initial_lr: float, trainer: "nnUNetTrainer_TimeBudget", exponent: float = 0.9):
        self.optimizer, self.initial_lr, self.trainer, self.exponent = optimizer, initial_lr, trainer, exponent
        self.step()

    def step(self, current_step=None):  # the epoch argument of PolyLRScheduler.step is ignored
        frac = min(max(self.trainer.budget_fraction(), 0.0), 1.0)
        lr = self.initial_lr * (1.0 - frac) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def get_last_lr(self):
        return self._last_lr


class nnUNetTrainer_TimeBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's own signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = 60.0 * float(os.environ.get("FEMUR_BENCH_BUDGET_MINUTES", "30"))
        self.num_iterations_per_epoch = int(os.environ.get("FEMUR_BENCH_ITERS_PER_EPOCH", "10"))
        self.num_val_iterations_per_epoch = int(os.environ.get("FEMUR_BENCH_VAL_ITERS", "1"))
        self.num_epochs = 100_000
        self.budget_clock = os.environ.get("FEMUR_BENCH_BUDGET_CLOCK", "wall")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"FEMUR_BENCH_BUDGET_CLOCK={self.budget_clock!r}: choose wall or cpu")
        self._now = BUDGET_CLOCKS[self.budget_clock]
        self._t0: float | None = None
        self._wall0 = self._cpu0 = 0.0
        self.curve: list[dict] = []
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if os.environ.get("FEMUR_BENCH_BATCH_SIZE"):  # off by default: the plans' batch size
            self.batch_size = max(1, int(os.environ["FEMUR_BENCH_BATCH_SIZE"]))

    # -- the budget ---------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        return 0.0 if self._t0 is None else self._now() - self._t0

    def _clocks_min(self) -> dict:
        return {"clock_minutes": round(self.elapsed_s() / 60, 4),
                "wall_minutes": round((time.monotonic() - self._wall0) / 60, 4),
                "cpu_minutes": round((time.process_time() - self._cpu0) / 60, 4)}

    def _log_value(self, key: str):
        try:
            v = self.logger.get_value(key, step=-1)
            return None if v is None else float(v)
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def budget_fraction(self) -> float:
        return self.elapsed_s() / self.budget_s if self.budget_s > 0 else 1.0

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, _TimePolyLR(optimizer, self.initial_lr, self)

    def run_training(self):
        self._t0, self._wall0, self._cpu0 = self._now(), time.monotonic(), time.process_time()
        self.on_train_start()
        stop_reason, iterations, epochs = "num_epochs", 0, 0
        for _ in range(self.current_epoch, self.num_epochs):
            if self.elapsed_s() > self.budget_s:
                stop_reason = "time_budget"
                break
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs, over = [], False
            for it in range(self.num_iterations_per_epoch):
                if it > 0 and self.elapsed_s() > self.budget_s:
                    over = True
                    break
                self.lr_scheduler.step()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                iterations += 1
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            epochs += 1
            self.curve.append({"epoch": epochs, "iterations": iterations, **self._clocks_min(),
                               "train_loss": self._log_value("train_losses"),
                               "val_loss": self._log_value("val_losses"),
                               "ema_pseudo_dice": self._log_value("ema_fg_dice")})
            if over:
                stop_reason = "time_budget"
                break
        loop_s = self.elapsed_s()
        loop_clocks = self._clocks_min()
        self.on_train_end()
        if self.local_rank == 0:
            summary = {
                "budget_minutes": self.budget_s / 60, "budget_clock": self.budget_clock,
                "loop_minutes": loop_s / 60, "loop_wall_minutes": loop_clocks["wall_minutes"],
                "loop_cpu_minutes": loop_clocks["cpu_minutes"],
                "with_final_checkpoint_minutes": self.elapsed_s() / 60, "stop_reason": stop_reason,
                "epochs": epochs, "iterations": iterations,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "batch_size": int(self.batch_size),
                "patch_size": [int(p) for p in self.configuration_manager.patch_size],
                "torch_threads": torch.get_num_threads(),
                "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
                "best_ema_pseudo_dice": float(self._best_ema) if self._best_ema is not None else None,
                "last_ema_pseudo_dice": float(self.logger.get_value("ema_fg_dice", step=-1)) if epochs else None,
                "configuration": self.configuration_name,
                "curve": self.curve,
            }
            with open(os.path.join(self.output_folder, "time_budget.json"), "w") as f:
                json.dump(summary, f, indent=2)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("FEMUR_BENCH_NNUNET_VALIDATION") == "1":
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("final validation skipped (the benchmark predicts with nnUNetv2_predict)")

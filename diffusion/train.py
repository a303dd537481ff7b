"""Training the diffusion prior: a noised-structure dataset and a Lightning module with EMA.

Each training example is one whole periodic cell of the dataset (cells as given: no rotations —
the model is equivariant — and no re-sizing), noised at a random t, with its radius graph built
for the noised positions. The module keeps an EMA copy of the score model; exported priors carry
the EMA weights.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from xanesdiff.datasets.graph import periodic_graph
from xanesdiff.diffusion.loss import dsm_loss
from xanesdiff.diffusion.schedule import VESchedule


class NoisedStructureDataset(Dataset):
    """`length` random draws: (random cell, t, noised positions, graph, displacement target).

    t = t_min + (1 − t_min)·u^t_power, u ~ U(0, 1), with probability 1 − extra_noise_fraction,
    else t ~ U(1, t_max_train): the extra levels (σ > k) show the model near-uniform
    configurations. t_power > 1 puts more draws at the intermediate noise where the network's
    topology forms (at σ ≳ 0.6 Å the denoising loss stays near its no-information value).
    `weights` (one per structure, relative; default equal) sets how often each cell is drawn.
    """

    def __init__(self, structures: list, schedule: VESchedule, cutoff_A: float,
                 length: int = 1000, t_min: float = 0.01, t_max_train: float = 2.0,
                 extra_noise_fraction: float = 0.2, seed: int = 0, t_power: float = 1.0,
                 weights: list[float] | None = None):
        if not structures:
            raise ValueError("no training structures")
        if weights is not None:
            weights = np.asarray(weights, dtype=float)
            if weights.shape != (len(structures),) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights: expected {len(structures)} non-negative numbers, "
                                 f"not all zero, got {weights.tolist()}")
            weights = weights / weights.sum()
        self.draw_probabilities = weights
        self.items = [(torch.tensor(a.positions, dtype=torch.float32),
                       torch.tensor(a.cell.array, dtype=torch.float32),
                       torch.tensor(a.numbers, dtype=torch.long)) for a in structures]
        self.schedule, self.cutoff_A, self.length = schedule, float(cutoff_A), int(length)
        self.t_min, self.t_max_train = float(t_min), float(t_max_train)
        self.extra_noise_fraction = float(extra_noise_fraction)
        self.t_power = float(t_power)
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, self.epoch, index, os.getpid()))
        pick = (rng.integers(len(self.items)) if self.draw_probabilities is None
                else rng.choice(len(self.items), p=self.draw_probabilities))
        pos0, cell, numbers = self.items[pick]
        if rng.random() < self.extra_noise_fraction and self.t_max_train > 1.0:
            t = rng.uniform(1.0, self.t_max_train)
        else:
            t = self.t_min + (1.0 - self.t_min) * rng.random() ** self.t_power
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        pos_t, disp = self.schedule.marginal_sample(pos0, cell, torch.tensor(t), generator=gen)
        sigma = torch.full((pos0.shape[0],), float(self.schedule.sigma(t)))
        return periodic_graph(pos_t, cell, numbers, self.cutoff_A, displacement=disp, sigma=sigma)


class PriorModule(L.LightningModule):
    """Denoising score matching of `score_model` under `schedule`, with an EMA copy."""

    def __init__(self, score_model: torch.nn.Module, schedule: VESchedule, lr: float = 2e-3,
                 ema_decay: float = 0.999, warmup_steps: int = 100, total_steps: int = 20000,
                 lr_min_ratio: float = 0.05):
        super().__init__()
        self.score_model = score_model
        self.ema_model = copy.deepcopy(score_model).requires_grad_(False)
        self.schedule = schedule
        self.lr, self.ema_decay = lr, ema_decay
        self.warmup_steps, self.total_steps, self.lr_min_ratio = warmup_steps, total_steps, lr_min_ratio
        self.skipped_in_a_row = 0  # non-finite losses since the last finite one

    def forward(self, data, model=None):
        model = model or self.score_model
        return model(data.pos, data.cell, data.z, data.sigma, data.edge_index, data.edge_shift,
                     data.batch)

    max_skipped_in_a_row = 20
    """Non-finite losses tolerated in a row (each batch skipped) before training stops."""

    def training_step(self, data, _):
        loss = dsm_loss(self(data), data.displacement, data.sigma, data.batch)
        if not torch.isfinite(loss):
            # skip the batch (no backward, no optimiser step): one bad draw must not poison the
            # weights; a run that keeps producing them has diverged and stops with an error
            self.skipped_in_a_row += 1
            self.log("train/skipped", float(self.skipped_in_a_row), batch_size=1)
            if self.skipped_in_a_row >= self.max_skipped_in_a_row:
                raise FloatingPointError(
                    f"{self.skipped_in_a_row} non-finite losses in a row at step "
                    f"{self.global_step}: training diverged; lower training.lr or set "
                    f"trainer.gradient_clip_val, and resume from the last finite checkpoint")
            return None
        self.skipped_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=int(data.num_graphs))
        return loss

    def validation_step(self, data, _):
        loss = dsm_loss(self(data, self.ema_model), data.displacement, data.sigma, data.batch)
        self.log("val/loss_ema", loss, batch_size=int(data.num_graphs))

    def on_train_batch_end(self, *_):
        decay = min(self.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema_model.parameters(), self.score_model.parameters()):
                p_ema.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.score_model.parameters(), lr=self.lr, weight_decay=0.0)

        def factor(step):
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            frac = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return self.lr_min_ratio + (1 - self.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class AtomicExport(L.Callback):
    """Every `every_min` minutes (and at the end of training): save the Lightning checkpoint
    (for resume) and export the EMA prior, each written to a temporary file then renamed."""

    def __init__(self, lightning_ckpt: str, prior_path: str, every_min: float = 5.0,
                 metadata: dict | None = None):
        self.lightning_ckpt, self.prior_path = Path(lightning_ckpt), Path(prior_path)
        self.every_s = every_min * 60
        self.metadata = metadata or {}
        self._last = time.monotonic()

    def export(self, trainer, module):
        from xanesdiff.diffusion.prior import save_prior

        if trainer.global_rank != 0:
            return
        if not all(bool(torch.isfinite(p).all()) for p in module.ema_model.parameters()):
            # keep the last good files rather than overwrite them with a diverged model
            raise FloatingPointError(
                f"the EMA weights at step {trainer.global_step} are not finite: not exported "
                f"(the last export in {self.prior_path} and {self.lightning_ckpt} is kept)")
        self.lightning_ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.lightning_ckpt.with_name(self.lightning_ckpt.name + ".tmp")
        trainer.save_checkpoint(str(tmp))
        os.replace(tmp, self.lightning_ckpt)
        meta = dict(self.metadata, global_step=int(trainer.global_step),
                    train_loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))
        save_prior(self.prior_path, module.ema_model, module.schedule, metadata=meta)
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, module, *_):
        if time.monotonic() - self._last >= self.every_s:
            self.export(trainer, module)

    def on_train_end(self, trainer, module):
        self.export(trainer, module)

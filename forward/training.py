"""Fitting a spectrum head on per-site features: the loss, the optimiser, the stopping rule.

Shared by the programmatic trainer (`train_surrogate`, used by the benchmark) and the Lightning
module behind ``xanesdiff train-forward``, so both train the same way. Stopping uses the
training loss only (never a held-out network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from xanesdiff.forward.heads import EnsembleHead


@dataclass
class HeadTrainConfig:
    """Optimisation settings for a head on cached features (mini-batches of random sites).

    `mean_weight` weighs the error of the per-frame mean spectrum (over the sites of a batch)
    against the per-site error: the per-site targets are noisy, the mean spectrum is what
    guidance matches. Each ensemble member draws its own random batches (diversity).
    Stopping: after `min_epochs`, stop when the epoch training loss has not improved by a
    relative `tol` over the last `patience` epochs, or at `max_epochs`.
    `featurizer_lr_scale` multiplies the learning rate of a trainable featuriser (fine-tuning
    a pretrained backbone wants a smaller step than the freshly initialised head).
    """

    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_sites: int = 512
    max_epochs: int = 60
    min_epochs: int = 15
    patience: int = 8
    tol: float = 2e-3
    mean_weight: float = 1.0
    feature_noise: float = 0.0
    featurizer_lr_scale: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def spectrum_loss(pred: torch.Tensor, target: torch.Tensor, frame_index: torch.Tensor,
                  n_frames: int, scale: torch.Tensor, mean_weight: float,
                  site_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled MSE of per-site spectra plus `mean_weight` × MSE of per-frame mean spectra.

    pred (K, N, M), target (N, M), frame_index (N,) in [0, n_frames), scale: intensity unit.
    `site_weight` (K, N) optionally weights sites per member (bagging masks).
    """
    diff = (pred - target.unsqueeze(0)) / scale
    if site_weight is None:
        site_weight = torch.ones(pred.shape[:2], dtype=pred.dtype, device=pred.device)
    site_term = ((diff ** 2).mean(-1) * site_weight).sum() / site_weight.sum()
    if mean_weight <= 0:
        return site_term
    K, _, M = pred.shape
    w = site_weight.unsqueeze(-1)
    summed = torch.zeros(K, n_frames, M, dtype=pred.dtype, device=pred.device)
    summed = summed.index_add(1, frame_index, diff * w)
    counts = torch.zeros(K, n_frames, dtype=pred.dtype, device=pred.device).index_add(
        1, frame_index, site_weight).clamp(min=1e-8)
    mean_term = ((summed / counts.unsqueeze(-1)) ** 2).mean()
    return site_term + mean_weight * mean_term


def make_optimizer(params, cfg: HeadTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class StopRule:
    """Training-loss plateau rule over epochs (see `HeadTrainConfig`)."""

    cfg: HeadTrainConfig
    history: list = field(default_factory=list)

    def update(self, loss: float) -> bool:
        """Record the epoch loss; True when training should stop."""
        self.history.append(float(loss))
        epoch, patience = len(self.history), self.cfg.patience
        if epoch >= self.cfg.max_epochs:
            return True
        if epoch < max(self.cfg.min_epochs, patience + 1):
            return False
        best_before = min(self.history[:-patience])
        best_recent = min(self.history[-patience:])
        return best_recent > best_before * (1.0 - self.cfg.tol)


def member_batches(n_members: int, n_sites: int, batch_sites: int, gen: torch.Generator):
    """Yield (K, B) site indices: each member walks its own permutation of the sites."""
    perms = torch.stack([torch.randperm(n_sites, generator=gen) for _ in range(n_members)])
    for start in range(0, n_sites - batch_sites // 2, batch_sites):
        yield perms[:, start:start + batch_sites]


def fit_head(head: EnsembleHead, features: list[torch.Tensor], spectra: list[torch.Tensor],
             cfg: HeadTrainConfig | None = None, progress: bool = False) -> list[float]:
    """Fit `head` in place on per-frame features [(N_f, F)] and spectra [(N_f, M)].

    Returns the epoch training-loss history.
    """
    cfg = cfg or HeadTrainConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.cat(features).float()
    y = torch.cat(spectra).float()
    frame_index = torch.cat([torch.full((len(f),), i, dtype=torch.long)
                             for i, f in enumerate(features)])
    head.fit_normalisation(x, y)
    optimizer = make_optimizer(head.parameters(), cfg)
    steps_per_epoch = max(1, round(len(x) / cfg.batch_sites))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, cfg.max_epochs * steps_per_epoch, cfg.lr * 0.05)
    stop = StopRule(cfg)
    feature_sd = torch.nan_to_num(head.feature_std, posinf=0.0)
    head.train()
    epochs = range(cfg.max_epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="fit head", leave=False)
    for _ in epochs:
        total, n = 0.0, 0
        for idx in member_batches(head.n_members, len(x), cfg.batch_sites, gen):
            loss = member_batch_loss(head, x, y, frame_index, len(features), idx, cfg,
                                     feature_sd, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, n = total + loss.item(), n + 1
        if stop.update(total / n):
            break
    head.eval()
    return stop.history


def member_batch_loss(head: EnsembleHead, x, y, frame_index, n_frames, idx, cfg, feature_sd=None,
                      gen=None) -> torch.Tensor:
    """Loss of every member on its own batch `idx` (K, B) of sites. The site tables (x, y,
    frame_index) may stay on the CPU: each batch is moved to the head's device."""
    device = head.feature_mean.device
    xin = x[idx].to(device)  # (K, B, F)
    if cfg.feature_noise and feature_sd is not None:
        noise = torch.randn(xin.shape, generator=gen, dtype=xin.dtype)  # on gen's (CPU) device
        xin = xin + cfg.feature_noise * feature_sd * noise.to(device)
    pred = head(xin)  # (K, B, M)
    target = y[idx].to(device)
    diff = (pred - target) / head.target_scale
    site_term = (diff ** 2).mean()
    if cfg.mean_weight <= 0:
        return site_term
    K, B, M = diff.shape
    flat = (frame_index[idx].to(device)
            + n_frames * torch.arange(K, device=device).unsqueeze(1)).reshape(-1)
    summed = torch.zeros(K * n_frames, M, dtype=diff.dtype, device=device).index_add(
        0, flat, diff.reshape(-1, M))
    counts = torch.bincount(flat, minlength=K * n_frames).to(diff.dtype)
    present = counts > 0
    mean_term = ((summed[present] / counts[present].unsqueeze(1)) ** 2).mean()
    return site_term + cfg.mean_weight * mean_term

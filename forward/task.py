"""Lightning training of a `Surrogate`: one code path for `train_surrogate` and ``train-forward``.

Frozen featuriser (M3GNet, descriptor): features of every training frame are computed once
(`FeatureCache`), and each step fits the ensemble head on random site batches, one batch per
member. Trainable featuriser (GNN from scratch, fine-tuned M3GNet): each step runs the whole
model on a few frames. Stopping watches the training loss only (`StopRule`).
"""

from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from xanesdiff.forward.m3gnet_features import FeatureCache
from xanesdiff.forward.surrogate import Surrogate, featurizer_is_trainable
from xanesdiff.forward.training import (HeadTrainConfig, StopRule, make_optimizer,
                                        member_batch_loss, member_batches, spectrum_loss)


class _SiteBatches(IterableDataset):
    """One epoch of (K, B) site-index batches; a fresh permutation per epoch."""

    def __init__(self, task: "SurrogateTask"):
        self.task = task

    def __iter__(self):
        task = self.task
        gen = torch.Generator().manual_seed(task.cfg.seed * 100003 + task.current_epoch)
        yield from member_batches(task.surrogate.head.n_members, task.n_sites,
                                  task.cfg.batch_sites, gen)

    def __len__(self):
        return self.task.steps_per_epoch


class _FrameBatches(IterableDataset):
    """One epoch of frame-index batches (`frames_per_step` frames each)."""

    def __init__(self, task: "SurrogateTask"):
        self.task = task

    def __iter__(self):
        task = self.task
        gen = torch.Generator().manual_seed(task.cfg.seed * 100003 + task.current_epoch)
        order = torch.randperm(len(task.frames), generator=gen)
        step = task.frames_per_step
        for start in range(0, len(order), step):
            yield order[start:start + step]

    def __len__(self):
        return self.task.steps_per_epoch


class SurrogateTask(L.LightningModule):
    """Fits `surrogate` on `frames` (each with `atoms` and `site_spectra`)."""

    def __init__(self, surrogate: Surrogate, frames: list, cfg: HeadTrainConfig,
                 frames_per_step: int = 2, cache=None,
                 progress: bool = False):
        super().__init__()
        self.surrogate = surrogate
        self.frames = list(frames)
        self.cfg = cfg
        self.frames_per_step = int(frames_per_step)
        self.cache = cache
        self.progress = bool(progress)
        self.end_to_end = featurizer_is_trainable(surrogate.featurizer)
        self.stop = StopRule(cfg)
        self._epoch_losses: list[float] = []
        self._prepared = False

    # -- data ------------------------------------------------------------------------------
    def prepare_features(self) -> None:
        """Cache the features (frozen featuriser) and fit the head's normalisation."""
        if self._prepared:
            return
        surrogate, absorber = self.surrogate, self.surrogate.absorber_number
        masks = [torch.as_tensor(f.atoms.numbers) == absorber for f in self.frames]
        spectra = [torch.as_tensor(f.site_spectra, dtype=torch.float32) for f in self.frames]
        for f, m, s in zip(self.frames, masks, spectra):
            if int(m.sum()) != s.shape[0]:
                raise ValueError(f"{f.name}: {s.shape[0]} spectra for {int(m.sum())} absorbers")
        self.y = torch.cat(spectra)
        self.frame_index = torch.cat([torch.full((len(s),), i, dtype=torch.long)
                                      for i, s in enumerate(spectra)])
        if self.end_to_end:
            with torch.no_grad():
                x = torch.cat([surrogate.featurizer.features_of_atoms(f.atoms)[m]
                               for f, m in zip(self.frames, masks)])
            self.frame_spectra, self.frame_masks = spectra, masks
        else:
            cache = self.cache if isinstance(self.cache, FeatureCache) else FeatureCache(
                surrogate.featurizer, self.cache)
            frames = self.frames
            try:
                from tqdm import tqdm

                frames = tqdm(frames, desc="features", leave=False, disable=not self.progress)
            except ImportError:
                pass
            x = torch.cat([cache(f.atoms)[m] for f, m in zip(frames, masks)])
        self.x = x.float()
        surrogate.head.fit_normalisation(self.x, self.y)
        self.n_sites = len(self.y)
        if self.end_to_end:
            self.steps_per_epoch = math.ceil(len(self.frames) / self.frames_per_step)
        else:
            self.steps_per_epoch = len(range(0, self.n_sites - self.cfg.batch_sites // 2,
                                             self.cfg.batch_sites))
        self._prepared = True

    def setup(self, stage: str) -> None:
        self.prepare_features()

    def train_dataloader(self):
        dataset = _FrameBatches(self) if self.end_to_end else _SiteBatches(self)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    # -- optimisation ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if self.end_to_end:
            loss = self._frames_loss(batch)
        else:
            self.surrogate.featurizer.eval()
            loss = member_batch_loss(self.surrogate.head, self.x, self.y, self.frame_index,
                                     len(self.frames), batch, self.cfg,
                                     torch.nan_to_num(self.surrogate.head.feature_std, posinf=0.0))
        self._epoch_losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=1)
        return loss

    def _frames_loss(self, frame_ids: torch.Tensor) -> torch.Tensor:
        preds, targets, index = [], [], []
        for j, fid in enumerate(frame_ids.tolist()):
            atoms = self.frames[fid].atoms
            dtype = self.surrogate.head.feature_mean.dtype
            pred = self.surrogate.site_spectra(
                torch.tensor(atoms.positions, dtype=dtype, device=self.device),
                torch.tensor(atoms.cell.array, dtype=dtype, device=self.device),
                torch.tensor(atoms.numbers, device=self.device))
            preds.append(pred)
            targets.append(self.frame_spectra[fid].to(self.device))
            index.append(torch.full((pred.shape[1],), j, dtype=torch.long, device=self.device))
        return spectrum_loss(torch.cat(preds, 1), torch.cat(targets), torch.cat(index),
                             len(preds), self.surrogate.head.target_scale, self.cfg.mean_weight)

    def on_train_epoch_end(self) -> None:
        if self._epoch_losses:
            loss = sum(self._epoch_losses) / len(self._epoch_losses)
            self._epoch_losses = []
            if self.stop.update(loss):
                self.trainer.should_stop = True

    def configure_optimizers(self):
        head = [p for p in self.surrogate.head.parameters() if p.requires_grad]
        featurizer = [p for p in self.surrogate.featurizer.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": self.cfg.lr}]
        if featurizer:
            groups.append({"params": featurizer, "lr": self.cfg.lr * self.cfg.featurizer_lr_scale})
        optimizer = make_optimizer(groups, self.cfg)
        total = max(1, self.cfg.max_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total)
                                                                     / total)))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints: carry the stop rule so a resumed run stops where it would have -------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stop_history"] = list(self.stop.history)
        checkpoint["surrogate"] = self.surrogate.checkpoint_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stop.history = list(checkpoint.get("stop_history", []))

    def on_train_epoch_start(self) -> None:
        if not self.end_to_end:
            self.surrogate.featurizer.eval()


def quiet_lightning() -> None:
    """Silence Lightning's banner lines (GPU/TPU availability, tips) for programmatic runs."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*TreeSpec.*")

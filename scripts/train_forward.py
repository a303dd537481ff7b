"""`xanesdiff train-forward [key=value ...]`: train the forward surrogate (structure -> XANES).

    xanesdiff train-forward                                   # -> runs/forward/surrogate.pt
    xanesdiff train-forward export_path=checkpoints/forward_default.pt
    xanesdiff train-forward forward=m3gnet_matpes head.seed=1 train.seed=1 \
        export_path=checkpoints/forward_judge.pt out_dir=runs/forward_judge
    xanesdiff train-forward data.exclude_densities=[2.5]      # leave one network out
    xanesdiff train-forward ckpt_path=auto                    # resume from out_dir/checkpoints/last.ckpt
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xanesdiff.runtime import lightning_trainer_options
from xanesdiff.scripts._hydra import hydra_app


def select_frames(cfg_data) -> tuple[list, list[str], object]:
    """Training frames (whole networks excluded by density) and the dataset's grid."""
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.errors import XanesdiffInputError

    dataset = load_dataset(root=cfg_data.root, asset=cfg_data.asset)
    excluded = dataset.networks_at(cfg_data.exclude_densities or [],
                                   cfg_data.density_tol_g_cm3, "data.exclude_densities")
    frames = [f for f in dataset.frames if f.network not in excluded]
    if not frames:
        raise XanesdiffInputError("every network is excluded; nothing to train on",
                                  "data.exclude_densities")
    return frames, excluded, dataset.grid


def run(cfg: DictConfig) -> dict:
    import lightning as L
    import torch

    from xanesdiff.forward.surrogate import build_surrogate
    from xanesdiff.forward.task import SurrogateTask, quiet_lightning
    from xanesdiff.forward.training import HeadTrainConfig

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.train.seed), workers=True, verbose=False)
    quiet_lightning()
    frames, excluded, grid = select_frames(cfg.data)
    train_cfg = HeadTrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    command = "xanesdiff train-forward " + " ".join(sys.argv[1:])
    surrogate = build_surrogate(
        OmegaConf.to_container(cfg.forward.featurizer, resolve=True),
        OmegaConf.to_container(cfg.head, resolve=True), grid, cfg.absorber,
        {"train": train_cfg.to_dict(), "command": command.strip(),
         "excluded_networks": excluded, "n_frames": len(frames),
         "frames": [f.name for f in frames]})
    task = SurrogateTask(surrogate, frames, train_cfg, frames_per_step=int(cfg.frames_per_step),
                         cache=cfg.feature_cache, progress=bool(cfg.progress))
    out_dir = Path(cfg.out_dir)
    checkpointing = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(out_dir / "checkpoints"), save_last=True, save_top_k=0, every_n_epochs=1,
        enable_version_counter=False)  # a fresh run overwrites last.ckpt (no last-v1.ckpt)
    trainer = L.Trainer(
        max_epochs=train_cfg.max_epochs, callbacks=[checkpointing], num_sanity_val_steps=0,
        logger=L.pytorch.loggers.CSVLogger(str(out_dir), name="logs"),
        enable_progress_bar=bool(cfg.progress), enable_model_summary=False,
        **lightning_trainer_options(OmegaConf.to_container(cfg.trainer, resolve=True)))
    ckpt = cfg.ckpt_path
    if ckpt == "auto":
        last = out_dir / "checkpoints" / "last.ckpt"
        ckpt = str(last) if last.exists() else None
    trainer.fit(task, ckpt_path=ckpt)
    surrogate.eval()
    path = surrogate.save(cfg.export_path) if trainer.global_rank == 0 else None
    summary = {"export_path": str(path), "epochs": int(trainer.current_epoch),
               "global_step": int(trainer.global_step),
               "train_loss": task.stop.history[-1] if task.stop.history else None,
               "excluded_networks": excluded, "n_frames": len(frames),
               "machine": platform.node() or platform.machine()}
    print(json.dumps(summary))
    return summary


@hydra_app("train_forward")
def main(cfg: DictConfig):
    run(cfg)
    return 0


if __name__ == "__main__":
    main()

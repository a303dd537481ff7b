"""`xanesdiff train-prior [key=value ...]`: train the equivariant diffusion prior.

    xanesdiff train-prior                                   # default prior -> checkpoints/prior_default.pt
    xanesdiff train-prior data.exclude_densities=[2.5] export_path=checkpoints/prior_without_2.5.pt \
        out_dir=runs/prior_without_2.5
    xanesdiff train-prior resume=auto                       # continue from out_dir/last.ckpt
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xanesdiff.runtime import lightning_trainer_options
from xanesdiff.scripts._hydra import hydra_app


def select_structures(cfg_data) -> tuple[list, list[str], list[float]]:
    """Training cells, the excluded networks, and each cell's relative draw weight: a network's
    weight (`data.network_weights`: {density g/cm³: weight} for the networks named, 1 for the
    rest), shared among its cells when `data.balance_networks` (every network then drawn as
    often, however many snapshots it has), else given to each of its cells."""
    from collections import Counter

    from xanesdiff.datasets.assets import resolve_asset
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.errors import XanesdiffInputError

    dataset = load_dataset(root=cfg_data.root, asset=cfg_data.asset)
    excluded = dataset.networks_at(cfg_data.exclude_densities or [],
                                   cfg_data.density_tol_g_cm3, "data.exclude_densities")
    frames = [f for f in dataset.frames if f.network not in excluded]
    weight_of = {}
    for density, weight in (cfg_data.get("network_weights") or {}).items():
        try:
            density, weight = float(density), float(weight)
        except (TypeError, ValueError):
            raise XanesdiffInputError(f"expected {{density g/cm³: weight}} numbers, got "
                                      f"{density!r}: {weight!r}", "data.network_weights") from None
        for network in dataset.networks_at([density], cfg_data.density_tol_g_cm3,
                                           "data.network_weights"):
            weight_of[network] = weight
    cells_of = Counter(f.network for f in frames) if cfg_data.get("balance_networks") else {}
    structures = [f.atoms for f in frames]
    weights = [weight_of.get(f.network, 1.0) / cells_of.get(f.network, 1) for f in frames]
    for path, weight in (cfg_data.get("extra_structures") or {}).items():
        extra = extra_structures(resolve_asset(cfg_data.asset, cfg_data.root), path, weight)
        structures += extra
        weights += [float(weight) / len(extra)] * len(extra)
    return structures, excluded, weights


def extra_structures(root: Path, path: str, weight) -> list:
    """Frames of a structure file added to the prior's training cells (`data.extra_structures`:
    {file: weight}, a path relative to the dataset folder or absolute), carbon only; the file as
    a whole is drawn as often as a network of that weight."""
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.datasets.structures import check_elements, read_structures

    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = -1.0
    if not weight > 0:
        raise XanesdiffInputError(f"expected {{file: positive weight}}, got {path!r}: {weight!r}",
                                  "data.extra_structures")
    file = Path(path) if Path(path).is_absolute() else Path(root) / path
    frames = read_structures(file)
    for i, atoms in enumerate(frames):
        check_elements(atoms, {"C"}, f"{file} (frame {i})")
    return frames


def warm_start(score_model, path: str) -> None:
    """Start from the (EMA) weights of an exported prior; its architecture must match, except
    that a density embedding the source lacks is added (it starts at zero: same scores), and
    that a deeper model gets its extra interaction layers inserted before the source's last one,
    each starting as the identity (same scores): more capacity without starting over."""
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.diffusion.prior import learned_state, load_prior

    source = load_prior(path).score_model
    n_source, n_target = source.config()["n_layers"], score_model.config()["n_layers"]
    inserted = range(n_source - 1, n_target - 1)
    state = learned_state(source.state_dict())
    if n_target > n_source:
        last = f"layers.{n_source - 1}."
        state = {(f"layers.{n_target - 1}." + k[len(last):] if k.startswith(last) else k): v
                 for k, v in state.items()}
    try:
        missing, unexpected = score_model.load_state_dict(state, strict=False)
        new = ("density_embedding.",) + tuple(f"layers.{k}." for k in inserted)
        not_new = [k for k in missing if not k.startswith(new)]
        problem = (f"missing keys {not_new[:3]}, unexpected keys {unexpected[:3]}"
                   if not_new or unexpected else None)
    except RuntimeError as exc:  # a parameter of another shape
        problem = str(exc).splitlines()[0]
    if problem:
        raise XanesdiffInputError(f"weights do not fit score_model: {problem}; use the "
                                  f"score_model config the prior was trained with (n_layers "
                                  f"may be larger)", str(path))
    for k in inserted:
        score_model.layers[k].start_as_identity()


def run(cfg: DictConfig) -> dict:
    import hydra
    import lightning as L
    import torch
    from torch_geometric.loader import DataLoader

    from xanesdiff.diffusion.train import AtomicExport, NoisedStructureDataset, PriorModule

    torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.training.seed), workers=True)
    structures, excluded, weights = select_structures(cfg.data)
    schedule = hydra.utils.instantiate(cfg.schedule)
    score_model = hydra.utils.instantiate(cfg.score_model)
    if cfg.get("init_from"):
        warm_start(score_model, cfg.init_from)
    tr = cfg.training
    dataset = NoisedStructureDataset(structures, schedule, score_model.cutoff_A,
                                     length=tr.steps_per_epoch * tr.batch_size, t_min=tr.t_min,
                                     t_max_train=tr.t_max_train,
                                     extra_noise_fraction=tr.extra_noise_fraction, seed=tr.seed,
                                     t_power=tr.get("t_power", 1.0), weights=weights)
    loader = DataLoader(dataset, batch_size=tr.batch_size, shuffle=False, num_workers=0)
    module = PriorModule(score_model, schedule, lr=tr.lr, ema_decay=tr.ema_decay,
                         warmup_steps=tr.warmup_steps, total_steps=tr.max_steps,
                         lr_min_ratio=tr.lr_min_ratio)
    out_dir = Path(cfg.out_dir)
    command = "xanesdiff train-prior " + " ".join(sys.argv[1:])
    metadata = {"command": command.strip(), "n_structures": len(structures),
                "excluded_networks": excluded, "machine": platform.node() or platform.machine(),
                "config": OmegaConf.to_container(cfg, resolve=True)}
    exporter = AtomicExport(str(out_dir / "last.ckpt"), cfg.export_path,
                            every_min=cfg.export_every_min, metadata=metadata)

    class EpochCounter(L.Callback):
        def on_train_epoch_start(self, trainer, _):
            dataset.epoch = trainer.current_epoch

    trainer = L.Trainer(
        max_steps=tr.max_steps, max_time=tr.max_time, enable_checkpointing=False,
        logger=L.pytorch.loggers.CSVLogger(str(out_dir), name="logs"),
        callbacks=[exporter, EpochCounter()], enable_progress_bar=False,
        **lightning_trainer_options(OmegaConf.to_container(cfg.trainer, resolve=True)))
    ckpt = cfg.resume
    if ckpt == "auto":
        ckpt = str(out_dir / "last.ckpt") if (out_dir / "last.ckpt").exists() else None
    trainer.fit(module, loader, ckpt_path=ckpt)
    summary = {"global_step": int(trainer.global_step), "export_path": str(cfg.export_path),
               "train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
               "excluded_networks": excluded}
    print(json.dumps(summary))
    return summary


@hydra_app("train_prior")
def main(cfg: DictConfig):
    run(cfg)
    return 0


if __name__ == "__main__":
    main()

"""`DiffusionPrior`: schedule + score model + cutoff, the object guidance and sampling use.

    prior = load_prior()                     # shipped checkpoints/prior_default.pt (EMA weights)
    s = prior.score(pos, cell, numbers, t)   # (N,3) 1/Å, differentiable in pos
    x0 = prior.denoise(pos, cell, numbers, t)
    atoms = prior.sample(density_g_cm3=2.0, n_samples=4, seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.diffusion.autoguidance import Autoguidance, AutoguidedScoreModel
from xanesdiff.diffusion.fidelity_record import FidelityRecord, load_fidelity_record
from xanesdiff.diffusion.hard_core import HardCoreScore
from xanesdiff.diffusion.neighbors import NeighborListCache
from xanesdiff.diffusion.schedule import VESchedule, schedule_from_config
from xanesdiff.diffusion.score_model import EquivariantScoreModel

CHECKPOINT_KIND = "diffusion_prior"
CHECKPOINT_VERSION = 1


class DiffusionPrior:
    """A trained score model under its noise schedule, with a neighbour-list cache, plus
    (optionally) the analytic score of a hard core where the data has no pairs."""

    def __init__(self, score_model: torch.nn.Module, schedule: VESchedule,
                 skin_A: float = 1.0, metadata: dict | None = None,
                 hard_core: HardCoreScore | None = None):
        # sampling differentiates positions only: frozen weights spare every backward pass
        # (guidance's, a recomputed one's) their gradients
        self.score_model = score_model.eval().requires_grad_(False)
        self.schedule = schedule
        self.hard_core = hard_core
        self.cutoff_A = float(score_model.cutoff_A)
        self.neighbors = NeighborListCache(self.cutoff_A, skin_A)
        self.metadata = dict(metadata or {})
        self.fidelity: FidelityRecord | None = None  # what its benchmark measured, if recorded

    @property
    def dtype(self) -> torch.dtype:
        return next(self.score_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the score model runs; inputs are moved there, scores come back to theirs."""
        return next(self.score_model.parameters()).device

    def score_batch(self, pos_A: torch.Tensor, cell_A: torch.Tensor, numbers: torch.Tensor,
                    t, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Score (N,3) in 1/Å of a batch of cells: cell (B,3,3), batch (N,) mapping atoms to cells
        (contiguous). Differentiable w.r.t. `pos_A` when it requires grad. Computed on the
        model's device in its dtype, returned on the positions' device in their dtype."""
        device, dtype = self.device, self.dtype
        pos = pos_A.to(device=device, dtype=dtype)
        cell = torch.as_tensor(cell_A).to(device=device, dtype=dtype).reshape(-1, 3, 3)
        numbers = torch.as_tensor(numbers, dtype=torch.long).to(device)
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=device)
        batch = batch.to(device)
        edge_index, edge_shift = self.neighbors.get(pos, cell, batch)
        sigma = self.schedule.sigma(torch.as_tensor(t, dtype=dtype).to(device))
        out = self.score_model(pos, cell, numbers, sigma, edge_index, edge_shift, batch)
        if self.hard_core is not None:
            out = out + self.hard_core(pos, cell, edge_index, edge_shift, batch, float(sigma))
        return out.to(device=pos_A.device, dtype=pos_A.dtype)

    def score(self, pos_A: torch.Tensor, cell_A: torch.Tensor, numbers, t) -> torch.Tensor:
        """Score ∇ log p_t(x) (N,3) in 1/Å for one cell: pos (N,3) Å, cell (3,3) Å, t ∈ (0, 1]."""
        return self.score_batch(pos_A, cell_A, numbers, t)

    def denoise(self, pos_A: torch.Tensor, cell_A: torch.Tensor, numbers, t) -> torch.Tensor:
        """Tweedie estimate x̂0 = x + σ(t)²·score (Å), not wrapped (differentiable in pos)."""
        sigma = self.schedule.sigma(float(t))
        return pos_A + sigma ** 2 * self.score(pos_A, cell_A, numbers, t)

    def sample(self, n_atoms: int | None = None, density_g_cm3: float | None = None,
               cell_A=None, n_samples: int = 1, seed: int = 0, sampler=None,
               extra_score=None):
        """Sample cells (list of ASE Atoms); see `xanesdiff.diffusion.sampling.sample_structures`.
        `extra_score(pos, t) -> (N,3)` is added to the prior's score (guidance hook)."""
        from xanesdiff.diffusion.sampling import sample_structures

        return sample_structures(self, n_atoms=n_atoms, density_g_cm3=density_g_cm3,
                                 cell_A=cell_A, n_samples=n_samples, seed=seed, sampler=sampler,
                                 extra_score=extra_score)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
           ) -> "DiffusionPrior":
        """Move the score model to `device` and/or cast it to `dtype` (in place; returns self).
        A bare dtype is accepted too (`prior.to(torch.float64)`)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.score_model = self.score_model.to(device=device, dtype=dtype)
        self.neighbors.clear()  # its cached graph lives on the old device
        return self


def learned_state(state_dict: dict) -> dict:
    """The state without e3nn's code-generated constants: a deep copy of a compiled tensor product
    (the EMA model is one) lists its Wigner-3j constant as `..._compiled_main_*._tensor_constantK`,
    which a freshly built model does not have; every model rebuilds it from its irreps."""
    return {k: v for k, v in state_dict.items()
            if not ("._compiled_main" in k and "._tensor_constant" in k)}


def save_prior(path: str | os.PathLike, score_model: torch.nn.Module, schedule: VESchedule,
               metadata: dict | None = None) -> Path:
    """Write a self-describing prior checkpoint (kind, version, constructor config, weights),
    atomically (temporary file then rename)."""
    import xanesdiff

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "xanesdiff_version": xanesdiff.__version__,
        "score_model": {"class": type(score_model).__name__,
                        "target": f"{type(score_model).__module__}.{type(score_model).__qualname__}",
                        "config": score_model.config()},
        "schedule": schedule.config(),
        "state_dict": {k: v.detach().cpu().float()
                       for k, v in learned_state(score_model.state_dict()).items()},
        "metadata": dict(metadata or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


# Shipped priors by name: the default (l ≤ 3 hidden features), one ≈2.5× cheaper per score
# call (l ≤ 1, the default until session 7) for very large cells and quick runs, the PaiNN
# model (≈6× cheaper per call than the default), and the default's architecture trained without
# the 2.5 g/cm³ network (the leave-out benchmark's prior, and the weaker model that autoguides
# the default in dense cells).
SHIPPED_PRIORS = {"default": "prior_default.pt", "fast": "prior_fast.pt",
                  "painn": "prior_painn.pt", "without_2.5": "prior_without_2.5.pt"}

# What `autoguidance="auto"` means for each shipped prior (the others have none): the default
# prior pushed away from the less-trained `without_2.5`, from 0 at 3.0 to full weight at 3.5 g/cm³,
# where it lowers the five-fold sites at 3.49 g/cm³ from 2.4 to 1.7 % and raises sp3 from 0.906 to
# 0.926 (reference 0.938; four seeds, benchmarks/prior.json, session19_autoguidance).
SHIPPED_AUTOGUIDANCE = {"default": Autoguidance(weaker="without_2.5", weight=1.0,
                                                from_g_cm3=3.0, to_g_cm3=3.5)}


def prior_checkpoint_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A shipped prior's name (`SHIPPED_PRIORS`; None: default) → its file; a path → itself."""
    import xanesdiff

    return xanesdiff.shipped_checkpoint_path(name_or_path, SHIPPED_PRIORS)


def score_model_class(spec: dict, path: Path) -> type:
    """The class a checkpoint's `score_model` entry names: its `target` (a class inside
    xanesdiff, e.g. xanesdiff.diffusion.painn_score_model.PaiNNScoreModel), or for checkpoints
    written before targets were stored, `class` in `score_model.py`."""
    import importlib

    target = spec.get("target") or (f"{EquivariantScoreModel.__module__}."
                                    f"{spec.get('class', EquivariantScoreModel.__name__)}")
    module_name, _, name = str(target).rpartition(".")
    try:
        if not module_name.startswith("xanesdiff."):
            raise ImportError("only score models of xanesdiff are loaded")
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise XanesdiffInputError(
            f"score model class {target!r} cannot be loaded ({exc}); the checkpoint needs the "
            f"xanesdiff version that wrote it", str(path)) from None


def read_prior_checkpoint(path: Path) -> tuple[torch.nn.Module, VESchedule, dict]:
    """(score model, schedule, metadata) of a prior checkpoint file, with clear errors for a
    missing, unreadable, foreign or too new file."""
    if not path.exists():
        raise XanesdiffInputError("prior checkpoint does not exist", str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise XanesdiffInputError(
            f"could not be read as a checkpoint ({type(exc).__name__}: {exc})", str(path)) from None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind != CHECKPOINT_KIND:
        raise XanesdiffInputError(
            f"checkpoint kind is {kind!r}, expected {CHECKPOINT_KIND!r} (a diffusion prior saved "
            "by `xanesdiff train-prior`)", str(path))
    if payload.get("version") != CHECKPOINT_VERSION:
        raise XanesdiffInputError(
            f"checkpoint version {payload.get('version')!r} is not supported (expected "
            f"{CHECKPOINT_VERSION}); retrain or use a matching xanesdiff", str(path))
    model = score_model_class(payload["score_model"], path)(**payload["score_model"]["config"])
    model.load_state_dict(learned_state(payload["state_dict"]))
    return model, schedule_from_config(payload["schedule"]), dict(payload.get("metadata") or {})


def load_prior(path: str | os.PathLike | None = None, skin_A: float = 1.0,
               hard_core_A: float | None = 1.1, device: str | torch.device = "cpu",
               autoguidance: Autoguidance | Mapping | str | None = None) -> DiffusionPrior:
    """Load a prior checkpoint: a path, or a shipped name (`SHIPPED_PRIORS`: default | fast |
    painn | without_2.5);
    `None` loads the default. `hard_core_A` (Å): closest pair distance kept by a
    `HardCoreScore` (None: the learned score alone). `device`: where the score model runs.
    `autoguidance`: push the score away from a weaker prior's (`autoguidance.py`): an
    `Autoguidance` or its fields as a mapping, "auto" (the pairing shipped for this prior,
    `SHIPPED_AUTOGUIDANCE`, if any), or None / "none" / a weight of 0: the prior's own score.
    The benchmark record beside the checkpoint, if any, becomes `prior.fidelity`."""
    path = prior_checkpoint_path(path)
    model, schedule, metadata = read_prior_checkpoint(path)
    autoguidance = resolve_autoguidance(autoguidance, path)
    if autoguidance is not None and float(autoguidance.weight) > 0:
        model = autoguided(model, schedule, autoguidance)
        metadata["autoguidance"] = {**asdict(autoguidance), "weaker": str(
            prior_checkpoint_path(autoguidance.weaker))}
    hard_core = HardCoreScore(hard_core_A) if hard_core_A is not None else None
    prior = DiffusionPrior(model, schedule, skin_A=skin_A, metadata=metadata,
                           hard_core=hard_core).to(device)
    prior.fidelity = load_fidelity_record(path)
    return prior


def resolve_autoguidance(setting: Autoguidance | Mapping | str | None, prior_path: Path
                         ) -> Autoguidance | None:
    """An `Autoguidance` (or None) from a config's setting for the prior at `prior_path`."""
    if setting is None or isinstance(setting, Autoguidance):
        return setting
    if isinstance(setting, str):
        if setting == "none":
            return None
        if setting == "auto":
            shipped = {prior_checkpoint_path(name).resolve(): choice
                       for name, choice in SHIPPED_AUTOGUIDANCE.items()}
            return shipped.get(Path(prior_path).resolve())
    elif isinstance(setting, Mapping):
        try:
            return Autoguidance(**setting)
        except TypeError as exc:
            raise XanesdiffInputError(
                f"{exc}; expected fields weaker, weight, from_g_cm3, to_g_cm3",
                "autoguidance") from None
    raise XanesdiffInputError(f"expected auto, none or a mapping with a weaker prior, got "
                              f"{setting!r}", "autoguidance")


def autoguided(model: torch.nn.Module, schedule: VESchedule, autoguidance: Autoguidance
               ) -> AutoguidedScoreModel:
    """`model` autoguided by the weaker prior that `autoguidance` names, which must share its
    cutoff and noise `schedule` (a clear error naming the weaker file otherwise)."""
    weak_path = prior_checkpoint_path(autoguidance.weaker)
    weak_model, weak_schedule, _ = read_prior_checkpoint(weak_path)
    if weak_schedule.config() != schedule.config():
        raise XanesdiffInputError(
            f"the weaker prior's noise schedule {weak_schedule.config()} differs from the "
            f"prior's {schedule.config()}; autoguidance needs one schedule", str(weak_path))
    try:
        return AutoguidedScoreModel(model, weak_model, float(autoguidance.weight),
                                    autoguidance.from_g_cm3, autoguidance.to_g_cm3)
    except ValueError as exc:
        raise XanesdiffInputError(str(exc), str(weak_path)) from None

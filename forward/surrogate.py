"""The forward surrogate: structure → per-site XANES (ensemble), differentiable in positions and cell.

    surrogate = load_surrogate()                       # shipped checkpoints/forward_default.pt
    members = surrogate.mean_spectrum(pos_A, cell_A, numbers)   # (K, M), K ensemble members
    sites = surrogate.site_spectra(pos_A, cell_A, numbers)      # (K, N_abs, M)

A `Surrogate` is a featuriser (pos, cell, numbers → per-atom features (N, F)) followed by an
`EnsembleHead` (features → K non-negative spectra per site). Featurisers are chosen by name in the
config (`FEATURIZERS`): ``m3gnet`` (pretrained M3GNet node features, the default), ``descriptor``
(radial + angular histograms) and ``gnn_scratch`` (a small message-passing net trained from
scratch), the last two being the benchmark baselines.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

import xanesdiff
from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.forward.heads import EnsembleHead

CHECKPOINT_KIND = "forward_surrogate"
CHECKPOINT_FORMAT = 1
"""Bumped when the checkpoint layout changes; a checkpoint of another format is refused."""

DEFAULT_CHECKPOINT = "forward_default.pt"
JUDGE_CHECKPOINT = "forward_judge.pt"


def build_featurizer(cfg: dict) -> nn.Module:
    """Featuriser from its config dict (``type`` plus that type's arguments)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "m3gnet")
    if kind == "m3gnet":
        from xanesdiff.forward.m3gnet_features import featurizer_from_config

        return featurizer_from_config(**cfg)
    if kind == "descriptor":
        from xanesdiff.forward.descriptor import RadialAngularDescriptor

        return RadialAngularDescriptor(**cfg)
    if kind == "gnn_scratch":
        from xanesdiff.forward.gnn_scratch import ScratchGNN

        return ScratchGNN(**cfg)
    if kind == "concat":
        return ConcatFeaturizer([build_featurizer(part) for part in cfg["parts"]])
    raise XanesdiffInputError(
        f"unknown featurizer type {kind!r}; expected one of m3gnet, descriptor, gnn_scratch, concat")


def featurizer_has_own_weights(cfg: dict) -> bool:
    """True when the featuriser's weights must travel in the checkpoint (learned or fine-tuned);
    a frozen pretrained M3GNet is an asset, referenced by name, and a descriptor has no weights."""
    kind = cfg.get("type", "m3gnet")
    if kind == "concat":
        return any(featurizer_has_own_weights(part) for part in cfg["parts"])
    return kind == "gnn_scratch" or bool(cfg.get("trainable", False))


class ConcatFeaturizer(nn.Module):
    """Several featurisers side by side: features (N, F_1 + F_2 + ...), in the given order."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def config(self) -> dict:
        return {"type": "concat", "parts": [part.config() for part in self.parts]}

    @property
    def feature_dim(self) -> int:
        return sum(part.feature_dim for part in self.parts)

    @property
    def cache_id(self) -> str:
        return "concat[" + ";".join(part.cache_id for part in self.parts) + "]"

    def forward(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(pos, cell, numbers) for part in self.parts], dim=1)

    @torch.no_grad()
    def features_of_atoms(self, atoms) -> torch.Tensor:
        return torch.cat([part.features_of_atoms(atoms) for part in self.parts], dim=1)


def featurizer_parts(surrogate) -> list:
    """The featurisers a surrogate reads (the parts of a `ConcatFeaturizer`, else its one
    featuriser; empty for an object without one)."""
    featurizer = getattr(surrogate, "featurizer", None)
    if featurizer is None:
        return []
    return list(getattr(featurizer, "parts", [featurizer]))


def featurizer_is_trainable(featurizer: nn.Module) -> bool:
    return any(p.requires_grad for p in featurizer.parameters())


class Surrogate(nn.Module):
    """Structure → per-site spectra of the absorbing element, K ensemble members.

    Args:
        featurizer: module (pos (N,3) Å, cell (3,3) Å, numbers (N,)) → features (N, F).
        head: `EnsembleHead` features → (K, N, M) spectra.
        grid: the energy grid (eV) of the M output points.
        absorber: chemical symbol of the absorbing element (spectra exist for those atoms only).
        config: the featuriser/head/training config, saved in checkpoints.
    """

    def __init__(self, featurizer: nn.Module, head: EnsembleHead, grid: EnergyGrid,
                 absorber: str = "C", config: dict | None = None):
        super().__init__()
        from ase.data import atomic_numbers

        if head.n_energies != grid.n_points:
            raise XanesdiffInputError(
                f"head outputs {head.n_energies} energies but the grid has {grid.n_points}")
        self.featurizer = featurizer
        self.head = head
        self._grid = grid
        self._absorber = str(absorber)
        self.absorber_number = int(atomic_numbers[self._absorber])
        self.config = copy.deepcopy(config or {})
        self.heldout_error = None  # a HeldOutError, when measured for the checkpoint it came from

    @property
    def grid(self) -> EnergyGrid:
        """Energy grid (eV) of the predicted spectra."""
        return self._grid

    @property
    def absorber(self) -> str:
        """Chemical symbol of the absorbing element, e.g. ``"C"``."""
        return self._absorber

    @property
    def n_members(self) -> int:
        return self.head.n_members

    @property
    def device(self) -> torch.device:
        """Where the surrogate runs (its head's buffers live there)."""
        return self.head.feature_mean.device

    def _inputs(self, pos, cell, numbers):
        pos = torch.as_tensor(pos)
        if not torch.is_floating_point(pos):
            pos = pos.double()
        dtype = self.head.feature_mean.dtype
        pos = pos.to(dtype)
        cell = torch.as_tensor(cell).to(device=pos.device, dtype=dtype).reshape(3, 3)
        numbers = torch.as_tensor(numbers, device=pos.device).long().reshape(-1)
        if pos.dim() != 2 or pos.shape[1] != 3 or pos.shape[0] != numbers.shape[0]:
            raise XanesdiffInputError(
                f"positions {tuple(pos.shape)} and numbers {tuple(numbers.shape)} disagree; "
                "expected pos (N, 3) Å and numbers (N,)")
        return pos, cell, numbers

    def absorber_mask(self, numbers: torch.Tensor) -> torch.Tensor:
        """(N,) bool: atoms of the absorbing element."""
        return torch.as_tensor(numbers).long() == self.absorber_number

    def site_features(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor
                      ) -> torch.Tensor:
        """Per-atom features (N, F) (all atoms), differentiable in `pos` and `cell`."""
        pos, cell, numbers = self._inputs(pos, cell, numbers)
        return self.featurizer(pos, cell, numbers)

    def site_spectra(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor
                     ) -> torch.Tensor:
        """(K, N_abs, M) spectra of the absorbing atoms, in atom order; differentiable in pos, cell.

        pos (N, 3) Å Cartesian, cell (3, 3) Å (rows are lattice vectors), numbers (N,) atomic numbers.
        """
        pos, cell, numbers = self._inputs(pos, cell, numbers)
        mask = self.absorber_mask(numbers)
        if not bool(mask.any()):
            raise XanesdiffInputError(f"structure has no {self.absorber} atoms to absorb")
        features = self.featurizer(pos, cell, numbers)
        return self.head(features[mask])

    def mean_spectrum(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor,
                      site_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(K, M) mean over absorbing sites, or over a chosen subset.

        `site_mask`: bool or float weights, either (N_abs,) over the absorbing sites in atom order,
        or (N,) over all atoms (non-absorbers are then ignored). Floats give a weighted mean.
        """
        spectra = self.site_spectra(pos, cell, numbers)
        if site_mask is None:
            return spectra.mean(1)
        n_atoms = int(torch.as_tensor(numbers).numel())
        weights = torch.as_tensor(site_mask, device=spectra.device).reshape(-1)
        if weights.numel() == n_atoms and n_atoms != spectra.shape[1]:
            weights = weights[self.absorber_mask(numbers).to(weights.device)]
        if weights.numel() != spectra.shape[1]:
            raise XanesdiffInputError(
                f"site_mask has {weights.numel()} entries; expected {spectra.shape[1]} (absorbing "
                f"sites) or {n_atoms} (atoms)")
        weights = weights.to(spectra.dtype)
        total = weights.sum()
        if float(total) <= 0:
            raise XanesdiffInputError("site_mask selects no absorbing site")
        return torch.einsum("knm,n->km", spectra, weights) / total

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_dict(self) -> dict:
        """Everything needed to rebuild this surrogate (the M3GNet backbone weights are an asset,
        referenced by name, unless the backbone was fine-tuned)."""
        featurizer_state = None
        if featurizer_has_own_weights(self.config.get("featurizer", {"type": "m3gnet"})):
            featurizer_state = {k: v.detach().cpu() for k, v in self.featurizer.state_dict().items()}
        return {
            "kind": CHECKPOINT_KIND,
            "format": CHECKPOINT_FORMAT,
            "version": xanesdiff.__version__,
            "config": copy.deepcopy(self.config),
            "grid": self.grid.to_dict(),
            "absorber": self.absorber,
            "head_config": self.head.config(),
            "head_state": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "featurizer_state": featurizer_state,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.checkpoint_dict(), tmp)
        os.replace(tmp, path)
        return path


SHIPPED_SURROGATES = {
    "default": DEFAULT_CHECKPOINT,  # M3GNet features + histograms: guidance and validation
    "fast": "forward_fast.pt",      # histograms only: ≈20× cheaper gradient, for large cells
    "judge": JUDGE_CHECKPOINT,      # M3GNet-MatPES features, other seed: independent judge
}
"""Shipped surrogates by name; `load_surrogate("fast")` etc. (a file of that name wins)."""


def surrogate_checkpoint_path(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint file for a path or a shipped name (`SHIPPED_SURROGATES`); None: default."""
    return xanesdiff.shipped_checkpoint_path(path, SHIPPED_SURROGATES)


def surrogate_from_checkpoint(ckpt: dict, source: str = "checkpoint",
                              backbone_path: str | None = None,
                              device: str | torch.device = "cpu") -> Surrogate:
    """Rebuild a `Surrogate` from a checkpoint dict (see `Surrogate.checkpoint_dict`)."""
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise XanesdiffInputError(
            f"not a forward-surrogate checkpoint (kind {kind!r}, expected {CHECKPOINT_KIND!r}); "
            "pass a file written by `xanesdiff train-forward`", source)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise XanesdiffInputError(
            f"checkpoint format {ckpt.get('format')!r} (written by xanesdiff "
            f"{ckpt.get('version', '?')}) is not the format {CHECKPOINT_FORMAT} this xanesdiff "
            f"{xanesdiff.__version__} reads; retrain it with `xanesdiff train-forward`", source)
    config = copy.deepcopy(ckpt["config"])
    featurizer_cfg = dict(config.get("featurizer", {"type": "m3gnet"}))
    if backbone_path is not None:
        featurizer_cfg = _with_backbone_path(featurizer_cfg, str(backbone_path))
    featurizer = build_featurizer(featurizer_cfg)
    if ckpt.get("featurizer_state") is not None:
        featurizer.load_state_dict(ckpt["featurizer_state"])
    head = EnsembleHead(**ckpt["head_config"])
    head.load_state_dict(ckpt["head_state"])
    surrogate = Surrogate(featurizer, head, EnergyGrid.from_dict(ckpt["grid"]),
                          ckpt.get("absorber", "C"), config)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate.to(device).eval()


def _with_backbone_path(cfg: dict, path: str) -> dict:
    """The featuriser config with every M3GNet backbone pointed at `path`."""
    cfg = dict(cfg)
    if cfg.get("type", "m3gnet") == "m3gnet":
        cfg["backbone_path"] = path
    elif cfg.get("type") == "concat":
        cfg["parts"] = [_with_backbone_path(part, path) for part in cfg["parts"]]
    return cfg


def predict_sites(surrogate, atoms) -> np.ndarray:
    """Ensemble members' per-site spectra (K, N_abs, M) of an ASE structure, as numpy, without
    gradients; computed on the surrogate's device (any object with `site_spectra` will do)."""
    device = getattr(surrogate, "device", "cpu")
    with torch.no_grad():
        sites = surrogate.site_spectra(
            torch.tensor(atoms.positions, dtype=torch.float64, device=device),
            torch.tensor(atoms.cell.array, dtype=torch.float64, device=device),
            torch.tensor(atoms.numbers, device=device))
    return sites.cpu().numpy()


def load_surrogate(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   backbone_path: str | os.PathLike | None = None) -> Surrogate:
    """Load a surrogate checkpoint; `None` loads the shipped ``checkpoints/forward_default.pt``,
    a name of `SHIPPED_SURROGATES` ("default", "fast", "judge") that shipped checkpoint.

    The M3GNet backbone is resolved with `resolve_asset` (the checkpoint's explicit path, else
    `$XANESDIFF_ASSETS`, else the user cache); `backbone_path` overrides it. The returned module
    is in eval mode with frozen parameters; gradients flow to positions and cell. Its
    `heldout_error` is the checkpoint's measured held-out error (`forward.heldout_error`), or None.
    """
    from xanesdiff.forward.heldout_error import load_heldout_error

    path = surrogate_checkpoint_path(path)
    if not path.exists():
        raise XanesdiffInputError(
            f"surrogate checkpoint does not exist (give a file, or a shipped name: "
            f"{', '.join(SHIPPED_SURROGATES)})", str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise XanesdiffInputError(
            f"could not be read as a checkpoint ({type(exc).__name__}: {exc})", str(path)) from None
    surrogate = surrogate_from_checkpoint(ckpt, str(path), backbone_path, device)
    surrogate.heldout_error = load_heldout_error(path, surrogate.grid.n_points)
    return surrogate


def build_surrogate(featurizer: dict | nn.Module | None, head: dict | None, grid: EnergyGrid,
                    absorber: str = "C", extra_config: dict | None = None) -> Surrogate:
    """An untrained surrogate from a featuriser (config dict or module) and head arguments."""
    if featurizer is None or isinstance(featurizer, dict):
        featurizer = build_featurizer(featurizer or {"type": "m3gnet"})
    head_cfg = dict(head or {})
    head_module = EnsembleHead(featurizer.feature_dim, grid.n_points, **head_cfg)
    config = {"featurizer": featurizer.config(), "head": head_module.config(),
              **copy.deepcopy(extra_config or {})}
    return Surrogate(featurizer, head_module, grid, absorber, config)


def train_surrogate(frames: list, grid: EnergyGrid, featurizer: dict | nn.Module | None = None,
                    head: dict | None = None, train: dict | None = None, absorber: str = "C",
                    trainer: dict | None = None, cache=None, frames_per_step: int = 2,
                    progress: bool = False) -> Surrogate:
    """Train a surrogate on `frames` (`Frame`s with `atoms` and `site_spectra`) and return it.

    featurizer: config dict (``{"type": "m3gnet", "layers": [...]}``, ``{"type": "descriptor"}``,
        ``{"type": "gnn_scratch"}``) or an already built featuriser module (reused as is; do not
        reuse a trainable one). head: `EnsembleHead` arguments (hidden, n_members, seed, dropout).
    train: `HeadTrainConfig` fields. trainer: extra `lightning.Trainer` arguments.
    cache: a `FeatureCache` or a folder for frozen features (reuse across calls: seconds).
    With a frozen featuriser and cached features this takes seconds on one CPU core.
    """
    from xanesdiff.forward.task import SurrogateTask, quiet_lightning
    from xanesdiff.forward.training import HeadTrainConfig

    import lightning as L

    train_cfg = HeadTrainConfig(**(train or {}))
    surrogate = build_surrogate(featurizer, head, grid, absorber,
                                {"train": train_cfg.to_dict()})
    task = SurrogateTask(surrogate, frames, train_cfg, frames_per_step=frames_per_step, cache=cache,
                         progress=progress)
    if not progress:
        quiet_lightning()
    options = dict(max_epochs=train_cfg.max_epochs, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_model_summary=False,
                   enable_progress_bar=progress, num_sanity_val_steps=0)
    options.update(trainer or {})
    L.Trainer(**options).fit(task)
    surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate

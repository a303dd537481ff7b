"""A generation request (hydra config) turned into guidance terms, with its checks."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xanesdiff.datasets.errors import XanesdiffInputError

log = logging.getLogger("xanesdiff.generate")

GUIDANCE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "guidance"
"""One YAML per guidance term; `steer=NAME` adds configs/guidance/NAME.yaml."""

DENSITY_HARD_BOUNDS_G_CM3 = (0.5, 4.0)
"""Beyond these a carbon network is unphysical (diamond is 3.51 g/cm³): refused."""


def build_terms(cfg: DictConfig) -> list:
    """Instantiate the configured guidance terms, plus the `steer` term if named."""
    from hydra.utils import instantiate

    specs = dict(cfg.guidance or {})
    if cfg.steer:
        for name in [cfg.steer] if isinstance(cfg.steer, str) else list(cfg.steer):
            path = GUIDANCE_CONFIGS / f"{name}.yaml"
            if not path.exists():
                available = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise XanesdiffInputError(f"no steer named {name!r}; available: {available}",
                                          "steer")
            # settings given under guidance.NAME (e.g. guidance=[NAME] with overrides) win
            specs[name] = OmegaConf.merge(OmegaConf.load(path), specs.get(name) or {})
    if cfg.target is None:
        specs.pop("spectrum", None)
    if not specs and cfg.get("start") is None:  # edits of a start need no guidance: variants
        raise XanesdiffInputError("nothing to guide on: give target=FILE and/or steer=NAME "
                                  "(or start=FILE for unguided variants of a structure)",
                                  "generate")
    return [instantiate(spec, _convert_="all") for spec in specs.values()]


def check_density(density) -> float | None:
    """The requested density (g/cm³): refused outside hard bounds, warned outside training."""
    if density is None:
        return None
    density = float(density)
    lo, hi = DENSITY_HARD_BOUNDS_G_CM3
    if not lo <= density <= hi:
        raise XanesdiffInputError(
            f"density {density} g/cm³ is outside {lo}–{hi} g/cm³, where carbon networks exist "
            "(the models are trained on 1.5–3.5)", "density")
    if not 1.5 <= density <= 3.5:
        log.warning("density %.2f g/cm³ is outside the trained range 1.5–3.5: extrapolation",
                    density)
    return density


def settings_concern(cfg: DictConfig, density_g_cm3: float | None) -> str | None:
    """What the chosen settings say about a cell of `density_g_cm3` (g/cm³): a preset that was
    validated only over `validated_g_cm3` [lo, hi] warns outside it (with its
    `validated_note`), and the warning is returned for the report; None inside or unset."""
    checked = cfg.get("validated_g_cm3")
    if checked is None or density_g_cm3 is None:
        return None
    lo, hi = (float(x) for x in checked)
    if lo <= density_g_cm3 <= hi:
        return None
    concern = (f"these settings were validated at {lo:g}–{hi:g} g/cm³, not at "
               f"{density_g_cm3:.2f}" + (f": {cfg.validated_note}"
                                          if cfg.get("validated_note") else ""))
    log.warning(concern)
    return concern


def set_relative_references(terms, generator, target, density, seed, start=None) -> None:
    """Relative feature targets (e.g. +20% π*) refer to the target spectrum when there is one,
    else to the start structure `start` (an ASE Atoms) when editing one, else to an unguided
    structure's prediction at the same density and seed."""
    import torch

    from xanesdiff.guidance.validation import predict_members

    relative = [t for t in terms if getattr(t, "relative", None) is not None]
    if not relative:
        return
    if target is not None:
        reference = target.spectrum
    else:
        atoms = start if start is not None else generator.generate(density, seed, guided=False)[0]
        reference = predict_members(generator.surrogate, atoms).mean(0)
    for term in relative:
        term.set_reference(torch.as_tensor(reference, dtype=torch.float32))


def load_start_structures(path, generator, noise_A) -> list:
    """The structures `generate start=FILE` edits (every frame of any ASE-readable file), checked:
    periodic, no overlapping atoms, only the prior's element, and a start noise (Å) within the
    generator's sampler range."""
    from xanesdiff.datasets.structures import check_elements, read_structures

    if noise_A is None:
        raise XanesdiffInputError("give the noise level (Å) to re-noise the start to",
                                  "start_noise_A")
    generator.start_time(float(noise_A))
    frames = read_structures(path)
    element = generator.element
    for i, atoms in enumerate(frames):
        check_elements(atoms, {element}, f"{path} (frame {i})")
    return frames


def region_mask(atoms, region) -> "np.ndarray | None":
    """The atoms an edit may move (bool (N,)), from `start_region`: `atoms` (indices), or
    `center_A` ([x, y, z] Å) with `radius_A` (minimum-image distance); None: every atom."""
    import numpy as np
    from ase.geometry import find_mic

    region = dict(region or {})
    indices, center, radius = region.get("atoms"), region.get("center_A"), region.get("radius_A")
    if indices is None and center is None and radius is None:
        return None
    if indices is not None and (center is not None or radius is not None):
        raise XanesdiffInputError("give atoms or center_A with radius_A, not both",
                                  "start_region")
    mask = np.zeros(len(atoms), dtype=bool)
    if indices is not None:
        indices = np.asarray(list(indices), dtype=int)
        if indices.size == 0 or indices.min() < 0 or indices.max() >= len(atoms):
            raise XanesdiffInputError(f"atoms: expected indices in 0…{len(atoms) - 1}, got "
                                      f"{indices.tolist()}", "start_region")
        mask[indices] = True
        return mask
    if center is None or radius is None or len(list(center)) != 3 or not float(radius) > 0:
        raise XanesdiffInputError(f"expected center_A [x, y, z] (Å) and a positive radius_A, "
                                  f"got {center} and {radius}", "start_region")
    _, distance = find_mic(atoms.positions - np.asarray(list(center), float), atoms.cell,
                           pbc=True)
    mask = distance <= float(radius)
    if not mask.any():
        raise XanesdiffInputError(f"no atom within {radius} Å of {list(center)}", "start_region")
    return mask


def edit_structure(generator, terms, target, start, noise_A: float, seed: int,
                   guided: bool = True, mobile=None):
    """One edit of the structure `start` (relative steers refer to it, unless there is a target),
    logged with how far its atoms moved (Å, minimum image); `guided=False`: the prior alone;
    `mobile` (bool (N,)): only these atoms move."""
    import numpy as np

    from xanesdiff.analysis.structure import displacements

    set_relative_references(terms, generator, target, None, seed, start=start)
    atoms, log = generator.edit(start, noise_A, seed, guided=guided, mobile=mobile)
    moved = displacements(start, atoms)
    log.update(start_rms_displacement_A=float(np.sqrt(np.mean(moved ** 2))),
               start_max_displacement_A=float(moved.max()))
    return atoms, log


def compose_generate_config(overrides: list[str] | None = None) -> DictConfig:
    """The `xanesdiff generate` config (shipped defaults plus `overrides`), for programmatic use
    such as benchmarks that must run exactly what the command runs."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("xanesdiff.configs", version_base="1.3"):
        return compose("generate", overrides=list(overrides or []))


def load_configured_prior(cfg: DictConfig, device="cpu"):
    """The prior a generate config names: `models.prior` (a checkpoint or shipped name) with the
    hard core of `models.hard_core_A` (Å) and `models.autoguidance`, on `device`. One place, so
    every caller runs the prior asked for."""
    from xanesdiff.diffusion.prior import load_prior

    return load_prior(cfg.models.prior, hard_core_A=cfg.models.hard_core_A, device=device,
                      autoguidance=cfg.models.get("autoguidance", "auto"))


def make_generator(cfg: DictConfig, prior, surrogate, terms: list, n_atoms: int | None = None):
    """A `GuidedGenerator` with the sampler and guided-score settings of a `generate` or
    `library` config."""
    from hydra.utils import instantiate

    from xanesdiff.guidance.pipeline import GuidedGenerator

    sampler = instantiate(cfg.sampler, schedule=prior.schedule)
    return GuidedGenerator(prior, surrogate, terms, sampler,
                           n_atoms=int(n_atoms or cfg.n_atoms),
                           through_denoiser=cfg.guided_score.through_denoiser,
                           max_ratio=cfg.guided_score.max_ratio,
                           refresh_every=cfg.guided_score.refresh_every,
                           max_t=cfg.guided_score.get("max_t"))

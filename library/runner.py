"""Generate a structure library: plan items → guided structures → validated rows in a database.

    summary = build_library(cfg)                    # cfg: the composed `configs/library.yaml`
    summary = build_library(cfg, models=LibraryModels(prior, surrogate))   # models built in code

Each item is generated with the same machinery as `xanesdiff generate` (guidance terms from the
`guidance` config plus the item's steer, `GuidedGenerator`, relative feature references), seeded by
the item's seed, validated (spectral match, hybridisation, CN1, minimum distance, optional
relaxation energy), filtered (thresholds, near-duplicates) and written as one row in one
transaction. A rerun skips every item that has a row, accepted or rejected, so killing the process
at any moment and rerunning the same command finishes the library without repeating anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.diffusion.fidelity_record import prior_concerns
from xanesdiff.guidance.request import settings_concern
from xanesdiff.library.filters import check_filter_config, threshold_failures
from xanesdiff.library.fingerprint import DuplicateIndex, local_environment_fingerprint
from xanesdiff.library.models import LibraryModels, load_models
from xanesdiff.library.plan import (PlanItem, expand_plan, load_plan_file, plan_fingerprint,
                                    shard_db_url, shard_items)
from xanesdiff.library.store import LibraryStore
from xanesdiff.runtime import resolve_device

log = logging.getLogger("xanesdiff.library")

SETTINGS_SECTIONS = ("guidance", "sampler", "guided_score", "target_prep", "validation", "filters",
                     "dedup", "store")
"""Config sections that change what an item produces: hashed into the settings id. The plan is
not among them (a plan can grow and the same database be resumed with it)."""


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def plan_items(cfg) -> list[PlanItem]:
    """The expanded plan of `cfg` (`plan_file` replaces the inline `plan` when given)."""
    if cfg.get("plan_file"):
        plan_path = Path(cfg.plan_file).expanduser().resolve()
        return expand_plan(load_plan_file(plan_path), base_dir=plan_path.parent)
    return expand_plan(_container(cfg.plan), base_dir=Path.cwd())


def library_settings(cfg, provenance: dict) -> tuple[dict, str]:
    """(settings dict, settings id): everything besides the plan that shapes the rows."""
    settings = {name: _container(cfg.get(name)) for name in SETTINGS_SECTIONS}
    settings["filters"] = check_filter_config(settings["filters"])
    settings["models"] = provenance
    text = json.dumps(settings, sort_keys=True, default=str)
    return settings, "s" + hashlib.sha256(text.encode()).hexdigest()[:15]


def db_url(cfg) -> str:
    return shard_db_url(str(cfg.db), int(cfg.shard_index), int(cfg.n_shards))


def seed_everything(item: PlanItem) -> None:
    """Global RNGs from the item key (the sampler itself draws from a generator seeded by
    `item.seed`): an item's result never depends on what ran before it in the process."""
    import torch

    seed = int(item.key[:8], 16)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class _Context:
    cfg: object
    models: LibraryModels
    settings: dict
    settings_id: str
    filters: dict
    duplicates: DuplicateIndex | None
    targets: dict = field(default_factory=dict)
    potential: object = None

    def target(self, path: str | None):
        from xanesdiff.guidance.target import load_target

        if path is None:
            return None
        if path not in self.targets:
            self.targets[path] = load_target(path, self.models.surrogate,
                                             **_container(self.cfg.target_prep))
        return self.targets[path]


def _steer_specs(item: PlanItem) -> dict:
    from xanesdiff.library.plan import GUIDANCE_CONFIG_DIR

    return {name: OmegaConf.to_container(OmegaConf.load(GUIDANCE_CONFIG_DIR / f"{name}.yaml"))
            for name in item.steer}


def build_terms_for(cfg, item: PlanItem) -> list:
    """The item's guidance terms, built exactly as `xanesdiff generate` builds them."""
    from xanesdiff.guidance.request import build_terms

    spec = OmegaConf.create({"guidance": cfg.guidance, "steer": list(item.steer) or None,
                             "target": item.target})
    return build_terms(spec)


def generate_item(item: PlanItem, ctx: _Context) -> tuple[object, dict, dict]:
    """Generate and validate one item: (atoms, key-value pairs, data). Does not filter."""
    from xanesdiff.analysis.structure import (density_g_cm3, hybridization_fractions,
                                              minimum_distance)
    from xanesdiff.guidance.request import make_generator, set_relative_references
    from xanesdiff.guidance.validation import relax, validate_spectrum

    cfg, models = ctx.cfg, ctx.models
    seed_everything(item)
    target = ctx.target(item.target)
    target_spectrum = None if target is None else target.spectrum
    terms = build_terms_for(cfg, item)
    for term in terms:
        term.bind(models.surrogate, target_spectrum)
    generator = make_generator(cfg, models.prior, models.surrogate, terms, n_atoms=item.n_atoms)
    set_relative_references(terms, generator, target, item.density_g_cm3, item.seed)
    atoms, gen_log = generator.generate(item.density_g_cm3, item.seed)

    metrics: dict = {"guided_steps": gen_log["guided_steps"],
                     "max_guidance_to_prior_rms": gen_log["max_guidance_to_prior_rms"]}
    data: dict = {}
    spectral = validate_spectrum(atoms, target_spectrum, models.surrogate)
    if models.judge is not None:
        spectral.update(validate_spectrum(atoms, target_spectrum, models.judge, prefix="judge_"))
    for name, value in spectral.items():
        if isinstance(value, np.ndarray):
            data[name] = value.astype(np.float32)
        else:
            metrics[name] = float(value)
    metrics.update(hybridization_fractions(atoms))
    metrics["min_distance_A"] = minimum_distance(atoms)
    metrics["density_g_cm3"] = density_g_cm3(atoms)
    if cfg.validation.relax:
        if ctx.potential is None:
            from xanesdiff.guidance.validation import load_potential

            ctx.potential = load_potential()
        relaxed, energies = relax(atoms, ctx.potential, cfg.validation.relax_fmax_eV_A,
                                  cfg.validation.relax_steps)
        metrics.update(energies)
        data["relaxed_positions"] = relaxed.positions.astype(np.float64)
        if target_spectrum is not None:
            metrics["relaxed_mae"] = float(validate_spectrum(relaxed, target_spectrum,
                                                             models.judge or models.surrogate)["mae"])

    grid = models.surrogate.grid
    data["energies_eV"] = np.asarray(grid.energies_eV, dtype=np.float64)
    if target_spectrum is not None:
        data["target_spectrum"] = np.asarray(target_spectrum, dtype=np.float32)
    if cfg.store.site_spectra:
        data.update(_site_spectra(atoms, models.surrogate))
    data["fingerprint"] = local_environment_fingerprint(atoms, int(cfg.dedup.k_neighbors))
    data["provenance"] = _jsonable({
        "item": {**item.content(), "index": item.index, "key": item.key,
                 "target_path": item.target},
        "target": None if target is None else {"source": target.source, "kind": target.kind,
                                               **_container(target.details)},
        "steer_specs": _steer_specs(item),
        "settings_id": ctx.settings_id,
        "settings": ctx.settings,
        "versions": _versions(),
        "generation": gen_log,
    })
    return atoms, {**_item_kvp(item, ctx), **metrics}, data


def _item_kvp(item: PlanItem, ctx: _Context) -> dict:
    """Searchable provenance of a row (metrics are added by the caller)."""
    import xanesdiff

    return {"item_index": item.index, "target": item.target_name,
            "target_sha256": f"sha256:{item.target_sha256}" if item.target_sha256 else "none",
            "seed": item.seed, "n_atoms": item.n_atoms, "steer": item.steer_name,
            "density_g_cm3": item.density_g_cm3, "settings_id": ctx.settings_id,
            "xanesdiff_version": xanesdiff.__version__, **_model_kvp(ctx.models.provenance)}


def _jsonable(value):
    """Plain JSON types only (numpy scalars and arrays become numbers and lists)."""
    def default(obj):
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def _site_spectra(atoms, surrogate) -> dict:
    from xanesdiff.forward.surrogate import predict_sites

    absorber = getattr(surrogate, "absorber", "C")
    indices = np.array([k for k, s in enumerate(atoms.get_chemical_symbols()) if s == absorber])
    return {"site_spectra": predict_sites(surrogate, atoms).mean(0).astype(np.float32),
            "absorber_indices": indices.astype(np.int64)}


def _model_kvp(provenance: dict) -> dict:
    out = {}
    for name in ("prior", "surrogate", "judge"):
        info = provenance.get(name) or {}
        sha = info.get("sha256") or info.get("weights_sha256")
        if sha:
            out[f"{name}_sha256"] = f"sha256:{sha}"
    if provenance.get("factory"):
        out["model_factory"] = provenance["factory"]
    return out


def _versions() -> dict:
    import ase
    import torch

    import xanesdiff

    return {"xanesdiff": xanesdiff.__version__, "torch": torch.__version__, "ase": ase.__version__,
            "numpy": np.__version__}


def _failed_item(item: PlanItem, ctx: _Context, exc: Exception) -> tuple[object, dict, dict]:
    """A row for an item whose sampling diverged: rejected, so a rerun does not retry it."""
    from ase import Atoms

    from xanesdiff.diffusion.sampling import cubic_cell_for_density

    atoms = Atoms(cell=cubic_cell_for_density(item.n_atoms, item.density_g_cm3), pbc=True)
    kvp = _item_kvp(item, ctx)
    data = {"provenance": _jsonable({
        "item": {**item.content(), "index": item.index, "key": item.key,
                 "target_path": item.target},
        "settings_id": ctx.settings_id, "settings": ctx.settings, "versions": _versions(),
        "error": f"{type(exc).__name__}: {exc}"})}
    return atoms, kvp, data


def filter_item(kvp: dict, data: dict, ctx: _Context) -> list[str]:
    """Reasons to reject (thresholds, then near-duplicates of accepted rows); empty: accept."""
    reasons = threshold_failures(kvp, ctx.filters)
    if not reasons and ctx.duplicates is not None:
        hit = ctx.duplicates.find(kvp["n_atoms"], kvp["density_g_cm3"], data["fingerprint"])
        if hit is not None:
            kvp["duplicate_of"], kvp["duplicate_distance_A"] = hit
            reasons.append(f"near-duplicate of {hit[0]} (fingerprint distance {hit[1]:.4f} Å "
                           f"≤ {ctx.duplicates.threshold_A:g})")
    return reasons


def load_duplicate_index(store: LibraryStore, dedup_cfg) -> DuplicateIndex | None:
    if not dedup_cfg.enabled:
        return None
    index = DuplicateIndex(float(dedup_cfg.threshold_A), float(dedup_cfg.density_tol_g_cm3))
    for row in store.rows(include_data=True, status="accepted"):
        if "fingerprint" in row.data:
            index.add(row.unique_id, row.n_atoms, row.density_g_cm3, row.data["fingerprint"])
    return index


def build_library(cfg, models: LibraryModels | None = None, progress: bool = True) -> dict:
    """Generate the items of this shard that the database does not hold yet; returns counts."""
    from tqdm import tqdm

    items = plan_items(cfg)
    mine = shard_items(items, int(cfg.shard_index), int(cfg.n_shards))
    for item in {tuple(i.steer): i for i in items if i.steer}.values():
        _steer_specs(item)  # every steer config parses before any work
    if models is None:
        models = load_models(_container(cfg.models), resolve_device(cfg.get("device", "auto")))
    settings, settings_id = library_settings(cfg, models.provenance)

    url = db_url(cfg)
    store = LibraryStore(url)
    if cfg.overwrite:
        store.clear()
    store.check_settings(settings_id)
    store.set_library_metadata({
        "settings_id": settings_id, "settings": settings, "plan_id": plan_fingerprint(items),
        "n_items_total": len(items), "plan_keys": [i.key for i in items],
        "shard_index": int(cfg.shard_index), "n_shards": int(cfg.n_shards)})

    done = store.keys()
    todo = [item for item in mine if item.key not in done]
    ctx = _Context(cfg, models, settings, settings_id, settings["filters"],
                   load_duplicate_index(store, cfg.dedup))
    for path in {i.target for i in todo if i.target}:
        ctx.target(path)  # unreadable targets fail now, not after hours of work
    from xanesdiff.guidance.validation import check_validation_fits

    for n_atoms, density in {(i.n_atoms, i.density_g_cm3) for i in todo}:  # so do huge cells
        check_validation_fits(n_atoms, density, {"models.surrogate": models.surrogate,
                                                 "models.judge": models.judge},
                              getattr(models.surrogate, "device", None))
    densities = sorted({i.density_g_cm3 for i in mine})  # each concern logged once per density
    concerns = {f"{density:g}": text for density in densities
                if (text := prior_concerns(models.prior, density))}
    settings_concerns = {f"{density:g}": text for density in densities
                         if (text := settings_concern(cfg, density))}  # e.g. a preset's range
    log.info("library %s: shard %d/%d has %d of %d planned items, %d already done",
             url, int(cfg.shard_index), int(cfg.n_shards), len(mine), len(items),
             len(mine) - len(todo))
    counts = {"accepted": 0, "rejected": 0}
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="library",
               disable=not progress)
    from xanesdiff.diffusion.samplers import NonFiniteSampleError

    for item in todo:
        try:
            atoms, kvp, data = generate_item(item, ctx)
            reasons = filter_item(kvp, data, ctx)
        except NonFiniteSampleError as exc:
            atoms, kvp, data = _failed_item(item, ctx, exc)
            reasons = [f"sampling failed: {exc}"]
        kvp["status"] = "rejected" if reasons else "accepted"
        if reasons:
            kvp["reason"] = "; ".join(reasons)
        if store.write(item.key, atoms, kvp, data) is not None:
            counts[kvp["status"]] += 1
            if not reasons and ctx.duplicates is not None:
                ctx.duplicates.add(item.key, item.n_atoms, kvp["density_g_cm3"],
                                   data["fingerprint"])
        bar.update(1)
        bar.set_postfix(counts)
    bar.close()
    summary = summarize(store, mine, len(items))
    summary.update({"db": url, "generated_now": counts, "shard_index": int(cfg.shard_index),
                    "n_shards": int(cfg.n_shards), "settings_id": settings_id,
                    "prior_fidelity": concerns, "settings_fidelity": settings_concerns})
    log.info("library %s: %s", url, json.dumps(summary))
    return summary


def summarize(store: LibraryStore, planned: list[PlanItem], n_total: int | None = None) -> dict:
    """Counts of a database against planned items: done, accepted, rejected (by reason), missing."""
    rows = {row.unique_id: row for row in store.rows(include_data=False)}
    keys = {i.key for i in planned}
    statuses = [rows[k].get("status") for k in keys if k in rows]
    reasons: dict[str, int] = {}
    for k in keys:
        if k in rows and rows[k].get("status") == "rejected":
            kind = _reason_kind(rows[k].get("reason", ""))
            reasons[kind] = reasons.get(kind, 0) + 1
    return {"planned": len(keys), "plan_total": n_total if n_total is not None else len(keys),
            "rows": len(rows), "done": len(statuses), "accepted": statuses.count("accepted"),
            "rejected": statuses.count("rejected"), "rejected_by": reasons,
            "missing": len(keys - set(rows)), "not_in_plan": len(set(rows) - keys)}


def _reason_kind(reason: str) -> str:
    kinds = sorted({part.split(" ")[0] for part in reason.split("; ") if part})
    return "+".join(kinds) or "unknown"

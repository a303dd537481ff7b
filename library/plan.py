"""A library plan: targets × densities × steers × cell sizes × seeds, expanded into items.

    plan:
      targets: [examples/target_rho2.5.csv]   # spectrum files (any kind `generate` takes); null: none
      densities: [2.0, 2.5]                   # g/cm³
      steers: [null, pi_star_up]              # configs/guidance/ names (or lists of them); null: none
      n_atoms: [216]
      seeds: null                             # explicit list, or null: seed_start + range(n_seeds)
      n_seeds: 4
      seed_start: 0
      items: []                               # extra explicit items {target, density, steer, seed, n_atoms}

Expansion is deterministic (the order above, seeds innermost). Each item has a stable key: the
SHA-256 of its content (the target file's SHA-256, not its path; density; steer; seed; n_atoms),
so reruns, shards and merges agree on what an item is. Items are assigned to shards by key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.spectra_io import file_sha256

GUIDANCE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "guidance"
PLAN_FIELDS = {"targets", "densities", "steers", "n_atoms", "seeds", "n_seeds", "seed_start",
               "items"}
ITEM_FIELDS = {"target", "density", "steer", "seed", "n_atoms"}


@dataclass(frozen=True)
class PlanItem:
    """One structure to generate. `target` is an absolute path (or None), `steer` a tuple of
    guidance config names (empty: no steer)."""

    index: int
    target: str | None
    target_sha256: str | None
    density_g_cm3: float
    steer: tuple[str, ...]
    seed: int
    n_atoms: int

    def content(self) -> dict:
        """What defines the item (and its key): not the index, not the target's path."""
        return {"target_sha256": self.target_sha256, "density_g_cm3": round(self.density_g_cm3, 6),
                "steer": list(self.steer), "seed": self.seed, "n_atoms": self.n_atoms}

    @property
    def key(self) -> str:
        text = json.dumps(self.content(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def steer_name(self) -> str:
        return "+".join(self.steer) if self.steer else "none"

    @property
    def target_name(self) -> str:
        return Path(self.target).name if self.target else "none"


def shard_of(key: str, n_shards: int) -> int:
    """Shard index of an item key: its hash modulo the shard count."""
    return int(key[:12], 16) % int(n_shards)


def shard_items(items: Iterable[PlanItem], shard_index: int, n_shards: int) -> list[PlanItem]:
    n_shards, shard_index = int(n_shards), int(shard_index)
    if n_shards < 1 or not 0 <= shard_index < n_shards:
        raise XanesdiffInputError(
            f"shard_index must be in 0…n_shards−1 with n_shards ≥ 1; got shard_index="
            f"{shard_index}, n_shards={n_shards}", "shard_index")
    return [item for item in items if shard_of(item.key, n_shards) == shard_index]


def shard_db_url(db: str, shard_index: int, n_shards: int) -> str:
    """`runs/lib/library.db` → `runs/lib/library_shard0of2.db` when sharded (n_shards > 1).
    Server URLs (postgresql://…) are returned unchanged: shards write disjoint item keys."""
    if int(n_shards) <= 1 or "://" in str(db):
        return str(db)
    path = Path(db)
    return str(path.with_name(f"{path.stem}_shard{int(shard_index)}of{int(n_shards)}{path.suffix}"))


def _as_list(value, name: str) -> list:
    if value is None:
        return [None]
    if isinstance(value, (str, int, float)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise XanesdiffInputError(f"expected a list, got {value!r}", f"plan.{name}") from None


def _steer_tuple(steer) -> tuple[str, ...]:
    if steer is None or steer == "none" or steer == "":
        return ()
    names = [steer] if isinstance(steer, str) else list(steer)
    available = sorted(p.stem for p in GUIDANCE_CONFIG_DIR.glob("*.yaml"))
    for name in names:
        if not isinstance(name, str) or not (GUIDANCE_CONFIG_DIR / f"{name}.yaml").exists():
            raise XanesdiffInputError(f"no steer named {name!r}; available: {available}",
                                      "plan.steers")
    return tuple(names)


def _density(value) -> float:
    from xanesdiff.guidance.request import check_density

    if value is None:
        raise XanesdiffInputError(
            "a library item needs a density (g/cm³); to infer one from a spectrum run "
            "`xanesdiff generate target=FILE` first and put its density in the plan",
            "plan.densities")
    try:
        density = float(value)
    except (TypeError, ValueError):
        raise XanesdiffInputError(f"density {value!r} is not a number", "plan.densities") from None
    return check_density(density)


def _positive_int(value, name: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise XanesdiffInputError(f"{value!r} is not an integer", f"plan.{name}") from None
    if number != value and not (isinstance(value, str) and str(number) == value.strip()):
        raise XanesdiffInputError(f"{value!r} is not an integer", f"plan.{name}")
    if number < minimum:
        raise XanesdiffInputError(f"must be at least {minimum}, got {number}", f"plan.{name}")
    return number


class _Targets:
    """Resolves target paths (relative to `base_dir`) once and hashes each file once."""

    def __init__(self, base_dir: Path):
        self.base_dir, self.cache = base_dir, {}

    def __call__(self, target) -> tuple[str | None, str | None]:
        if target is None or target == "none":
            return None, None
        path = Path(str(target)).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        path = path.resolve()
        if path not in self.cache:
            if not path.is_file():
                raise XanesdiffInputError("target file does not exist", str(path))
            self.cache[path] = file_sha256(path)
        return str(path), self.cache[path]


def expand_plan(plan: dict, base_dir: str | Path = ".") -> list[PlanItem]:
    """Validate a plan mapping and expand it into items (duplicates by key dropped, first kept).

    Raises `XanesdiffInputError` for unknown fields, missing target files, unknown steers, bad
    densities or sizes, items with nothing to guide on, and empty plans."""
    plan = dict(plan or {})
    unknown = set(plan) - PLAN_FIELDS
    if unknown:
        raise XanesdiffInputError(f"unknown field(s) {sorted(unknown)}; known: "
                                  f"{sorted(PLAN_FIELDS)}", "plan")
    targets = _Targets(Path(base_dir))
    if plan.get("seeds") is not None:
        seeds = [_positive_int(s, "seeds") for s in _as_list(plan["seeds"], "seeds")]
    else:
        n_seeds = _positive_int(plan.get("n_seeds", 1), "n_seeds")
        start = _positive_int(plan.get("seed_start", 0), "seed_start")
        seeds = list(range(start, start + n_seeds))
    raw: list[tuple] = []
    target_list = _as_list(plan.get("targets"), "targets")
    density_list = _as_list(plan.get("densities"), "densities")
    steer_list = _as_list(plan.get("steers"), "steers")
    size_list = _as_list(plan.get("n_atoms", 216), "n_atoms")
    if seeds and target_list and density_list and steer_list and size_list:
        for target in target_list:
            for density in density_list:
                for steer in steer_list:
                    for n_atoms in size_list:
                        for seed in seeds:
                            raw.append((target, density, steer, seed, n_atoms))
    for k, extra in enumerate(plan.get("items") or []):
        extra = dict(extra)
        bad = set(extra) - ITEM_FIELDS
        if bad or "density" not in extra:
            raise XanesdiffInputError(f"item fields are {sorted(ITEM_FIELDS)} (density required); "
                                      f"got {sorted(extra)}", f"plan.items[{k}]")
        raw.append((extra.get("target"), extra["density"], extra.get("steer"),
                    extra.get("seed", 0), extra.get("n_atoms", 216)))

    items: list[PlanItem] = []
    seen: set[str] = set()
    checked: dict = {}
    for target, density, steer, seed, n_atoms in raw:
        path, sha = targets(target)
        steer_t = _steer_tuple(steer)
        if path is None and not steer_t:
            raise XanesdiffInputError(
                "an item with neither a target spectrum nor a steer has nothing to guide on: "
                "give plan.targets=[FILE,…] and/or plan.steers=[NAME,…]", "plan")
        if density not in checked:
            checked[density] = _density(density)
        size = _positive_int(n_atoms, "n_atoms", minimum=2)
        item = PlanItem(len(items), path, sha, checked[density], steer_t,
                        _positive_int(seed, "seeds"), size)
        if item.key in seen:
            continue
        seen.add(item.key)
        items.append(item)
    if not items:
        raise XanesdiffInputError(
            "the plan expands to no items: give at least one target or steer, density, seed "
            "and n_atoms (e.g. plan.targets=[FILE] plan.densities=[2.5] plan.n_seeds=4)", "plan")
    return items


def load_plan_file(path: str | Path) -> dict:
    """A plan from a YAML or JSON file: either the plan mapping itself or `{plan: {...}}`."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise XanesdiffInputError("plan file does not exist", str(path))
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise XanesdiffInputError(f"could not be read as YAML/JSON ({exc})", str(path)) from None
    if isinstance(loaded, dict) and set(loaded) == {"plan"}:
        loaded = loaded["plan"]
    if not isinstance(loaded, dict):
        raise XanesdiffInputError("expected a mapping of plan fields", str(path))
    return loaded


def plan_fingerprint(items: list[PlanItem]) -> str:
    return hashlib.sha256("\n".join(i.key for i in items).encode()).hexdigest()[:16]

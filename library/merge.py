"""Merge shard databases into one library database.

Rows are copied in plan order (item index), so the merged database lists items as a single run
would. A row whose item key is already in the output (present before, or in two inputs) is
skipped. With `dedup`, accepted rows are checked again for near-duplicates across shards (each
shard could only compare with its own rows) and a near-duplicate is copied as rejected with its
reason. All inputs must have been made with the same settings; the merged database's metadata
holds the union of their plans' items (each shard records the whole plan), so a later `xanesdiff library db=<merged> n_shards=1` with
the same plan resumes into it (and fills in any item a shard missed).
"""

from __future__ import annotations

import re
from pathlib import Path

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.library.fingerprint import DuplicateIndex
from xanesdiff.library.store import LibraryStore, is_server_url

SHARD_PATTERN = re.compile(r"_shard(\d+)of(\d+)$")


def find_shards(db: str, n_shards: int | None = None) -> list[str]:
    """Shard files beside `db` (`<stem>_shard{i}of{n}<suffix>`); all of 0…n−1 must exist."""
    if is_server_url(db):
        raise XanesdiffInputError("shards of a server database are rows in it already: "
                                  "nothing to merge", db)
    path = Path(db)
    found: dict[int, dict[int, Path]] = {}
    for candidate in path.parent.glob(f"{path.stem}_shard*of*{path.suffix}"):
        match = SHARD_PATTERN.search(candidate.stem)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = candidate
    if n_shards is None:
        if not found:
            raise XanesdiffInputError(
                f"no shard databases ({path.stem}_shard<i>of<n>{path.suffix}) beside it; run "
                "`xanesdiff library shard_index=… n_shards=…` first, or give inputs=[…]", db)
        if len(found) > 1:
            raise XanesdiffInputError(
                f"shard sets for n_shards {sorted(found)} beside it; choose one with n_shards=N",
                db)
        n_shards = next(iter(found))
    shards = found.get(int(n_shards), {})
    missing = [i for i in range(int(n_shards)) if i not in shards]
    if missing:
        raise XanesdiffInputError(
            f"shard database(s) {missing} of {n_shards} missing "
            f"({path.stem}_shard<i>of{n_shards}{path.suffix}); run those shards first", db)
    return [str(shards[i]) for i in range(int(n_shards))]


def merge_libraries(inputs: list[str], out: str, dedup: bool = True) -> dict:
    """Merge `inputs` into `out`; returns counts (per input and in total)."""
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise XanesdiffInputError("no input databases to merge", "inputs")
    if str(out) in inputs:
        raise XanesdiffInputError("the output is also an input", str(out))
    stores = [LibraryStore(url, create=False) for url in inputs]
    metas = []
    for store in stores:
        meta = store.library_metadata
        if meta is None:
            raise XanesdiffInputError("has no xanesdiff library metadata: not a library shard",
                                      store.url)
        metas.append(meta)
    settings_ids = {m["settings_id"] for m in metas}
    if len(settings_ids) > 1:
        raise XanesdiffInputError(f"inputs were made with different settings {sorted(settings_ids)}"
                                  "; merge only shards of one library", "inputs")
    plan_ids = {m.get("plan_id") for m in metas}
    if len(plan_ids) > 1:
        raise XanesdiffInputError(f"inputs were made from different plans {sorted(plan_ids)}",
                                  "inputs")
    meta = metas[0]
    target = LibraryStore(out)
    target.check_settings(meta["settings_id"])
    previous = target.library_metadata or {}
    planned_all = list(dict.fromkeys(
        [k for m in [previous, *metas] for k in m.get("plan_keys", [])]))
    target.set_library_metadata({**meta, "plan_keys": planned_all, "shard_index": 0,
                                 "n_shards": 1, "merged_from": inputs})

    existing = target.keys()
    duplicates = None
    dedup_cfg = meta["settings"].get("dedup") or {}
    if dedup and dedup_cfg.get("enabled", True):
        duplicates = DuplicateIndex(float(dedup_cfg.get("threshold_A", 0.015)),
                                    float(dedup_cfg.get("density_tol_g_cm3", 0.05)))
        for row in target.rows(include_data=True, status="accepted"):
            duplicates.add(row.unique_id, row.n_atoms, row.density_g_cm3, row.data["fingerprint"])

    order = []
    per_input = []
    for k, store in enumerate(stores):
        rows = list(store.rows(include_data=False))
        per_input.append({"db": store.url, "rows": len(rows),
                          "accepted": sum(r.get("status") == "accepted" for r in rows),
                          "rejected": sum(r.get("status") == "rejected" for r in rows)})
        order += [(r.get("item_index", 0), r.unique_id, k, r.id) for r in rows]
    order.sort()
    counts = {"written": 0, "skipped_existing": 0, "skipped_duplicate_key": 0,
              "near_duplicates_rejected": 0}
    seen = set()
    for _, key, k, row_id in order:
        if key in existing:
            counts["skipped_existing"] += 1
            continue
        if key in seen:
            counts["skipped_duplicate_key"] += 1
            continue
        seen.add(key)
        row = stores[k].get(id=row_id)
        kvp = dict(row.key_value_pairs)
        data = dict(row.data)
        if duplicates is not None and kvp.get("status") == "accepted" and "fingerprint" in data:
            hit = duplicates.find(row.n_atoms, kvp["density_g_cm3"], data["fingerprint"])
            if hit is not None:
                kvp.update(status="rejected", duplicate_of=hit[0], duplicate_distance_A=hit[1],
                           reason=f"near-duplicate of {hit[0]} (fingerprint distance "
                                  f"{hit[1]:.4f} Å ≤ {duplicates.threshold_A:g}, across shards)")
                counts["near_duplicates_rejected"] += 1
            else:
                duplicates.add(key, row.n_atoms, kvp["density_g_cm3"], data["fingerprint"])
        if target.write(key, row.toatoms(), kvp, data, ctime=row.ctime,
                        user=row.get("user")) is not None:
            counts["written"] += 1
        else:
            counts["skipped_existing"] += 1
    rows = {r.unique_id: r.get("status") for r in target.rows(include_data=False)}
    statuses = list(rows.values())
    counts.update({
        "inputs": per_input, "db": target.url, "rows": len(rows),
        "accepted": statuses.count("accepted"), "rejected": statuses.count("rejected"),
        "planned": len(planned_all), "missing": len(set(planned_all) - set(rows)),
        "not_in_plan": len(set(rows) - set(planned_all)),
    })
    return counts

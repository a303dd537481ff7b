"""`xanesdiff library`: a plan of targets → validated structures in an ASE database.

    xanesdiff library plan.targets=[spec.csv] plan.densities=[2.0,2.5] plan.n_seeds=8 out=runs/lib
    xanesdiff library -m shard_index=0,1 n_shards=2 …     # one database per shard (multirun)
    xanesdiff library mode=export out=runs/lib             # extxyz / POSCARs / per-site spectra
    xanesdiff library mode=summary out=runs/lib            # counts against the plan

Resumable: rerunning the same command continues where it stopped (see `xanesdiff.library`).
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.scripts._hydra import hydra_app, set_threads

log = logging.getLogger("xanesdiff.library")


def run(cfg: DictConfig, models=None) -> dict:
    """Dispatch on `cfg.mode`; returns the mode's summary dict (also printed as JSON)."""
    from xanesdiff.library.runner import build_library, db_url, plan_items, summarize
    from xanesdiff.library.plan import shard_items
    from xanesdiff.library.store import LibraryStore

    mode = str(cfg.mode)
    if mode == "generate":
        result = build_library(cfg, models=models, progress=bool(cfg.progress))
    elif mode == "export":
        from xanesdiff.library.export import export_library

        result = export_library(db_url(cfg), cfg.export.out, list(cfg.export.formats),
                                str(cfg.export.status), str(cfg.export.positions))
        result["out"] = str(cfg.export.out)
    elif mode == "summary":
        items = plan_items(cfg)
        mine = shard_items(items, int(cfg.shard_index), int(cfg.n_shards))
        result = summarize(LibraryStore(db_url(cfg), create=False), mine, len(items))
        result["db"] = db_url(cfg)
    else:
        raise XanesdiffInputError(f"unknown mode {mode!r}: generate | export | summary", "mode")
    print(json.dumps({"mode": mode, **result}, indent=1))
    return result


@hydra_app("library")
def main(cfg: DictConfig):
    set_threads()
    run(cfg)


if __name__ == "__main__":
    main()

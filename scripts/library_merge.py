"""`xanesdiff library-merge`: merge shard databases of one library into one database.

    xanesdiff library-merge out=runs/lib n_shards=2        # runs/lib/library_shard{0,1}of2.db → library.db
    xanesdiff library-merge db=merged.db 'inputs=[a.db,b.db]'

Skips rows whose item key is already present (reports how many), re-checks near-duplicates across
shards (`dedup=false` to skip), and prints counts: rows, accepted, rejected, planned, missing.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from xanesdiff.scripts._hydra import hydra_app


def run(cfg: DictConfig) -> dict:
    from xanesdiff.library.merge import find_shards, merge_libraries

    inputs = list(cfg.inputs) if cfg.inputs else find_shards(
        str(cfg.db), None if cfg.n_shards is None else int(cfg.n_shards))
    result = merge_libraries(inputs, str(cfg.db), dedup=bool(cfg.dedup))
    print(json.dumps(result, indent=1))
    return result


@hydra_app("library_merge")
def main(cfg: DictConfig):
    run(cfg)


if __name__ == "__main__":
    main()

"""Structure libraries: many guided generations into one database, resumable and shardable.

- `plan`: targets × densities × steers × cell sizes × seeds → items with stable content keys,
  assigned to shards by key hash.
- `models`: prior / surrogate / judge from checkpoints or from a `module:function` factory, with
  their SHA-256 for provenance.
- `runner`: `build_library(cfg)`: each item generated like `xanesdiff generate` does it, validated,
  filtered (`filters`: thresholds; `fingerprint`: near-duplicates) and written as one row (one
  transaction) by `store` into an ASE database (SQLite file or PostgreSQL URL).
- `merge`: shard databases → one, duplicates skipped by key, near-duplicates re-checked.
- `export`: extxyz, POSCAR folder, per-site predicted spectra (CSV), index CSV.

Command line (`configs/library.yaml`, `configs/library_merge.yaml`)::

    xanesdiff library plan.targets=[a.csv,b.csv] plan.densities=[2.0,2.5] plan.n_seeds=8 out=runs/lib
    xanesdiff library -m shard_index=0,1 n_shards=2 …          # hydra multirun, basic launcher
    xanesdiff library-merge out=runs/lib n_shards=2
    xanesdiff library mode=export out=runs/lib
    xanesdiff library mode=summary out=runs/lib

On SLURM (optional `pip install hydra-submitit-launcher`)::

    xanesdiff library -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.timeout_min=720 hydra.launcher.cpus_per_task=8 \\
        'shard_index=range(0,16)' n_shards=16 plan_file=plan.yaml out=/scratch/lib
    xanesdiff library-merge out=/scratch/lib n_shards=16

Rerunning any of these after a kill, a timeout or a pre-emption continues where it stopped.
"""

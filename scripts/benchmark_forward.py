"""Forward-surrogate benchmark: leave-one-density-out accuracy of M3GNet features vs baselines,
and throughput. Writes benchmarks/forward.json and the table benchmarks/forward.md.

    python -m xanesdiff.scripts.benchmark_forward                       # everything (~20 min, 2 cores)
    python -m xanesdiff.scripts.benchmark_forward --models m3gnet --densities 2.5 --no-throughput

Models: `m3gnet` (frozen M3GNet gc_1..gc_3 node features), `m3gnet_descriptor` (those next to the
descriptor; the shipped default), `gnn_scratch` and `descriptor` (the baselines).
Every model is trained exactly as `xanesdiff train-forward forward=<model>` would train it (the
same hydra config), on four networks, and evaluated on the fifth, which it never saw during
training (stopping watches the training loss only). The head/featuriser settings were chosen
after comparing a few variants on these same splits (benchmarks/forward.md says which), so the
numbers are not from a fully untouched test set. Each split is trained `--seeds` times (seeds
k = 0, 1, ...); metrics are the means over seeds of per-held-out-frame metrics averaged over the
network's frames:
  site_mae   mean |ensemble-mean site spectrum − reference site spectrum| (all sites, energies)
  mean_mae   mean |predicted mean spectrum − reference mean spectrum| over energies
  spearman   Spearman rank correlation of the predicted and reference mean spectra
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

DENSITIES = (1.5, 2.0, 2.5, 3.0, 3.5)
MODELS = ("m3gnet", "m3gnet_descriptor", "gnn_scratch", "descriptor")
TARGETS = {"interior_mean_mae_max": 0.005, "interior_spearman_min": 0.995,
           "interior_densities": [2.0, 2.5, 3.0]}


def compose_model_config(model: str, overrides: list[str] | None = None):
    """The `train-forward` config of one model (configs/forward/<model>.yaml)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="xanesdiff.configs", version_base="1.3"):
        return compose("train_forward", overrides=[f"forward={model}", *(overrides or [])])


def evaluate(surrogate, frames) -> dict:
    """Per-network metrics (means over frames) plus the per-frame values."""
    from scipy.stats import spearmanr

    from xanesdiff.forward.surrogate import predict_sites

    per_frame = []
    for frame in frames:
        members = predict_sites(surrogate, frame.atoms)          # (K, N, M)
        sites = members.mean(0)
        mean_members = members.mean(1)                          # (K, M)
        mean = mean_members.mean(0)
        per_frame.append({
            "frame": frame.name,
            "site_mae": float(np.abs(sites - frame.site_spectra).mean()),
            "mean_mae": float(np.abs(mean - frame.mean_spectrum).mean()),
            "spearman": float(spearmanr(mean, frame.mean_spectrum).statistic),
            "ensemble_std": float(mean_members.std(0).mean()),
        })
    out = {k: float(np.mean([f[k] for f in per_frame]))
           for k in ("site_mae", "mean_mae", "spearman", "ensemble_std")}
    out["n_frames"] = len(frames)
    out["frames"] = per_frame
    return out


def reference_scales(dataset) -> dict:
    """Data-only scales: frame-to-frame MAE within a network, and between adjacent densities."""
    nets = dataset.networks
    means = {n: np.array([f.mean_spectrum for f in dataset.frames_of([n])]) for n in nets}
    within = {f"{dataset.network_density(n):.2f}":
              float(np.mean([np.abs(a - b).mean() for i, a in enumerate(means[n])
                             for b in means[n][i + 1:]])) for n in nets}
    adjacent = {f"{dataset.network_density(a):.2f}-{dataset.network_density(b):.2f}":
                float(np.abs(means[a].mean(0) - means[b].mean(0)).mean())
                for a, b in zip(nets[:-1], nets[1:])}
    return {"within_network_frame_mae": within, "adjacent_density_mae": adjacent}


def _reseeded(featurizer_cfg: dict, k: int) -> dict:
    """A learned featuriser's config with its seed shifted by k (frozen ones have no seed)."""
    cfg = dict(featurizer_cfg)
    if "seed" in cfg:
        cfg["seed"] = int(cfg["seed"]) + k
    if cfg.get("type") == "concat":
        cfg["parts"] = [_reseeded(part, k) for part in cfg["parts"]]
    return cfg


def run_model(model: str, dataset, densities, overrides, caches: dict, log,
              n_seeds: int = 1) -> dict:
    from omegaconf import OmegaConf

    from xanesdiff.datasets.splits import leave_one_density_out
    from xanesdiff.forward.m3gnet_features import FeatureCache
    from xanesdiff.forward.surrogate import (build_featurizer, featurizer_has_own_weights,
                                             train_surrogate)

    cfg = compose_model_config(model, overrides)
    featurizer_cfg = OmegaConf.to_container(cfg.forward.featurizer, resolve=True)
    head_cfg = OmegaConf.to_container(cfg.head, resolve=True)
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    results, frozen = {}, not featurizer_has_own_weights(featurizer_cfg)
    featurizer = build_featurizer(featurizer_cfg) if frozen else None
    if frozen:
        caches.setdefault(model, FeatureCache(featurizer))
    for rho in densities:
        split = leave_one_density_out(dataset, rho)
        runs = []
        for k in range(n_seeds):
            head_k, train_k = dict(head_cfg), dict(train_cfg)
            head_k["seed"], train_k["seed"] = head_cfg["seed"] + k, train_cfg["seed"] + k
            feat_k = featurizer if frozen else _reseeded(featurizer_cfg, k)
            start = time.perf_counter()
            surrogate = train_surrogate(
                split.train, dataset.grid, feat_k, head_k, train_k, absorber=dataset.absorber,
                cache=caches.get(model), frames_per_step=int(cfg.frames_per_step))
            train_s = time.perf_counter() - start
            runs.append(evaluate(surrogate, split.test))
            runs[-1]["train_s"] = train_s
        metrics = {key: float(np.mean([r[key] for r in runs]))
                   for key in ("site_mae", "mean_mae", "spearman", "ensemble_std", "train_s")}
        metrics.update({"mean_mae_seed_std": float(np.std([r["mean_mae"] for r in runs])),
                        "n_seeds": n_seeds, "held_out_network": split.held_out_network,
                        "n_frames": runs[0]["n_frames"], "n_train_frames": len(split.train),
                        "per_seed": runs})
        results[f"{rho:.1f}"] = metrics
        log(f"{model:17s} held out {rho:.1f}: mean_mae {metrics['mean_mae']:.4f} "
            f"(±{metrics['mean_mae_seed_std']:.4f} over {n_seeds} seeds) spearman "
            f"{metrics['spearman']:.4f} site_mae {metrics['site_mae']:.4f} "
            f"({metrics['train_s']:.0f} s per model)")
    return {"results": results, "config": {"featurizer": featurizer_cfg, "head": head_cfg,
                                           "train": train_cfg}}


def throughput(dataset, threads: int, log) -> dict:
    """Predict speed (sites/s) and forward+backward seconds for 216- and 1728-atom cells."""
    import os
    import resource

    import torch

    from xanesdiff.forward.surrogate import load_surrogate, predict_sites

    torch.set_num_threads(threads)
    surrogate = load_surrogate()
    frames = dataset.frames
    predict_sites(surrogate, frames[0].atoms)  # warm-up
    start = time.perf_counter()
    n_sites = 0
    for frame in frames:
        n_sites += predict_sites(surrogate, frame.atoms).shape[1]
    sites_per_s = n_sites / (time.perf_counter() - start)

    def fwd_bwd(atoms, repeats):
        times = []
        for _ in range(repeats):
            pos = torch.tensor(atoms.positions, dtype=torch.float32, requires_grad=True)
            cell = torch.tensor(atoms.cell.array, dtype=torch.float32, requires_grad=True)
            t0 = time.perf_counter()
            spectrum = surrogate.mean_spectrum(pos, cell, torch.tensor(atoms.numbers)).mean(0)
            (spectrum ** 2).sum().backward()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    frame = next(f for f in frames if f.network == dataset.networks[2])  # 2.5 g/cm³
    t216 = fwd_bwd(frame.atoms, 3)
    big = frame.atoms.repeat((2, 2, 2))
    t1728 = fwd_bwd(big, 2)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log(f"throughput: {sites_per_s:.0f} sites/s, fwd+bwd 216: {t216:.2f} s, 1728: {t1728:.2f} s")
    return {"sites_per_s": sites_per_s, "fwd_bwd_s_216": t216, "fwd_bwd_s_1728": t1728,
            "peak_rss_gb": peak_gb, "threads": threads, "load_average_1min": load, "density_g_cm3": frame.density_g_cm3,
            "ensemble_members": surrogate.n_members}


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    return (f"{cpu}, {os.cpu_count()} cores visible, {threads} torch threads, torch "
            f"{torch.__version__}, {platform.system()} {platform.release()}")


def markdown_table(report: dict) -> str:
    lodo = report["leave_one_density_out"]
    densities = sorted({d for m in lodo.values() for d in m}, key=float)
    lines = ["| model | metric | " + " | ".join(f"{d} held out" for d in densities) + " |",
             "|---|---|" + "---|" * len(densities)]
    for model, res in lodo.items():
        for metric, fmt in (("mean_mae", "{:.4f}"), ("spearman", "{:.4f}"), ("site_mae", "{:.4f}")):
            cells = [fmt.format(res[d][metric]) if d in res else "" for d in densities]
            lines.append(f"| {model} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- benchmark table: start -->", "<!-- benchmark table: end -->"


def splice_table(md_path: Path, table: str, report: dict) -> str:
    """The markdown file with the generated table (between the markers) replaced."""
    block = (f"{TABLE_START}\n{table}\n\nThroughput: "
             + (", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                          for k, v in report.get("throughput", {}).items()
                          if not isinstance(v, dict)) or "not measured")
             + f"\n\nCommand: `{report['command']}`  \nMachine: {report['machine']}\n{TABLE_END}")
    text = md_path.read_text() if md_path.exists() else "# Forward surrogate benchmark\n\n"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        return head + block + rest.split(TABLE_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra train-forward overrides for every model, e.g. head.n_members=8")
    parser.add_argument("--seeds", type=int, default=3,
                        help="independent trainings per split (head/train/GNN seed + k); metrics "
                             "are their means")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for throughput")
    parser.add_argument("--train-threads", type=int, default=1,
                        help="torch threads for training/evaluation (1: a loaded 2-core machine "
                             "makes 2-thread OpenMP steps ~30x slower)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--out", default="benchmarks/forward.json")
    parser.add_argument("--md", default="benchmarks/forward.md",
                        help="markdown file whose table (between the table markers) is replaced")
    args = parser.parse_args(argv)

    import torch

    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.spectra_io import atomic_write_text
    from xanesdiff.forward.task import quiet_lightning

    torch.set_num_threads(args.train_threads)
    quiet_lightning()
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    dataset = load_dataset()
    report: dict = {"leave_one_density_out": {}, "configs": {}, "timing_s": {}}
    caches: dict = {}
    for model in args.models:
        t0 = time.perf_counter()
        out = run_model(model, dataset, args.densities, args.set, caches, log, args.seeds)
        report["leave_one_density_out"][model] = out["results"]
        report["configs"][model] = out["config"]
        report["timing_s"][model] = time.perf_counter() - t0
    if not args.no_throughput:
        report["throughput"] = throughput(dataset, args.threads, log)
        if args.threads != 1:
            one = throughput(dataset, 1, log)
            report["throughput"]["one_thread"] = {k: one[k] for k in (
                "sites_per_s", "fwd_bwd_s_216", "fwd_bwd_s_1728")}
        torch.set_num_threads(args.train_threads)
    report["reference_scales"] = reference_scales(dataset)
    report["targets"] = TARGETS
    report["command"] = "python -m xanesdiff.scripts.benchmark_forward " + " ".join(
        sys.argv[1:] if argv is None else argv)
    report["machine"] = machine(args.threads)
    report["timing_s"]["total"] = time.perf_counter() - started
    out_path = Path(args.out)
    atomic_write_text(out_path, json.dumps(report, indent=1) + "\n")
    md_path = Path(args.md)
    atomic_write_text(md_path, splice_table(md_path, markdown_table(report), report))
    log(f"wrote {out_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the diffusion prior against the issue-4 targets; writes benchmarks/prior.json + .md.

    python -m xanesdiff.scripts.benchmark_prior                      # full table (8 × 216 atoms)
    python -m xanesdiff.scripts.benchmark_prior --n-samples 2 --densities 2.49   # quick look
    python -m xanesdiff.scripts.benchmark_prior --record-from benchmarks/prior.json
        # the misses of a result, beside its checkpoint (<checkpoint>.fidelity.json), for
        # `sample` and `generate` to warn from (`--record` does it at the end of a run)

For each training network: sample at its density, compare with that network's frames. Leave-out:
the prior trained without the 2.5 g/cm³ network, sampled at 2.49 g/cm³, against that network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

TARGETS = {"cn1": 0.01, "cn5plus": 0.01, "sp3_err": 0.05, "sp2_err": 0.05, "rdf_peak_err": 0.03,
           "dmin_min": 1.1, "leave_out_sp3_err": 0.08}


def make_sampler(name: str, schedule, overrides: list[str]):
    import hydra
    from omegaconf import OmegaConf

    from xanesdiff.diffusion.sampling import sampler_config

    cfg = sampler_config(name, overrides)
    return hydra.utils.instantiate(cfg, schedule=schedule), OmegaConf.to_container(cfg)


def evaluate(prior, sampler, density: float, reference: list, n_samples: int, n_atoms: int,
             seed: int, save_to: Path | None = None) -> dict:
    from xanesdiff.analysis.structure import compare_sets, hybridization_fractions, minimum_distance

    start = time.perf_counter()
    frames = prior.sample(n_atoms=n_atoms, density_g_cm3=density, n_samples=n_samples, seed=seed,
                          sampler=sampler)
    wall = time.perf_counter() - start
    if save_to is not None:
        from xanesdiff.guidance.report import write_extxyz

        save_to.parent.mkdir(parents=True, exist_ok=True)
        write_extxyz(save_to, frames)
    h = hybridization_fractions(frames)
    href = hybridization_fractions(reference)
    cmp = compare_sets(frames, reference)
    dmins = [minimum_distance(a) for a in frames]
    return {
        "cn1": h["cn1"], "cn5plus": h["cn5plus"], "sp3_err": cmp["sp3_err"],
        "sp2_err": cmp["sp2_err"], "sp_err": cmp["sp_err"], "rdf_peak_err": cmp["rdf_peak_err"],
        "rdf_peak_err_unsmoothed": cmp["rdf_peak_err_unsmoothed"],
        "dmin": float(min(dmins)), "dmin_mean": float(sum(dmins) / len(dmins)),
        "sample": {k: h[k] for k in ("cn0", "cn1", "sp", "sp2", "sp3", "cn5plus", "mean_cn")},
        "reference": {k: href[k] for k in ("sp", "sp2", "sp3")},
        "distances": {k: cmp[k] for k in ("rdf_l1", "rdf_w1", "angle_w1", "angle_l1", "cn_l1")},
        "n_samples": n_samples, "n_atoms": n_atoms, "sample_wall_s": wall,
    }


def passes(row: dict) -> dict:
    return {"cn1": row["cn1"] <= TARGETS["cn1"], "cn5plus": row["cn5plus"] <= TARGETS["cn5plus"],
            "sp3": row["sp3_err"] <= TARGETS["sp3_err"], "sp2": row["sp2_err"] <= TARGETS["sp2_err"],
            "rdf_peak": row["rdf_peak_err"] <= TARGETS["rdf_peak_err"],
            "dmin": row["dmin"] >= TARGETS["dmin_min"]}


def markdown(result: dict) -> str:
    from xanesdiff.analysis.structure import RDF_PEAK_SMOOTHING_A

    lines = ["# Diffusion prior benchmark (issue 4)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Checkpoints: `{result['checkpoint']}` (step {result['checkpoint_step']})"
             + (f", leave-out `{result['leave_out_checkpoint']}`  "
                if result.get("leave_out_checkpoint") else "  "),
             f"Sampler: `{json.dumps(result['sampler'])}`  ",
             f"Autoguidance: `{json.dumps(result.get('autoguidance'))}`", "",
             "Targets: CN1 ≤ 0.01, CN5+ ≤ 0.01, |Δsp3| ≤ 0.05, |Δsp2| ≤ 0.05, |Δ RDF peak| ≤ 0.03 Å, "
             "dmin ≥ 1.1 Å; leave-out |Δsp3| ≤ 0.08. Fractions of atoms (cutoff 1.85 Å). RDF peak: "
             f"g(r) smoothed by {RDF_PEAK_SMOOTHING_A} Å (`rdf_peak_err_unsmoothed` in the JSON: raw 0.02 Å bins).", "",
             "| density g/cm³ | CN1 | CN5+ | sp3 (ref) | sp2 (ref) | sp (ref) | |Δsp3| | |Δsp2| | "
             "ΔRDF peak Å | dmin Å | angle W1 ° | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rho, row in result["per_density"].items():
        ok = all(row["pass"].values())
        s, r = row["sample"], row["reference"]
        lines.append(
            f"| {rho} | {row['cn1']:.3f} | {row['cn5plus']:.3f} | {s['sp3']:.3f} ({r['sp3']:.3f}) | "
            f"{s['sp2']:.3f} ({r['sp2']:.3f}) | {s['sp']:.3f} ({r['sp']:.3f}) | {row['sp3_err']:.3f} | "
            f"{row['sp2_err']:.3f} | {row['rdf_peak_err']:.3f} | {row['dmin']:.2f} | "
            f"{row['distances']['angle_w1']:.1f} | "
            f"{'yes' if ok else 'no: ' + ', '.join(k for k, v in row['pass'].items() if not v)} |")
    for rho, row in result.get("leave_out", {}).items():
        lines += ["", f"Leave-one-density-out ({rho} g/cm³ network held out of training): "
                  f"sp3 {row['sample']['sp3']:.3f} vs {row['reference']['sp3']:.3f} → |Δsp3| = "
                  f"{row['sp3_err']:.3f} ({'pass' if row['sp3_err'] <= TARGETS['leave_out_sp3_err'] else 'fail'}); "
                  f"CN1 {row['cn1']:.3f}, CN5+ {row['cn5plus']:.3f}, dmin {row['dmin']:.2f} Å."]
    return "\n".join(lines) + "\n"


def record(result: dict, advice: str = "") -> Path:
    """Write the misses of `result` beside the checkpoint it measured (`fidelity_record`), with
    `advice` to end its warnings."""
    import xanesdiff
    from xanesdiff.diffusion.fidelity_record import fidelity_from_benchmark, save_fidelity_record

    checkpoint = Path(xanesdiff.PACKAGE_ROOT) / result["checkpoint"]  # undoes `_as_recorded`
    if not checkpoint.exists():
        raise SystemExit(f"the measured checkpoint {result['checkpoint']} does not exist here")
    return save_fidelity_record(checkpoint, fidelity_from_benchmark(result, advice))


def _as_recorded(path: str | Path) -> str:
    """`path` relative to the project root when it lies inside it, so the JSON reads the same on
    every machine (the shipped checkpoints resolve to absolute paths)."""
    import xanesdiff

    path, root = Path(path).resolve(), Path(xanesdiff.PACKAGE_ROOT).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def main(argv=None) -> int:
    from xanesdiff.runtime import configure_process

    configure_process()
    import torch

    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.spectra_io import atomic_write_text
    from xanesdiff.diffusion.prior import load_prior, prior_checkpoint_path

    import xanesdiff

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: shipped prior_default.pt")
    p.add_argument("--leave-out-checkpoint",
                   default=str(xanesdiff.PACKAGE_ROOT / "checkpoints" / "prior_without_2.5.pt"))
    p.add_argument("--leave-out-density", type=float, default=2.5)
    p.add_argument("--densities", type=float, nargs="*", default=None,
                   help="network densities to test (default: all training networks)")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--n-atoms", type=int, default=216)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="pc", help="configs/sampler/<name>.yaml")
    p.add_argument("--set", nargs="*", default=[], help="sampler overrides, e.g. n_steps=200")
    p.add_argument("--autoguidance", default="auto",
                   help="auto (the shipped pairing, as in sample and generate) | none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/prior.json")
    p.add_argument("--no-leave-out", action="store_true")
    p.add_argument("--save-samples", default=None, metavar="DIR",
                   help="also write the sampled structures, DIR/rho<density>.extxyz")
    p.add_argument("--record", action="store_true",
                   help="also write the result's misses beside the checkpoint "
                        "(<checkpoint>.fidelity.json), which sample and generate warn from")
    p.add_argument("--record-advice", default="", metavar="TEXT",
                   help="a sentence the record's warnings end with (e.g. a better sampler)")
    p.add_argument("--record-from", default=None, metavar="RESULT_JSON",
                   help="only write that record, from an earlier result of this benchmark")
    p.add_argument("--merge", nargs="*", default=None,
                   help="combine partial result JSONs (e.g. from parallel runs over densities) "
                        "into --out and its .md instead of sampling")
    args = p.parse_args(argv)
    if args.record_from:
        result = json.loads(Path(args.record_from).read_text())
        print(f"wrote {record(result, args.record_advice)}")
        return 0
    if args.merge:
        from xanesdiff.datasets.spectra_io import atomic_write_text

        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = dict(parts[0], per_density={}, leave_out={})
        for part in parts:
            merged["per_density"].update(part["per_density"])
            merged["leave_out"].update(part.get("leave_out", {}))
            merged.setdefault("leave_out_checkpoint", part.get("leave_out_checkpoint"))
            if part.get("leave_out_checkpoint"):
                merged["leave_out_checkpoint"] = part["leave_out_checkpoint"]
        merged["per_density"] = dict(sorted(merged["per_density"].items()))
        merged["command"] = " && ".join(part["command"] for part in parts) + (
            " && python -m xanesdiff.scripts.benchmark_prior --merge " + " ".join(args.merge)
            + f" --out {args.out}")
        atomic_write_text(Path(args.out), json.dumps(merged, indent=1))
        atomic_write_text(Path(args.out).with_suffix(".md"), markdown(merged))
        print(markdown(merged))
        if args.record:
            print(f"wrote {record(merged, args.record_advice)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_dataset()
    prior = load_prior(args.checkpoint, autoguidance=args.autoguidance)
    sampler, sampler_cfg = make_sampler(args.sampler, prior.schedule, args.set)
    networks = dataset.networks
    if args.densities:
        networks = [min(networks, key=lambda n: abs(dataset.network_density(n) - rho))
                    for rho in args.densities]
    result = {"per_density": {}, "leave_out": {},
              "command": "python -m xanesdiff.scripts.benchmark_prior " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "checkpoint": _as_recorded(args.checkpoint or prior_checkpoint_path()),
              "checkpoint_step": prior.metadata.get("global_step"),
              "sampler": sampler_cfg, "targets": TARGETS,
              "autoguidance": prior.metadata.get("autoguidance")}
    for network in networks:
        rho = dataset.network_density(network)
        reference = [f.atoms for f in dataset.frames_of([network])]
        save_to = Path(args.save_samples) / f"rho{rho:.2f}.extxyz" if args.save_samples else None
        row = evaluate(prior, sampler, rho, reference, args.n_samples, args.n_atoms, args.seed,
                       save_to)
        row["pass"] = passes(row)
        result["per_density"][f"{rho:.2f}"] = row
        print(f"{rho:.2f}: " + json.dumps({k: round(v, 3) for k, v in row.items()
                                           if isinstance(v, float)}), flush=True)
    if not args.no_leave_out and Path(args.leave_out_checkpoint).exists():
        held = load_prior(args.leave_out_checkpoint)
        sampler_lo, _ = make_sampler(args.sampler, held.schedule, args.set)
        network = min(dataset.networks,
                      key=lambda n: abs(dataset.network_density(n) - args.leave_out_density))
        if network not in held.metadata.get("excluded_networks", []):
            raise SystemExit(f"{args.leave_out_checkpoint} was trained with {network}")
        rho = dataset.network_density(network)
        reference = [f.atoms for f in dataset.frames_of([network])]
        save_to = (Path(args.save_samples) / f"leave_out_rho{rho:.2f}.extxyz"
                   if args.save_samples else None)
        row = evaluate(held, sampler_lo, rho, reference, args.n_samples, args.n_atoms, args.seed,
                       save_to)
        row["checkpoint_step"] = held.metadata.get("global_step")
        result["leave_out"][f"{args.leave_out_density}"] = row
        result["leave_out_checkpoint"] = _as_recorded(args.leave_out_checkpoint)
        print(f"leave-out {rho:.2f}: sp3_err {row['sp3_err']:.3f}", flush=True)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1))
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    if args.record:
        print(f"wrote {record(result, args.record_advice)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

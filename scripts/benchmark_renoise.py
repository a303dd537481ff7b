"""Re-noising test of the diffusion prior: does it keep a real structure as it is?

    python -m xanesdiff.scripts.benchmark_renoise                 # -> benchmarks/prior_renoise.json + .md
    python -m xanesdiff.scripts.benchmark_renoise --t 0.15 --frames 1 --checkpoint my_prior.pt

For each network: add the schedule's noise at time t to reference frames (σ = k·t Å), integrate
back to t_end with the default sampler started at t, and compare hybridisation with the frames
themselves. A perfect score model returns statistically the same structures at every t, so the
drift measures the score model's local error alone: no start from random positions, no density
to find. Sampling from scratch cannot beat the drift seen at small t.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def renoise(prior, frames: list, t: float, sampler, seed: int) -> list:
    """Frames (ASE Atoms, one cell shape each) noised to time t and denoised by `sampler`, at
    the noise scales it uses for the first frame's density (frames of one network)."""
    import torch

    from xanesdiff.datasets.graph import wrap_positions
    from xanesdiff.datasets.structures import density_g_cm3

    generator = torch.Generator().manual_seed(seed)
    dtype = prior.dtype
    cells = torch.stack([torch.as_tensor(a.cell.array, dtype=dtype) for a in frames])
    numbers = torch.cat([torch.as_tensor(a.numbers) for a in frames])
    batch = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(frames)])
    pos = torch.cat([torch.as_tensor(a.positions, dtype=dtype) for a in frames])
    sigma = float(prior.schedule.sigma(t))
    pos = wrap_positions(pos + sigma * torch.randn(pos.shape, generator=generator, dtype=dtype),
                         cells, batch)
    prior.neighbors.clear()
    out = sampler.sample(pos, lambda x, tt: prior.score_batch(x, cells, numbers, tt, batch),
                         lambda x: wrap_positions(x, cells, batch), generator,
                         density_g_cm3=density_g_cm3(frames[0]))
    result = []
    for i, atoms in enumerate(frames):
        copy = atoms.copy()
        copy.positions = out[batch == i].double().numpy()
        copy.wrap()
        result.append(copy)
    return result


def markdown(result: dict) -> str:
    times = result["t"]
    lines = ["# Prior re-noising test (issue 4 diagnostic)", "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Checkpoint: `{result['checkpoint']}`; {result['frames_per_network']} frame(s) per "
             "network; sp3 / sp2 / CN5+ as fractions of atoms (cutoff 1.85 Å).", "",
             "| network g/cm³ | reference sp3 / sp2 / CN5+ | "
             + " | ".join(f"t = {t} (σ = {result['sigma_A'][str(t)]:.2f} Å)" for t in times) + " |",
             "|---|---|" + "---|" * len(times)]
    for rho, row in result["networks"].items():
        ref = row["reference"]
        cells = [f"{row[str(t)]['sp3']:.3f} / {row[str(t)]['sp2']:.3f} / {row[str(t)]['cn5plus']:.3f}"
                 for t in times]
        lines.append(f"| {rho} | {ref['sp3']:.3f} / {ref['sp2']:.3f} / {ref['cn5plus']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: shipped prior_default.pt")
    parser.add_argument("--t", type=float, nargs="+", default=[0.15, 0.3, 0.5])
    parser.add_argument("--frames", type=int, default=2, help="frames per network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/prior_renoise.json")
    args = parser.parse_args(argv)

    import torch

    from xanesdiff.analysis.structure import hybridization_fractions
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.spectra_io import atomic_write_text
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.sampling import default_sampler
    from xanesdiff.guidance.report import write_json

    torch.set_num_threads(args.threads)
    prior = load_prior(args.checkpoint)
    dataset = load_dataset()
    keys = ("sp3", "sp2", "cn5plus", "cn1")
    networks = {}
    for network in dataset.networks:
        frames = [f.atoms for f in dataset.frames if f.network == network][:args.frames]
        rho = f"{dataset.network_density(network):.2f}"
        ref = hybridization_fractions(frames)
        row = {"reference": {k: ref[k] for k in keys}}
        for t in args.t:
            sampler = default_sampler(prior.schedule)  # started at t, same step density
            sampler.t_start, sampler.n_steps = t, max(10, round(sampler.n_steps * t))
            h = hybridization_fractions(renoise(prior, frames, t, sampler, args.seed))
            row[str(t)] = {k: h[k] for k in keys}
            print(rho, t, row[str(t)], flush=True)
        networks[rho] = row
    result = {"networks": dict(sorted(networks.items())), "t": args.t,
              "sigma_A": {str(t): float(prior.schedule.sigma(t)) for t in args.t},
              "frames_per_network": args.frames,
              "checkpoint": args.checkpoint or "checkpoints/prior_default.pt",
              "command": "python -m xanesdiff.scripts.benchmark_renoise "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {args.threads} torch thread(s)"}
    write_json(args.out, result)
    md = markdown(result)
    atomic_write_text(Path(args.out).with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()

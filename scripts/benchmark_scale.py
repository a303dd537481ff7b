"""Scaling of sampling with the atom count → benchmarks/scale.json.

    python -m xanesdiff.scripts.benchmark_scale [--atoms 216 1000 3000 10000] [--large 10000]

Each point runs in its own process (so its peak memory is its own): one prior score step
(neighbour list + e3nn forward) and one guided step (prior forward+backward through x̂0 plus the
M3GNet surrogate's forward+backward on the whole cell) at 2.5 g/cm³, repeated and averaged.
The exponent is the slope of log(time) against log(atoms). `--large N` also samples one N-atom
cell with the default sampler (prior only) and compares its structure with 216-atom samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

DENSITY = 2.5


def measure_point(n_atoms: int, guided: bool, repeats: int) -> dict:
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.sampling import cubic_cell_for_density
    from xanesdiff.datasets.graph import wrap_positions

    prior = load_prior()
    cell = torch.tensor(cubic_cell_for_density(n_atoms, DENSITY), dtype=torch.float32)
    numbers = torch.full((n_atoms,), 6)
    generator = torch.Generator().manual_seed(0)
    pos = prior.schedule.prior_sampling(n_atoms, cell, generator)
    result = {"atoms": n_atoms}
    with torch.no_grad():
        prior.score(pos, cell, numbers, 0.5)
        start = time.perf_counter()
        for _ in range(repeats):
            pos = wrap_positions(pos + 0.05 * torch.randn_like(pos), cell)  # moves: cache checks
            prior.score(pos, cell, numbers, 0.5)
        result["step_s"] = (time.perf_counter() - start) / repeats
    if guided:
        from xanesdiff.forward.surrogate import load_surrogate
        from xanesdiff.guidance.guided_score import GuidedScore
        from xanesdiff.guidance.spectrum import SpectrumLikelihood

        surrogate = load_surrogate()
        target = np.full(surrogate.grid.n_points, 0.22)
        score = GuidedScore(prior, cell, numbers, [SpectrumLikelihood(surrogate, target)])
        score(pos, 0.3)  # warm-up (the first call of a size also sizes the allocator's heap)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            score(pos, 0.3)
            times.append(time.perf_counter() - start)
        result["guided_step_s"] = float(np.median(times))
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def large_cell(n_atoms: int, n_small: int, n_steps: int) -> dict:
    """One `n_atoms` cell and `n_small` 216-atom cells, same sampler (Euler–Maruyama, `n_steps`,
    5 final corrector steps), compared by their hybridisation."""
    from xanesdiff.analysis.structure import hybridization_fractions
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.samplers import EulerMaruyama
    from xanesdiff.diffusion.sampling import sample_structures

    prior = load_prior()
    sampler = EulerMaruyama(prior.schedule, n_steps=n_steps, final_corrector_steps=5)
    start = time.perf_counter()
    (big,) = sample_structures(prior, n_atoms=n_atoms, density_g_cm3=DENSITY, seed=0,
                               sampler=sampler)
    sample_s = time.perf_counter() - start
    small = sample_structures(prior, n_atoms=216, density_g_cm3=DENSITY, n_samples=n_small,
                              seed=1, sampler=sampler)
    hb, hs = hybridization_fractions(big), hybridization_fractions(small)
    return {"atoms": n_atoms, "sample_s": sample_s, "sampler": f"em, {n_steps} steps", "sp3": hb["sp3"], "sp3_216": hs["sp3"],
            "sp3_err": abs(hb["sp3"] - hs["sp3"]), "cn1": hb["cn1"], "cn1_216": hs["cn1"],
            "guided_s": None,
            "note": "guided sampling not run at this size: the surrogate's forward + backward "
                    "holds ≈3 MB per atom (see peak_mb), beyond this machine's memory at 10^4 "
                    "atoms; guided_s_estimate extrapolates the guided steps with the fitted "
                    "exponent"}


def sample_calls() -> tuple[int, int]:
    """(score calls, guided calls) of the default `generate` sampler: pc makes
    n_steps × (1 + n_corrector) + final_corrector_steps + 1 score calls; the guidance is refreshed
    every `refresh_every` calls (once per pc step), the other calls cost a prior step."""
    from xanesdiff.guidance.request import compose_generate_config

    cfg = compose_generate_config([])
    calls = (cfg.sampler.n_steps * (1 + cfg.sampler.n_corrector)
             + cfg.sampler.final_corrector_steps + int(cfg.sampler.final_denoise))
    return calls, -(-calls // cfg.guided_score.refresh_every)


def add_sample_estimates(points: list[dict]) -> None:
    """Whole-sample times (s) of the default `generate` sampler from the measured step times."""
    calls, guided_calls = sample_calls()
    for p in points:
        p["sample_s"] = calls * p["step_s"]
        p["sample_s_note"] = f"estimated: {calls} score calls"
        if "guided_step_s" in p:
            p["guided_sample_s"] = (guided_calls * p["guided_step_s"]
                                    + (calls - guided_calls) * p["step_s"])
            p["sample_s_note"] += f", {guided_calls} of them guided when guided"


def main(argv=None) -> None:
    from xanesdiff.runtime import keep_freed_memory

    keep_freed_memory()
    from xanesdiff.guidance.report import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, nargs="+", default=[216, 1000, 3000, 10000])
    parser.add_argument("--guided-max", type=int, default=3000,
                        help="largest cell for the guided step (M3GNet memory grows fast)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large", type=int, default=0, help="also sample one cell this large")
    parser.add_argument("--large-steps", type=int, default=100)
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--guided", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/scale.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(measure_point(args.point, args.guided, args.repeats)))
        return
    points = []
    for n in args.atoms:
        cmd = [sys.executable, "-m", "xanesdiff.scripts.benchmark_scale", "--point", str(n),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        if n <= args.guided_max:
            cmd.append("--guided")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        points.append(json.loads(out.strip().splitlines()[-1]))
        print(points[-1], flush=True)
    add_sample_estimates(points)
    atoms = np.array([p["atoms"] for p in points], dtype=float)
    exponent = float(np.polyfit(np.log(atoms), np.log([p["step_s"] for p in points]), 1)[0])
    guided = [p for p in points if "guided_step_s" in p]
    result = {"points": points, "exponent": exponent,
              "guided_exponent": float(np.polyfit(np.log([p["atoms"] for p in guided]),
                                                  np.log([p["guided_step_s"] for p in guided]),
                                                  1)[0]) if len(guided) > 1 else None,
              "density_g_cm3": DENSITY,
              "command": "python -m xanesdiff.scripts.benchmark_scale "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {args.threads} torch threads"}
    if args.large:
        result["large_cell"] = large_cell(args.large, n_small=4, n_steps=args.large_steps)
        if guided and result["guided_exponent"] is not None:
            last = guided[-1]
            step = last["guided_step_s"] * (args.large / last["atoms"]) ** result["guided_exponent"]
            big = [p for p in points if p["atoms"] == args.large]
            calls, guided_calls = sample_calls()
            result["large_cell"]["guided_s_estimate"] = (
                guided_calls * step + (calls - guided_calls) * big[0]["step_s"] if big else None)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Speed of one guided 216-atom sample: xanesdiff's default pipeline against a re-implementation
of the reference notebook's recipe (arXiv:2312.05472), side by side in one process.

    python -m xanesdiff.scripts.benchmark_speed [--threads 2] [--out benchmarks/speed.json]

The reference recipe is rebuilt for its *cost profile* (same widths, depths, step counts and
3 Å cutoff, untrained weights): a 5-layer, 200-wide message-passing score model, 64 Euler–Maruyama
steps plus 4 restart rounds of 25 steps, the graph rebuilt every step, and a 3-layer, 128-wide
forward GNN whose spectrum-loss gradient is added at every step. Its structures are not judged
(untrained weights); xanesdiff's fidelity is reported against the 2.5 g/cm³ network, and its
spectral match by the default surrogate and the independent judge. Variants of `generate`
(`VARIANTS`: the shipped defaults, the `fast` guidance surrogate, the 50-step `pc_quick`
sampler, the PaiNN prior with each, and `preset=rapid`; `--variants` picks some) run in the
same process, each `--repeats` times (median kept), the reference too. The top-level figures
are those of `--headline` (default: `rapid`, the fastest setting that keeps the prior's
structure targets). The reference is also timed with xanesdiff's two generic CPU fixes
(Gaussians' exponent clamped, `index_select` gathers: `reference_recipe_tuned_s`), so the
ratio against it counts only what the models and the sampler save.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from xanesdiff.datasets.graph import edge_vectors, periodic_neighbor_list, wrap_positions
from xanesdiff.diffusion.sampling import cubic_cell_for_density
from xanesdiff.numerics import MIN_GAUSSIAN_EXPONENT

N_ATOMS, DENSITY = 216, 2.5

VARIANTS = {
    "default": [],                                    # shipped `generate` settings
    "fast_guide": ["models.surrogate=fast"],          # histogram surrogate guides
    "quick": ["sampler=pc_quick"],                    # 50 predictor-corrector steps, not 100
    "painn": ["models.prior=painn"],                  # the PaiNN prior, ≈6× cheaper per call
    "painn_fast_guide": ["models.prior=painn", "models.surrogate=fast"],
    "painn_quick": ["models.prior=painn", "models.surrogate=fast", "sampler=pc_quick"],
    "rapid": ["preset=rapid"],                        # the above, one corrector, guided t ≤ 0.6
}
"""`generate` config overrides timed side by side with the reference recipe."""


def radius_graph(pos, cell, cutoff_A):
    i, j, s, _ = periodic_neighbor_list(pos.detach().double().numpy(),
                                        cell.detach().double().numpy(), cutoff_A)
    return torch.from_numpy(np.stack([i, j])), torch.from_numpy(s).float()


class GaussianRBF(nn.Module):
    """exp(−γ (r − c)²) as the notebook writes it; `clamp_exp` clamps the exponent as
    xanesdiff's `gaussians` do (torch's exp is ≈50× slower on arguments that underflow)."""

    clamp_exp = False

    def __init__(self, cutoff_A: float, n: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0, cutoff_A, n))
        self.gamma = (n / cutoff_A) ** 2

    def forward(self, r):
        exponent = -self.gamma * (r[:, None] - self.centers) ** 2
        return torch.exp(exponent.clamp_min(MIN_GAUSSIAN_EXPONENT) if self.clamp_exp
                         else exponent)


class MessagePassing(nn.Module):
    """Plain MPNN on edge vectors: messages MLP([h_i, h_j, rbf]) summed, residual update.
    `index_select_gathers`: gather node rows with `index_select`, as xanesdiff does, instead
    of the notebook's `h[src]` (whose backward is an accumulating index_put, several times
    slower on a CPU)."""

    index_select_gathers = False

    def __init__(self, width: int, n_layers: int, cutoff_A: float, n_rbf: int = 50):
        super().__init__()
        self.cutoff_A, self.rbf = cutoff_A, GaussianRBF(cutoff_A, n_rbf)
        self.embed = nn.Parameter(torch.randn(width) * 0.1)
        self.time = nn.Linear(1, width)
        self.messages = nn.ModuleList(nn.Sequential(nn.Linear(2 * width + n_rbf, width), nn.SiLU(),
                                                    nn.Linear(width, width))
                                      for _ in range(n_layers))
        self.updates = nn.ModuleList(nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(),
                                                   nn.Linear(width, width))
                                     for _ in range(n_layers))

    def gather(self, h, index):
        return h.index_select(0, index) if self.index_select_gathers else h[index]

    def node_features(self, pos, cell, edge_index, edge_shift, t):
        vec = edge_vectors(pos, cell, edge_index, edge_shift)
        rbf = self.rbf(vec.norm(dim=1))
        h = self.embed.expand(pos.shape[0], -1) + self.time(torch.full((pos.shape[0], 1), t))
        src, dst = edge_index
        for message, update in zip(self.messages, self.updates):
            m = message(torch.cat([self.gather(h, src), self.gather(h, dst), rbf], dim=1))
            agg = torch.zeros_like(h).index_add(0, src, m)
            h = h + update(torch.cat([h, agg], dim=1))
        return h, vec, rbf


class ReferenceScore(MessagePassing):
    def __init__(self):
        super().__init__(width=200, n_layers=5, cutoff_A=3.0)
        self.edge_weight = nn.Sequential(nn.Linear(400 + 50, 200), nn.SiLU(), nn.Linear(200, 1))

    def forward(self, pos, cell, edge_index, edge_shift, t):
        h, vec, rbf = self.node_features(pos, cell, edge_index, edge_shift, t)
        src, dst = edge_index
        w = self.edge_weight(torch.cat([self.gather(h, src), self.gather(h, dst), rbf], dim=1))
        return torch.zeros_like(pos).index_add(0, src, w * vec / vec.norm(dim=1, keepdim=True))


class ReferenceForward(MessagePassing):
    def __init__(self, n_energies: int = 100):
        super().__init__(width=128, n_layers=3, cutoff_A=3.0)
        self.out = nn.Linear(128, n_energies)

    def forward(self, pos, cell, edge_index, edge_shift):
        h, _, _ = self.node_features(pos, cell, edge_index, edge_shift, 0.0)
        return nn.functional.softplus(self.out(h)).mean(0)


@contextmanager
def reference_tuned():
    """Within the block the reference recipe runs with xanesdiff's two generic CPU fixes:
    Gaussians with a clamped exponent and `index_select` gathers (same numbers, less time)."""
    GaussianRBF.clamp_exp = MessagePassing.index_select_gathers = True
    try:
        yield
    finally:
        GaussianRBF.clamp_exp = MessagePassing.index_select_gathers = False


def reference_guided_sample(target: torch.Tensor, seed: int = 0, rho: float = 800.0) -> float:
    """Wall time (s) of one guided sample with the reference recipe's cost profile."""
    torch.manual_seed(seed)
    score_model, forward_model = ReferenceScore().eval(), ReferenceForward().eval()
    cell = torch.tensor(cubic_cell_for_density(N_ATOMS, DENSITY), dtype=torch.float32)
    pos = torch.rand(N_ATOMS, 3) @ cell
    k = 0.8

    def step(pos, t, dt, noise=True):
        edge_index, edge_shift = radius_graph(pos, cell, 3.0)  # rebuilt every step
        with torch.no_grad():
            score = score_model(pos, cell, edge_index, edge_shift, t)
        x = pos.detach().requires_grad_(True)
        loss = (forward_model(x, cell, edge_index, edge_shift) - target).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        g2 = 2 * k ** 2 * t
        pos = pos + g2 * dt * (score - rho * grad)
        if noise:
            pos = pos + (g2 * dt) ** 0.5 * torch.randn_like(pos)
        return wrap_positions(pos, cell)

    start = time.perf_counter()
    for t in torch.linspace(1.0, 0.01, 65)[:-1].tolist():
        pos = step(pos, t, (1.0 - 0.01) / 64)
    for _ in range(4):
        pos = pos + 0.8 * 0.3 * torch.randn_like(pos)
        for t in torch.linspace(0.3, 0.01, 26)[:-1].tolist():
            pos = step(pos, t, (0.3 - 0.01) / 25)
    return time.perf_counter() - start


def xanesdiff_guided_sample(target: np.ndarray, seed: int = 0, overrides=()
                            ) -> tuple[float, object, dict]:
    """Wall time (s), structure and log of one guided sample with the shipped defaults."""
    from omegaconf import OmegaConf

    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.request import (build_terms, compose_generate_config,
                                            load_configured_prior, make_generator)

    cfg = OmegaConf.merge(compose_generate_config(overrides), {"target": "benchmark"})
    prior = load_configured_prior(cfg)
    surrogate = load_surrogate(cfg.models.surrogate)
    terms = [term.bind(surrogate, target) for term in build_terms(cfg)]
    generator = make_generator(cfg, prior, surrogate, terms, N_ATOMS)
    start = time.perf_counter()
    atoms, log = generator.generate(DENSITY, seed)
    elapsed = time.perf_counter() - start
    log["n_score_evals"] = generator.sampler.n_score_evals
    return elapsed, atoms, log


def main(argv=None) -> None:
    from xanesdiff.runtime import configure_process

    configure_process()
    import sys

    from xanesdiff.analysis.structure import compare_sets, hybridization_fractions
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.datasets.structures import minimum_distance
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.report import write_json
    from xanesdiff.guidance.validation import predict_members, spectral_match

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/speed.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which `generate` variants to time (default: all)")
    parser.add_argument("--headline", default="rapid", choices=list(VARIANTS),
                        help="the variant of the top-level figures (if timed; else the first)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per variant and of the reference; the median is kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = load_dataset()
    network = min(dataset.networks, key=lambda n: abs(dataset.network_density(n) - DENSITY))
    reference_frames = [f.atoms for f in dataset.frames_of([network])]
    target = dataset.frames_of([network])[0].mean_spectrum.astype(np.float64)

    judges = {"mae": load_surrogate("default"), "judge_mae": load_surrogate("judge")}
    variants = {}
    for name in args.variants:
        overrides = VARIANTS[name]
        runs = [xanesdiff_guided_sample(target, overrides=overrides) for _ in range(args.repeats)]
        runs_s = [run[0] for run in runs]
        ours_s, (_, atoms, log) = float(np.median(runs_s)), runs[0]
        comparison = compare_sets([atoms], reference_frames)
        fractions = hybridization_fractions(atoms)
        variants[name] = {
            "overrides": overrides, "s": ours_s, "runs_s": runs_s,
            "score_evals": log["n_score_evals"],
            "guided_steps": log["guided_steps"],
            "fidelity": {"cn1": fractions["cn1"], "cn5plus": fractions["cn5plus"],
                         "sp3_err": comparison["sp3_err"], "sp2_err": comparison["sp2_err"],
                         "rdf_peak_err": comparison["rdf_peak_err"],
                         "dmin": minimum_distance(atoms)},
            **{key: spectral_match(predict_members(model, atoms).mean(0), target)["mae"]
               for key, model in judges.items()}}
    target_t = torch.tensor(target, dtype=torch.float32)
    reference_runs_s = [reference_guided_sample(target_t) for _ in range(args.repeats)]
    with reference_tuned():
        tuned_runs_s = [reference_guided_sample(target_t) for _ in range(args.repeats)]
    reference_s = float(np.median(reference_runs_s))
    tuned_s = float(np.median(tuned_runs_s))
    for row in variants.values():
        row["speedup"] = reference_s / row["s"]
        row["speedup_vs_tuned_reference"] = tuned_s / row["s"]
    headline = args.headline if args.headline in variants else args.variants[0]
    default = variants[headline]
    result = {"reference_recipe_s": reference_s, "reference_runs_s": reference_runs_s,
              "reference_recipe_tuned_s": tuned_s, "reference_tuned_runs_s": tuned_runs_s,
              "xanesdiff_variant": headline, "xanesdiff_overrides": default["overrides"],
              "xanesdiff_s": default["s"],
              "speedup": default["speedup"],
              "speedup_vs_tuned_reference": default["speedup_vs_tuned_reference"],
              "reference_steps": 64 + 4 * 25, "xanesdiff_score_evals": default["score_evals"],
              "xanesdiff_guided_steps": default["guided_steps"],
              "step_s_per_atom": {"reference": reference_s / (64 + 100) / N_ATOMS,
                                  "xanesdiff": default["s"] / default["score_evals"] / N_ATOMS},
              "fidelity": default["fidelity"], "variants": variants,
              "density_g_cm3": DENSITY, "n_atoms": N_ATOMS,
              "command": "python -m xanesdiff.scripts.benchmark_speed "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()} {platform.processor() or ''}, "
                         f"{args.threads} torch threads"}
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()

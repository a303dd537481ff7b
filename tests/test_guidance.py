"""Guidance terms, the DPS guided score, density search, and target loading."""

import numpy as np
import pytest
import torch

from guidance_toys import TOY_GRID, ToySurrogate, random_carbon, tiny_prior
from xanesdiff.guidance.base import TimeWindow
from xanesdiff.guidance.features import SpectralFeature
from xanesdiff.guidance.guided_score import GuidedScore
from xanesdiff.guidance.pipeline import DensitySearch, GuidedGenerator, _parabola_minimum
from xanesdiff.guidance.rdf import RDFTarget, smooth_rdf
from xanesdiff.guidance.spectrum import SpectrumLikelihood


def central_difference(f, x, eps=1e-5, n_checks=6, seed=0):
    rng = np.random.default_rng(seed)
    idx = [(int(rng.integers(x.shape[0])), int(rng.integers(3))) for _ in range(n_checks)]
    out = []
    for a, b in idx:
        xp, xm = x.clone(), x.clone()
        xp[a, b] += eps
        xm[a, b] -= eps
        out.append((float(f(xp)) - float(f(xm))) / (2 * eps))
    return idx, np.array(out)


def test_time_window():
    w = TimeWindow(strength=2.0, t_min=0.1, t_max=0.5, ramp=0.2)
    assert w(0.05) == 0.0 and w(0.3) == 2.0 and w(0.6) == pytest.approx(1.0) and w(0.8) == 0.0
    with pytest.raises(ValueError):
        TimeWindow(t_min=0.5, t_max=0.2)


@pytest.mark.parametrize("make_term", [
    lambda s, y: SpectrumLikelihood(s, y, sigma_obs=0.05),
    lambda s, y: SpectralFeature("intensity", (284.5, 286.5), relation="eq", value=1.0,
                                 surrogate=s),
    lambda s, y: SpectralFeature("ratio", (284.5, 286.5), (290.0, 294.0), relation="ge",
                                 value=50.0, surrogate=s),
    lambda s, y: SpectralFeature("peak_position", (283.0, 289.0), relation="eq", value=286.0,
                                 surrogate=s),
    lambda s, y: RDFTarget(torch.linspace(1.0, 2.5, 20, dtype=torch.float64),
                           torch.ones(20, dtype=torch.float64)),
])
def test_term_contribution_is_minus_energy_gradient(make_term):
    """Each term's score contribution equals −w·∇E, checked against central differences."""
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(16, seed=1)
    target = surrogate.mean_spectrum(pos + 0.05, cell, numbers).mean(0).detach()
    term = make_term(surrogate, target)
    term.schedule = TimeWindow(strength=0.7)
    contribution, log = term(pos, pos, cell, numbers, t=0.3)
    idx, fd = central_difference(lambda x: term.energy(x, cell, numbers)[0], pos)
    factor = term.size_factor(numbers)
    assert factor == pytest.approx(16 / 216) and log["size_factor"] == factor
    analytic = np.array([-float(contribution[a, b]) / (0.7 * factor) for a, b in idx])
    np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-6)
    assert np.isfinite(log["energy"])


def test_spectrum_likelihood_can_count_the_guides_held_out_error_as_noise():
    """heldout_weight w adds w·rms² per energy point to the variance: points where the guide is
    known to err on new networks pull less. Without a measured error it is refused."""
    from xanesdiff.forward.heldout_error import HeldOutError

    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(16, seed=1)
    members = surrogate.mean_spectrum(pos, cell, numbers)
    target = members.mean(0).detach() + 0.02
    rms = np.linspace(0.0, 0.05, TOY_GRID.n_points)
    surrogate.heldout_error = HeldOutError(TOY_GRID.energies_eV, rms)
    variance = 0.01 ** 2 + members.var(0, unbiased=False)
    for weight in (0.0, 2.0):
        term = SpectrumLikelihood(surrogate, target, sigma_obs=0.01, heldout_weight=weight)
        expected = 0.5 * ((members.mean(0) - target) ** 2
                          / (variance + weight * torch.as_tensor(rms ** 2))).sum()
        assert float(term.energy(pos, cell, numbers)[0]) == pytest.approx(float(expected))
    surrogate.heldout_error = None
    with pytest.raises(RuntimeError, match="held-out error is measured"):
        SpectrumLikelihood(surrogate, target, heldout_weight=1.0).energy(pos, cell, numbers)


def _supercell(pos, cell, numbers, reps=2):
    shifts = torch.tensor([[a, b, c] for a in range(reps) for b in range(reps)
                           for c in range(reps)], dtype=pos.dtype) @ cell
    big = (pos[None] + shifts[:, None]).reshape(-1, 3)
    return big, cell * reps, numbers.repeat(reps ** 3)


@pytest.mark.parametrize("make_term", [
    lambda s, y, n: SpectrumLikelihood(s, y, sigma_obs=0.05, reference_atoms=n),
    lambda s, y, n: SpectralFeature("intensity", (284.5, 286.5), relation="eq", value=1.0,
                                    surrogate=s, reference_atoms=n),
    lambda s, y, n: RDFTarget(torch.linspace(1.0, 2.5, 20, dtype=torch.float64),
                              torch.ones(20, dtype=torch.float64), reference_atoms=n),
])
def test_guidance_pull_per_atom_does_not_depend_on_cell_size(make_term):
    """A 2×2×2 supercell holds the same material: each atom must feel the same guidance as in
    the unit cell (the cell average's 1/N is undone), and without the size factor 1/8 of it."""
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(16, seed=7)
    big_pos, big_cell, big_numbers = _supercell(pos, cell, numbers)
    target = surrogate.mean_spectrum(pos + 0.05, cell, numbers).mean(0).detach()
    small, _ = make_term(surrogate, target, 216)(pos, pos, cell, numbers, t=0.3)
    big, log = make_term(surrogate, target, 216)(big_pos, big_pos, big_cell, big_numbers, t=0.3)
    assert log["size_factor"] == pytest.approx(8 * 16 / 216)
    torch.testing.assert_close(big, small.repeat(8, 1), rtol=1e-6, atol=1e-10)
    plain, _ = make_term(surrogate, target, None)(big_pos, big_pos, big_cell, big_numbers, t=0.3)
    plain_small, _ = make_term(surrogate, target, None)(pos, pos, cell, numbers, t=0.3)
    torch.testing.assert_close(plain, plain_small.repeat(8, 1) / 8, rtol=1e-6, atol=1e-10)


def test_size_factor_counts_absorbing_sites_of_a_mask():
    term = SpectrumLikelihood(ToySurrogate(), torch.zeros(3), site_mask=torch.tensor([1, 0, 1.0]),
                              reference_atoms=4)
    assert term.size_factor(torch.full((3,), 6)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference_atoms"):
        SpectrumLikelihood(reference_atoms=0)


def test_inequality_feature_is_flat_when_satisfied():
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(16, seed=2)
    spectrum = surrogate.mean_spectrum(pos, cell, numbers).mean(0)
    term = SpectralFeature("intensity", (284.5, 286.5), relation="ge", relative=0.5,
                           surrogate=surrogate)
    term.set_reference(spectrum)
    energy, log = term.energy(pos, cell, numbers)
    assert float(energy) == 0.0 and log["value"] > log["target"]
    term.relative = 1.5
    assert float(term.energy(pos, cell, numbers)[0]) > 0.0
    with pytest.raises(ValueError, match="exactly one"):
        SpectralFeature("intensity", value=1.0, relative=1.2)


def test_guided_score_carries_gradient_through_the_denoiser():
    """score = s(x) + w·J(x)ᵀ(−∇E(x̂0)) with x̂0 = x + σ²s(x): compare with autograd of the
    composition E(x̂0(x)) and with the J ≈ I variant."""
    prior = tiny_prior()
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(20, seed=3)
    target = surrogate.mean_spectrum(pos + 0.1, cell, numbers).mean(0).detach()
    term = SpectrumLikelihood(surrogate, target, sigma_obs=0.5, ensemble_weight=0.0,
                              schedule=TimeWindow(strength=1.0))
    t = 0.4
    guided = GuidedScore(prior, cell, numbers, [term], through_denoiser=True, max_ratio=None)
    score = guided(pos, t)
    x = pos.clone().requires_grad_(True)
    x0 = prior.denoise(x, cell, numbers, t)
    energy = term.energy(x0, cell, numbers)[0]
    (grad,) = torch.autograd.grad(energy, x)
    expected = prior.score(pos, cell, numbers, t).detach() - term.size_factor(numbers) * grad
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-8)
    identity = GuidedScore(prior, cell, numbers, [term], through_denoiser=False, max_ratio=None)
    assert not torch.allclose(identity(pos, t), score)


def test_guidance_ratio_cap_and_inactive_times():
    prior = tiny_prior()
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(20, seed=4)
    target = torch.zeros(TOY_GRID.n_points, dtype=torch.float64)
    term = SpectrumLikelihood(surrogate, target, sigma_obs=1e-3,
                              schedule=TimeWindow(strength=1.0, t_max=0.5))
    guided = GuidedScore(prior, cell, numbers, [term], through_denoiser=False, max_ratio=0.5)
    prior_score = prior.score(pos, cell, numbers, 0.3).detach()
    extra = guided(pos, 0.3) - prior_score
    ratio = extra.pow(2).mean().sqrt() / prior_score.pow(2).mean().sqrt()
    assert guided.history[-1]["spectrum/to_prior_rms"] > 0.5
    assert float(ratio) == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(guided(pos, 0.9), prior.score(pos, cell, numbers, 0.9))


def test_each_term_is_capped_separately():
    """A steep spectrum term cannot drown a gentle steer: each is capped on its own."""
    prior = tiny_prior()
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(20, seed=5)
    steep = SpectrumLikelihood(surrogate, torch.zeros(TOY_GRID.n_points, dtype=torch.float64),
                               sigma_obs=1e-4)
    gentle = SpectralFeature("intensity", (284.5, 286.5), relation="ge", value=1e3,
                             tolerance=1e3, surrogate=surrogate)
    both = GuidedScore(prior, cell, numbers, [steep, gentle], through_denoiser=False,
                       max_ratio=1.0)
    only_steep = GuidedScore(prior, cell, numbers, [steep], through_denoiser=False, max_ratio=1.0)
    only_gentle = GuidedScore(prior, cell, numbers, [gentle], through_denoiser=False,
                              max_ratio=1.0)
    prior_score = prior.score(pos, cell, numbers, 0.3)
    total = both(pos, 0.3) - prior_score
    torch.testing.assert_close(total, (only_steep(pos, 0.3) - prior_score)
                               + (only_gentle(pos, 0.3) - prior_score))
    assert both.history[-1]["spectrum/to_prior_rms"] > 1.0
    assert 0 < both.history[-1]["feature/to_prior_rms"] < 1.0


def test_lagged_guidance_reuses_the_last_contribution():
    prior = tiny_prior()
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(20, seed=6)
    term = SpectrumLikelihood(surrogate, torch.zeros(TOY_GRID.n_points, dtype=torch.float64),
                              sigma_obs=0.5)
    lagged = GuidedScore(prior, cell, numbers, [term], max_ratio=None, refresh_every=3)
    exact = GuidedScore(prior, cell, numbers, [term], max_ratio=None)
    moved = pos + 0.01
    first = lagged(pos, 0.3)
    torch.testing.assert_close(first, exact(pos, 0.3))
    reused = lagged(moved, 0.29) - prior.score(moved, cell, numbers, 0.29)
    torch.testing.assert_close(reused, first - prior.score(pos, cell, numbers, 0.3))
    lagged(moved, 0.28)
    torch.testing.assert_close(lagged(moved, 0.27), exact(moved, 0.27))  # 4th call: refreshed
    assert len(lagged.history) == 2


def test_max_t_cuts_every_term_window_and_its_cost():
    """Above `max_t` the guided score is the prior's and no term runs; at or below it the
    terms guide as without the cut."""
    prior = tiny_prior()
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(20, seed=7)
    term = SpectrumLikelihood(surrogate, torch.zeros(TOY_GRID.n_points, dtype=torch.float64),
                              sigma_obs=0.5, schedule=TimeWindow(strength=1.0, t_max=0.6,
                                                                 ramp=0.2))
    cut = GuidedScore(prior, cell, numbers, [term], max_ratio=None, max_t=0.6)
    uncut = GuidedScore(prior, cell, numbers, [term], max_ratio=None)
    prior_score = prior.score(pos, cell, numbers, 0.7)
    assert not torch.allclose(uncut(pos, 0.7), prior_score)  # inside the term's ramp
    torch.testing.assert_close(cut(pos, 0.7), prior_score)
    assert cut.history == []  # the term never ran
    torch.testing.assert_close(cut(pos, 0.6), uncut(pos, 0.6))
    assert len(cut.history) == 1
    with pytest.raises(ValueError, match="max_t"):
        GuidedScore(prior, cell, numbers, [term], max_t=0.0)


def pi_star_generator():
    """A tiny prior guided toward a higher π* window intensity of the toy surrogate (24 atoms)."""
    from xanesdiff.diffusion.samplers import EulerMaruyama

    prior = tiny_prior(dtype=torch.float32)
    surrogate = ToySurrogate()
    term = SpectralFeature("intensity", (284.5, 286.5), relation="ge", value=10.0,
                           tolerance=0.5, surrogate=surrogate,
                           schedule=TimeWindow(strength=1.0, t_max=1.0))
    sampler = EulerMaruyama(prior.schedule, n_steps=12, t_end=0.05)
    return GuidedGenerator(prior, surrogate, [term], sampler, n_atoms=24, max_ratio=5.0), term


def test_guided_sampling_moves_feature_toward_target():
    """With the same seeds, guiding toward a higher π* intensity gives a higher π* intensity."""
    generator, term = pi_star_generator()
    surrogate = generator.surrogate
    values = {}
    for guided in (False, True):
        vals = []
        for seed in range(3):
            atoms, log = generator.generate(2.5, seed, guided=guided)
            assert np.isfinite(atoms.positions).all()
            spec = surrogate.mean_spectrum(torch.tensor(atoms.positions),
                                           torch.tensor(atoms.cell.array), None).mean(0)
            vals.append(float(term.measure(spec)))
        values[guided] = np.mean(vals)
    assert values[True] > values[False] * 1.05


def test_parabola_minimum_and_density_search():
    scan = [{"density_g_cm3": d, "mae": (d - 2.3) ** 2 + 0.01} for d in (1.5, 2.0, 2.5, 3.0)]
    assert _parabola_minimum(scan, 1.5, 3.5) == pytest.approx(2.3, abs=1e-6)
    edge = [{"density_g_cm3": d, "mae": d} for d in (1.5, 2.0, 2.5)]
    assert _parabola_minimum(edge, 1.5, 3.5) == 1.5

    class FakeGenerator:
        surrogate = ToySurrogate()

    search = DensitySearch(coarse_g_cm3=(1.5, 2.5, 3.5), refine_step_g_cm3=0.5)
    search.score = lambda gen, target, d: {"density_g_cm3": d, "mae": abs(d - 3.1)}
    best, scan = search.run(FakeGenerator(), None)
    # best coarse point 3.5 is refined inwards only (4.0 lies outside the scanned range)
    assert [(s["stage"], s["density_g_cm3"]) for s in scan][3:] == [("refined", 3.0)]
    assert abs(best - 3.1) < 0.35


def test_reference_density_recovers_an_interpolated_target_and_warns_at_the_edge():
    from xanesdiff.guidance.density import ReferenceCurve, infer_density

    rng = np.random.default_rng(0)
    spectra = np.cumsum(rng.random((4, 30)), axis=0)      # monotone in density, like sp3 content
    curve = ReferenceCurve(np.array([3.0, 1.5, 2.0, 2.5]), spectra[[3, 0, 1, 2]])
    target = 0.4 * spectra[1] + 0.6 * spectra[2]           # 2.0 + 0.6 × 0.5 = 2.3 g/cm³
    best, scan = infer_density(curve, target)
    assert best == pytest.approx(2.3, abs=0.011)
    assert min(s["mae"] for s in scan) < 1e-9
    with pytest.warns(UserWarning, match="end of their range"):
        assert infer_density(curve, spectra[3] * 1.1)[0] == pytest.approx(3.0)


def test_reference_density_leaves_the_held_out_network_out(a_c_dataset):
    dataset = a_c_dataset
    """Each interior network, left out of the references, is placed by the other four."""
    from xanesdiff.guidance.density import infer_density, reference_curve_from_dataset

    energies = dataset.grid.energies_eV
    for network in dataset.networks[1:-1]:
        rho = dataset.network_density(network)
        curve = reference_curve_from_dataset(dataset, energies, exclude_g_cm3=(rho,))
        assert len(curve.densities_g_cm3) == len(dataset.networks) - 1
        frame = dataset.frames_of([network])[0]
        assert abs(infer_density(curve, frame.mean_spectrum)[0] - rho) < 0.1


def test_smooth_rdf_peaks_at_bond_length():
    from ase.build import bulk

    diamond = bulk("C", "diamond", a=3.567, cubic=True).repeat(2)
    r = torch.linspace(1.0, 2.0, 101, dtype=torch.float64)
    g = smooth_rdf(torch.tensor(diamond.positions), torch.tensor(diamond.cell.array), r, 0.03)
    assert float(r[int(torch.argmax(g))]) == pytest.approx(1.545, abs=0.015)


def test_steer_term_takes_settings_given_under_its_name():
    from xanesdiff.guidance.request import build_terms, compose_generate_config

    plain = build_terms(compose_generate_config(["steer=pi_star_up"]))
    tuned = build_terms(compose_generate_config(
        ["steer=pi_star_up", "guidance=[pi_star_up]", "guidance.pi_star_up.schedule.strength=7"]))
    assert [t.name for t in plain] == [t.name for t in tuned] == ["pi_star_up"]
    assert plain[0].schedule.strength == 100.0 and tuned[0].schedule.strength == 7.0


def test_reference_density_without_reference_data_says_how_to_do_without(tmp_path):
    from xanesdiff.datasets.errors import MissingAssetError
    from xanesdiff.guidance.density import ReferenceDensity

    with pytest.raises(MissingAssetError, match="density_search=scan"):
        ReferenceDensity(dataset=str(tmp_path / "nowhere")).curve(np.linspace(280, 300, 10))


def test_outlier_sites_are_named_by_atom_index():
    from xanesdiff.guidance.validation import outlier_sites, validate_spectrum

    sites = np.ones((5, 4))
    sites[3, 2] = 50.0                                   # one site's peak 50× the median
    assert outlier_sites(sites, np.array([0, 2, 4, 6, 8])) == [6]
    assert outlier_sites(np.ones((5, 4)), np.arange(5)) == []

    from ase import Atoms

    pos, cell, _ = random_carbon(16, seed=8)
    atoms = Atoms("C16", positions=pos.numpy(), cell=cell.numpy(), pbc=True)
    result = validate_spectrum(atoms, None, ToySurrogate())
    assert result["outlier_sites"] == 0 and "outlier_atoms" not in result
    assert result["predicted"].shape == (TOY_GRID.n_points,)


def test_edit_keeps_the_start_at_small_noise_and_moves_it_toward_the_guidance():
    """`GuidedGenerator.edit` re-noises a given structure and denoises it: its cell, atoms and
    density are kept, small noise keeps atoms near their start, guidance still acts, and bad
    requests are refused by field."""
    from ase import Atoms

    from xanesdiff.analysis.structure import displacements
    from xanesdiff.datasets.errors import XanesdiffInputError

    generator, term = pi_star_generator()
    surrogate = generator.surrogate
    pos, cell, numbers = random_carbon(24, 2.5, seed=3)
    start = Atoms(numbers=numbers.numpy(), positions=pos.numpy(), cell=cell.numpy(), pbc=True)

    def feature(atoms):
        spec = surrogate.mean_spectrum(torch.tensor(atoms.positions),
                                       torch.tensor(atoms.cell.array), None).mean(0)
        return float(term.measure(spec))

    rms, edited = {}, {}
    for noise in (0.05, 0.5):
        edited[noise], log = generator.edit(start, noise, seed=0, guided=False)
        assert len(edited[noise]) == 24
        assert np.allclose(edited[noise].cell.array, start.cell.array)
        assert log["density_g_cm3"] == pytest.approx(2.5, rel=1e-6)
        rms[noise] = float(np.sqrt(np.mean(displacements(start, edited[noise]) ** 2)))
    assert rms[0.05] < 0.3 and rms[0.05] < rms[0.5] / 2
    again, _ = generator.edit(start, 0.05, seed=0, guided=False)
    np.testing.assert_allclose(again.positions, edited[0.05].positions)

    values = {guided: np.mean([feature(generator.edit(start, 0.5, seed, guided=guided)[0])
                               for seed in range(3)]) for guided in (False, True)}
    assert values[True] > values[False] * 1.05

    mobile = np.zeros(24, dtype=bool)
    mobile[:6] = True  # only six atoms may move; the rest stay exactly where they were
    local, log = generator.edit(start, 0.5, seed=0, mobile=mobile)
    moved = displacements(start, local)
    assert log["mobile_atoms"] == 6
    assert moved[~mobile].max() < 1e-5 and moved[mobile].min() > 0.05

    with pytest.raises(XanesdiffInputError, match="start_noise_A"):
        generator.edit(start, 2.0, seed=0)
    with pytest.raises(XanesdiffInputError, match="start_region"):
        generator.edit(start, 0.1, seed=0, mobile=np.zeros(24, dtype=bool))
    silicon = start.copy()
    silicon.numbers[:] = 14
    with pytest.raises(XanesdiffInputError, match="samples C only"):
        generator.edit(silicon, 0.1, seed=0)


def test_guided_fidelity_benchmark_writes_the_rows_of_the_settings_it_is_given(tmp_path):
    import json

    from xanesdiff.scripts.benchmark_guided_fidelity import main

    out = tmp_path / "fidelity.json"
    overrides = ["models.surrogate=fast", "sampler.n_steps=2", "sampler.final_corrector_steps=0"]
    assert main([str(out), *overrides, "--densities", "2.0", "--n-samples", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["overrides"] == overrides and "sampler.n_steps=2" in result["command"]
    (row,) = result["rows"].values()
    assert abs(row["density"] - 2.0) < 0.05  # the network's own density
    assert 0 <= row["sp3_err"] <= 1 and 0 <= row["cn1"] <= 1 and row["dmin"] > 0
    assert np.isfinite([row["mae"], row["judge_mae"]]).all() and row["mae"] > 0  # (2 steps: poor)

"""Experimental spectrum input: reading, checks, alignment, interpolation, normalisation."""

import numpy as np
import pytest

from xanesdiff.datasets.dataset import A_C_GRID
from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.experimental import (MeasuredSpectrum, from_pymatgen, prepare_target,
                                             read_measured)
from xanesdiff.datasets.spectra_io import read_spectra_csv, write_spectra_csv

GRID = EnergyGrid.from_dict(A_C_GRID)


@pytest.fixture(scope="module")
def model_spectrum(a_c_dataset):
    """A mean spectrum on the model grid, as the surrogate would give it."""
    return a_c_dataset.frames_of([a_c_dataset.networks[1]])[0].mean_spectrum.astype(np.float64)


def measured_version(spectrum, shift_eV, scale=37.0, background=(0.02, 0.5), step=0.1):
    """What a beamline would hand over: finer, wider energy axis, shifted, scaled, with a
    linear background."""
    energy = np.arange(GRID.energies_eV[0] - 8, GRID.energies_eV[-1] + 8, step)
    clean = np.interp(energy - shift_eV, GRID.energies_eV, spectrum, left=0.0, right=spectrum[-1])
    return energy, scale * clean + background[0] * (energy - energy[0]) * 0 + background[1]


@pytest.mark.parametrize("shift_eV", [-2.3, -0.7, 0.0, 1.1, 3.4])
def test_alignment_recovers_known_shift_within_one_grid_step(model_spectrum, shift_eV, tmp_path):
    energy, intensity = measured_version(model_spectrum, shift_eV)
    path = tmp_path / "measured.csv"
    path.write_text("energy_eV,mu\n" + "\n".join(f"{e:.4f},{y:.6f}" for e, y in zip(energy, intensity)))
    measured = read_measured(path)
    from xanesdiff.datasets.experimental import peak_position_eV
    reference_peak = peak_position_eV(GRID.energies_eV, model_spectrum, (282.0, 289.0))
    target, applied = prepare_target(measured, GRID, align_feature_eV=reference_peak,
                                     pre_edge_eV=(energy[0], GRID.energies_eV[0] + 3),
                                     area=float(model_spectrum.sum()))
    assert abs(applied + shift_eV) <= GRID.step_eV
    assert np.abs(target - model_spectrum).mean() < 0.02 * model_spectrum.mean() + 0.01


def test_given_shift_wins_and_round_trips(model_spectrum, tmp_path):
    energy, intensity = measured_version(model_spectrum, 1.5)
    measured = MeasuredSpectrum(energy, intensity)
    target, applied = prepare_target(measured, GRID, shift_eV=-1.5, normalisation="none")
    assert applied == -1.5
    expected = 37.0 * model_spectrum + 0.5  # two linear interpolations: ~1% of the peak
    assert np.abs(target - expected).max() < 0.02 * expected.max()


def test_csv_round_trip(model_spectrum, tmp_path):
    path = tmp_path / "spectra.csv"
    write_spectra_csv(path, GRID.energies_eV, {"mean": model_spectrum, "twice": 2 * model_spectrum})
    energy, columns = read_spectra_csv(path)
    np.testing.assert_allclose(energy, GRID.energies_eV, rtol=1e-6)
    np.testing.assert_allclose(columns["twice"], 2 * model_spectrum, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_pymatgen_xas_input(model_spectrum):
    from pymatgen.analysis.xas.spectrum import XAS
    from pymatgen.core import Lattice, Structure

    structure = Structure(Lattice.cubic(3.567), ["C"], [[0, 0, 0]])
    energy, intensity = measured_version(model_spectrum, 0.0)
    xas = XAS(energy, intensity, structure, "C", edge="K", spectrum_type="XANES")
    target, applied = prepare_target(from_pymatgen(xas), GRID, align_feature_eV=None,
                                     area=float(model_spectrum.sum()))
    assert applied == 0.0 and target.shape == (GRID.n_points,)
    assert np.isclose(target.sum(), model_spectrum.sum())


@pytest.mark.parametrize("rows,expected", [
    ([(280 + i * 0.1, 1.0) for i in range(400)][::-1], "not increasing"),
    ([(0.280 + i * 1e-4, 1.0) for i in range(400)], "look like keV"),
    ([(280.0, 1.0), (280.0, 1.1)] + [(281 + i * 0.1, 1.0) for i in range(400)], "duplicated energy"),
    ([(290 + i * 0.1, 1.0) for i in range(100)], "does not cover the model grid"),
    ([(270 + i * 0.1, float("inf")) for i in range(500)], "non-finite"),
])
def test_bad_measured_spectra(tmp_path, rows, expected):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(f"{e} {y}" for e, y in rows))
    with pytest.raises(XanesdiffInputError) as err:
        prepare_target(read_measured(path), GRID, align_feature_eV=None, area=22.0)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("text,expected", [
    ("", "empty"),
    ("\n".join(f"{280 + i}" for i in range(50)), "expected two columns"),
    ("\n".join(f"{280 + i} 1 2" for i in range(50)), "expected two columns"),
    ("280 1\n281 x\n", "non-numeric"),
])
def test_bad_two_column_files(tmp_path, text, expected):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(XanesdiffInputError) as err:
        read_measured(path)
    assert str(path) in str(err.value) and expected in str(err.value)

"""Fuzz: hundreds of malformed inputs at the public entry points. Every one must end in a
`XanesdiffInputError` whose message names the input and the problem; none may leave a file."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from ase import Atoms

from guidance_toys import TOY_GRID, ToySurrogate
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.experimental import prepare_target, read_measured
from xanesdiff.datasets.structures import read_structures
from xanesdiff.guidance.target import load_target

N_PER_KIND = 13
GOOD_ENERGY = np.linspace(270.0, 320.0, 300)


def spectrum_text(rng, energy, intensity, sep=None):
    sep = sep or rng.choice([",", " ", "\t", "  "])
    header = rng.choice(["", "energy_eV,mu\n", "# measured at a beamline\n"])
    return header + "\n".join(f"{e:.5f}{sep}{y:.6g}" for e, y in zip(energy, intensity)) + "\n"


def good_intensity(rng, energy):
    pi = np.exp(-0.5 * ((energy - rng.uniform(284.5, 286.5)) / 0.7) ** 2)
    edge = 1 / (1 + np.exp(-(energy - 289.0)))
    return rng.uniform(0.5, 50) * (pi + 2 * edge) + rng.uniform(0, 0.1)


# Each maker returns (file text, words the message must contain).
def empty(rng):
    return rng.choice(["", "\n\n", "# only a comment\n", "energy,mu\n"]), "empty"


def one_column(rng):
    return "\n".join(f"{e:.3f}" for e in GOOD_ENERGY[: rng.integers(5, 300)]), "column"


def three_columns(rng):
    e = GOOD_ENERGY
    return "\n".join(f"{x} 1.0 2.0" for x in e[: rng.integers(5, 300)]), "column(s)"


def non_numeric(rng):
    lines = spectrum_text(rng, GOOD_ENERGY, good_intensity(rng, GOOD_ENERGY), sep=" ").splitlines()
    k = int(rng.integers(len(lines) // 2, len(lines)))
    cells = lines[k].split()
    cells[int(rng.integers(0, 2))] = str(rng.choice(["abc", "1.2.3", "--", "n/a", "0x"]))
    lines[k] = " ".join(cells)
    return "\n".join(lines), "non-numeric"


def non_finite(rng):
    y = good_intensity(rng, GOOD_ENERGY).astype(object)
    y[int(rng.integers(0, len(y)))] = rng.choice(["nan", "inf", "-inf", "NaN"])
    return "\n".join(f"{e:.5f} {v}" for e, v in zip(GOOD_ENERGY, y)), "non-finite"


def not_increasing(rng):
    e = GOOD_ENERGY.copy()
    k = int(rng.integers(1, len(e) - 1))
    e[k] = e[k - 1] - rng.uniform(0.01, 5)
    return spectrum_text(rng, e, good_intensity(rng, GOOD_ENERGY)), "not increasing"


def duplicated(rng):
    e = GOOD_ENERGY.copy()
    k = int(rng.integers(1, len(e)))
    e[k] = e[k - 1]
    return spectrum_text(rng, e, good_intensity(rng, GOOD_ENERGY)), "duplicated energy"


def kev(rng):
    return spectrum_text(rng, GOOD_ENERGY / 1000.0, good_intensity(rng, GOOD_ENERGY)), "keV"


def short_range(rng):
    lo = rng.uniform(280, 300)
    e = np.linspace(lo, lo + rng.uniform(5, 12), 120)
    return spectrum_text(rng, e, good_intensity(rng, e)), "does not cover the model grid"


def negative(rng):
    y = good_intensity(rng, GOOD_ENERGY) - rng.uniform(100, 500)
    return spectrum_text(rng, GOOD_ENERGY, y), "no positive area"


def per_site_wrong_width(rng):
    rows = rng.integers(2, 50)
    cols = int(rng.choice([3, 50, 99, 101, 150]))
    return "\n".join(" ".join("0.1" for _ in range(cols)) for _ in range(rows)), "column(s)"


SPECTRUM_KINDS = [empty, one_column, three_columns, non_numeric, non_finite, not_increasing,
                  duplicated, kev, short_range, negative, per_site_wrong_width]


def structure_case(rng, kind, path):
    import ase.io

    n = int(rng.integers(2, 12))
    cell = np.eye(3) * rng.uniform(4, 8)
    pos = rng.uniform(0, 1, (n, 3)) @ cell
    if kind == "unreadable":
        path.write_text(rng.choice(["garbage\n", "POSCAR\n1.0\nnope\n", "\x00\x01\x02"]))
        return "could not be read"
    if kind == "non-periodic":
        ase.io.write(path, Atoms(f"C{n}", positions=pos * 3))
        return "no 3D periodic cell"
    if kind == "left-handed":
        bad = cell.copy()
        bad[[0, 1]] = bad[[1, 0]]
        ase.io.write(path, Atoms(f"C{n}", positions=pos, cell=bad, pbc=True))
        return "left-handed"
    if kind == "overlap":
        pos[1] = pos[0] + rng.uniform(0.01, 0.3) * rng.normal(size=3) / np.sqrt(3)
        ase.io.write(path, Atoms(f"C{n}", positions=pos, cell=cell, pbc=True))
        return "overlapping atoms"
    if kind == "element":
        symbols = ["C"] * (n - 1) + [str(rng.choice(["Si", "O", "N", "Fe"]))]
        ase.io.write(path, Atoms(symbols, positions=pos, cell=cell, pbc=True))
        return "not supported"
    raise AssertionError(kind)


STRUCTURE_KINDS = ["unreadable", "non-periodic", "left-handed", "overlap", "element"]
CASES = ([("spectrum", k.__name__, i) for k in SPECTRUM_KINDS for i in range(N_PER_KIND)]
         + [("structure", k, i) for k in STRUCTURE_KINDS for i in range(N_PER_KIND)])


def test_fuzz_has_enough_cases():
    assert len(CASES) >= 200


@pytest.fixture(scope="module")
def surrogate():
    return ToySurrogate()


@pytest.mark.parametrize("family,kind,index", CASES)
def test_malformed_input_gives_a_specific_error(tmp_path, surrogate, family, kind, index):
    rng = np.random.default_rng([zlib.crc32(kind.encode()), index])
    if family == "spectrum":
        text, expected = globals()[kind](rng)
        path = tmp_path / f"target_{kind}.{rng.choice(['csv', 'txt', 'dat'])}"
        path.write_text(text)
    else:
        path = tmp_path / f"structure_{kind}.{rng.choice(['extxyz', 'cif', 'vasp'])}"
        if kind in ("non-periodic", "left-handed") and path.suffix == ".cif":
            path = path.with_suffix(".extxyz")  # CIF cell parameters cannot express these
        if kind == "non-periodic" and path.suffix == ".vasp":
            path = path.with_suffix(".extxyz")
        expected = structure_case(rng, kind, path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(XanesdiffInputError) as err:
        load_target(path, surrogate, align_feature_eV=None)
    message = str(err.value)
    assert str(path) in message, message
    assert expected.lower() in message.lower(), message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("density,expected", [(0.1, "outside"), (5.0, "outside"),
                                              (-1.0, "outside")])
def test_generation_request_density_bounds(density, expected):
    from xanesdiff.guidance.request import check_density

    with pytest.raises(XanesdiffInputError, match=expected):
        check_density(density)

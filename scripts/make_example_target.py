"""Make the example target spectrum shipped in `examples/` with the project's own tools.

    python -m xanesdiff.scripts.make_example_target [--frame d2.5_1] [--out examples/target_rho2.5.csv]

The target is the shipped default surrogate's predicted mean spectrum of one a-C frame (read from
$XANESDIFF_ASSETS/data/a-C), written as a two-column file (energy eV, intensity) on the model
grid — the format of a measured spectrum. No data file is copied.
"""

from __future__ import annotations

import argparse

import numpy as np

from xanesdiff.datasets.assets import resolve_asset
from xanesdiff.datasets.spectra_io import atomic_write_text
from xanesdiff.datasets.structures import read_structures
from xanesdiff.forward.surrogate import load_surrogate, predict_sites


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", default="d2.5_1", help="a-C frame name (structures/NAME.vasp)")
    parser.add_argument("--out", default="examples/target_rho2.5.csv")
    parser.add_argument("--checkpoint", default=None, help="surrogate (default: shipped)")
    args = parser.parse_args(argv)
    atoms = read_structures(resolve_asset("data/a-C") / "structures" / f"{args.frame}.vasp")[0]
    surrogate = load_surrogate(args.checkpoint)
    spectrum = predict_sites(surrogate, atoms)
    spectrum = np.asarray(spectrum).reshape(-1, surrogate.grid.n_points).mean(0)
    lines = [f"# predicted C K-edge XANES of a-C frame {args.frame} "
             f"({len(atoms)} atoms, {atoms.get_volume():.1f} A^3) by the xanesdiff default surrogate",
             "# made by: python -m xanesdiff.scripts.make_example_target "
             f"--frame {args.frame} --out {args.out}",
             "energy_eV,intensity"]
    lines += [f"{e:.5f},{y:.6f}" for e, y in zip(surrogate.grid.energies_eV, spectrum)]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

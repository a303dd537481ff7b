"""Splits by network. There is deliberately no split by atom or by frame."""

from __future__ import annotations

from dataclasses import dataclass

from xanesdiff.datasets.dataset import Frame, XasDataset


@dataclass
class Split:
    name: str
    train: list[Frame]
    test: list[Frame]
    held_out_network: str

    def __post_init__(self):
        overlap = {f.network for f in self.train} & {f.network for f in self.test}
        if overlap:
            raise AssertionError(f"split {self.name} leaks networks {sorted(overlap)}")


def leave_one_network_out(dataset: XasDataset) -> list[Split]:
    """One split per network: that network's frames are the test set, all others train."""
    splits = []
    for network in dataset.networks:
        train = [f for f in dataset.frames if f.network != network]
        test = [f for f in dataset.frames if f.network == network]
        splits.append(Split(f"without_{network}", train, test, network))
    return splits


def leave_one_density_out(dataset: XasDataset, density_g_cm3: float, tol: float = 0.1) -> Split:
    """The split that holds out the network whose density is within `tol` g/cm³ of the given one."""
    matches = [n for n in dataset.networks if abs(dataset.network_density(n) - density_g_cm3) <= tol]
    if len(matches) != 1:
        available = ", ".join(f"{dataset.network_density(n):.2f}" for n in dataset.networks)
        raise ValueError(
            f"density {density_g_cm3} g/cm³ matches {len(matches)} networks; available: {available}")
    return next(s for s in leave_one_network_out(dataset) if s.held_out_network == matches[0])

"""The held-out error of a surrogate: how it is fitted, stored beside its checkpoint, and refused
when the checkpoint changed; and the calibration script end to end on a tiny recipe."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.forward.heldout_error import (fit_heldout_error, heldout_error_path,
                                             load_heldout_error, save_heldout_error)


def test_every_network_counts_once_and_coverage_leaves_the_network_out():
    energies = np.arange(3.0)
    many_small = np.full((12, 3), 0.001)      # twelve snapshots of one network, small errors
    one_large = np.array([[0.004, -0.004, 0.0]])
    error = fit_heldout_error({"a": many_small, "b": one_large}, energies)
    # equal weights per network: mean of the two networks' mean squares, not of the 13 frames
    np.testing.assert_allclose(error.rms ** 2, [(1e-6 + 16e-6) / 2, (1e-6 + 16e-6) / 2, 0.5e-6])
    assert error.network_mae == pytest.approx({"a": 0.001, "b": 0.008 / 3})
    # a's errors lie within b's rms (0.004, 0.004, 0) at two of three energies; b's within a's
    # (0.001 everywhere) at the one where b's error is zero: (2/3 + 1/3) / 2
    assert error.coverage == pytest.approx(0.5)
    np.testing.assert_allclose(error.band(np.array([0.003, 0.0, 0.0])) ** 2,
                               np.array([9e-6, 0.0, 0.0]) + error.rms ** 2)
    assert error.ensemble_coverage is None
    # with the ensemble's σ: the band is √(σ² + rms of the other networks²) per frame
    spread = {"a": np.full((12, 3), 0.0), "b": np.array([[0.0, 0.0, 0.001]])}
    with_spread = fit_heldout_error({"a": many_small, "b": one_large}, energies, spread)
    np.testing.assert_allclose(with_spread.rms, error.rms)
    assert with_spread.coverage == pytest.approx(0.5)        # b's zero-error point was in already
    assert with_spread.ensemble_coverage == pytest.approx((0 + 1 / 3) / 2)
    wide = {"a": np.full((12, 3), 0.01), "b": np.full((1, 3), 0.01)}
    assert fit_heldout_error({"a": many_small, "b": one_large}, energies, wide).coverage == 1.0
    with pytest.raises(ValueError, match="two networks"):
        fit_heldout_error({"a": many_small}, energies)


def test_stored_beside_its_checkpoint_and_ignored_once_the_weights_change(tmp_path, caplog):
    checkpoint = tmp_path / "forward_x.pt"
    checkpoint.write_bytes(b"weights v1")
    error = fit_heldout_error({"a": np.ones((2, 4)) * 0.002, "b": np.ones((1, 4)) * 0.004},
                              np.linspace(280, 290, 4))
    path = save_heldout_error(checkpoint, error)
    assert path == heldout_error_path(checkpoint) == tmp_path / "forward_x.heldout.json"
    loaded = load_heldout_error(checkpoint, 4)
    np.testing.assert_allclose(loaded.rms, error.rms)
    assert loaded.coverage == error.coverage and loaded.network_mae == error.network_mae
    with pytest.raises(XanesdiffInputError, match="must hold 100 values.*got 4"):
        load_heldout_error(checkpoint, 100)
    checkpoint.write_bytes(b"weights v2")
    with caplog.at_level(logging.WARNING, logger="xanesdiff.forward"):
        assert load_heldout_error(checkpoint, 4) is None
    assert "other weights" in caplog.text
    path.write_text(json.dumps({"rms": [1, 2]}))
    with pytest.raises(XanesdiffInputError, match="forward_x.heldout.json.*not a held-out error"):
        load_heldout_error(checkpoint, 4)
    assert load_heldout_error(tmp_path / "never_measured.pt", 4) is None


def test_calibration_retrains_the_recipe_without_each_network(a_c_dataset):
    """A histogram recipe, retrained per fold: the errors are those of models that never saw the
    network (the same recipe trained on all networks fits them several times better)."""
    from xanesdiff.forward.surrogate import train_surrogate
    from xanesdiff.guidance.validation import predict_members
    from xanesdiff.scripts.calibrate_forward import heldout_errors

    config = {"featurizer": {"type": "descriptor", "cutoff_A": 3.0, "n_radial": 8,
                             "n_angular": 6},
              "head": {"in_dim": 20, "n_energies": 100, "hidden": [16], "n_members": 2,
                       "seed": 0},
              "train": {"max_epochs": 4, "min_epochs": 1}}
    errors, spreads = heldout_errors(config, a_c_dataset, progress=False)
    assert sorted(errors) == sorted(spreads) == sorted(a_c_dataset.networks)
    for network, e in errors.items():
        assert e.shape == spreads[network].shape == (len(a_c_dataset.frames_of([network])), 100)
        assert (spreads[network] >= 0).all() and spreads[network].max() > 0
    seen = train_surrogate(a_c_dataset.frames, a_c_dataset.grid, config["featurizer"],
                           {"hidden": [16], "n_members": 2, "seed": 0}, config["train"])
    trained_on = np.mean([np.abs(predict_members(seen, f.atoms).mean(0) - f.mean_spectrum).mean()
                          for f in a_c_dataset.frames])
    held_out = np.mean([np.abs(e).mean() for e in errors.values()])
    assert held_out > 1.5 * trained_on  # measured: 0.026 against 0.013

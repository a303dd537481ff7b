"""The prior's benchmark record: misses derived from a result, the warning near a missed
density, its tie to the checkpoint's bytes, and the shipped default's record."""

import json
import logging

import pytest

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.diffusion.fidelity_record import (fidelity_from_benchmark, fidelity_record_path,
                                                 load_fidelity_record, prior_concerns,
                                                 save_fidelity_record)
from xanesdiff.diffusion.prior import load_prior, prior_checkpoint_path

TARGETS = {"cn1": 0.01, "cn5plus": 0.01, "sp3_err": 0.05, "sp2_err": 0.05, "rdf_peak_err": 0.03,
           "dmin_min": 1.1, "leave_out_sp3_err": 0.08}


def _row(**changes):
    row = {"cn1": 0.0, "cn5plus": 0.0, "sp3_err": 0.01, "sp2_err": 0.01, "rdf_peak_err": 0.005,
           "dmin": 1.25, "n_samples": 8, "sample": {"sp3": 0.30, "sp2": 0.68},
           "reference": {"sp3": 0.29, "sp2": 0.70}}
    return {**row, **changes}


def benchmark_result(checkpoint="prior.pt"):
    """A `benchmark_prior` result: 2.0 meets every target, 3.49 misses three of them."""
    dense = _row(cn5plus=0.038, sp3_err=0.058, dmin=1.05,
                 sample={"sp3": 0.880, "sp2": 0.08}, reference={"sp3": 0.938, "sp2": 0.05})
    return {"per_density": {"2.00": _row(), "3.49": dense}, "targets": TARGETS,
            "checkpoint": str(checkpoint), "command": "benchmark_prior …",
            "sampler": {"_target_": "xanesdiff.diffusion.samplers.PredictorCorrector",
                        "n_steps": 100}}


def test_misses_are_the_targets_a_density_failed_in_either_direction():
    record = fidelity_from_benchmark(benchmark_result())
    assert record.per_density["2.00"] == {}
    dense = record.per_density["3.49"]
    assert set(dense) == {"cn5plus", "sp3_err", "dmin"}  # dmin is a lower bound
    assert dense["sp3_err"] == pytest.approx({"value": 0.058, "limit": 0.05, "sample": 0.880,
                                              "reference": 0.938})
    assert dense["dmin"] == pytest.approx({"value": 1.05, "limit": 1.1})
    assert record.sampler == "PredictorCorrector, 100 steps" and record.n_samples == 8
    cooled = benchmark_result()
    cooled["sampler"]["density_cooling"] = {"from_g_cm3": 3.0, "to_g_cm3": 3.5}
    assert fidelity_from_benchmark(cooled).sampler == \
        "PredictorCorrector, 100 steps, cooled from 3.0 g/cm³"
    cooled["sampler"]["dense_steps"] = {"from_g_cm3": 3.3, "factor": 2}
    assert fidelity_from_benchmark(cooled).sampler.endswith(
        "cooled from 3.0 g/cm³, 2× the steps from 3.3 g/cm³")


def test_concerns_name_the_nearest_missed_density_only_within_reach():
    record = fidelity_from_benchmark(benchmark_result())
    text = record.concerns(3.4)
    assert text.startswith("at 3.49 g/cm³") and "cn5plus 0.038 (target ≤ 0.01)" in text
    assert "dmin 1.050 (target ≥ 1.1)" in text and "network 0.938" in text
    assert record.concerns(2.1) is None      # nearest density met every target
    assert record.concerns(3.9) is None      # beyond 0.25 g/cm³ of any benchmarked density
    assert record.concerns(3.9, within_g_cm3=0.5) is not None
    record.advice = "Colder sampling helps there."
    assert record.concerns(3.4).endswith("(target ≥ 1.1). Colder sampling helps there.")


def test_record_is_tied_to_the_checkpoint_bytes(tmp_path, caplog):
    checkpoint = tmp_path / "prior.pt"
    checkpoint.write_bytes(b"weights")
    path = save_fidelity_record(checkpoint, fidelity_from_benchmark(benchmark_result()))
    assert path == fidelity_record_path(checkpoint) == tmp_path / "prior.fidelity.json"
    loaded = load_fidelity_record(checkpoint)
    assert loaded.per_density == fidelity_from_benchmark(benchmark_result()).per_density

    checkpoint.write_bytes(b"retrained weights")
    with caplog.at_level(logging.WARNING, logger="xanesdiff.diffusion"):
        assert load_fidelity_record(checkpoint) is None
    assert "other weights" in caplog.text

    path.write_text(json.dumps({"per_density": {"3.49": {"cn5plus": {"value": "high"}}}}))
    with pytest.raises(XanesdiffInputError, match="prior.fidelity.json.*benchmark_prior --record"):
        load_fidelity_record(checkpoint)
    assert load_fidelity_record(tmp_path / "unrecorded.pt") is None


def test_prior_concerns_warns_and_says_nothing_without_a_record(caplog):
    class Prior:
        fidelity = fidelity_from_benchmark(benchmark_result())

    with caplog.at_level(logging.WARNING, logger="xanesdiff.diffusion"):
        assert prior_concerns(Prior(), 3.49).startswith("at 3.49")
        assert prior_concerns(Prior(), 2.0) is None
        assert prior_concerns(object(), 3.49) is None
    assert caplog.text.count("3.49 g/cm³") == 1


@pytest.mark.parametrize("name", ["default", "fast"])
def test_the_shipped_priors_carry_their_benchmark_records(name):
    """Retraining a shipped prior without rerunning `benchmark_prior --record` fails here."""
    record = load_prior(name).fidelity
    assert record is not None, f"no record matching {prior_checkpoint_path(name)}"
    assert len(record.per_density) == 5
    assert all(1.4 < float(density) < 3.6 for density in record.per_density)

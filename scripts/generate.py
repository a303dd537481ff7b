"""`xanesdiff generate`: structures whose predicted XANES matches a target, validated and reported.

From scratch (random positions at a given or inferred density), or, with `start=FILE`, as edits
of given structures (re-noised to `start_noise_A` and denoised with the same guidance).

Writes into `out`: samples/sample_NNN.extxyz (one per structure, as it finishes: a rerun resumes),
structures.extxyz (all, metrics in `info`), report.json, spectra.csv, spectra.png,
structure.png, and density_scan.png when the density was inferred.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.guidance.request import (build_terms, check_density, edit_structure,
                                        load_configured_prior, load_start_structures,
                                        make_generator, region_mask, set_relative_references,
                                        settings_concern)
from xanesdiff.runtime import resolve_device
from xanesdiff.scripts._hydra import hydra_app, set_threads

log = logging.getLogger("xanesdiff.generate")

def request_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes what would be generated (not `n`: more can be added)."""
    request = OmegaConf.to_container(cfg, resolve=True)
    for key in ("n", "out", "overwrite", "device", "validation"):
        request.pop(key, None)
    for key in ("target", "start"):  # the same path with other contents is another request
        if cfg.get(key) is not None and Path(cfg[key]).is_file():
            request[f"{key}_sha256"] = hashlib.sha256(Path(cfg[key]).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def check_out_dir(out: Path, fingerprint: str, overwrite: bool) -> None:
    from xanesdiff.datasets.spectra_io import atomic_write_text

    marker = out / "request.json"
    if marker.exists() and not overwrite:
        previous = json.loads(marker.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise XanesdiffInputError(
                f"{out} holds results of a different request (fingerprint {previous}, this one "
                f"{fingerprint}); choose another out=… or pass overwrite=true", "out")
    for leftover in [*out.glob(".*.tmp*"), *(out / "samples").glob(".*.tmp*")]:
        leftover.unlink()  # half-written files of a killed run: never read, never kept
    if overwrite:  # finished work of the previous request must not leak into this one
        for stale in [*(out / "samples").glob("sample_*.extxyz"), out / "density_scan.json"]:
            stale.unlink(missing_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint}) + "\n")


def run(cfg: DictConfig) -> dict:
    """Generate, validate and report; returns the report dict."""
    import ase.io
    from tqdm import tqdm

    from xanesdiff.analysis.plots import plot_structure_report
    from xanesdiff.analysis.structure import density_g_cm3, structure_report
    from xanesdiff.diffusion.fidelity_record import prior_concerns
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.report import (plot_density_scan, plot_spectra, write_extxyz,
                                           write_json)
    from xanesdiff.guidance.target import load_target
    from xanesdiff.guidance.validation import (check_validation_fits, load_potential, relax,
                                               spectral_match, validate_spectrum)
    from xanesdiff.datasets.spectra_io import write_spectra_csv

    if int(cfg.n) < 1:
        raise XanesdiffInputError(f"n must be a positive number of structures, got {cfg.n}", "n")
    if int(cfg.n_atoms) < 2:
        raise XanesdiffInputError(f"n_atoms must be at least 2, got {cfg.n_atoms}", "n_atoms")
    density = check_density(cfg.density)
    out = Path(cfg.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    log.info("running on %s", device)
    surrogate = load_surrogate(cfg.models.surrogate, device=device)
    _advise_fast_guide(int(cfg.n_atoms), surrogate, device)
    validator = _load_validator(cfg.models.validator, cfg.models.surrogate, surrogate)
    judge = _load_judge(cfg.models.judge, load_surrogate, device)
    prior = load_configured_prior(cfg, device)
    target = None
    if cfg.target is not None:
        target = load_target(cfg.target, validator, **OmegaConf.to_container(cfg.target_prep))
    terms = build_terms(cfg)
    for term in terms:
        term.bind(surrogate, None if target is None else target.spectrum)
    generator = make_generator(cfg, prior, surrogate, terms)
    start = None
    if cfg.start is not None:
        if density is not None:
            raise XanesdiffInputError("a start structure fixes the density (its cell and atoms); "
                                      "drop density=… or start=…", "density")
        start = load_start_structures(cfg.start, generator, cfg.start_noise_A)
        mobile = [region_mask(a, cfg.start_region) for a in start]  # refused before generating
        if int(cfg.n) < len(start):
            log.warning("%s holds %d frames but n=%d: only the first %d are edited", cfg.start,
                        len(start), int(cfg.n), int(cfg.n))
        density = float(np.mean([density_g_cm3(a) for a in start]))
    if density is None and target is None:
        raise XanesdiffInputError("density is needed when there is no target spectrum to infer "
                                  "it from", "density")

    def check_fits(density):
        check_validation_fits(int(cfg.n_atoms) if start is None else len(start[0]), density,
                              {"models.validator": validator, "models.judge": judge}, device)

    density_known = density is not None
    if density_known:  # refused before the out dir records this request
        check_fits(density)
    check_out_dir(out, request_fingerprint(cfg), bool(cfg.overwrite))

    report: dict = {"target": None if target is None else
                    {"source": target.source, "kind": target.kind, **target.details}}
    scan_path = out / "density_scan.json"
    if start is not None:
        start_info = [_spectral_info(a, target, validator, judge, validate_spectrum)
                      for a in start]
        report["density"] = {"start_g_cm3": [density_g_cm3(a) for a in start]}
        report["start"] = {"source": str(cfg.start), "noise_A": float(cfg.start_noise_A),
                           "frames": [_scalars(info) for info in start_info]}
    elif density is None:
        if scan_path.exists():
            saved = json.loads(scan_path.read_text())
            density, scan = saved["inferred_density_g_cm3"], saved["scan"]
        else:
            search = hydra.utils.instantiate(cfg.density_search, _convert_="all")
            density, scan = search.run(generator, target.spectrum, progress=tqdm)
            write_json(scan_path, {"inferred_density_g_cm3": density, "scan": scan})
        plot_density_scan(out / "density_scan.png", scan, density)
        report["density"] = {  # the dense interpolated curve is in density_scan.json only
            "inferred_g_cm3": density, "method": cfg.density_search._target_,
            "scan": [row for row in scan if row.get("stage") != "interpolated"],
            "scan_file": scan_path.name}
    else:
        report["density"] = {"given_g_cm3": density}
    if not density_known:  # inferred just now
        check_fits(density)
    report["prior_fidelity"] = prior_concerns(prior, density if start is None
                                              else density_g_cm3(start[0]))
    report["settings_fidelity"] = settings_concern(cfg, density)

    if start is None:
        set_relative_references(terms, generator, target, density, int(cfg.seed))

    potential = load_potential() if cfg.validation.relax else None
    frames = []
    for i in tqdm(range(int(cfg.n)), desc="generate"):
        seed = int(cfg.seed) + i
        path = out / "samples" / f"sample_{i:03d}.extxyz"
        if path.exists():
            frames.append(ase.io.read(path))
            continue
        if start is None:
            atoms, gen_log = generator.generate(density, seed)
        else:
            k = i % len(start)
            atoms, gen_log = edit_structure(generator, terms, target, start[k],
                                            float(cfg.start_noise_A), seed,
                                            mobile=mobile[k])
            gen_log.update(start_frame=k, **({} if target is None else
                                             {"start_mae": start_info[k]["mae"]}))
        info = {**gen_log, **_spectral_info(atoms, target, validator, judge, validate_spectrum)}
        info.update(_feature_info(terms, info, None if start is None else start_info[k]))
        if info["outlier_sites"]:
            log.warning("structure %d: the validator's prediction at %d site(s) (atoms %s) is over "
                        "10× the typical site's: environments unlike the training data, e.g. a "
                        "pair closer than 1.1 Å; they can dominate the mean spectrum and its MAE",
                        i, info["outlier_sites"], info["outlier_atoms"])
        if potential is not None:
            relaxed, energies = relax(atoms, potential, cfg.validation.relax_fmax_eV_A,
                                      cfg.validation.relax_steps)
            info.update(energies)
            if target is not None:
                after = validate_spectrum(relaxed, target.spectrum, judge or validator)
                info["relaxed_mae"] = after["mae"]
        atoms.info.update({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                           for k, v in info.items()})
        write_extxyz(path, [atoms])
        frames.append(atoms)

    write_extxyz(out / "structures.extxyz", frames)
    reference = _training_reference(density) if start is None else start
    structure = structure_report(frames, reference)
    plot_structure_report(structure, out / "structure.png",
                          title=f"generated at {density:.2f} g/cm³" if start is None else
                          f"edited from {Path(cfg.start).name} (σ = {cfg.start_noise_A} Å)")
    grid = validator.grid.energies_eV
    predicted = [np.asarray(a.info["predicted"]) for a in frames]
    stds = [np.asarray(a.info["predicted_std"]) for a in frames]
    shown = {f"structure_{i}": (p, s) for i, (p, s) in enumerate(zip(predicted, stds))}
    if start is not None:  # the start structures' predictions, for comparison
        shown = {**{f"start_{k}": (np.asarray(info["predicted"]),
                                   np.asarray(info["predicted_std"]))
                    for k, info in enumerate(start_info)}, **shown}
    plot_spectra(out / "spectra.png", grid, None if target is None else target.spectrum,
                 [p for p, _ in shown.values()], [s for _, s in shown.values()],
                 [name.replace("_", " ") for name in shown],
                 title=f"{len(frames)} structures at {density:.2f} g/cm³",
                 target_band=None if validator.heldout_error is None else
                 validator.heldout_error.rms)
    columns = {} if target is None else {"target": target.spectrum}
    columns.update({name: p for name, (p, _) in shown.items()})
    write_spectra_csv(out / "spectra.csv", grid, columns)

    per_structure = []
    for i, atoms in enumerate(frames):
        row = _scalars(atoms.info)
        row.update(structure["per_structure"][i])
        per_structure.append(row)
    summary = {"density_g_cm3": density, "n_structures": len(frames)}
    if validator.heldout_error is not None:  # how far a perfect structure's prediction can be
        summary["validator_heldout_mae"] = float(np.mean(
            list(validator.heldout_error.network_mae.values())))
    if target is not None:
        mean_pred = np.mean(predicted, axis=0)
        summary["mean_prediction_match"] = spectral_match(mean_pred, target.spectrum)
        if judge is not None:
            judged = np.mean([np.asarray(a.info["judge_predicted"]) for a in frames], axis=0)
            summary["judged_mean_match"] = spectral_match(judged, target.spectrum)
    summary.update({k: structure["pooled"][k] for k in structure["pooled"]})
    report.update({"summary": summary, "per_structure": per_structure,
                   "structure": {k: v for k, v in structure.items() if k != "per_structure"},
                   "guidance": OmegaConf.to_container(cfg.guidance), "steer": cfg.steer,
                   "config": OmegaConf.to_container(cfg, resolve=True)})
    write_json(out / "report.json", report)
    log.info("wrote %d structures and report.json to %s", len(frames), out)
    return report


def _advise_fast_guide(n_atoms: int, guide, device) -> None:
    """Large cells with a learned-feature guide take hours on a CPU: say so, and what is faster
    (README, "A guided 10⁴-atom sample")."""
    from xanesdiff.guidance.pipeline import descriptor_only

    if n_atoms > 3000 and not descriptor_only(guide) and device.type == "cpu":
        log.warning("%d atoms with a learned-feature guide on the CPU: ≈1 h per structure for "
                    "10⁴ atoms on 2 cores; models.surrogate=fast sampler=pc_quick took 10–15 min, "
                    "preset=rapid ≈2 min (validation still uses models.validator)", n_atoms)


def _load_validator(validator_path, guide_path, guide):
    """The surrogate whose prediction validates each structure: the guide itself when both name
    the same checkpoint (e.g. the defaults), else its own (e.g. guide `fast`, validate `default`)."""
    from xanesdiff.forward.surrogate import load_surrogate, surrogate_checkpoint_path

    same = (surrogate_checkpoint_path(validator_path).resolve()
            == surrogate_checkpoint_path(guide_path).resolve())
    return guide if same else load_surrogate(validator_path, device=guide.device)


def _load_judge(path, load_surrogate, device):
    from xanesdiff.forward.surrogate import surrogate_checkpoint_path

    if path is None:
        default = surrogate_checkpoint_path("judge")
        return load_surrogate(default, device=device) if default.exists() else None
    return load_surrogate(path, device=device)


def _spectral_info(atoms, target, surrogate, judge, validate_spectrum) -> dict:
    spectrum = None if target is None else target.spectrum
    info = validate_spectrum(atoms, spectrum, surrogate)
    if judge is not None:
        info.update(validate_spectrum(atoms, spectrum, judge, prefix="judge_"))
    return info


def _feature_info(terms, info: dict, start_info: dict | None) -> dict:
    """Each spectral-feature term (e.g. `pi_star_up`) measured on the validated prediction, on
    the judge's, and on the start structure's, next to the term's target value."""
    import torch

    values = {}
    for term in terms:
        if not hasattr(term, "measure"):
            continue
        sources = [("", info, "predicted"), ("judge_", info, "judge_predicted")]
        if start_info is not None:
            sources += [("start_", start_info, "predicted"),
                        ("start_judge_", start_info, "judge_predicted")]
        for prefix, source, key in sources:
            if key in source:
                spectrum = torch.as_tensor(np.asarray(source[key]), dtype=torch.float64)
                values[f"{prefix}{term.name}"] = float(term.measure(spectrum))
        values[f"{term.name}_target"] = float(term.target_value)
    return values


def _scalars(info: dict) -> dict:
    """The JSON-friendly part of a validation result (no spectra)."""
    return {k: v for k, v in info.items() if not isinstance(v, (list, np.ndarray))}


def _training_reference(density: float):
    """Frames of the training network nearest in density, when the dataset is available."""
    try:
        from xanesdiff.datasets.dataset import load_dataset

        dataset = load_dataset()
    except Exception:  # the report is still useful without a reference
        return None
    network = min(dataset.networks, key=lambda n: abs(dataset.network_density(n) - density))
    return [f.atoms for f in dataset.frames_of([network])]


@hydra_app("generate")
def main(cfg: DictConfig):
    set_threads()
    run(cfg)


if __name__ == "__main__":
    main()

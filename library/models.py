"""The models a library is generated with, and what they were (for provenance).

From checkpoints (`models.prior`, `models.surrogate`, `models.judge`; null: the shipped ones), or
from a Python factory given by dotted path (`models.factory=package.module:function`, called with
`models.factory_kwargs`) returning a mapping `{prior, surrogate[, judge]}` — for models built in
code, e.g. the small stand-ins the tests use. Objects can also be passed to `build_library`
directly as a `LibraryModels`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.spectra_io import file_sha256

_LOADED: dict = {}
"""Checkpoint-loaded models by (kind, path, sha256, device, variant): hydra multirun jobs in one
process share them."""


@dataclass
class LibraryModels:
    prior: object
    surrogate: object
    judge: object | None = None
    provenance: dict = field(default_factory=dict)


def _checkpoint(kind: str, path, loader, device="cpu", variant=None) -> tuple[object, dict]:
    """(model, provenance) of a checkpoint file, loaded once per (file, device, `variant`: what
    else the loader was given)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise XanesdiffInputError(f"{kind} checkpoint does not exist", str(path))
    sha = file_sha256(path)
    cache_key = (kind, str(path), sha, str(device), repr(variant))
    if cache_key not in _LOADED:
        _LOADED[cache_key] = loader(path, device=device)
    return _LOADED[cache_key], {"path": str(path), "sha256": sha}


def _weights_sha256(model) -> str | None:
    """Hash of a module's parameters (models built in code have no file to hash)."""
    module = getattr(model, "score_model", model)
    state = getattr(module, "state_dict", None)
    if state is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_factory(dotted: str):
    """`pkg.module:function` or `pkg.module.function` → the callable."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        raise XanesdiffInputError(f"expected 'module:function', got {dotted!r}", "models.factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise XanesdiffInputError(f"cannot import {module_name!r} ({exc})",
                                  "models.factory") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise XanesdiffInputError(f"{module_name!r} has no callable {attr!r}", "models.factory")
    return factory


def load_models(models_cfg: dict, device="cpu") -> LibraryModels:
    """Models from a `models` config mapping (see the module docstring); checkpoints are loaded
    onto `device` (a factory places its own models)."""
    cfg = dict(models_cfg or {})
    if cfg.get("factory"):
        kwargs = dict(cfg.get("factory_kwargs") or {})
        built = resolve_factory(cfg["factory"])(**kwargs)
        built = dict(built)
        if "prior" not in built or "surrogate" not in built:
            raise XanesdiffInputError("a model factory must return {prior, surrogate[, judge]}",
                                      "models.factory")
        provenance = {"factory": cfg["factory"], "factory_kwargs": kwargs}
        for name in ("prior", "surrogate", "judge"):
            if built.get(name) is not None:
                provenance[name] = {"class": type(built[name]).__name__,
                                    "weights_sha256": _weights_sha256(built[name])}
        return LibraryModels(built["prior"], built["surrogate"], built.get("judge"), provenance)

    from xanesdiff.diffusion.prior import load_prior, prior_checkpoint_path
    from xanesdiff.forward.surrogate import load_surrogate, surrogate_checkpoint_path

    autoguidance = cfg.get("autoguidance", "auto")
    prior, prior_info = _checkpoint(  # a path, or a shipped name such as "fast"
        "prior", prior_checkpoint_path(cfg.get("prior")),
        functools.partial(load_prior, autoguidance=autoguidance), device, variant=autoguidance)
    if "autoguidance" in prior.metadata:
        prior_info["autoguidance"] = prior.metadata["autoguidance"]
    surrogate, surrogate_info = _checkpoint(  # a path, or a shipped name such as "fast"
        "surrogate", surrogate_checkpoint_path(cfg.get("surrogate")), load_surrogate, device)
    provenance = {"prior": prior_info, "surrogate": surrogate_info}
    judge = None
    judge_path = cfg.get("judge")
    if judge_path is None and surrogate_checkpoint_path("judge").exists():
        judge_path = "judge"
    if judge_path not in (None, False, "none"):
        judge, provenance["judge"] = _checkpoint("judge", surrogate_checkpoint_path(judge_path),
                                                 load_surrogate, device)
    return LibraryModels(prior, surrogate, judge, provenance)

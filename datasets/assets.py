"""Offline asset resolution: explicit path, then `$XANESDIFF_ASSETS`, then the user cache.

Assets are named by a path relative to an asset root, e.g. ``models/M3GNet-MP-2021.2.8-PES`` or
``data/a-C``. Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from xanesdiff.datasets.errors import MissingAssetError

ENV_VAR = "XANESDIFF_ASSETS"

HOW_TO_GET = {
    "models": (
        "Pretrained M3GNet directories come from the matgl repository (folder pretrained_models/, "
        "BSD-3-Clause). On a machine with internet: `python -c \"import matgl; "
        "matgl.load_model('M3GNet-MP-2021.2.8-PES')\"` and copy the downloaded folder to "
        "<assets>/models/, or point $XANESDIFF_ASSETS at a folder that has models/."
    ),
    "data": (
        "The a-C dataset is the demo data of arXiv:2312.05472 (LLNL/graphite, "
        "notebooks/amorph-gen/data/a-C/dgp, MIT licence): copy it to <assets>/data/a-C/ with "
        "structures/ and spectra/ beside each other, or point $XANESDIFF_ASSETS at such a folder."
    ),
}


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/xanesdiff` (default ``~/.cache/xanesdiff``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xanesdiff"


def search_roots() -> list[Path]:
    """Asset roots in resolution order (after an explicit path)."""
    roots = []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]).expanduser())
    roots.append(user_cache_dir())
    return roots


def resolve_asset(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Return the path of asset `name` (e.g. ``models/M3GNet-MP-2021.2.8-PES``).

    An explicit path wins and must exist; otherwise each root of `search_roots()` is tried.
    Raises `MissingAssetError` naming every place looked at and how to obtain the asset.
    """
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser()
        if path.exists():
            return path.resolve()
        raise MissingAssetError(f"{name}: the explicit path {path} does not exist.")
    tried = []
    for root in search_roots():
        candidate = root / name
        tried.append(str(candidate))
        if candidate.exists():
            return candidate.resolve()
    kind = name.split("/", 1)[0]
    hint = HOW_TO_GET.get(kind, "Place it under one of the roots above.")
    env_note = "" if os.environ.get(ENV_VAR) else f" (${ENV_VAR} is not set)"
    raise MissingAssetError(
        f"Asset '{name}' not found. Looked in: {', '.join(tried)}{env_note}. {hint}"
    )

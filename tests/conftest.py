"""Test configuration: assets come from ../shared beside the repo unless $XANESDIFF_ASSETS is set."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XANESDIFF_ASSETS", str(REPO_ROOT.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def assets_root() -> Path:
    root = Path(os.environ["XANESDIFF_ASSETS"])
    if not (root / "data" / "a-C").exists():
        pytest.fail(f"test assets missing: {root}/data/a-C (set XANESDIFF_ASSETS to ../shared)")
    return root


@pytest.fixture(scope="session")
def a_c_dataset(assets_root):
    from xanesdiff.datasets.dataset import load_dataset

    return load_dataset()

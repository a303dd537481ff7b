"""Shared plumbing for hydra entry points: config location, error reporting, seeding."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from xanesdiff.datasets.errors import MissingAssetError, XanesdiffInputError
from xanesdiff.runtime import configure_process

CONFIG_PATH = "../configs"  # relative to this file; configs/ ships as package data


def hydra_app(config_name: str) -> Callable:
    """Turn `fn(cfg) -> int|None` into a hydra app reading `configs/<config_name>.yaml`.

    User errors (bad input, missing assets) print one clear line and exit 2 instead of a traceback.
    Freed memory is kept for reuse and kernels are deterministic
    (`xanesdiff.runtime.configure_process`).
    """

    def decorate(fn: Callable[[DictConfig], int | None]) -> Callable:
        @functools.wraps(fn)
        def guarded(cfg: DictConfig):
            configure_process()
            try:
                return fn(cfg)
            except (XanesdiffInputError, MissingAssetError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)

        return hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")(
            guarded)

    return decorate


def set_threads() -> None:
    """Respect `$XANESDIFF_THREADS` (default: torch's choice) for CPU runs."""
    import torch

    if os.environ.get("XANESDIFF_THREADS"):
        torch.set_num_threads(int(os.environ["XANESDIFF_THREADS"]))

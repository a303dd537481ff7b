"""xanesdiff: XANES-guided equivariant diffusion for 3D structures of disordered materials."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
"""Folder of the installed package: holds `configs/`, the shipped `checkpoints/` and `examples/`."""

"""xanesdiff: XANES-guided equivariant diffusion for 3D structures of disordered materials."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_ROOT = Path(__file__).resolve().parent
"""Folder of the installed package: holds `configs/`, the shipped `checkpoints/` and `examples/`."""


def shipped_checkpoint_path(name_or_path, shipped: dict) -> Path:
    """A checkpoint path, or a shipped checkpoint's name (a key of `shipped`, which maps names to
    files in `checkpoints/`; None or "": "default"). An existing file wins over a name."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = "default"
    if str(name_or_path) in shipped and not Path(name_or_path).exists():
        return PACKAGE_ROOT / "checkpoints" / shipped[str(name_or_path)]
    return Path(name_or_path)

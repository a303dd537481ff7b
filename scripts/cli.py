"""`xanesdiff` command: one subcommand per job, each a hydra app with command-line overrides.

    xanesdiff <subcommand> [key=value ...]      e.g.  xanesdiff sample density=2.0 n=4
    xanesdiff <subcommand> --help               hydra's help for that job's config
    xanesdiff <subcommand> --cfg job            print the composed config
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module under xanesdiff.scripts exposing main(), one-line description)
    "predict": ("predict", "predict per-site and mean XANES of structures with the forward surrogate"),
    "train-forward": ("train_forward", "train the forward surrogate (structure -> XANES)"),
    "train-prior": ("train_prior", "train the equivariant diffusion prior"),
    "sample": ("sample", "sample structures from the prior (no guidance) with a structure report"),
    "generate": ("generate", "spectrum-guided generation with validation report (the main job)"),
    "library": ("library", "generate a library of validated structures into an ASE database"),
    "library-merge": ("library_merge", "merge library shard databases into one"),
}


def available_subcommands() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists in this installation."""
    found = {}
    for name, (module, doc) in SUBCOMMANDS.items():
        if importlib.util.find_spec(f"xanesdiff.scripts.{module}") is not None:
            found[name] = (module, doc)
    return found


def usage() -> str:
    lines = ["usage: xanesdiff <subcommand> [key=value ...]", "", "subcommands:"]
    for name, (_, doc) in available_subcommands().items():
        lines.append(f"  {name:<14} {doc}")
    lines += ["", "Each subcommand is a hydra app: `xanesdiff SUB --help` shows its config groups,",
              "`xanesdiff SUB --cfg job` the composed config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    commands = available_subcommands()
    if name not in commands:
        print(f"xanesdiff: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"xanesdiff.scripts.{commands[name][0]}")
    sys.argv = [f"xanesdiff {name}", *rest]
    result = module.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Forward surrogate: structure → per-site carbon K-edge XANES (ensemble), differentiable.

    from xanesdiff.forward import load_surrogate
    surrogate = load_surrogate()                     # shipped checkpoints/forward_default.pt
    members = surrogate.mean_spectrum(pos_A, cell_A, numbers)   # (K, M)

Names are imported lazily (matgl is slow to import).
"""

_EXPORTS = {"Surrogate": "surrogate", "load_surrogate": "surrogate",
            "train_surrogate": "surrogate", "build_surrogate": "surrogate",
            "EnsembleHead": "heads", "M3GNetFeaturizer": "m3gnet_features"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"xanesdiff.forward.{_EXPORTS[name]}"), name)
    raise AttributeError(name)

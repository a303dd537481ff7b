"""Per-atom features from a pretrained M3GNet potential, differentiable in positions and cell.

The backbone is loaded offline from a local matgl model folder (``model.json``/``model.pt``),
put in eval mode and frozen (unless `trainable=True` for fine-tuning). Input is plain tensors:
positions (N,3) Å, cell (3,3) Å (rows are lattice vectors), atomic numbers (N,).
Output is (N, F): the node features of the chosen M3GNet layers, concatenated in layer order.

Layers (M3GNet, 3 blocks, cutoff 5 Å): ``embedding`` is the element embedding only (constant
for a one-element system), ``gc_1``/``gc_2``/``gc_3`` are node features after each graph block
(receptive field 5/10/15 Å). ``edge_gc_k`` is the mean over an atom's bonds (within the 5 Å
graph) of the edge features after block k. Only the blocks the chosen layers need are run, and
cells too large for the machine's memory recompute block intermediates in the backward pass
(`RECOMPUTE_MEMORY_FRACTION`), so that guidance on 10⁴ atoms fits in 23 GB. Blocks run over
spans of atoms (`three_body_spans`), so a pass without gradient (validation) needs memory
linear in the bonds: 8.8 GB for 1.1·10⁵ atoms.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xanesdiff.datasets.assets import resolve_asset
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.graph import expected_neighbours, periodic_neighbor_list, recomputed
from xanesdiff.runtime import device_memory_mb

DEFAULT_BACKBONE = "models/M3GNet-MP-2021.2.8-PES"
DEFAULT_LAYERS = ("gc_1", "gc_2", "gc_3")
GRAPH_MB_PER_ATOM = 2.4
"""Memory autograd keeps for a differentiated pass over the three blocks, MB per atom (1000-atom
a-C cell at 2.5 g/cm³). With recomputation, span by span, ≈0.2 (0.4 GB over the loaded model for
1728 atoms, 2.6 GB for 13 824; 10.8 GB and 1.4× the time when whole blocks were recomputed), but
a 1728-atom gradient takes ≈1.9× as long."""
INFERENCE_BYTES_PER_BOND = 1600
"""Peak memory of validating a cell (a surrogate's pass without gradient: these features, any
histograms beside them, the heads) over the loaded models, per bond within the 5 Å cutoff. The
blocks run span by span (`three_body_spans`), so it grows with the bonds. Measured for the
default surrogate on random positions at 2.5 g/cm³ (≈65 bonds per atom): 1430 B at 10⁴ atoms,
1555 at 3·10⁴, 1530 at 10⁵ (9.5 GB, 110 s on 2 threads); these features alone on tiled a-C
took 1220 at 1.1·10⁵ atoms."""
RECOMPUTE_MEMORY_FRACTION = 0.4
"""Recompute when the kept graph would take more than this share of the machine's memory
(a 10⁴-atom cell on a 23 GB machine does; a 3000-atom cell does not)."""
THREE_BODY_PAIRS_PER_SPAN = 2**17
"""M3GNet's blocks run over spans of atoms holding about this many three-body bond pairs
(`three_body_spans`; ≈120 a-C atoms at 2.5 g/cm³): a pass without gradient over 13 824 atoms
took 9.9 s and 1.2 GB over the loaded model with these, 15.6 s and 1.8 GB with spans of 2²¹."""
RECOMPUTED_PAIRS_PER_SPAN = 2**19
"""Spans of a differentiated pass with recomputation hold at least this many pairs, and there
are at most `MAX_RECOMPUTED_SPANS` of them: the gradient of each span's reads of the node
features fills a whole-cell buffer, a cost ∝ atoms × spans. A 5832-atom gradient took 15.4 s
(2.1 GB peak) in these 12 spans, 17.3–18.4 s (1.8 GB) in 49 of 2¹⁷ pairs, 16.2 s (5.7 GB) in 2,
and 8.3–10 s (17.8 GB) without recomputation; 13 824 atoms 38.9 s (3.1 GB) in 29 spans, 40.7 s
(2.8 GB) in 64. One without recomputation, which keeps every span's intermediates anyway,
runs as one span: 16 spans of 1728 atoms took 15 % longer."""
MAX_RECOMPUTED_SPANS = 64
"""At most this many spans in a differentiated pass with recomputation (larger cells get larger
spans; see `RECOMPUTED_PAIRS_PER_SPAN`)."""


def load_m3gnet(model_dir: str | os.PathLike) -> nn.Module:
    """Load the M3GNet graph model (not the `Potential` wrapper) from a local matgl folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import matgl

    model_dir = Path(model_dir)
    if not (model_dir / "model.json").exists():
        raise XanesdiffInputError(
            "not a matgl model folder (no model.json); expected e.g. "
            "<assets>/models/M3GNet-MP-2021.2.8-PES", str(model_dir))
    loaded = matgl.load_model(str(model_dir))
    model = getattr(loaded, "model", loaded)
    if not hasattr(model, "three_body_interactions") or not hasattr(model, "graph_layers"):
        raise XanesdiffInputError(f"model is a {type(model).__name__}, expected M3GNet",
                                  str(model_dir))
    if getattr(model, "include_state", False):
        raise XanesdiffInputError("M3GNet models with a global state input are not supported",
                                  str(model_dir))
    if any(getattr(block, "dropout", None) is not None for block in model.graph_layers):
        raise XanesdiffInputError("M3GNet models with dropout in their graph blocks are not "
                                  "supported (backbone_blocks runs the blocks' updates itself)",
                                  str(model_dir))
    return model


class M3GNetFeaturizer(nn.Module):
    """Frozen (by default) M3GNet → per-atom features (N, F), differentiable in pos and cell.

    Args:
        model_dir: local matgl folder of an M3GNet potential.
        layers: names of the layers whose node features are concatenated (see module doc).
        trainable: if False (default) the backbone is frozen and always stays in eval mode.
        recompute_min_atoms: differentiated passes over at least this many atoms recompute block
            intermediates in the backward pass (same values, less memory, slower); None: when
            the graph would not fit comfortably in memory (`RECOMPUTE_MEMORY_FRACTION`).
    """

    def __init__(self, model_dir: str | os.PathLike, layers=DEFAULT_LAYERS, trainable: bool = False,
                 recompute_min_atoms: int | None = None):
        super().__init__()
        self.recompute_min_atoms = recompute_min_atoms
        self.model_dir = str(model_dir)
        self.layers = tuple(layers)
        self.m3gnet = load_m3gnet(model_dir)
        self.trainable = bool(trainable)
        self.cutoff_A = float(self.m3gnet.cutoff)
        element_types = list(self.m3gnet.element_types)
        from ase.data import atomic_numbers

        lookup = torch.full((119,), -1, dtype=torch.long)
        for index, symbol in enumerate(element_types):
            lookup[atomic_numbers[symbol]] = index
        self.register_buffer("_type_of_z", lookup, persistent=False)
        known = {"embedding", "gc_1", "gc_2", "gc_3", "edge_gc_1", "edge_gc_2", "edge_gc_3"}
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            raise XanesdiffInputError(f"unknown M3GNet layer(s) {unknown}; choose from {sorted(known)}")
        self._n_blocks_needed = max(
            [0] + [int(name[-1]) for name in self.layers if name != "embedding"])
        self.set_trainable(self.trainable)
        self._feature_dim = int(self._probe().shape[1])

    def config(self) -> dict:
        """Config dict that rebuilds this featuriser (`build_featurizer`)."""
        return {"type": "m3gnet", "backbone": getattr(self, "backbone", DEFAULT_BACKBONE),
                "backbone_path": getattr(self, "backbone_path", None), "layers": list(self.layers),
                "trainable": self.trainable}

    @property
    def cache_id(self) -> str:
        return f"m3gnet|{Path(self.model_dir).name}|{','.join(self.layers)}"

    # -- mode handling ---------------------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        self.trainable = bool(trainable)
        for p in self.m3gnet.parameters():
            p.requires_grad_(self.trainable)
        self.m3gnet.train(self.trainable and self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen backbone stays in eval mode: a training-mode potential builds extra graphs.
        self.m3gnet.train(mode and self.trainable)
        return self

    @property
    def feature_dim(self) -> int:
        """F, the width of the concatenated features."""
        return self._feature_dim

    @torch.no_grad()
    def _probe(self) -> torch.Tensor:
        """Features of a 2-atom diamond cell (to learn the feature width from the model itself)."""
        a = 3.567
        cell = torch.tensor([[0.0, a / 2, a / 2], [a / 2, 0.0, a / 2], [a / 2, a / 2, 0.0]])
        pos = torch.tensor([[0.0, 0.0, 0.0], [a / 4, a / 4, a / 4]])
        return self(pos, cell, torch.tensor([6, 6]))

    # -- graph -----------------------------------------------------------------------------
    def neighbor_graph(self, pos: torch.Tensor, cell: torch.Tensor):
        """Edges within the backbone cutoff for the current (detached) geometry.

        Returns edge_index (2,E) sorted by source atom and integer image shifts (E,3)."""
        i, j, shifts, _ = periodic_neighbor_list(pos.detach().cpu().double().numpy(),
                                                 cell.detach().cpu().double().numpy(),
                                                 self.cutoff_A)
        edge_index = torch.from_numpy(np.stack([i, j])).to(pos.device)
        return edge_index, torch.from_numpy(shifts).to(device=pos.device, dtype=pos.dtype)

    def forward(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Per-atom features (N, F) for positions `pos` (N,3) Å, cell (3,3) Å, numbers (N,)."""
        cell = cell.reshape(3, 3).to(pos.dtype)
        numbers = torch.as_tensor(numbers, device=pos.device).long()
        node_type = self._type_of_z.to(pos.device)[numbers]
        if (node_type < 0).any():
            bad = sorted(set(numbers[node_type < 0].tolist()))
            raise XanesdiffInputError(f"atomic numbers {bad} are not covered by {self.model_dir}")
        edge_index, shifts = self.neighbor_graph(pos, cell)
        recompute = torch.is_grad_enabled() and self.recomputes(pos.shape[0], pos.device)
        blocks = backbone_blocks(
            self.m3gnet, pos, shifts @ cell, edge_index, node_type, n_blocks=self._n_blocks_needed,
            recompute=recompute, keep_edge_features=any(n.startswith("edge_") for n in self.layers))
        parts = []
        n_atoms = pos.shape[0]
        for name in self.layers:
            node_feat, edge_feat = blocks[name.removeprefix("edge_")]
            if name.startswith("edge_"):
                summed = torch.zeros(n_atoms, edge_feat.shape[1], dtype=edge_feat.dtype,
                                     device=edge_feat.device).index_add(0, edge_index[0], edge_feat)
                count = torch.bincount(edge_index[0], minlength=n_atoms).clamp(min=1)
                parts.append(summed / count.unsqueeze(1).to(edge_feat.dtype))
            else:
                parts.append(node_feat)
        return torch.cat(parts, dim=1)

    def inference_mb(self, n_atoms: int, volume_A3: float) -> float:
        """Peak memory (MB) of a pass without gradient over `n_atoms` atoms spread evenly over
        `volume_A3` Å³: it grows with the bonds, atoms × density."""
        bonds = n_atoms * expected_neighbours(n_atoms, volume_A3, self.cutoff_A)
        return bonds * INFERENCE_BYTES_PER_BOND / 2**20

    def recomputes(self, n_atoms: int, device=None) -> bool:
        """Whether a differentiated pass over `n_atoms` atoms recomputes its spans in the
        backward pass (`recompute_min_atoms`, else when the kept graph would crowd memory)."""
        if self.recompute_min_atoms is not None:
            return n_atoms >= self.recompute_min_atoms
        total_mb = device_memory_mb(device)  # the GPU's own memory when it runs on one
        return total_mb is not None and n_atoms * GRAPH_MB_PER_ATOM > (
            RECOMPUTE_MEMORY_FRACTION * total_mb)

    @torch.no_grad()
    def features_of_atoms(self, atoms) -> torch.Tensor:
        """Features (N, F) float32 of an ASE `Atoms`, without gradients (for caching)."""
        dtype = next(self.m3gnet.parameters()).dtype
        pos = torch.tensor(atoms.positions, dtype=dtype)
        cell = torch.tensor(atoms.cell.array, dtype=dtype)
        return self(pos, cell, torch.tensor(atoms.numbers)).float()


def featurizer_from_config(backbone: str = DEFAULT_BACKBONE, backbone_path: str | None = None,
                           layers=DEFAULT_LAYERS, trainable: bool = False) -> M3GNetFeaturizer:
    """Resolve the backbone folder (explicit path, else `$XANESDIFF_ASSETS`/cache) and load it."""
    featurizer = M3GNetFeaturizer(resolve_asset(backbone, backbone_path), layers, trainable)
    featurizer.backbone, featurizer.backbone_path = backbone, backbone_path
    return featurizer


class FeatureCache:
    """Frozen-featuriser features per frame, in memory and optionally on disk (``.pt``).

    Works with any featuriser that has `cache_id` (identity string) and `features_of_atoms`.

    The key is the frame name plus a hash of positions/cell and the featuriser identity, so a
    stale cache is never reused for a changed structure or a different layer choice.
    """

    def __init__(self, featurizer: nn.Module, cache_dir: str | os.PathLike | None = None):
        self.featurizer = featurizer
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}

    def _key(self, atoms) -> str:
        import hashlib

        h = hashlib.sha1()
        h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.numbers).tobytes())
        h.update(self.featurizer.cache_id.encode())
        return h.hexdigest()[:20]

    def __call__(self, atoms) -> torch.Tensor:
        key = self._key(atoms)
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        if path is not None and path.exists():
            feats = torch.load(path)
        else:
            feats = self.featurizer.features_of_atoms(atoms)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(feats, tmp)
                os.replace(tmp, path)
        self._memory[key] = feats
        return feats


def three_body_pairs(source: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """M3GNet's three-body line graph: the pairs (2, T) of distinct bonds b ≠ c that share a
    source atom, both `kept` (within the three-body cutoff). `source` (E,) holds the bonds'
    source atoms, sorted ascending; entries are positions in it. Row 0 is the bond that receives
    the message, row 1 the one that supplies the neighbour, ordered as matgl orders them."""
    bonds = torch.nonzero(kept).squeeze(1)
    _, group_size = torch.unique_consecutive(source[bonds], return_counts=True)
    group_start = torch.cumsum(group_size, 0) - group_size
    partners = torch.repeat_interleave(group_size - 1, group_size)
    first_of_group = torch.repeat_interleave(group_start, group_size)
    receiving = torch.repeat_interleave(torch.arange(len(bonds), device=bonds.device), partners)
    row_start = torch.repeat_interleave(torch.cumsum(partners, 0) - partners, partners)
    nth_partner = torch.arange(len(receiving), device=bonds.device) - row_start
    rank = receiving - first_of_group[receiving]  # the receiving bond's place in its group
    supplying = first_of_group[receiving] + nth_partner + (nth_partner >= rank).long()
    return torch.stack([bonds[receiving], bonds[supplying]])


def three_body_spans(source: torch.Tensor, kept: torch.Tensor, n_atoms: int,
                     pairs_per_span: int, max_spans: int | None = None,
                     ) -> list[tuple[int, int, int, int]]:
    """Split the cell into spans of consecutive atoms, (bond start, bond stop, atom start, atom
    stop), that hold about `pairs_per_span` three-body pairs each (more where one atom alone has
    more, or where `max_spans` spans would not hold them all). `source` (E,) holds the bonds'
    source atoms, sorted ascending, and `kept` marks the bonds within the three-body cutoff. A
    span's bonds are those its atoms are the source of, so its three-body pairs and the messages
    its bonds send stay inside it."""
    kept_per_atom = torch.bincount(source[kept], minlength=n_atoms)
    cumulative_pairs = torch.cumsum(kept_per_atom * (kept_per_atom - 1), 0)
    if max_spans is not None and n_atoms:
        pairs_per_span = max(pairs_per_span, -(-int(cumulative_pairs[-1]) // max_spans))
    span_of_atom = (cumulative_pairs - 1).clamp(min=0) // max(pairs_per_span, 1)
    first_atoms = (torch.nonzero(span_of_atom[1:] != span_of_atom[:-1]).squeeze(1) + 1).tolist()
    atom_bounds = [0, *first_atoms, n_atoms]
    bond_bounds = torch.searchsorted(source, torch.tensor(atom_bounds, dtype=source.dtype,
                                                          device=source.device)).tolist()
    return [(bond_bounds[i], bond_bounds[i + 1], atom_bounds[i], atom_bounds[i + 1])
            for i in range(len(atom_bounds) - 1)]


def backbone_blocks(m3gnet: nn.Module, pos: torch.Tensor, offsets_A: torch.Tensor,
                    edge_index: torch.Tensor, node_type: torch.Tensor, n_blocks: int,
                    recompute: bool = False, keep_edge_features: bool = True,
                    pairs_per_span: int | None = None,
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """M3GNet's forward pass up to graph block `n_blocks` (matgl 4.1's `M3GNet.forward`, without
    the readout): {"embedding" | "gc_k": (node features (N, 64), edge features (E, 64))}; the
    edge features are None, and freed as the pass goes, without `keep_edge_features`.

    Each block runs span by span (`three_body_spans`): a span's bonds get their three-body and
    edge updates and send their messages to the span's own atoms, so the block's working memory
    is one span's (≈`pairs_per_span` three-body pairs; by default `THREE_BODY_PAIRS_PER_SPAN`,
    or `RECOMPUTED_PAIRS_PER_SPAN` with `recompute`), not the whole cell's. The bond angles are
    built once per span and reused by every block, except in passes that must bound their memory
    (without gradient over several spans, or with `recompute`), which rebuild them per block. A
    differentiated pass without `recompute` is one span.
    `recompute` trades time for memory when the result will be differentiated: each span of each
    block keeps only its inputs, and its intermediates are rebuilt during the backward pass. The
    values and gradients are the same either way.
    """
    from matgl.graph._compute import compute_pair_vector_and_distance, compute_theta_and_phi
    from matgl.utils.cutoff import polynomial_cutoff

    n_atoms, source, target = pos.shape[0], edge_index[0], edge_index[1]
    bond_vec, bond_dist = compute_pair_vector_and_distance(pos, edge_index, offsets_A)
    expanded_dists = m3gnet.bond_expansion(bond_dist)
    three_body_cutoff = polynomial_cutoff(bond_dist, m3gnet.threebody_cutoff)
    kept = (bond_dist <= m3gnet.threebody_cutoff).detach()
    differentiated = torch.is_grad_enabled()
    if pairs_per_span is None:
        pairs_per_span = RECOMPUTED_PAIRS_PER_SPAN if recompute else THREE_BODY_PAIRS_PER_SPAN
    spans = three_body_spans(source, kept, n_atoms, pairs_per_span, max_spans=(
        None if not differentiated else MAX_RECOMPUTED_SPANS if recompute else 1))

    def angular_basis(bonds, bond_vec, bond_dist):
        """Three-body pairs of the bonds in slice `bonds` and their basis (`bond_vec`,
        `bond_dist`: those bonds' own)."""
        pairs = three_body_pairs(source[bonds], kept[bonds])
        angles = compute_theta_and_phi(bond_vec, bond_dist, pairs)
        return pairs, m3gnet.basis_expansion(angles["triple_bond_lengths"], angles["cos_theta"],
                                             angles["phi"])

    def block_on_span(k, span, node_feat, neighbour_feat, edge_feat, bond_vec, bond_dist,
                      cutoff, rbf, built=None):
        """Graph block k on one span's bonds: their new edge features (the three-body update,
        then the edge update) and the summed messages its atoms receive (the node update before
        its sum over the cell). The sums are matgl's (`ThreeBodyInteractions`,
        `M3GNetGraphConv`) restricted to the span; `neighbour_feat` is the three-body layer's
        atom update of the whole cell, computed once per block."""
        bond_start, bond_stop, atom_start, atom_stop = span
        pairs, basis = built or angular_basis(slice(bond_start, bond_stop), bond_vec, bond_dist)
        source_atoms, target_atoms = source[bond_start:bond_stop], target[bond_start:bond_stop]
        three_body_layer, conv = m3gnet.three_body_interactions[k], m3gnet.graph_layers[k].conv
        terms = basis * neighbour_feat[target_atoms[pairs[1]]] * (
            cutoff[pairs[0]] * cutoff[pairs[1]]).unsqueeze(1)
        summed = torch.zeros(bond_stop - bond_start, terms.shape[1], dtype=edge_feat.dtype,
                             device=edge_feat.device)
        summed = summed.index_add(0, pairs[0], terms.to(edge_feat.dtype))
        edge_feat = edge_feat + three_body_layer.update_network_bond(summed)
        edge_feat = edge_feat + conv.edge_update_(edge_index[:, bond_start:bond_stop], edge_feat,
                                                  node_feat, rbf, None)
        inputs = torch.hstack([node_feat[source_atoms], node_feat[target_atoms], edge_feat])
        messages = conv.node_update_func(inputs) * conv.node_weight_func(rbf)
        received = torch.zeros(atom_stop - atom_start, messages.shape[1], dtype=messages.dtype,
                               device=messages.device)
        return edge_feat, received.index_add(0, source_atoms - atom_start, messages)

    weights = tuple(m3gnet.parameters())
    run = ((lambda fn, *args: recomputed(fn, *args, params=weights)) if recompute
           else (lambda fn, *args: fn(*args)))
    bounded = recompute or (len(spans) > 1 and not differentiated)
    bonds_of = [slice(span[0], span[1]) for span in spans]
    built = ([None] * len(spans) if bounded
             else [angular_basis(bonds, bond_vec[bonds], bond_dist[bonds]) for bonds in bonds_of])
    node_feat, edge_feat, _ = m3gnet.embedding(node_type, expanded_dists, None)
    out = {"embedding": (node_feat, edge_feat if keep_edge_features else None)}
    for k in range(n_blocks):
        neighbour_feat = m3gnet.three_body_interactions[k].update_network_atom(node_feat)
        edge_parts, node_parts = [], []
        for span, bonds, basis in zip(spans, bonds_of, built):
            new_edges, received = run(
                block_on_span, k, span, node_feat, neighbour_feat, edge_feat[bonds],
                bond_vec[bonds], bond_dist[bonds], three_body_cutoff[bonds], expanded_dists[bonds],
                basis)
            edge_parts.append(new_edges)
            node_parts.append(received)
        edge_feat, node_feat = torch.cat(edge_parts), node_feat + torch.cat(node_parts)
        out[f"gc_{k + 1}"] = (node_feat, edge_feat if keep_edge_features else None)
    return out

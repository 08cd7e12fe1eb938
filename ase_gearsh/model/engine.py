"""A model ready to run, and the one forward path of the project.

:class:`Model` holds the network, its parameters, the closed-form statistics,
the registry and the block layout.  Its forward path is three stages, each a
pure function of (parameters, statistics, arrays):

1. :meth:`Model.density`: the neighbour density of a set of edges (a sum over
   edges, so it can be accumulated over edge chunks);
2. :meth:`Model.atoms`: atom descriptors and on-site blocks of all atoms;
3. :meth:`Model.bonds`: pair blocks of a set of bonds, from the descriptors.

Training and validation batches call :meth:`Model.forward`, which is these
three stages composed on one padded batch (differentiable); prediction
(:class:`~ase_gearsh.model.inference.Predictor`, used by ``gearsh eval``,
``gearsh predict`` and the calculator) calls the same stages on chunks.  Blocks
come out in the canonical layout, eV.  Call the stages inside :func:`precision`
(the training loop and the Predictor do).

A committee (``gearsh committee``) is one model with several parameter sets of the
same network: :attr:`Model.members` lists (parameters, statistics) of each, the first
being :attr:`Model.params` and :attr:`Model.stats`; prediction averages the members'
blocks (:class:`~ase_gearsh.model.inference.Predictor`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from ..core.basis import Registry
from .baseline import baseline_blocks, onsite_baseline_blocks
from .checkpoint import CheckpointError, load_checkpoint
from .graph import FAR, Graph, batch_graphs, build_graph, pad_size
from .layout import Layout
from .network import (
    GearsHNet,
    ModelSettings,
    postprocess_onsite,
    postprocess_pairs,
    postprocess_pairs_once,
)

__all__ = [
    "pair_cutoff_matrix",
    "Model",
    "FAR",
    "precision",
    "enable_compilation_cache",
    "load_model",
]

PRECISION = "highest"  # float32 matmuls at full precision (no TF32 / bf16 passes on GPUs)


@contextmanager
def precision():
    """The matmul precision of every network call (a context, not a global setting)."""
    with jax.default_matmul_precision(PRECISION):
        yield


def enable_compilation_cache(path=None) -> str | None:
    """Cache compiled XLA code on disk (default ``~/.cache/ase-gearsh/jax``) so a new
    process does not recompile shapes it has seen.  Process-wide JAX setting:
    called by the command-line tools and the demo, not by library code.  Does
    nothing when a cache directory is already configured or ``GEARSH_NO_CACHE``
    is set; returns the directory in use."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if os.environ.get("GEARSH_NO_CACHE"):
        return None
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "ase-gearsh", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # read-only home: just compile
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


def pair_cutoff_matrix(registry: Registry, bond_cutoff: float) -> np.ndarray:
    """(S+1, S+1) bond cut-off per species pair: min(rc_a + rc_b, bond cut-off), A."""
    rc = registry.rc
    pc = np.minimum(rc[:, None] + rc[None, :], float(bond_cutoff))
    pc[0, :] = 0.0
    pc[:, 0] = 0.0
    return pc


_EMPTY_I = np.zeros(0, np.int32)
_EMPTY_V = np.zeros((0, 3), np.float32)


class Model:
    """Network + parameters + statistics + registry (see the module docstring).

    Attributes set by :meth:`from_checkpoint` (``None`` for a model built in
    memory): ``path``, ``extra`` (training record), ``versions``,
    ``basis_data`` (basis functions for the exact S) and ``coverage``.
    ``committee``: the (parameters, statistics) of further committee members (empty
    for a single model); see :attr:`members`.
    """

    path: str | None = None
    extra: dict
    versions: dict | None = None
    basis_data: dict | None = None
    coverage: dict | None = None

    def __init__(
        self,
        settings: dict,
        registry: Registry,
        stats: dict,
        params=None,
        config: dict | None = None,
    ):
        self.settings = dict(settings)
        self.settings["mlp_layer_widths"] = tuple(self.settings["mlp_layer_widths"])
        self.registry = registry
        self.layout = Layout(registry)
        self.config = config or {}
        self.extra = {}
        self.net = GearsHNet(ModelSettings(**self.settings))
        self.stats = {k: jnp.asarray(v) for k, v in stats.items()}
        self.params = params
        self.committee: list[tuple] = []
        index, coef, _ = self.layout.gather_tables
        self.tables = {
            "index": jnp.asarray(index),
            "coef": jnp.asarray(coef, jnp.float32),
            "n": self.layout.n,
        }
        self.cutoff = float(self.settings["cutoff"])
        self.pair_cutoff = pair_cutoff_matrix(registry, self.settings["bond_cutoff"])
        self.mp_steps = int(self.settings.get("mp_steps", 0) or 0)
        # compiled prediction stages per chunk sizes, filled by
        # ase_gearsh.model.inference.predictor_for; they live and die with the model
        self.predictors: dict = {}

    # -- construction -------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path) -> Model:
        ck = load_checkpoint(path)
        registry = Registry.from_dict(ck["registry"])
        model = cls(ck["settings"], registry, ck["stats"], None, ck["config"])
        shapes = model.param_shapes()
        model.params = _restore(shapes, ck["params"], path)
        members = ck.get("members") or {}
        for key in sorted(members, key=int):  # a committee's further members
            m = members[key]
            params = _restore(shapes, m["params"], f"{path} (member {int(key) + 1})")
            model.committee.append((params, {k: jnp.asarray(v) for k, v in m["stats"].items()}))
        model.extra = ck["extra"]
        model.versions = ck["versions"]
        model.basis_data = ck.get("basis")  # for the exact overlap (None in old files)
        model.coverage = ck["extra"].get("coverage")
        model.path = str(path)
        return model

    def _init_args(self):
        g = Graph(
            species=np.array([1, 1], np.int32),
            edge_i=np.array([0, 1], np.int32),
            edge_j=np.array([1, 0], np.int32),
            edge_vec=np.array([[1.0, 0, 0], [-1.0, 0, 0]], np.float32),
            pair_i=np.array([0], np.int32),
            pair_j=np.array([1], np.int32),
            pair_shift=np.zeros((1, 3), np.int32),
            pair_vec=np.array([[1.0, 0, 0]], np.float32),
        )
        b = batch_graphs(
            [g], 4, 4, with_labels=False, sizes=(pad_size(2, 4), pad_size(2, 4), pad_size(1, 4))
        )
        return [jnp.asarray(b[k]) for k in _INPUTS]

    def param_shapes(self):
        """The parameter tree as shapes only (no compilation)."""
        return jax.eval_shape(self.net.init, jax.random.PRNGKey(0), *self._init_args())

    def init_params(self, seed: int):
        with precision():
            return _jitted_init(self.net.s)(jax.random.PRNGKey(seed), *self._init_args())

    @property
    def members(self) -> list[tuple]:
        """(parameters, statistics) of every committee member, this model's first."""
        return [(self.params, self.stats), *self.committee]

    # -- the forward path ---------------------------------------------------
    def species_index(self, atoms) -> np.ndarray:
        return self.registry.species_index(atoms.numbers)

    def graph(self, atoms, name: str = "") -> Graph:
        """Neighbour and bond lists of ``atoms`` at this model's cut-offs."""
        return build_graph(
            atoms, self.species_index(atoms), self.cutoff, self.pair_cutoff, name=name
        )

    def density(self, params, species, edge_i, edge_j, edge_vec):
        """Stage 1: neighbour density (N, 1, (L+1)^2, F) of these edges."""
        return self.net.apply(
            params, species, edge_i, edge_j, edge_vec, _EMPTY_I, _EMPTY_I, _EMPTY_V, stage="density"
        )

    def atoms(self, params, stats, species, edge_i, edge_j, edge_vec, rho=None):
        """Stage 2: (descriptors, on-site blocks (N, n, n)).  ``rho``: the summed
        density of stage 1; ``None`` computes it from these edges (message passing
        needs every edge here)."""
        d, onsite = self.net.apply(
            params,
            species,
            edge_i,
            edge_j,
            edge_vec,
            _EMPTY_I,
            _EMPTY_I,
            _EMPTY_V,
            stage="atoms",
            rho=rho,
        )
        return d, postprocess_onsite(onsite, stats, self.tables, species)

    def bonds(self, params, stats, species, descriptors, pair_i, pair_j, pair_vec):
        """Stage 3: pair blocks (P, n, n) of these bonds."""
        first, second = self.bond_irreps(params, species, descriptors, pair_i, pair_j, pair_vec)
        return self.bond_blocks(first, second, stats, species, pair_i, pair_j, pair_vec)

    def bond_irreps(self, params, species, descriptors, pair_i, pair_j, pair_vec):
        """Stage 3, network part: the two pair outputs (irreps) of these bonds."""
        _, first, second = self.net.apply(
            params,
            species,
            _EMPTY_I,
            _EMPTY_I,
            _EMPTY_V,
            pair_i,
            pair_j,
            pair_vec,
            stage="bonds",
            descriptors=descriptors,
        )
        return first, second

    def bond_blocks(self, first, second, stats, species, pair_i, pair_j, pair_vec):
        """Stage 3, post-processing: pair irreps -> blocks (P, n, n), eV."""
        post = postprocess_pairs_once if self.net.s.bond_evaluation == "once" else postprocess_pairs
        blocks = post(first, second, stats, self.tables, species, pair_i, pair_j, pair_vec)
        if "pair_baseline" in stats:  # the network corrects a two-centre H0
            si, sj = species[pair_i], species[pair_j]
            blocks = blocks + baseline_blocks(
                stats["pair_baseline"], self.tables, stats["pair_cutoff"], si, sj, pair_vec
            )
        return blocks

    def onsite_baseline(self, stats, species, edge_i, edge_j, edge_vec):
        """On-site H0 (N, n, n) summed over these edges, or ``None`` when the model has
        none (a sum over edges: accumulated over edge chunks like the density)."""
        if "onsite_baseline_coef" not in stats:
            return None
        return onsite_baseline_blocks(stats, self.tables, species, edge_i, edge_j, edge_vec)

    def forward(self, params, stats, batch):
        """The three stages on one padded batch (jittable, differentiable):
        canonical blocks (onsite (N, n, n), pairs (P, n, n))."""
        sp, ei, ej, ev = (batch[k] for k in ("species", "edge_i", "edge_j", "edge_vec"))
        rho = None if self.mp_steps else self.density(params, sp, ei, ej, ev)
        d, onsite = self.atoms(params, stats, sp, ei, ej, ev, rho)
        h0 = self.onsite_baseline(stats, sp, ei, ej, ev)
        if h0 is not None:
            onsite = onsite + h0
        pairs = self.bonds(
            params, stats, sp, d, batch["pair_i"], batch["pair_j"], batch["pair_vec"]
        )
        return onsite, pairs


_LOADED: dict = {}


def load_model(path) -> Model:
    """:meth:`Model.from_checkpoint`, shared per file: a checkpoint already loaded in
    this process (same resolved path, modification time and size) is returned
    as is, with its compiled prediction stages; a rewritten file is read again."""
    from pathlib import Path

    p = Path(path)
    try:
        st = p.resolve().stat()
    except OSError:
        raise CheckpointError(f"checkpoint {str(path)!r} not found") from None
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    model = _LOADED.get(key)
    if model is None:
        for old in [k for k in _LOADED if k[0] == key[0]]:
            del _LOADED[old]  # the file changed: drop the stale model
        model = _LOADED[key] = Model.from_checkpoint(p)
    return model


@lru_cache(maxsize=16)
def _jitted_init(settings: ModelSettings):
    """One jitted initialiser per network settings: models of equal settings (every
    run of one config) trace it once per process."""
    return jax.jit(GearsHNet(settings).init)


def _restore(template, state, path):
    """Checkpoint arrays into the network's parameter tree, shapes checked."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for keypath, shape in flat:
        node = state
        try:
            for k in keypath:
                node = node[str(getattr(k, "key", getattr(k, "idx", k)))]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{path}: parameter {jax.tree_util.keystr(keypath)} is "
                f"missing; the file does not fit its own settings"
            ) from None
        if tuple(node.shape) != tuple(shape.shape):
            raise CheckpointError(
                f"{path}: parameter {jax.tree_util.keystr(keypath)} has "
                f"shape {tuple(node.shape)}, the network expects "
                f"{tuple(shape.shape)}"
            )
        leaves.append(np.asarray(node, dtype=shape.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_INPUTS = ("species", "edge_i", "edge_j", "edge_vec", "pair_i", "pair_j", "pair_vec")

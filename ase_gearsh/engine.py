"""A model ready to run: network, statistics, layout and jitted prediction.

Shared by training, evaluation and the ASE calculator.  Inputs are padded to
bucketed sizes so that structures of similar size reuse one compilation.
"""
from __future__ import annotations

import numpy as np

from .graph import batch_graphs, build_graph, pad_size
from .layout import Layout, Registry

__all__ = ["pair_cutoff_matrix", "Model", "FAR"]

FAR = 1.0e3  # length (A) of padding vectors: beyond every cut-off


def pair_cutoff_matrix(registry: Registry, bond_cutoff: float) -> np.ndarray:
    """(S+1, S+1) bond cut-off per species pair: min(rc_a + rc_b, bond cut-off), A."""
    rc = registry.rc
    pc = np.minimum(rc[:, None] + rc[None, :], float(bond_cutoff))
    pc[0, :] = 0.0
    pc[:, 0] = 0.0
    return pc


def _setup_jax():
    """float32 with 'highest' matmul precision; compiled code cached on disk
    (``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/ase-gearsh/jax``) so that a
    new process does not recompile shapes it has seen."""
    import os

    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    if not jax.config.jax_compilation_cache_dir and not os.environ.get("GEARSH_NO_CACHE"):
        path = os.path.join(os.path.expanduser("~"), ".cache", "ase-gearsh", "jax")
        try:
            os.makedirs(path, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", path)
        except OSError:  # read-only home: just compile
            pass
    return jax


class Model:
    """Network + statistics + registry; ``predict(atoms)`` gives GPAW-order blocks."""

    def __init__(self, settings: dict, registry: Registry, stats: dict, params, config=None):
        jax = _setup_jax()
        import jax.numpy as jnp
        from .model import GearsHNet, ModelSettings
        self.settings = dict(settings)
        self.settings["mlp_layer_widths"] = tuple(self.settings["mlp_layer_widths"])
        self.registry = registry
        self.layout = Layout(registry)
        self.config = config or {}
        self.net = GearsHNet(ModelSettings(**self.settings))
        self.stats = {k: jnp.asarray(v) for k, v in stats.items()}
        self.params = params
        index, coef, _ = self.layout.gather_tables
        self.tables = {"index": jnp.asarray(index), "coef": jnp.asarray(coef, jnp.float32),
                       "n": self.layout.n}
        self.cutoff = float(self.settings["cutoff"])
        self.pair_cutoff = pair_cutoff_matrix(registry, self.settings["bond_cutoff"])
        self._forward = jax.jit(self._blocks)

    # -- construction -------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path) -> "Model":
        from .checkpoint import CheckpointError, load_checkpoint
        ck = load_checkpoint(path)
        registry = Registry.from_dict(ck["registry"])
        model = cls(ck["settings"], registry, ck["stats"], None, ck["config"])
        model.params = _restore(model.param_shapes(), ck["params"], path)
        model.extra = ck["extra"]
        model.versions = ck["versions"]
        model.basis_data = ck.get("basis")  # for the exact overlap (None in old files)
        model.coverage = ck["extra"].get("coverage")
        model.path = str(path)
        return model

    def param_shapes(self):
        """The parameter tree as shapes only (no compilation)."""
        import jax
        import jax.numpy as jnp
        dummy = _dummy_batch()
        args = [jnp.asarray(dummy[k]) for k in _INPUTS]
        return jax.eval_shape(self.net.init, jax.random.PRNGKey(0), *args)

    def init_params(self, seed: int):
        import jax
        import jax.numpy as jnp
        dummy = _dummy_batch()
        args = [jnp.asarray(dummy[k]) for k in _INPUTS]
        return jax.jit(self.net.init)(jax.random.PRNGKey(seed), *args)

    # -- prediction ---------------------------------------------------------
    def _blocks(self, params, stats, batch):
        """Jittable: statistics are an argument (not baked-in constants), so models
        of the same shape share compiled code (and JAX's persistent cache)."""
        from .model import postprocess
        args = [batch[k] for k in _INPUTS]
        raw = self.net.apply(params, *args)
        return postprocess(raw, stats, self.tables, batch["species"], batch["pair_i"],
                           batch["pair_j"], batch["pair_vec"])

    def graph(self, atoms, name=""):
        return build_graph(atoms, self.registry, self.cutoff, self.pair_cutoff, name=name)

    def predict_graph(self, graph, atoms_multiple=None, nl_multiple=None):
        """Canonical blocks (onsite (N, n, n), pairs (P, n, n)) as float64 numpy."""
        import jax.numpy as jnp
        d = self.config.get("data", {}) if self.config else {}
        am = atoms_multiple or d.get("atoms_pad_multiple", 100)
        nm = nl_multiple or d.get("nl_pad_multiple", 10000)
        b = batch_graphs([graph], am, nm, far=FAR, with_labels=False)
        on, pr = self._forward(self.params, self.stats,
                               {k: jnp.asarray(v) for k, v in b.items()})
        return (np.asarray(on, np.float64)[:graph.n_atoms],
                np.asarray(pr, np.float64)[:len(graph.pair_i)])

    def to_gpaw_order(self, graph, onsite, pairs):
        """Canonical blocks -> flat row-major GPAW-order arrays as stored in datasets."""
        sp = graph.species
        lay = self.layout
        on = [lay.from_canonical(onsite[a], sp[a], sp[a]).ravel() for a in range(len(sp))]
        pr = [lay.from_canonical(pairs[p], sp[i], sp[j]).ravel()
              for p, (i, j) in enumerate(zip(graph.pair_i, graph.pair_j))]
        return (np.concatenate(on) if on else np.zeros(0),
                np.concatenate(pr) if pr else np.zeros(0))


def _restore(template, state, path):
    """Checkpoint arrays into the network's parameter tree, shapes checked."""
    import jax
    from .checkpoint import CheckpointError
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for keypath, shape in flat:
        node = state
        try:
            for k in keypath:
                node = node[str(getattr(k, "key", getattr(k, "idx", k)))]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(keypath)} is "
                                  f"missing; the file does not fit its own settings") from None
        if tuple(node.shape) != tuple(shape.shape):
            raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(keypath)} has "
                                  f"shape {tuple(node.shape)}, the network expects "
                                  f"{tuple(shape.shape)}")
        leaves.append(np.asarray(node, dtype=shape.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


_INPUTS = ("species", "edge_i", "edge_j", "edge_vec", "pair_i", "pair_j", "pair_vec")


def _dummy_batch():
    """Tiny padded input used only to initialise parameter shapes."""
    from .graph import Graph
    g = Graph(species=np.array([1, 1], np.int32), edge_i=np.array([0, 1], np.int32),
              edge_j=np.array([1, 0], np.int32),
              edge_vec=np.array([[1.0, 0, 0], [-1.0, 0, 0]], np.float32),
              pair_i=np.array([0], np.int32), pair_j=np.array([1], np.int32),
              pair_shift=np.zeros((1, 3), np.int32),
              pair_vec=np.array([[1.0, 0, 0]], np.float32))
    return batch_graphs([g], 4, 4, far=FAR, with_labels=False,
                        sizes=(pad_size(2, 4), pad_size(2, 4), pad_size(1, 4)))

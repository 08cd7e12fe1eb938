"""The core layer: numpy, scipy and ASE only (no JAX, no GPAW at import).

* :mod:`~ase_gearsh.core.errors`: :class:`GearsHError`, the base of every error
  a user can meet;
* :mod:`~ase_gearsh.core.io`: atomic file writes and figures without pyplot;
* :mod:`~ase_gearsh.core.schema`: the on-disk dataset schema;
* :mod:`~ase_gearsh.core.data`: reading datasets;
* :mod:`~ase_gearsh.core.blocks`: block indexing and sparse assembly of H(k), S(k);
* :mod:`~ase_gearsh.core.basis`: basis-set descriptions and the species registry.

Every other layer of the project imports from here; this layer imports from
none of them (enforced by the import contract in ``setup.cfg``).
"""

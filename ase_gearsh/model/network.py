"""The GEARS H network (flax/e3x) and the pure functions that turn its output into blocks.

Every e3x call passes ``cartesian_order=False`` (GPAW's real spherical
harmonic order) and spherical harmonics use ``normalization='orthonormal'``.
All normalisations are per atom or per bond: padding never changes a result.

Pipeline (paper section 2.1 and S2)::

    species-aware radial basis -> 2B density -> TensorDense body orders (kept
    separate) -> optional self-attention message passing -> nonlinear block ->
    degree reduction, concatenation                         = atom descriptor
    atom descriptor -> residual dense block -> on-site readout
    (d_i + d_j) -> nonlinear block, (x) species-aware bond expansion
                -> residual dense block -> pair readout
    readouts -> scale-shift (closed-form statistics) -> envelope -> blocks

Pair symmetry ``H_ji(-R) = H_ij(R)^T`` holds exactly, in one of two ways
(``ModelSettings.bond_evaluation``):

- ``"once"`` (the default of new models): one network evaluation per unordered
  pair.  Unlike species are evaluated from the lower species index to the higher
  and transposed when stored the other way round.  For like species the bond
  expansion is split into its parts even and odd under r -> -r; an even branch
  gives the symmetric part of the block and an odd branch (linear in the odd
  expansion, with even coefficients) the antisymmetric part.
- ``"both_orientations"`` (the paper's symmetrisation, models written before the
  option existed): ``H_ij = (F(i->j) + F(j->i)^T) / 2``, twice the work.

Both are exactly rotation and permutation equivariant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import e3x
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .dense import Dense
from .fused import FusedTensor, TensorDense

__all__ = [
    "ModelSettings",
    "GearsHNet",
    "EquivariantLayerNorm",
    "postprocess_onsite",
    "postprocess_pairs",
    "postprocess_pairs_once",
    "envelope",
    "count_parameters",
]

_ACTIVATIONS = {
    "bent_identity": e3x.nn.bent_identity,
    "mish": e3x.nn.mish,
    "silu": e3x.nn.silu,
    "swish": e3x.nn.swish,
    "gelu": e3x.nn.gelu,
    "shifted_softplus": e3x.nn.shifted_softplus,
    "relu": e3x.nn.relu,
}
_RADIAL = {
    "basic_fourier": e3x.nn.basic_fourier,
    "basic_bernstein": e3x.nn.basic_bernstein,
    "basic_chebyshev": e3x.nn.basic_chebyshev,
    "basic_gaussian": e3x.nn.basic_gaussian,
}
_CUTOFF = {"smooth_cutoff": e3x.nn.smooth_cutoff, "cosine_cutoff": e3x.nn.cosine_cutoff}


@dataclass(frozen=True)
class ModelSettings:
    """Hyperparameters of the network (the ``model`` section of the config)."""

    n_species: int
    out_max_degree: int
    out_features: int
    # atom-centred
    cutoff: float = 8.0
    num_radial: int = 24
    radial_max_degree: int = 4
    num_elemental_embedding: int = 32
    num_tensordenses: int = 1
    max_tensordense_degree: int = 4
    num_tensordense_features: int = 12
    use_fused_tensor: bool = True
    mp_steps: int = 0
    # "attention": e3x SelfAttention per body order (the paper's option); "density":
    # a second neighbour density gated by the neighbours' invariant features
    # (see AtomDescriptor), far cheaper
    mp_type: str = "attention"
    mp_degree: int = 4
    mp_num_heads: int = 4
    mp_qkv_features: int = 32
    mp_basis_max_degree: int = 2
    mp_basis_num: int = 8
    mp_radial_fn: str = "basic_fourier"
    mp_cutoff_fn: str = "smooth_cutoff"
    # bond-centred
    bond_cutoff: float = 8.0
    bond_max_degree: int = 4
    bond_tensor: str = "fused_tensor"
    bond_basis_max_degree: int = 4
    bond_basis_num: int = 24
    bond_radial_fn: str = "basic_fourier"
    bond_cutoff_fn: str = "smooth_cutoff"
    # residual dense block
    mlp_layer_widths: tuple = (32, 16, 32)
    activation: str = "bent_identity"
    # fused tensor products in both readouts; False in checkpoints written before the
    # option existed (the config default is True)
    readout_fused_tensor: bool = False
    # "both_orientations": every pair evaluated as i->j and j->i and averaged (the
    # paper's symmetrisation, checkpoints written before the option existed);
    # "once": one evaluation per unordered pair, exactly symmetric (see GearsHNet)
    bond_evaluation: str = "both_orientations"
    odd_features: int = 0  # features of the odd part with "once" (0: the bond features)
    radial_fn: str = "basic_fourier"
    cutoff_fn: str = "smooth_cutoff"


def _basis(vec, *, max_degree, num, cutoff, radial_fn, cutoff_fn):
    """Radial (scaled by the cut-off) x orthonormal real spherical harmonics."""
    return e3x.nn.basis(
        vec,
        max_degree=max_degree,
        num=num,
        radial_fn=partial(_RADIAL[radial_fn], limit=cutoff),
        cutoff_fn=partial(_CUTOFF[cutoff_fn], cutoff=cutoff),
        angular_fn=partial(
            e3x.so3.spherical_harmonics, r_is_normalized=True, normalization="orthonormal"
        ),
        cartesian_order=False,
    )


class ProjectedBasis(nn.Module):
    """``e3x.nn.Dense(features, use_bias=False)`` applied to :func:`_basis` of ``vec``,
    without forming the basis: the basis is R_n(r) Y_lm(r^) and the Dense has one
    matrix W_l per degree, so the result is Y_lm(r^) (R(r) W_l)_f.  Same parameters
    (names and shapes) as the Dense on the basis, the same values up to rounding, and
    (E, (L+1)^2, num) never stored: 3x faster for the neighbour density at device
    scale (``benchmarks/device_scale.py``).  Output (E, 1, (L+1)^2, features)."""

    features: int
    max_degree: int
    num: int
    cutoff: float
    radial_fn: str
    cutoff_fn: str

    @nn.compact
    def __call__(self, vec):
        norm = e3x.ops.norm(vec, axis=-1, keepdims=True)  # as e3x.nn.basis (safe gradient)
        u = vec / jnp.where(norm > 0, norm, 1)
        norm = norm[..., 0]
        radial = _RADIAL[self.radial_fn](norm, self.num, limit=self.cutoff)
        radial = radial * _CUTOFF[self.cutoff_fn](norm, cutoff=self.cutoff)[..., None]
        ylm = e3x.so3.spherical_harmonics(
            u,
            max_degree=self.max_degree,
            r_is_normalized=True,
            normalization="orthonormal",
            cartesian_order=False,
        )
        parity = "+-"
        out = []
        for l in range(self.max_degree + 1):  # e3x.nn.Dense's per-degree layers
            w = nn.Dense(
                self.features,
                use_bias=False,
                kernel_init=e3x.nn.modules.default_kernel_init,
                name=f"{l}{parity[l % 2]}",
            )(radial)
            out.append(ylm[..., l * l : (l + 1) ** 2, None] * w[..., None, :])
        return jnp.concatenate(out, axis=-2)[..., None, :, :]


def _tensor_dense(features, *, max_degree, fused, name):
    """A TensorDense layer: the fused one of :mod:`.fused` (e3x's parameters and
    outputs, a faster layout) or e3x's with the full tensor product."""
    if fused:
        return TensorDense(features, max_degree=max_degree, name=name)
    return e3x.nn.TensorDense(
        features, max_degree=max_degree, use_fused_tensor=False, cartesian_order=False, name=name
    )


def _with_pseudotensors(x, max_degree):
    return e3x.nn.change_max_degree_or_type(x, max_degree=max_degree, include_pseudotensors=True)


class EquivariantLayerNorm(nn.Module):
    """Layer normalisation of one atom's (or bond's) features, E(3)-equivariant.

    Even scalars are centred and scaled over the features; all other irreps
    together are divided by their joint RMS (one number per atom or bond, so a
    channel that is zero by symmetry is not blown up to noise).  A learnable
    scale per (parity, degree, feature).  Statistics never mix atoms, so
    padding and distant atoms cannot leak in.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        P, LM, F = x.shape[-3:]
        lmax = int(round(np.sqrt(LM))) - 1
        scale = self.param("scale", nn.initializers.ones, (P, lmax + 1, F))
        bias = self.param("bias", nn.initializers.zeros, (F,))
        degree = np.repeat(np.arange(lmax + 1), 2 * np.arange(lmax + 1) + 1)
        s = x[..., 0:1, 0:1, :]
        s = s - s.mean(axis=-1, keepdims=True)
        s = s / jnp.sqrt((s * s).mean(axis=-1, keepdims=True) + self.eps) + bias
        is_scalar = np.zeros((P, LM, 1), dtype=bool)
        is_scalar[0, 0, 0] = True
        rest = jnp.where(is_scalar, 0.0, x)
        n_rest = P * LM * F - F
        norm = jnp.sqrt((rest * rest).sum(axis=(-3, -2, -1), keepdims=True) / n_rest + self.eps)
        out = jnp.where(is_scalar, s, rest / norm)
        return out * scale[:, degree, :]


class NonlinearBlock(nn.Module):
    """Two dense layers with LayerNorm and a gated activation, plus a residual."""

    activation: str = "bent_identity"

    @nn.compact
    def __call__(self, x):
        F = x.shape[-1]
        act = _ACTIVATIONS[self.activation]
        y = EquivariantLayerNorm()(x)
        y = act(Dense(F)(y))
        y = EquivariantLayerNorm()(y)
        y = Dense(F)(y)
        return x + y


class ResidualDense(nn.Module):
    """The shared residual dense block (paper listing 4)."""

    widths: Sequence[int]
    activation: str = "bent_identity"

    @nn.compact
    def __call__(self, x):
        act = _ACTIVATIONS[self.activation]
        h = x
        for k, w in enumerate(self.widths):
            h = Dense(w)(h)
            if k < len(self.widths) - 1:
                h = act(h)
        skip = (
            x
            if x.shape[-1] == self.widths[-1]
            else Dense(self.widths[-1], use_bias=False, name="skip")(x)
        )
        return act(h + skip)


class AtomDescriptor(nn.Module):
    """Atom-centred descriptors of body orders 2 .. 2 + num_tensordenses.

    Shapes: ``species`` (N,) int (0 = padding); ``edge_i``, ``edge_j`` (E,) int
    (centre, neighbour); ``edge_vec`` (E, 3) = r_j + R - r_i in Angstrom.

    Math: the neighbour density of atom i is

        rho_i = sum_{j in N(i)} g(z_i, z_j) * W [R_n(|r_ij|) Y_lm(r_ij / |r_ij|)]

    (radial basis R_n scaled by the cut-off, orthonormal real spherical
    harmonics, species gate g, linear projection W), shape (N, 1, (L+1)^2, F).
    Each TensorDense raises the body order by one: x_{k+1} = TD(x_k).  Every
    order goes through optional self-attention message passing (``mp_type``
    "attention") and a :class:`NonlinearBlock`; the orders are concatenated along
    features: output d (N, 2, (L_bond+1)^2, F * (num_tensordenses + 1)).

    ``mp_type`` "density", ``mp_steps`` = T: T rounds of

        rho'_i = rho_i + sum_{j in N(i)} g'(h_i, h_j) * W [R_n Y_lm](r_ij),
        d <- d + D'(rho'_i)

    with h the even scalars of d (invariant), the same projected basis W [R Y] as
    rho, and D' the TensorDense / NonlinearBlock chain above with its own
    parameters.  An atom then sees its neighbours' environments (twice the cut-off)
    through invariant gates only: one dense map and one sum per edge, no tensor
    product on edges.
    """

    s: ModelSettings

    @nn.compact
    def __call__(self, species, edge_i, edge_j, edge_vec, rho=None, density_only=False):
        """Atom descriptors.  The neighbour density ``rho`` is a sum over edges, so
        it can be accumulated over edge chunks (``density_only=True`` returns one
        chunk's contribution; pass the total as ``rho``).  Message passing needs
        all edges at once."""
        s = self.s
        N = species.shape[0]
        F = s.num_tensordense_features
        emb = e3x.nn.Embed(s.n_species + 1, s.num_elemental_embedding, name="embed")
        e_centre = emb(species).reshape(N, -1)  # e3x returns (N, 1, 1, features)
        if rho is None:
            # species-aware radial functions: depend on centre AND neighbour species
            pair_emb = jnp.concatenate([e_centre[edge_i], e_centre[edge_j]], axis=-1)
            gate = nn.Dense(F, name="species_radial")(pair_emb)
            projected = ProjectedBasis(
                F,
                max_degree=s.radial_max_degree,
                num=s.num_radial,
                cutoff=s.cutoff,
                radial_fn=s.radial_fn,
                cutoff_fn=s.cutoff_fn,
                name="radial_projection",
            )(edge_vec)
            two_body = projected * gate[:, None, None, :]
            rho = e3x.ops.indexed_sum(two_body, dst_idx=edge_i, num_segments=N)
        elif s.mp_steps:
            raise ValueError("message passing needs the edges, not a summed density")
        if density_only:
            return rho
        # the centre's own species enters the scalar channel
        rho = rho.at[:, 0, 0, :].add(nn.Dense(F, name="centre_species")(e_centre))
        rho = _with_pseudotensors(rho, s.max_tensordense_degree)
        if s.mp_steps and s.mp_type == "density":
            d = self._orders_out(rho, prefix="")
            for step in range(s.mp_steps):
                h = d[:, 0, 0, :]  # even scalars: invariant
                g = nn.Dense(F, name=f"mp_gate_{step}")(
                    jnp.concatenate([h[edge_i], h[edge_j]], axis=-1)
                )
                msg = e3x.ops.indexed_sum(
                    projected * g[:, None, None, :], dst_idx=edge_i, num_segments=N
                )
                x = rho + _with_pseudotensors(msg, s.max_tensordense_degree)
                d = d + self._orders_out(x, prefix=f"mp{step + 1}_")
            return d
        if s.mp_steps and s.mp_type != "attention":
            raise ValueError(f"mp_type={s.mp_type!r}: 'attention' or 'density'")
        orders = self._orders(rho, prefix="")
        if s.mp_steps:
            mp_basis = _basis(
                edge_vec,
                max_degree=s.mp_basis_max_degree,
                num=s.mp_basis_num,
                cutoff=s.cutoff,
                radial_fn=s.mp_radial_fn,
                cutoff_fn=s.mp_cutoff_fn,
            )
        out = []
        for b, x in enumerate(orders):
            x = _with_pseudotensors(x, s.mp_degree if s.mp_steps else s.max_tensordense_degree)
            for step in range(s.mp_steps):
                m = e3x.nn.SelfAttention(
                    max_degree=s.mp_degree,
                    num_heads=s.mp_num_heads,
                    qkv_features=s.mp_qkv_features,
                    out_features=F,
                    cartesian_order=False,
                    name=f"attention_{b}_{step}",
                )(x, mp_basis, dst_idx=edge_i, src_idx=edge_j, num_segments=N)
                x = EquivariantLayerNorm(name=f"mp_norm_{b}_{step}")(x + m)
            x = NonlinearBlock(s.activation, name=f"nonlinear_{b}")(x)
            out.append(_with_pseudotensors(x, s.bond_max_degree))
        return jnp.concatenate(out, axis=-1)

    def _orders(self, rho, prefix):
        """[rho, TD(rho), TD(TD(rho)), ...]: body orders 2 .. 2 + num_tensordenses."""
        s = self.s
        orders = [rho]
        x = rho
        for k in range(s.num_tensordenses):
            x = _tensor_dense(
                s.num_tensordense_features,
                max_degree=s.max_tensordense_degree,
                fused=s.use_fused_tensor,
                name=f"{prefix}tensordense_{k}",
            )(x)
            orders.append(x)
        return orders

    def _orders_out(self, rho, prefix):
        """The descriptor of a density without attention: every body order through its
        NonlinearBlock, concatenated."""
        s = self.s
        out = []
        for b, x in enumerate(self._orders(rho, prefix)):
            x = NonlinearBlock(s.activation, name=f"{prefix}nonlinear_{b}")(x)
            out.append(_with_pseudotensors(x, s.bond_max_degree))
        return jnp.concatenate(out, axis=-1)


class GearsHNet(nn.Module):
    """The GEARS H network: raw readout irreps of on-site blocks and of pair blocks.

    Shapes: atoms (N,), edges (E,), bonds (P,) as in :class:`AtomDescriptor`,
    ``pair_vec`` (P, 3) = r_j + R - r_i.  Outputs are e3x irreps of shape
    (., 2, (L_out+1)^2, F_out) with L_out = 2 l_max of the basis and F_out the
    layout's feature count; :func:`postprocess_onsite` / :func:`postprocess_pairs`
    map them to (., n, n) blocks.

    Math: with atom descriptors d_i, a bond (i, j, R) has the descriptor
    b = NB(d_i + d_j) (symmetric in i, j) and the oriented, species-ordered bond
    expansion e_ij = g(z_i, z_j) * W [R_n(|r|) Y_lm(r)], r = r_ij; the forward
    output is F(i->j) = TD(RD(b (x) e_ij)) and the reverse one uses e_ji with
    Y_lm(-r) = (-1)^l Y_lm(r).

    - ``bond_evaluation="both_orientations"``: blocks H_ij = (F(i->j) + F(j->i)^T) / 2;
      the bond stage returns (F(i->j), F(j->i)).
    - ``bond_evaluation="once"``: with (a, b) the pair in canonical order (lower
      species index first) and e = e_even + e_odd split by the parity of l,
      u = RD(b (x) e_even) is even in r, O_even = TD(u) and
      O_odd = W (W' u (x) W'' e_odd) odd in r; the bond stage returns
      (O_even, O_odd) and :func:`postprocess_pairs_once` builds
      H_ab = O_even + O_odd (unlike species) or sym(O_even) + antisym(O_odd)
      (like species, so that H(-r) = H(r)^T).

    On-site: TD(RD(d_i)), symmetrised.
    (NB: nonlinear block, RD: shared residual dense block, TD: TensorDense
    readout, (x): tensor product.)
    """

    s: ModelSettings

    @nn.compact
    def __call__(
        self,
        species,
        edge_i,
        edge_j,
        edge_vec,
        pair_i,
        pair_j,
        pair_vec,
        stage="all",
        rho=None,
        descriptors=None,
    ):
        """``stage``: 'density' (the neighbour density of these edges), 'atoms'
        (descriptors and on-site irreps from the summed ``rho``, or from these edges
        when ``rho`` is None) and 'bonds' (pair irreps of these bonds from
        ``descriptors``); :class:`~ase_gearsh.model.engine.Model` composes them.
        'all' runs every stage at once and serves to initialise the parameters.
        Every stage uses the same parameters."""
        s = self.s
        shared = ResidualDense(tuple(s.mlp_layer_widths), s.activation, name="residual_dense")
        if stage == "density":
            return AtomDescriptor(s, name="atom_descriptor")(
                species, edge_i, edge_j, edge_vec, density_only=True
            )
        if stage == "bonds":
            d, onsite = descriptors, None
        else:
            d = AtomDescriptor(s, name="atom_descriptor")(
                species, edge_i, edge_j, edge_vec, rho=rho
            )
            onsite = _tensor_dense(
                s.out_features,
                max_degree=s.out_max_degree,
                fused=s.readout_fused_tensor,
                name="onsite_readout",
            )(shared(d))
            if stage == "atoms":
                return d, onsite
        Fd = d.shape[-1]
        # bond descriptor: symmetric pooling of the two atoms, refined
        pooled = NonlinearBlock(s.activation, name="bond_nonlinear")(d[pair_i] + d[pair_j])
        emb = e3x.nn.Embed(s.n_species + 1, s.num_elemental_embedding, name="bond_embed")
        gate_layer = nn.Dense(Fd, name="bond_species")
        if s.bond_tensor == "fused_tensor":
            tensor = FusedTensor(
                max_degree=s.bond_max_degree, cartesian_order=False, name="bond_tensor"
            )
        else:
            tensor = e3x.nn.Tensor(
                max_degree=s.bond_max_degree, cartesian_order=False, name="bond_tensor"
            )
        readout = _tensor_dense(
            s.out_features,
            max_degree=s.out_max_degree,
            fused=s.readout_fused_tensor,
            name="pair_readout",
        )

        proj = ProjectedBasis(
            Fd,
            max_degree=s.bond_basis_max_degree,
            num=s.bond_basis_num,
            cutoff=s.bond_cutoff,
            radial_fn=s.bond_radial_fn,
            cutoff_fn=s.bond_cutoff_fn,
            name="bond_projection",
        )

        def expansion(vec, za, zb):
            """Species-ordered, oriented bond expansion g(z_a, z_b) * W b, with b the
            radial x spherical-harmonic basis of the bond vector ``vec``."""
            g = gate_layer(
                jnp.concatenate(
                    [emb(za).reshape(za.shape[0], -1), emb(zb).reshape(zb.shape[0], -1)], axis=-1
                )
            )
            y = proj(vec) * g[:, None, None, :]
            return _with_pseudotensors(y, s.bond_max_degree)

        zi, zj = species[pair_i], species[pair_j]
        if s.bond_evaluation == "once":
            # canonical orientation: from the lower species index to the higher
            canon = zi <= zj
            vec = jnp.where(canon[:, None], pair_vec, -pair_vec)
            y = expansion(vec, jnp.minimum(zi, zj), jnp.maximum(zi, zj))
            deg = np.repeat(
                np.arange(s.bond_max_degree + 1), 2 * np.arange(s.bond_max_degree + 1) + 1
            )
            odd = jnp.asarray(deg % 2 == 1)[:, None]
            y_even = jnp.where(odd, 0.0, y)  # Y_lm(-r) = (-1)^l Y_lm(r): even in r
            y_odd = jnp.where(odd, y, 0.0)  # odd in r
            u = shared(tensor(pooled, y_even))  # even in r
            even = readout(u)
            F_odd = s.odd_features or Fd
            odd_tensor = FusedTensor(
                max_degree=s.out_max_degree, cartesian_order=False, name="pair_odd_tensor"
            )
            t = odd_tensor(
                Dense(F_odd, name="pair_odd_in")(u),
                Dense(F_odd, use_bias=False, name="pair_odd_bond")(y_odd),
            )
            # no bias: a bias on the scalars would not be odd in r
            odd_out = Dense(s.out_features, use_bias=False, name="pair_odd_readout")(t)
            return onsite, even, odd_out
        both = [
            tensor(pooled, expansion(pair_vec, zi, zj)),
            tensor(pooled, expansion(-pair_vec, zj, zi)),  # Y(-r) = (-1)^L Y(r)
        ]
        P = pair_i.shape[0]
        bond = readout(shared(jnp.concatenate(both, axis=0)))
        return onsite, bond[:P], bond[P:]


def envelope(x):
    """Smooth cut-off of the pair blocks, x = distance / pair cut-off."""
    return e3x.nn.smooth_cutoff(x)


def shift_basis(x, num: int):
    """Legendre polynomials of (2x - 1), (..., num): the distance dependence of shifts."""
    t = 2.0 * x - 1.0
    out = [jnp.ones_like(t), t]
    for k in range(2, num):
        out.append(((2 * k - 1) * t * out[-1] - (k - 1) * out[-2]) / k)
    return jnp.stack(out[:num], axis=-1)


def _to_blocks(irreps, index, coef, n):
    flat = irreps.reshape(irreps.shape[0], -1)
    return (jnp.take(flat, index, axis=1) * coef).sum(-1).reshape(-1, n, n)


def postprocess_onsite(onsite, stats, tables, species):
    """On-site irreps (N, 2, (L+1)^2, F) -> symmetric canonical blocks (N, n, n), eV.

    x' = x * scale[z] + shift[z] (shift on even scalars only), then the
    Clebsch-Gordan gather of the layout, then (B + B^T) / 2."""
    index, coef, n = tables["index"], tables["coef"], tables["n"]
    on = onsite * stats["onsite_scale"][species] + stats["onsite_shift"][species]
    B = _to_blocks(on, index, coef, n)
    return 0.5 * (B + jnp.swapaxes(B, -1, -2))


def postprocess_pairs(fwd, rev, stats, tables, species, pair_i, pair_j, pair_vec):
    """Pair irreps in both orientations (P, 2, (L+1)^2, F) -> canonical blocks (P, n, n), eV.

    Per orientation: x' = env(x) * (x * scale[z_a, z_b] + sum_k a_k[z_a, z_b] P_k(2x - 1))
    with x = d / pair_cutoff[z_a, z_b] (shift on even scalars only, Legendre P_k,
    smooth envelope env); then B = (B(i->j) + B(j->i)^T) / 2."""
    index, coef, n = tables["index"], tables["coef"], tables["n"]
    si, sj = species[pair_i], species[pair_j]
    dist = jnp.sqrt(jnp.sum(pair_vec * pair_vec, axis=-1))
    rc = stats["pair_cutoff"][si, sj]
    x = jnp.clip(dist / rc, 0.0, 1.0)
    env = envelope(x)[:, None, None, None]
    phi = shift_basis(x, stats["pair_shift"].shape[-1])  # (P, K)

    # pair_shift: (S, S, F, K) for the even scalars
    def shifted(raw_irreps, a, b):
        out = raw_irreps * stats["pair_scale"][a, b]
        scal = jnp.einsum("pfk,pk->pf", stats["pair_shift"][a, b], phi)
        return (out.at[:, 0, 0, :].add(scal)) * env

    Bf = _to_blocks(shifted(fwd, si, sj), index, coef, n)
    Br = _to_blocks(shifted(rev, sj, si), index, coef, n)
    return 0.5 * (Bf + jnp.swapaxes(Br, -1, -2))


def postprocess_pairs_once(even, odd, stats, tables, species, pair_i, pair_j, pair_vec):
    """Pair irreps of one evaluation (``bond_evaluation="once"``) -> canonical blocks
    (P, n, n) in the stored orientation i -> j, eV.

    In the canonical orientation a -> b (lower species index first):
    B_even = env(x) * (O_even * scale[z_a, z_b] + sum_k a_k P_k(2x - 1)) and
    B_odd = env(x) * O_odd * scale[z_a, z_b] as blocks; H_ab = B_even + B_odd for
    unlike species, (B_even + B_even^T) / 2 + (B_odd - B_odd^T) / 2 for like
    species; transposed where the pair is stored as b -> a."""
    index, coef, n = tables["index"], tables["coef"], tables["n"]
    si, sj = species[pair_i], species[pair_j]
    canon = si <= sj
    a, b = jnp.minimum(si, sj), jnp.maximum(si, sj)
    dist = jnp.sqrt(jnp.sum(pair_vec * pair_vec, axis=-1))
    x = jnp.clip(dist / stats["pair_cutoff"][a, b], 0.0, 1.0)
    env = envelope(x)[:, None, None, None]
    phi = shift_basis(x, stats["pair_shift"].shape[-1])
    scale = stats["pair_scale"][a, b]
    scal = jnp.einsum("pfk,pk->pf", stats["pair_shift"][a, b], phi)
    Be = _to_blocks((even * scale).at[:, 0, 0, :].add(scal) * env, index, coef, n)
    Bo = _to_blocks(odd * scale * env, index, coef, n)
    like = (si == sj)[:, None, None]
    BeT, BoT = jnp.swapaxes(Be, -1, -2), jnp.swapaxes(Bo, -1, -2)
    B = jnp.where(like, 0.5 * (Be + BeT) + 0.5 * (Bo - BoT), Be + Bo)
    return jnp.where(canon[:, None, None], B, jnp.swapaxes(B, -1, -2))


def count_parameters(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))

"""Training configuration: the paper's YAML keys (listings 1-6), checked (no JAX).

``load_config(path)`` returns a nested dict with every default filled in.
Unknown keys and values of the wrong type raise :class:`ConfigError` naming
the key, what was expected and what was found.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from ..core.errors import GearsHError

__all__ = ["DEFAULTS", "ConfigError", "load_config", "check_config", "model_settings"]


class ConfigError(GearsHError, ValueError):
    """A configuration file that cannot be used."""


_ANY = object()  # placeholder type: any YAML value (kwargs dicts)
_PATHS = (str, list, type(None))

DEFAULTS = {
    "data": {
        "directory": ".",
        "experiment": "gearsh",
        "train_data_path": None,
        "val_data_path": None,
        "n_train": None,
        "n_valid": None,
        # a fixed validation set: structure names or indices into train_data_path
        "valid_structures": None,
        "bond_fraction": 1.0,
        "sampling_alpha": 0.0,
        "atoms_pad_multiple": 100,
        "nl_pad_multiple": 10000,
        # bonds padded to a multiple of this (null: nl_pad_multiple); with
        # bond_fraction < 1 a smaller multiple saves the padded bonds' work
        "bond_pad_multiple": None,
        "batch_size": 1,
        "valid_batch_size": 1,
        "shuffle_buffer_size": 100,
        "energy_unit": "eV",
        "pos_unit": "Ang",
        "seed": 0,
    },
    "model": {
        "atom_centered": {
            # "two_centre": the on-site blocks correct H0 = sum over neighbours of the
            # two-centre S S^T, S T^T + T S^T, T T^T terms (ase_gearsh.model.baseline)
            "baseline": "none",
            "descriptor": {
                "descriptor_name": "ShallowTDSAAtomCenteredDescriptor",
                "use_fused_tensor": True,
                "num_tensordenses": 1,
                "max_tensordense_degree": 4,
                "num_tensordense_features": 12,
                "mp_steps": 0,
                # "attention" (e3x SelfAttention, as in the paper) or "density" (a second
                # neighbour density gated by the neighbours' invariants; far cheaper)
                "mp_type": "attention",
                "mp_degree": 4,
                "mp_options": {"num_heads": 4, "qkv_features": 32},
                "mp_basis_options": {
                    "cutoff_fn": "smooth_cutoff",
                    "radial_fn": "basic_fourier",
                    "radial_kwargs": {},
                    "max_degree": 2,
                    "num": 8,
                },
                "radial_basis": {
                    "cutoff": 8.0,
                    "num_radial": 24,
                    "max_degree": 4,
                    "num_elemental_embedding": 32,
                },
            },
        },
        "bond_centered": {
            "cutoff": 8.0,
            "max_basis_degree": 4,
            "max_degree": 4,
            "tensor_module": "fused_tensor",
            "tensor_module_dtype": "float32",
            # "once": one evaluation per unordered pair, exactly H_ji = H_ij^T (even and
            # odd parts in r); "both_orientations": the paper's average of i->j and j->i
            "evaluation": "once",
            "odd_features": 0,  # features of the odd branch of "once" (0: as the bond)
            # "two_centre": the network corrects H0 = c(d) S + t(d) T of the two-centre
            # overlap and kinetic integrals (ase_gearsh.model.baseline); "none": the paper
            "baseline": "none",
            "bond_expansion_options": {
                "cutoff_fn": "smooth_cutoff",
                "radial_fn": "basic_fourier",
                "radial_kwargs": {},
                "max_degree": 4,
                "num": 24,
            },
        },
        "mlp": {
            "mlp_layer_widths": [32, 16, 32],
            "mlp_dtype": "float32",
            "mlp_activation_function": "bent_identity",
            # fused tensor products in the on-site and pair readouts: 1.4x faster
            # bonds on CPU and the paper's parameter count (80,256 here for its WSe2
            # listing against 82,909; unfused: 115,008).  Checkpoints keep theirs.
            "readout_fused_tensor": True,
        },
    },
    "optimizer": {
        "lr": 0.005,
        "name": "adan",
        "opt_kwargs": {"weight_decay": 0.001},
        "grad_clip": 1.0,
        "schedule": {
            # "warmup_cosine": linear warm-up over warmup_fraction of the budget, then a
            # cosine decay to final_scale that ends when the budget ends (n_epochs or
            # training.max_minutes, whichever comes first); "reduce_on_plateau": the
            # paper's (factor, patience, rtol, atol, cooldown, min_scale); null: constant
            "name": "reduce_on_plateau",
            "warmup_fraction": 0.02,
            "final_scale": 0.01,
            "factor": 0.9,
            "patience": 50,
            "min_scale": 0.01,
            "rtol": 0.01,
            "atol": 0.0,
            "cooldown": 25,
            "accumulation_size": None,
        },
    },
    "loss": {
        "name": "weighted_mse_and_rmse",
        "loss_parameters": {
            "off_diagonal_weight": 4.0,
            "on_diagonal_weight": 1.0,
            "mse_weight": 1.0,
            "rmse_weight": 1.0,
            "loss_multiplier": 5.0,
            # our keys: a loss on the Gamma-point eigenvalues of (H, S) within
            # eigenvalue_window eV of the Fermi level, weighted like the H terms, used
            # (with all bonds of every structure) once eigenvalue_start of the budget
            # has passed; 0 switches it off
            "eigenvalue_weight": 0.0,
            "eigenvalue_window": 5.0,
            "eigenvalue_start": 0.5,
            # our key: a loss on the residuals of the reference's Gamma-point states
            # within eigenvalue_window of E_F under the predicted H, in the S^-1 norm
            # (||(H_pred - e_n S) c_n||, a bound on each level's error that weighs S's
            # near-null directions as the eigenvalues do); every step, on the step's
            # bonds, no diagonalisation; weighted like the H terms; 0 switches it off
            "residual_weight": 0.0,
            # our keys: a loss on the rows and columns of H in S's canonical basis that
            # belong to S's near-null directions at Gamma (eigenvalue < null_cutoff),
            # couplings included, in the same norm (||C^T dH x_p|| with x_p = u_p /
            # sqrt(s_p)): those rows decide where the levels of the near-linearly
            # dependent part of the basis go (WSe2's spurious levels); every step, on
            # the step's bonds; weighted like the H terms; 0 switches it off
            "null_weight": 0.0,
            "null_cutoff": 3.0e-2,
            # our key: a loss on the first-order mean shift of each structure's levels
            # within eigenvalue_window of E_F, c = <dH, rho_w> with rho_w the window
            # density matrix of the reference (H + aS gives c = a); Gamma-only data;
            # weighted like the H terms; 0 switches it off
            "shift_weight": 0.0,
            # with the pair blocks' part too (false: on-site blocks only, whose part
            # carries the shift, without the noise of a subsample of bonds)
            "shift_pairs": False,
        },
    },
    "training": {
        "n_epochs": 100,
        "seed": 0,
        "num_devices": 1,
        "max_minutes": None,
        # exponential moving average of the weights, used for validation and saved in
        # model.ckpt (0: off); its decay ramps up as (1 + t) / (10 + t) over step t
        "ema_decay": 0.0,
        # fit the reliability reference (distance of atom descriptors to the
        # training set) into model.ckpt when training ends
        "reliability": True,
        # start from the weights of a trained model of the same network (a model.ckpt or
        # latest.ckpt; elements, basis sets and model settings must match) with a new
        # optimiser and schedule: fine-tuning, e.g. with another loss.  The model's
        # statistics come along, so that its weights keep their meaning.  null: the
        # initial weights of training.seed.  --resume ignores it.
        "init_params": None,
        "checkpoint_every": 1,
        "valid_every": 1,
    },
}

# expected types for leaves whose default is None or that accept several types
_TYPES = {
    "data.train_data_path": _PATHS,
    "data.val_data_path": _PATHS,
    "data.n_train": (int, type(None)),
    "data.n_valid": (int, type(None)),
    "data.valid_structures": (list, type(None)),
    "data.bond_pad_multiple": (int, type(None)),
    "data.bond_fraction": (int, float),
    "data.sampling_alpha": (int, float),
    "optimizer.lr": (int, float),
    "optimizer.grad_clip": (int, float, type(None)),
    "optimizer.schedule.name": (str, type(None)),
    "optimizer.schedule.accumulation_size": (int, type(None)),
    "optimizer.schedule.atol": (int, float),
    "optimizer.schedule.rtol": (int, float),
    "optimizer.schedule.factor": (int, float),
    "optimizer.schedule.min_scale": (int, float),
    "model.atom_centered.descriptor.radial_basis.cutoff": (int, float),
    "model.bond_centered.cutoff": (int, float),
    "training.max_minutes": (int, float, type(None)),
    "training.init_params": (str, type(None)),
    "training.num_devices": (int, str),
}
_FREE = {
    "optimizer.opt_kwargs",
    "model.atom_centered.descriptor.mp_basis_options.radial_kwargs",
    "model.bond_centered.bond_expansion_options.radial_kwargs",
}
_CHOICES = {
    "data.energy_unit": ("eV",),
    "data.pos_unit": ("Ang", "Angstrom", "A"),
    "loss.name": ("weighted_mse_and_rmse",),
    "model.bond_centered.tensor_module": ("fused_tensor", "tensor"),
    "model.bond_centered.tensor_module_dtype": ("float32",),
    "model.bond_centered.evaluation": ("once", "both_orientations"),
    "model.bond_centered.baseline": ("none", "two_centre"),
    "model.atom_centered.baseline": ("none", "two_centre"),
    "model.mlp.mlp_dtype": ("float32",),
    "model.mlp.mlp_activation_function": (
        "bent_identity",
        "mish",
        "silu",
        "swish",
        "gelu",
        "shifted_softplus",
        "relu",
    ),
    "model.atom_centered.descriptor.descriptor_name": ("ShallowTDSAAtomCenteredDescriptor",),
    "optimizer.schedule.name": ("reduce_on_plateau", "warmup_cosine", None),
}
for _k in (
    "model.atom_centered.descriptor.mp_basis_options",
    "model.bond_centered.bond_expansion_options",
):
    _CHOICES[_k + ".cutoff_fn"] = ("smooth_cutoff", "cosine_cutoff")
    _CHOICES[_k + ".radial_fn"] = (
        "basic_fourier",
        "basic_bernstein",
        "basic_chebyshev",
        "basic_gaussian",
    )


def _type_name(t):
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return "null" if t is type(None) else t.__name__


def _merge(default, given, where):
    out = copy.deepcopy(default)
    if not isinstance(given, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping, got {type(given).__name__}")
    for key, value in given.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in default:
            raise ConfigError(
                f"unknown key '{path}'; known keys here: {', '.join(sorted(default))}"
            )
        d = default[key]
        if path in _FREE:
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
            out[key] = value
        elif isinstance(d, dict):
            out[key] = _merge(d, value if value is not None else {}, path)
        else:
            expected = _TYPES.get(path)
            if expected is None:
                expected = (int, float) if type(d) is float else type(d)
            ok = isinstance(value, expected) and not (
                isinstance(value, bool)
                and bool not in (expected if isinstance(expected, tuple) else (expected,))
            )
            if not ok:
                raise ConfigError(
                    f"'{path}' must be {_type_name(expected)}, got "
                    f"{value!r} ({type(value).__name__})"
                )
            if path in _CHOICES and value not in _CHOICES[path]:
                raise ConfigError(f"'{path}' must be one of {list(_CHOICES[path])}, got {value!r}")
            out[key] = value
    return out


def check_config(given: dict | None) -> dict:
    """Merge a user config into the defaults, checking keys, types and values."""
    cfg = _merge(DEFAULTS, given or {}, "")
    d = cfg["data"]
    if not d["train_data_path"]:
        raise ConfigError(
            "'data.train_data_path' is required: a dataset folder written by "
            "python -m gpaw_tools.extract (or a list of them)"
        )
    if not 0 < d["bond_fraction"] <= 1:
        raise ConfigError(f"'data.bond_fraction' must be in (0, 1], got {d['bond_fraction']}")
    for k in (
        "batch_size",
        "valid_batch_size",
        "atoms_pad_multiple",
        "nl_pad_multiple",
        "bond_pad_multiple",
    ):
        if d[k] is not None and d[k] < 1:
            raise ConfigError(f"'data.{k}' must be >= 1, got {d[k]}")
    desc = cfg["model"]["atom_centered"]["descriptor"]
    if desc["mp_steps"] < 0 or desc["num_tensordenses"] < 0:
        raise ConfigError("'mp_steps' and 'num_tensordenses' must be >= 0")
    if desc["mp_type"] not in ("attention", "density"):
        raise ConfigError(
            "'model.atom_centered.descriptor.mp_type' must be 'attention' or 'density', "
            f"got {desc['mp_type']!r}"
        )
    for k in ("model.atom_centered.descriptor.radial_basis.cutoff", "model.bond_centered.cutoff"):
        node = cfg
        for part in k.split("."):
            node = node[part]
        if node <= 0:
            raise ConfigError(f"'{k}' must be > 0 (Angstrom), got {node}")
    o, t = cfg["optimizer"], cfg["training"]
    checks = (
        ("optimizer.lr", o["lr"], lambda v: v > 0, "a finite number > 0"),
        (
            "optimizer.schedule.warmup_fraction",
            o["schedule"]["warmup_fraction"],
            lambda v: 0 <= v < 1,
            "in [0, 1)",
        ),
        (
            "optimizer.schedule.final_scale",
            o["schedule"]["final_scale"],
            lambda v: 0 <= v <= 1,
            "in [0, 1]",
        ),
        ("training.ema_decay", t["ema_decay"], lambda v: 0 <= v < 1, "in [0, 1)"),
        (
            "loss.loss_parameters.eigenvalue_weight",
            cfg["loss"]["loss_parameters"]["eigenvalue_weight"],
            lambda v: v >= 0,
            ">= 0",
        ),
        (
            "loss.loss_parameters.residual_weight",
            cfg["loss"]["loss_parameters"]["residual_weight"],
            lambda v: v >= 0,
            ">= 0",
        ),
        (
            "loss.loss_parameters.null_weight",
            cfg["loss"]["loss_parameters"]["null_weight"],
            lambda v: v >= 0,
            ">= 0",
        ),
        (
            "loss.loss_parameters.null_cutoff",
            cfg["loss"]["loss_parameters"]["null_cutoff"],
            lambda v: 0 < v < 1,
            "in (0, 1) (S's eigenvalues below it count as near-null)",
        ),
        (
            "loss.loss_parameters.shift_weight",
            cfg["loss"]["loss_parameters"]["shift_weight"],
            lambda v: v >= 0,
            ">= 0",
        ),
        (
            "loss.loss_parameters.eigenvalue_window",
            cfg["loss"]["loss_parameters"]["eigenvalue_window"],
            lambda v: v > 0,
            "> 0 (eV)",
        ),
        (
            "loss.loss_parameters.eigenvalue_start",
            cfg["loss"]["loss_parameters"]["eigenvalue_start"],
            lambda v: 0 <= v < 1,
            "in [0, 1) (a fraction of the budget)",
        ),
    )
    for key, value, ok, what in checks:
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"'{key}' must be {what}, got {value}")
    if t["n_epochs"] < 1:
        raise ConfigError(f"'training.n_epochs' must be >= 1, got {t['n_epochs']}")
    if t["max_minutes"] is not None and not t["max_minutes"] > 0:
        raise ConfigError(f"'training.max_minutes' must be > 0 or null, got {t['max_minutes']}")
    nd = cfg["training"]["num_devices"]
    if isinstance(nd, str) and nd != "all":
        raise ConfigError(f"'training.num_devices' must be an integer or 'all', got {nd!r}")
    return cfg


def _yaml(text: str):
    """YAML with numbers like ``1e-5`` read as floats (YAML 1.2; PyYAML's YAML 1.1
    rules read them as strings, which a config check would then refuse)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)


def apply_overrides(given: dict, overrides) -> dict:
    """``given`` with ``KEY=VALUE`` strings applied (``training.seed=1``,
    ``data.valid_structures=[a, b]``): KEY is a dotted path into the config, VALUE is
    read as YAML.  Returns a new dict; ``given`` is not changed."""
    import copy

    import yaml

    out = copy.deepcopy(given or {})
    if overrides and not isinstance(out, dict):
        raise ConfigError(f"expected a config mapping of sections, got {type(out).__name__}")
    for item in overrides or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"a config override must look like 'section.key=value' (for example "
                f"training.seed=1), got {item!r}"
            )
        try:
            value = _yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
        node, parts = out, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: '{where}' is a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides=None) -> dict:
    """Read a YAML config, apply ``overrides`` (``KEY=VALUE`` strings,
    :func:`apply_overrides`) and check it (:func:`check_config`).  A missing file
    raises FileNotFoundError; a file that is not YAML text, ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        given = _yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file ({err})") from None
    if given is not None and not isinstance(given, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of sections, got {type(given).__name__}"
        )
    return check_config(apply_overrides(given or {}, overrides))


def model_settings(cfg: dict, n_species: int, out_max_degree: int, out_features: int) -> dict:
    """Translate the ``model`` section into :class:`ase_gearsh.model.ModelSettings` kwargs."""
    desc = cfg["model"]["atom_centered"]["descriptor"]
    rb = desc["radial_basis"]
    mpb = desc["mp_basis_options"]
    bond = cfg["model"]["bond_centered"]
    be = bond["bond_expansion_options"]
    mlp = cfg["model"]["mlp"]
    return dict(
        n_species=n_species,
        out_max_degree=out_max_degree,
        out_features=out_features,
        cutoff=float(rb["cutoff"]),
        num_radial=rb["num_radial"],
        radial_max_degree=rb["max_degree"],
        num_elemental_embedding=rb["num_elemental_embedding"],
        num_tensordenses=desc["num_tensordenses"],
        max_tensordense_degree=desc["max_tensordense_degree"],
        num_tensordense_features=desc["num_tensordense_features"],
        use_fused_tensor=desc["use_fused_tensor"],
        mp_steps=desc["mp_steps"],
        mp_type=desc["mp_type"],
        mp_degree=desc["mp_degree"],
        mp_num_heads=desc["mp_options"].get("num_heads", 4),
        mp_qkv_features=desc["mp_options"].get("qkv_features", 32),
        mp_basis_max_degree=mpb["max_degree"],
        mp_basis_num=mpb["num"],
        mp_radial_fn=mpb["radial_fn"],
        mp_cutoff_fn=mpb["cutoff_fn"],
        bond_cutoff=float(bond["cutoff"]),
        bond_max_degree=bond["max_degree"],
        bond_tensor=bond["tensor_module"],
        bond_basis_max_degree=be["max_degree"],
        bond_basis_num=be["num"],
        bond_radial_fn=be["radial_fn"],
        bond_cutoff_fn=be["cutoff_fn"],
        mlp_layer_widths=tuple(mlp["mlp_layer_widths"]),
        activation=mlp["mlp_activation_function"],
        readout_fused_tensor=bool(mlp["readout_fused_tensor"]),
        bond_evaluation=bond["evaluation"],
        odd_features=int(bond["odd_features"]),
    )

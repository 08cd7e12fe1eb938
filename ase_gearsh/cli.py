"""The ``gearsh`` command: ``train CONFIG``, ``eval MODEL DATASET``,
``predict STRUCTURE -m MODEL -o OUT``, ``attach-basis MODEL``,
``attach-reliability MODEL DATASET [DATASET...]``, ``committee MODEL MODEL [...] -o OUT``,
``check DATASET [DATASET...]``."""

from __future__ import annotations

import argparse
import json
import sys

from ase.calculators.calculator import CalculatorSetupError, PropertyNotPresent

from .bands import register as register_bands
from .core.data import check_dataset
from .core.errors import GearsHError
from .core.memory import keep_freed_memory
from .core.processes import Interrupted, interrupt_on_sigterm
from .export import register as register_export
from .model.checkpoint import load_checkpoint
from .model.committee import build_committee
from .model.engine import enable_compilation_cache
from .model.reliability import reference_summary
from .predict import format_summary_table, parse_kpts, predict_many, predict_structure
from .training.attach import attach_basis, attach_reliability, dataset_structures
from .training.evaluate import evaluate
from .training.train import train

__all__ = ["main", "USER_ERRORS"]

# errors that are the user's (bad input, files, options): one line, exit status 2
USER_ERRORS = (GearsHError, CalculatorSetupError, PropertyNotPresent, OSError)


def _train(args: argparse.Namespace) -> None:
    run = train(
        args.config,
        resume=args.resume,
        output=args.output,
        progress=not args.quiet,
        overrides=args.set,
    )
    print(f"finished: {run}/model.ckpt (best), {run}/metrics.csv, {run}/loss.png")


# gearsh eval points to --overlap-cutoff below this smallest eigenvalue of S (WSe2 in
# szp(dzp): 4e-4; molecules 0.018 and more, h-BN 0.048)
NEAR_SINGULAR = 2e-3


def _eval(args: argparse.Namespace) -> None:
    s = evaluate(
        args.model,
        args.dataset,
        output=args.output,
        limit=args.limit,
        progress=not args.quiet,
        validation_only=args.validation_only,
        overlap_cutoff=args.overlap_cutoff,
    )
    print(f"{s['structures']} structures of {s['dataset']}")
    print(
        f"  H MAE          {s['h_mae_meV']:9.3f} meV   (on-site {s['h_mae_onsite_meV']:.3f},"
        f" pair {s['h_mae_pair_meV']:.3f})"
    )
    print(
        f"  eigenvalue MAE {s['eig_mae_window_meV']:9.3f} meV   within +-5 eV of E_F "
        f"(all states {s['eig_mae_all_meV']:.3f})"
    )
    print(
        f"  of which shift {s['eig_abs_shift_meV']:9.3f} meV   mean |common shift| of a "
        f"structure's eigenvalues; MAE without it {s['eig_mae_window_unshifted_meV']:.3f}"
    )
    off = s["eig_level_offset_max"]
    print(
        f"  aligned        {s['eig_mae_window_aligned_meV']:9.3f} meV   the window's levels "
        f"against the reference's with their index moved by the best whole number; "
        + (
            "no move needed"
            if off == 0
            else f"largest move {off}: the predicted spectrum has {off} levels too many or "
            f"too few below the window, so E_F by electron counting is off by as many states"
        )
    )
    nn = s["near_null_occupied_max"]
    print(
        f"  near-null      {nn:9d}       occupied predicted levels along S's near-null "
        f"directions (|c|^2 > 50; known without DFT, GearsHCalculator.get_near_null_levels), "
        f"largest per k-point"
    )
    if s["overlap_min_eigenvalue"] < NEAR_SINGULAR and not s.get("overlap_cutoff"):
        print(
            f"  note: S is nearly singular (smallest eigenvalue "
            f"{s['overlap_min_eigenvalue']:.1e}), which amplifies H errors into level "
            f"shifts; see --overlap-cutoff (e.g. 1e-3 to 1e-2; docs/inference.md)"
        )
    if s.get("overlap_cutoff"):
        print(
            f"  overlap cut-off {s['overlap_cutoff']:g}: the DFT H itself with this cut-off "
            f"is off by {s['eig_mae_window_cutoff_floor_meV']:.3f} meV (within +-5 eV)"
        )
    if "committee_spread_meV" in s:
        rho = s.get("committee_spread_spearman")
        print(
            f"  committee      {s['committee_spread_meV']:9.3f} meV   mean spread of the "
            f"{s['committee_members']} members' H"
            + ("" if rho is None else f" (Spearman rank correlation with the H MAE {rho:+.2f})")
        )
    if args.output:
        print(f"  wrote {args.output}/summary.json, structures.csv, errors.png, parity.png")
    if args.json:
        print(json.dumps(s, indent=1))


def _predict(args: argparse.Namespace) -> int | None:
    if args.keep_freed_memory and not keep_freed_memory(children=True):
        print("--keep-freed-memory: glibc's mallopt not available here, ignored", file=sys.stderr)
    options = dict(
        kpts=parse_kpts(args.kpts),
        width=args.width,
        npts=args.npts,
        emin=args.emin,
        emax=args.emax,
        method=args.method,
        charge=args.charge,
        index=args.index,
        holes=args.holes,
        hole_window=args.hole_window,
        fermi_guess=args.fermi_guess,
        overlap_screen=args.overlap_screen,
        overlap_cutoff=args.overlap_cutoff,
        pdos=args.pdos,
        resolution_at=args.resolution_at,
    )
    if len(args.structure) == 1:
        predict_structure(
            args.structure[0],
            args.model,
            args.output,
            progress=not args.quiet,
            overwrite=args.overwrite,
            **options,
        )
        return None
    rows, failed = predict_many(
        args.structure,
        args.model,
        args.output,
        jobs=args.jobs,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **options,
    )
    print(format_summary_table(rows))
    print(f"wrote {args.output}/summary.csv and one folder per structure")
    for name, msg in failed:
        print(f"  failed: {name}: {msg}", file=sys.stderr)
    return 1 if failed else None


def _attach(args: argparse.Namespace) -> None:
    out = attach_basis(
        args.model,
        xc=args.xc,
        setups=args.setups,
        output=args.output,
        dataset=args.dataset,
        force=args.force,
    )
    print(f"wrote {out} with basis functions of {args.xc}/{args.setups} GPAW setups")


def _attach_reliability(args: argparse.Namespace) -> None:
    names = None
    if not args.all_structures:
        names = set(load_checkpoint(args.model)["extra"].get("train_names") or []) or None
    ref = attach_reliability(
        args.model,
        dataset_structures(args.datasets, names, args.model),
        output=args.output,
        max_reference=args.max_reference,
        n_components=args.components,
        progress=not args.quiet,
    )
    which = "every structure" if names is None else "the training structures"
    print(f"wrote {args.output or args.model} with a reliability reference from {which}")
    print(f"  {reference_summary(ref)}")


def _committee(args: argparse.Namespace) -> None:
    out = build_committee(args.models, args.output)
    n = len(load_checkpoint(out).get("members") or {}) + 1
    print(f"wrote {out}: a committee of {n} members (predictions are their mean)")


def _check(args: argparse.Namespace) -> int:
    status = 0
    for folder in args.datasets:
        good, problems = check_dataset(folder, eigenvalue_tolerance=args.eigenvalue_tolerance)
        print(f"{folder}: {good} good structure(s), {len(problems)} problem(s)")
        for name, what in problems:
            print(f"  {name}: {what}")
        if problems:
            status = 1
            print(
                "  fix: re-extract a damaged entry with `python -m gpaw_tools.extract "
                f"RUN.gpw -o {folder} --overwrite`, or delete it"
            )
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``gearsh``; returns the exit status (2 and one line on stderr for a user
    error, see :data:`USER_ERRORS`)."""
    p = argparse.ArgumentParser(
        prog="gearsh", description="GEARS H machine-learned Hamiltonians: training and evaluation"
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config")
    t.add_argument("-o", "--output", help="run folder (default data.directory/experiment)")
    t.add_argument("--resume", action="store_true", help="continue from latest.ckpt")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value), e.g. --set training.seed=1; "
        "may be repeated; pass the same ones with --resume (it checks only the model "
        "settings, so other keys would silently change)",
    )
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="H and eigenvalue errors of a model on a dataset")
    e.add_argument("model")
    e.add_argument("dataset")
    e.add_argument("-o", "--output", help="folder for summary.json, CSV and PNG files")
    e.add_argument("--limit", type=int, help="only the first N structures")
    e.add_argument(
        "--validation-only",
        action="store_true",
        help="only the structures the model was validated on (held out)",
    )
    e.add_argument(
        "--overlap-cutoff",
        type=float,
        default=0.0,
        help="predicted eigenvalues without the directions of S with eigenvalues below "
        "this (canonical orthogonalisation, as the calculator's overlap_cutoff; "
        "default 0: the full basis)",
    )
    e.add_argument("--json", action="store_true", help="also print the summary as JSON")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)
    r = sub.add_parser("predict", help="predicted H, exact S, spectrum and DOS of a structure")
    r.add_argument(
        "structure",
        nargs="+",
        help="any file ase.io.read understands; several: a batch, one folder each",
    )
    r.add_argument("-m", "--model", required=True, help="model.ckpt")
    r.add_argument(
        "-o",
        "--output",
        required=True,
        help="output folder (must not exist); with several structures the parent of "
        "one folder per structure (finished ones are skipped: the batch resumes)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace output folders that exist")
    r.add_argument("--jobs", type=int, default=1, help="parallel processes for a batch (1)")
    r.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for the next structure instead of returning it: "
        "faster at device scale, resident memory stays at its peak (docs/inference.md)",
    )
    r.add_argument(
        "--holes",
        metavar="EL,EL",
        help="elements whose projected DOS from E_F to E_F + --hole-window is the hole "
        "count (e.g. W,Se)",
    )
    r.add_argument("--hole-window", type=float, default=0.2, help="hole window above E_F, eV (0.2)")
    r.add_argument(
        "--pdos",
        default="species",
        help="projected DOS in dos.csv: 'species' (each species) or 'holes' (the --holes "
        "elements as one row; with KPM two moments per step, faster at device scale)",
    )
    r.add_argument(
        "--fermi-guess",
        type=float,
        help="with --method exact: the first shift of the Fermi-level search, eV (e.g. the "
        "level of a similar structure; default: from the local DOS of small clusters)",
    )
    r.add_argument("--kpts", help="Gamma-centred k-grid, e.g. 4,4,1 (default: Gamma only)")
    r.add_argument("--width", type=float, default=0.1, help="DOS broadening, eV (0.1)")
    r.add_argument("--npts", type=int, default=2001, help="DOS energy points (2001)")
    r.add_argument("--emin", type=float, help="DOS window start, eV")
    r.add_argument("--emax", type=float, help="DOS window end, eV")
    r.add_argument(
        "--method",
        choices=["auto", "dense", "kpm", "exact"],
        default="auto",
        help="spectrum solver (auto: dense up to 20000 orbitals, then KPM; exact: the "
        "exact states in --emin..--emax, default E_F -+ 2 eV, and E_F from a sparse "
        "LDL^T factorisation, Gamma only, any size)",
    )
    r.add_argument("--charge", type=float, default=0.0, help="net charge (e)")
    r.add_argument(
        "--resolution-at",
        choices=["interval", "fermi"],
        help="KPM: where the DOS has the resolution --width ('interval', default: "
        "everywhere; 'fermi': within 1.5 eV of E_F, where the hole count is read, with "
        "fewer moments when E_F lies far from the spectrum's centre)",
    )
    r.add_argument(
        "--overlap-screen",
        type=float,
        help="S leaves out elements below half of this and projector terms below a "
        "20th (default 1e-8; 0: GPAW's S to rounding)",
    )
    r.add_argument(
        "--overlap-cutoff",
        type=float,
        help="dense spectra without the directions of S with eigenvalues below this "
        "(canonical orthogonalisation; default 0: the full basis; e.g. 1e-3 for bases "
        "with near-linear dependences such as W and Se szp(dzp))",
    )
    r.add_argument("--index", default=-1, help="frame of a multi-frame file (default last)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=_predict)
    b = sub.add_parser(
        "attach-basis",
        help="store basis functions (for the exact S) in a checkpoint that lacks them",
    )
    b.add_argument("model")
    b.add_argument("--xc", default="PBE", help="functional of the training data (PBE)")
    b.add_argument("--setups", default="paw")
    b.add_argument("-o", "--output", help="write here instead of in place")
    b.add_argument(
        "--dataset",
        help="training dataset: also store the training coverage used for extrapolation warnings",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="store the basis of --xc even if the model's data records another functional",
    )
    b.set_defaults(func=_attach)
    a = sub.add_parser(
        "attach-reliability",
        help="store the reference of the reliability figure (distance of each atom's "
        "descriptor to the training set) in a checkpoint",
    )
    a.add_argument("model")
    a.add_argument("datasets", nargs="+", metavar="dataset", help="training dataset folder(s)")
    a.add_argument("-o", "--output", help="write here instead of in place")
    a.add_argument(
        "--all-structures",
        action="store_true",
        help="use every structure of the datasets (default: only the checkpoint's "
        "training structures, when it records them)",
    )
    a.add_argument(
        "--max-reference", type=int, default=128, help="reference atoms per element (128)"
    )
    a.add_argument("--components", type=int, default=8, help="principal components (8)")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=_attach_reliability)
    m = sub.add_parser(
        "committee",
        help="combine checkpoints of one network (e.g. trained with different seeds) into "
        "one whose predictions are the members' mean",
    )
    m.add_argument("models", nargs="+", metavar="model", help="two or more checkpoints")
    m.add_argument("-o", "--output", required=True, help="the committee's checkpoint")
    m.set_defaults(func=_committee)
    c = sub.add_parser(
        "check",
        help="list corrupt or inconsistent entries of datasets (exit status 1 if any)",
    )
    c.add_argument("datasets", nargs="+", metavar="dataset")
    c.add_argument(
        "--eigenvalue-tolerance",
        type=float,
        default=1e-3,
        metavar="EV",
        help="largest accepted eigenvalue error recorded at extraction (1e-3 eV)",
    )
    c.set_defaults(func=_check)
    register_bands(sub)
    register_export(sub)
    args = p.parse_args(argv)
    enable_compilation_cache()  # process-wide JAX setting: the command's, not the library's
    try:
        with interrupt_on_sigterm():
            return args.func(args) or 0
    except USER_ERRORS as err:
        print(f"gearsh {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(
            f"gearsh {args.command}: interrupted ({stop}); every file written is complete"
            + (" (resume with --resume)" if args.command == "train" else ""),
            file=sys.stderr,
        )
        return 128 + stop.signum


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (some come from GPAW or ASE with line breaks)."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())

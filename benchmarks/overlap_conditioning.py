"""How a nearly singular overlap amplifies errors of H into eigenvalue errors, and what
canonical orthogonalisation (``overlap_cutoff``) does about it.

    python benchmarks/overlap_conditioning.py DATASET [--index 0] [--cutoffs 0 1e-3 3e-3 1e-2]
                                              [--onsite-meV 15] [--pair-meV 1.3]
                                              [--model CKPT] [--validation-only]

For one structure of a dataset (GPAW's H(k) and S(k) at its k-points), printed per cut-off:

* S: its smallest eigenvalue and how many directions each cut-off removes;
* the DFT H itself solved with the cut-off: the eigenvalue MAE within E_F +- 5 eV against
  the full basis (what the cut-off costs: the floor);
* the DFT H plus random symmetric errors with the given mean absolute size on the on-site
  and pair blocks (a stand-in for a model's errors): the eigenvalue MAE and its mean
  (common shift) with and without the cut-off.

With ``--model``: ``gearsh eval`` of that checkpoint on the dataset at each cut-off, and
for the structure ``--index``: the mean error of the model's on-site diagonal elements
per element, the residual of the reference's Gamma-point window states under the model's
H (what ``loss_parameters.residual_weight`` trains), and the eigenvalue MAE with only its
on-site blocks (pairs from DFT) or only its pair blocks, at each cut-off.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg as la

WINDOW = 5.0  # eV around E_F, as gearsh eval


def _sym_onsite(x, counts):
    out, o = [], 0
    for n in counts:
        b = x[o : o + n * n].reshape(n, n)
        out.append((0.5 * (b + b.T)).ravel())
        o += n * n
    return np.concatenate(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--cutoffs", type=float, nargs="+", default=[0.0, 1e-3, 3e-3, 1e-2])
    p.add_argument("--onsite-meV", type=float, default=15.0, help="MAE of on-site errors")
    p.add_argument("--pair-meV", type=float, default=1.3, help="MAE of pair-block errors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a checkpoint: gearsh eval at each cut-off")
    p.add_argument("--validation-only", action="store_true")
    p.add_argument(
        "--swap",
        action="store_true",
        help="with --model: the model's H with its rows along S's near-null directions "
        "replaced by the reference's (how much of the level error those rows carry)",
    )
    p.add_argument(
        "--lift", type=float, default=20.0, help="with --swap: eV above E_F for the lift"
    )
    a = p.parse_args(argv)
    from ase_gearsh.core.blocks import assemble
    from ase_gearsh.core.data import Dataset
    from ase_gearsh.electronic.dense import solve_dense

    s = Dataset(a.dataset)[a.index]
    arr = s.arrays
    counts = arr["orbital_counts"]
    onH, prH = np.asarray(arr["onsite_H"][0], float), np.asarray(arr["pair_H"][0], float)
    kpts, ef = arr["kpts"], s.fermi_level
    print(
        f"{s.meta['source']['name']}: {s.atoms.get_chemical_formula()}, {counts.sum()} "
        f"orbitals, {len(kpts)} k-points, E_F {ef:.3f} eV",
        flush=True,
    )
    Sk = [s.overlap(k) for k in kpts]
    lam = [la.eigvalsh(S) for S in Sk]
    print(
        f"smallest eigenvalue of S(k): {min(x[0] for x in lam):.2e} .. {max(x[0] for x in lam):.2e}"
    )
    rng = np.random.default_rng(a.seed)
    c = np.sqrt(np.pi / 2) * 1e-3  # Gaussian sigma from a mean absolute value in meV
    on_n = onH + _sym_onsite(rng.standard_normal(onH.shape) * a.onsite_meV * c, counts)
    pr_n = prH + rng.standard_normal(prH.shape) * a.pair_meV * c

    def levels(on, pr, q, cut, n_keep=None):
        H = assemble(counts, on, arr["pair_ij"], arr["pair_shift"], pr, kpt=kpts[q])
        return solve_dense(H, Sk[q], overlap_cutoff=cut, n_keep=n_keep)[0]

    ref = [levels(onH, prH, q, 0.0) for q in range(len(kpts))]
    print(
        f"random errors: on-site MAE {a.onsite_meV:g} meV, pair MAE {a.pair_meV:g} meV "
        f"(seed {a.seed}); eigenvalue errors within E_F +- {WINDOW:g} eV (meV)"
    )
    print(f"{'cut-off':>8} {'removed':>9} {'floor':>8} {'noisy MAE':>10} {'mean':>8} {'time':>6}")
    for cut in a.cutoffs:
        t = time.perf_counter()
        floor, noisy, removed = [], [], []
        for q, e0 in enumerate(ref):
            keep = int((lam[q] >= cut).sum())
            removed.append(len(e0) - keep)
            m = np.abs(e0 - ef) <= WINDOW
            floor.append(levels(onH, prH, q, cut, keep)[: len(e0)][m[:keep]] - e0[:keep][m[:keep]])
            noisy.append(levels(on_n, pr_n, q, cut, keep)[m[:keep]] - e0[:keep][m[:keep]])
        floor, noisy = np.concatenate(floor), np.concatenate(noisy)
        print(
            f"{cut:8.0e} {min(removed):4d}-{max(removed):<4d} {1e3 * np.abs(floor).mean():8.2f} "
            f"{1e3 * np.abs(noisy).mean():10.1f} {1e3 * noisy.mean():8.1f} "
            f"{time.perf_counter() - t:5.1f}s",
            flush=True,
        )
    if a.model:
        from ase_gearsh.model.engine import Model
        from ase_gearsh.model.inference import predictor_for
        from ase_gearsh.training.evaluate import evaluate, predict_structure_blocks

        on_m, pr_m = predict_structure_blocks(predictor_for(Model.from_checkpoint(a.model)), s)
        d_on, o, diag = on_m - onH, 0, {}
        for sym, n in zip(s.atoms.get_chemical_symbols(), counts):
            diag.setdefault(sym, []).append(np.diag(d_on[o : o + n * n].reshape(n, n)).mean())
            o += n * n
        print(
            f"\nmodel {a.model} on {s.meta['source']['name']}: mean error of the on-site "
            "diagonal elements "
            + ", ".join(f"{k} {1e3 * np.mean(v):+.1f} meV" for k, v in sorted(diag.items()))
        )
        # what the residual loss (loss_parameters.residual_weight) measures: the window
        # states of the reference at the cell's Gamma point, ||(H_model - e_n S) c_n||
        # in the S^-1 norm (a bound on each level's error)
        H0, S0 = s.hamiltonian(), s.overlap()
        e0, C0 = la.eigh(H0, S0)
        w0 = np.abs(e0 - ef) <= WINDOW
        Hm = assemble(counts, on_m, arr["pair_ij"], arr["pair_shift"], pr_m)
        r = np.linalg.norm(C0.T @ (Hm - H0) @ C0[:, w0], axis=0)
        em = la.eigh(Hm, S0, eigvals_only=True)
        print(
            f"Gamma point, {w0.sum()} window states: residual ||(H_model - e_n S) c_n|| "
            f"(S^-1 norm) rms {np.sqrt((r**2).mean()):.3f} eV, largest {r.max():.3f} eV; "
            f"eigenvalue MAE {1e3 * np.abs(em[w0] - e0[w0]).mean():.1f} meV"
        )
        # what the near-null loss (loss_parameters.null_weight) measures: the rows of
        # the model's H error along S's near-null directions x_p = u_p / sqrt(s_p)
        sw, U0 = np.linalg.eigh(S0)
        for cut in (1e-2, 3e-2):
            X = U0[:, sw < cut] / np.sqrt(sw[sw < cut])
            r = np.linalg.norm(C0.T @ (Hm - H0) @ X, axis=0)
            print(
                f"S's {X.shape[1]} directions below {cut:g}: ||C^T dH x_p|| rms "
                f"{np.sqrt((r**2).mean()):.3f} eV, largest {r.max():.3f} eV"
            )
        print(f"{'cut-off':>8} {'on-site only':>13} {'pairs only':>11} (eigenvalue MAE, meV)")
        for cut in a.cutoffs:
            parts = []
            for o_, p_ in ((on_m, prH), (onH, pr_m)):
                d = []
                for q, e0 in enumerate(ref):
                    keep = int((lam[q] >= cut).sum())
                    m = np.abs(e0[:keep] - ef) <= WINDOW
                    d.append(levels(o_, p_, q, cut, keep)[m] - e0[:keep][m])
                parts.append(1e3 * np.abs(np.concatenate(d)).mean())
            print(f"{cut:8.0e} {parts[0]:13.1f} {parts[1]:11.1f}", flush=True)

        if a.swap:
            _swap_report(s, on_m, pr_m, Sk, kpts, ef, a.cutoffs, a.lift)

        print(f"\ngearsh eval {a.model} (validation only: {a.validation_only})")
        print(
            f"{'cut-off':>8} {'H MAE':>7} {'eig MAE':>8} {'shift':>7} {'unshifted':>9} {'floor':>6}"
        )
        for cut in a.cutoffs:
            r = evaluate(
                a.model,
                a.dataset,
                progress=False,
                validation_only=a.validation_only,
                overlap_cutoff=cut,
            )
            print(
                f"{cut:8.0e} {r['h_mae_meV']:7.2f} {r['eig_mae_window_meV']:8.1f} "
                f"{r['eig_abs_shift_meV']:7.1f} {r['eig_mae_window_unshifted_meV']:9.1f} "
                f"{r.get('eig_mae_window_cutoff_floor_meV', 0.0):6.2f}",
                flush=True,
            )


def _swap_report(s, on_m, pr_m, Sk, kpts, ef, cutoffs, lift=20.0):
    """Levels of the model's H in S's canonical basis (X = U s^-1/2, every direction
    kept) with the rows and columns of the directions s < c taken from the reference:
    the null-null block alone, or those rows entirely (their coupling to the rest too).
    Aligned eigenvalue MAE within E_F +- 5 eV (meV) and the level offset, all k-points."""
    from ase_gearsh.core.blocks import assemble
    from ase_gearsh.training.evaluate import aligned_window_errors

    arr = s.arrays
    counts = arr["orbital_counts"]
    onH, prH = np.asarray(arr["onsite_H"][0], float), np.asarray(arr["pair_H"][0], float)
    canon = []
    for q, k in enumerate(kpts):
        lam, U = la.eigh(Sk[q])
        X = U / np.sqrt(lam)[None, :]
        Hr = assemble(counts, onH, arr["pair_ij"], arr["pair_shift"], prH, kpt=k)
        Hm = assemble(counts, on_m, arr["pair_ij"], arr["pair_shift"], pr_m, kpt=k)
        canon.append((lam, X.conj().T @ Hr @ X, X.conj().T @ Hm @ X))
    print(
        f"\nthe model's H with S's near-null rows from the reference ({len(kpts)} k-points; "
        "aligned eigenvalue MAE within E_F +- 5 eV, meV, and the largest level offset)"
    )
    lam, Hr, Hm = canon[0]
    few = np.argsort(lam)[:8]
    print(
        "S's smallest eigenvalues at the first k-point and the diagonal of H in those "
        "directions (u^H H u / s, eV), reference / model:\n"
        + "\n".join(f"  s {lam[i]:.2e}: {Hr[i, i].real:9.2f} / {Hm[i, i].real:9.2f}" for i in few)
    )
    print(
        f"lift: the model's null block with its eigenvalues below E_F + {lift:g} eV raised to "
        "that (no reference used)"
    )
    keys = ("model", "block", "rows", "lift")
    print(f"{'cut-off':>8} {'rows':>9} " + " ".join(f"{k:>12}" for k in keys))
    for cut in cutoffs:
        rows, res = [], {k: [] for k in keys}
        offs = {key: 0 for key in res}
        for lam, Hr, Hm in canon:
            e_ref = la.eigvalsh(Hr)
            win = np.abs(e_ref - ef) <= WINDOW
            n = lam < cut
            rows.append(int(n.sum()))
            block = Hm.copy()
            block[np.ix_(n, n)] = Hr[np.ix_(n, n)]
            full = Hm.copy()
            full[n, :], full[:, n] = Hr[n, :], Hr[:, n]
            lifted = Hm.copy()
            if n.any():
                c, V = la.eigh(Hm[np.ix_(n, n)])
                c = np.maximum(c, ef + lift)
                lifted[np.ix_(n, n)] = (V * c[None, :]) @ V.conj().T
            for key, Hx in (("model", Hm), ("block", block), ("rows", full), ("lift", lifted)):
                o, d = aligned_window_errors(la.eigvalsh(Hx), e_ref, win)
                res[key].append(d)
                offs[key] = max(offs[key], abs(o))
        cells = [
            f"{1e3 * np.abs(np.concatenate(res[key])).mean():8.1f} ({offs[key]:2d})" for key in keys
        ]
        print(f"{cut:8.0e} {min(rows):4d}-{max(rows):<4d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()

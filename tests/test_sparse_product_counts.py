"""How often a sparse solve streams its Jacobian: ours against scipy's (issue 13).

Each pass of a compiled CSR/CSC kernel over the Jacobian's entries is counted
(scipy's ``_sparsetools`` kernels, looked up by name at every product, and
the same kernels as :mod:`torchimize_scipy._engine.csr` calls them, summed
over its row blocks; floating-point values only: our column grouping's one
integer product of the 0/1 pattern is no pass over a Jacobian), as a multiple
of the Jacobian's entry count, together
with the iterations of every LSMR solve. LSMR itself makes two passes per
iteration on both sides; what a solve streams beyond them (starts of LSMR,
gradients, the 2-D subspace, the predicted reductions) must not exceed
scipy's. Counts, not timings: they do not depend on the machine's load.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import scipy.optimize._lsq.dogbox as scipy_dogbox
import scipy.optimize._lsq.trf as scipy_trf
import scipy.sparse as sp
import scipy.sparse._sparsetools as sparsetools
from _parity import assert_cost_close

from torchimize_scipy import least_squares
from torchimize_scipy._engine import csr
from torchimize_scipy._engine.steps import trf_lsmr


class _Passes:
    """Entries streamed by the counted kernels, and LSMR iterations, per solver."""

    def __init__(self, nnz: int) -> None:
        self.nnz = nnz
        self.passes = 0.0
        self.iterations = 0

    def kernel(self, orig, vectors: bool):
        def counted(*a):
            if vectors:  # (n_row, n_col, n_vecs, Ap, Aj, Ax, ...)
                k, ptr, values = a[2], a[3], a[5]
            else:  # (n_row, n_col, Ap, Aj, Ax, ...)
                k, ptr, values = 1, a[2], a[4]
            if values.dtype.kind in "fc":  # (not the integer product of the column grouping)
                self.passes += k * int(ptr[-1] - ptr[0]) / self.nnz
            return orig(*a)
        return counted

    def lsmr(self, orig, iterations):
        def counted(*a, **k):
            out = orig(*a, **k)
            self.iterations += iterations(out)
            return out
        return counted


def _problem(seed: int = 0, m: int = 400, n: int = 250):
    """Residuals ``A x + 0.1 (A x)^2 - b`` of a random sparse ``A``: J's pattern is A's."""
    rng = np.random.default_rng(seed)
    A = sp.random_array((m, n), density=0.03, random_state=rng, format="csr")
    A = (A + sp.eye_array(m, n, format="csr")).tocsr()
    b = rng.standard_normal(m)
    dense = A.toarray()  # (the residuals stream no sparse kernel of their own)

    def fun(x):
        y = dense @ x
        return y + 0.1 * y * y - b

    pattern = A.copy()
    pattern.data[:] = 1
    return fun, np.zeros(n), pattern


@pytest.mark.parametrize("method, bounded, x_scale", [
    ("trf", False, "jac"), ("trf", False, 1.0), ("trf", True, "jac"), ("dogbox", False, 1.0)])
def test_no_more_passes_over_the_jacobian_than_scipy(monkeypatch, method, bounded, x_scale):
    fun, x0, pattern = _problem()
    bounds = (-0.5, 0.5) if bounded else (-np.inf, np.inf)
    opts = dict(jac_sparsity=pattern, method=method, bounds=bounds, x_scale=x_scale,
                tr_solver="lsmr")
    counts = {}
    for who in ("scipy", "ours"):
        c = counts[who] = _Passes(pattern.nnz)
        with monkeypatch.context() as mp:
            for name in ("csr_matvec", "csc_matvec"):
                mp.setattr(sparsetools, name, c.kernel(getattr(sparsetools, name), False))
            for name in ("csr_matvecs", "csc_matvecs"):
                mp.setattr(sparsetools, name, c.kernel(getattr(sparsetools, name), True))
            mp.setattr(csr, "_csr_matvec", c.kernel(csr._csr_matvec, False))
            mp.setattr(csr, "_csc_matvec", c.kernel(csr._csc_matvec, False))
            if who == "scipy":
                for mod in (scipy_trf, scipy_dogbox):
                    mp.setattr(mod, "lsmr", c.lsmr(mod.lsmr, lambda out: int(out[2])))
                res = so.least_squares(fun, x0, **opts)
            else:
                mp.setattr(trf_lsmr, "lsmr",
                           c.lsmr(trf_lsmr.lsmr, lambda out: int(out.itn.sum())))
                res = least_squares(fun, x0, **opts)
        c.cost, c.nfev = float(res.cost), int(res.nfev)
    ours, ref = counts["ours"], counts["scipy"]
    assert ref.iterations > 10 and ours.iterations > 10  # (LSMR did run on both sides)
    assert_cost_close(ours.cost, ref.cost, 1e-8)
    # two passes per LSMR iteration on both sides; beyond them, no more than scipy
    assert ours.passes >= 2 * ours.iterations
    assert ours.passes - 2 * ours.iterations <= ref.passes - 2 * ref.iterations

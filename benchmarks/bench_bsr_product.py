"""scipy's block-sparse (BSR) product against its CSR product on a bundle-adjustment Jacobian.

Issue 13's bundle adjustment streams about 800 million Jacobian entries a
solve through CSR products (``csr_matvec``: a value and a 32-bit column index
per entry). Its pattern is exactly aligned 2 x 3 blocks (two residuals of an
observation against 9 camera and 3 point parameters), so a BSR product would
read one index per six values. This script builds the same pattern as
``bench_sparse.py --case ba`` (49 cameras, 7,776 points, 4 observations a
point, random values), checks that both forms give the same products, and
times scipy's kernels single-threaded on ``J x`` and ``J^T u`` (``J^T`` in its
own CSR/BSR form, as the solver keeps it): the time per stored entry.

Usage::

    python benchmarks/bench_bsr_product.py [--repeat 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
from _common import median_time
from scipy.sparse import _sparsetools


def ba_pattern(seed: int = 0) -> sp.csr_array:
    """A bundle-adjustment Jacobian: rows (2 per observation) by camera and point columns."""
    rng = np.random.default_rng(seed)
    n_cam, n_pts, per_pt = 49, 7776, 4
    n = n_cam * 9 + n_pts * 3
    n_obs = n_pts * per_pt
    cam = rng.integers(0, n_cam, n_obs)
    pt = np.repeat(np.arange(n_pts), per_pt)
    rows, cols = [], []
    for k in range(2):
        r = 2 * np.arange(n_obs) + k
        rows += [r] * 12
        cols += [cam * 9 + c for c in range(9)] + [n_cam * 9 + pt * 3 + c for c in range(3)]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    J = sp.csr_array((rng.standard_normal(rows.size), (rows, cols)), shape=(2 * n_obs, n))
    J.sort_indices()
    return sp.csr_array((J.data, J.indices.astype(np.int32), J.indptr.astype(np.int32)),
                        shape=J.shape)


def per_entry(call, nnz: int, repeat: int) -> float:
    """Median nanoseconds per stored entry of ``call()`` over ``repeat`` calls."""
    return median_time(call, repeat=repeat)[0] * 1e9 / nnz


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    J = ba_pattern()
    Jt = J.T.tocsr()
    B, Bt = sp.bsr_array(J, blocksize=(2, 3)), sp.bsr_array(Jt, blocksize=(3, 2))
    rng = np.random.default_rng(1)
    x, u = rng.standard_normal(J.shape[1]), rng.standard_normal(J.shape[0])
    np.testing.assert_allclose(B @ x, J @ x, rtol=0, atol=1e-12 * np.abs(J @ x).max())
    np.testing.assert_allclose(Bt @ u, Jt @ u, rtol=0, atol=1e-12 * np.abs(Jt @ u).max())
    y, z = np.zeros(J.shape[0]), np.zeros(J.shape[1])
    m, n = J.shape
    cases = {
        "J x, CSR": lambda: _sparsetools.csr_matvec(m, n, J.indptr, J.indices, J.data, x, y),
        "J x, BSR 2 x 3": lambda: _sparsetools.bsr_matvec(m // 2, n // 3, 2, 3, B.indptr,
                                                          B.indices, B.data.ravel(), x, y),
        "J^T u, CSR": lambda: _sparsetools.csr_matvec(n, m, Jt.indptr, Jt.indices, Jt.data,
                                                      u, z),
        "J^T u, BSR 3 x 2": lambda: _sparsetools.bsr_matvec(n // 3, m // 2, 3, 2, Bt.indptr,
                                                            Bt.indices, Bt.data.ravel(), u, z),
    }
    print(f"J: {m} x {n}, {J.nnz:,} entries; one thread, median of {args.repeat}")
    print("| product | ns per entry |\n|---|---|")
    for name, call in cases.items():
        print(f"| {name} | {per_entry(call, J.nnz, args.repeat):.2f} |")


if __name__ == "__main__":
    main()

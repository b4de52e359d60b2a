"""``tr_solver='lsmr'``: the 'trf' and 'dogbox' step rules that use ``J`` by products only.

Parity with ``scipy.optimize.least_squares(..., tr_solver='lsmr')`` on the same
problems (``docs/parity.md``): ``x`` and ``cost`` within tolerances derived
from the problem, statuses in the same class, evaluation counts within one
iteration where both runs follow the same path. Where the two cannot follow
the same path, counts are not compared: with a robust loss, 'trf' often gets
an LSMR step that is a multiple of the gradient (LSMR stops after its first
iteration), and scipy's 2-D subspace then contains a rounding-noise
direction, which ours replaces by the next Krylov direction
(``steps/trf_lsmr.py``); both then stop on ``ftol`` in a flat valley, where
``x`` is known to about ``sqrt(ftol)`` only.

Sparse and operator Jacobians are run through the engine directly (the
frontend's conversion of scipy.sparse / LinearOperator Jacobians is tested
with the frontend), against scipy on the same problem given as scipy.sparse.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _parity import (
    ONE_EVAL_RTOL,
    assert_bitwise_equal,
    assert_close_scaled,
    assert_cost_close,
    assert_counts_close,
    assert_result_parity,
    assert_status_equivalent,
    assert_x_close,
)
from _torch_calls import recorded_torch_calls
from scipy.optimize import least_squares as scipy_least_squares

from torchimize_scipy import least_squares
from torchimize_scipy._driver import EngineRun, initial_state, solve
from torchimize_scipy._engine import status as codes
from torchimize_scipy._engine.operator import JacobianOperator
from torchimize_scipy._engine.steps.trf_lsmr import (
    _newton_2d,
    _orthonormal_pair,
    solve_trust_region_2d,
)
from torchimize_scipy._loss import make_loss

LOSSES = ["linear", "soft_l1", "huber", "cauchy", "arctan"]


# ---- problems --------------------------------------------------------------------------

class Broyden:
    """Broyden's tridiagonal system (scipy's test problem), with a box around the root."""

    def __init__(self, n=60):
        rng = np.random.default_rng(123440)
        self.n = n
        self.lb = np.linspace(-2, -1.5, n) + 0.1 * rng.standard_normal(n)
        self.ub = np.linspace(-0.8, 0.0, n) + 0.1 * rng.standard_normal(n)
        x0 = -np.ones(n) + 0.1 * rng.standard_normal(n)
        self.x0 = np.clip(x0, self.lb + 1e-3, self.ub - 1e-3)

    def fun(self, x):
        f = (3 - x) * x + 1
        f[1:] -= x[:-1]
        f[:-1] -= 2 * x[1:]
        return f

    def jac_sparse(self, x):
        n = self.n
        return sp.diags([-np.ones(n - 1), 3 - 2 * x, -2 * np.ones(n - 1)], [-1, 0, 1],
                        format="csr")

    def jac(self, x):
        return self.jac_sparse(x).toarray()


class Decay:
    """An exponential decay with an outlier: robust losses stop in a flat valley."""

    t = np.linspace(0, 4, 40)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.05 * np.sin(7 * t)
    y[5] += 2
    x0 = np.array([1.0, 1.0, 0.0])
    lb = np.array([0.0, 0.1, -1.0])
    ub = np.array([5.0, 3.0, 0.55])

    def fun(self, p):
        return p[0] * np.exp(-p[1] * self.t) + p[2] - self.y

    def jac(self, p):
        e = np.exp(-p[1] * self.t)
        return np.stack([e, -p[0] * self.t * e, np.ones_like(self.t)], 1)


def _compare(got, ref, same_path):
    """Parity for one pair of results; counts only where both follow one path."""
    ftol_stop = ref.status == 2
    # an ftol stop in a flat valley leaves x known to ~sqrt(ftol) = 1e-4
    assert_x_close(got.x, ref.x, rtol=1e-4 if ftol_stop else None)
    # ...and the cost to ~ftol of itself where the paths differ (10 ftol)
    assert_cost_close(got.cost, ref.cost, rtol=1e-7 if ftol_stop and not same_path else 1e-8)
    assert_status_equivalent(got.status, ref.status)
    assert bool(got.success) == bool(ref.success)
    if same_path:
        assert_counts_close(got.status, ref.status, (got.nfev, got.njev), (ref.nfev, ref.njev))


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("problem", [Broyden(), Decay()], ids=["broyden", "decay"])
def test_dense_parity_with_scipy(method, loss, bounded, problem):
    x_scale = "jac" if loss in ("soft_l1", "cauchy") else 1.0
    kw = dict(jac=problem.jac, method=method, loss=loss, x_scale=x_scale, tr_solver="lsmr",
              bounds=(problem.lb, problem.ub) if bounded else (-np.inf, np.inf))
    got = least_squares(problem.fun, problem.x0, **kw)
    ref = scipy_least_squares(problem.fun, problem.x0, **kw)
    _compare(got, ref, same_path=method == "dogbox" or loss == "linear")
    if bounded:
        assert np.array_equal(got.active_mask, ref.active_mask)
        assert np.all(got.x >= problem.lb) and np.all(got.x <= problem.ub)


def test_rosenbrock_follows_scipy_step_by_step():
    """A small problem where both runs take the same steps: equal counts."""
    def fun(x):
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    for kw in ({}, {"bounds": ([-2.5, -1], [0.9, 2])}, {"method": "dogbox"},
               {"x_scale": "jac"}, {"tr_options": {"regularize": False}}):
        got = least_squares(fun, [-2.0, 1.0], tr_solver="lsmr", **kw)
        ref = scipy_least_squares(fun, [-2.0, 1.0], tr_solver="lsmr", **kw)
        assert_result_parity(got, ref, counts=False)
        assert (got.nfev, got.njev) == (ref.nfev, ref.njev), kw


@pytest.mark.parametrize("options", [
    {"regularize": False}, {"regularize": True, "damp": 0.1}, {"btol": 1e-10, "atol": 1e-10},
    {"maxiter": 3}, {"conlim": 10.0},
])
@pytest.mark.parametrize("bounded", [False, True])
def test_tr_options_parity(options, bounded):
    p = Broyden(40)
    kw = dict(jac=p.jac, tr_solver="lsmr", tr_options=options,
              bounds=(p.lb, p.ub) if bounded else (-np.inf, np.inf))
    got = least_squares(p.fun, p.x0, **kw)
    ref = scipy_least_squares(p.fun, p.x0, **kw)
    _compare(got, ref, same_path=True)


def test_tr_options_reach_lsmr():
    """A tight LSMR iteration limit changes the run (the options are not ignored)."""
    p = Broyden(40)
    free = least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr")
    capped = least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr", tr_options={"maxiter": 1})
    assert capped.nfev != free.nfev
    ref = scipy_least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr", tr_options={"maxiter": 1})
    assert_cost_close(capped.cost, ref.cost)


def test_unknown_tr_option_is_scipys_type_error():
    p = Broyden(10)
    with pytest.raises(TypeError) as ours:
        least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr", tr_options={"tol": 1e-10})
    with pytest.raises(TypeError) as theirs:
        scipy_least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr", tr_options={"tol": 1e-10})
    assert "'tol'" in str(ours.value) and "'tol'" in str(theirs.value)


def test_lsmr_show_option_is_refused_by_name():
    p = Broyden(10)
    with pytest.raises(ValueError, match="'show'"):
        least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr", tr_options={"show": True})


def test_dogbox_regularize_warns_as_scipy():
    p = Broyden(10)
    with pytest.warns(UserWarning, match="'regularize' in `tr_options` is not relevant"):
        got = least_squares(p.fun, p.x0, p.jac, method="dogbox", tr_solver="lsmr",
                            tr_options={"regularize": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scipy_least_squares(p.fun, p.x0, p.jac, method="dogbox", tr_solver="lsmr",
                                  tr_options={"regularize": False})
    _compare(got, ref, same_path=True)


def test_torch_function_with_lsmr():
    """A torch residual function and autograd Jacobian on the lsmr path."""
    p = Broyden(30)

    def fun(x):
        f = (3 - x) * x + 1
        return f - torch.cat([x.new_zeros(1), x[:-1]]) - 2 * torch.cat([x[1:], x.new_zeros(1)])

    got = least_squares(fun, torch.as_tensor(p.x0), jac="autograd", tr_solver="lsmr")
    ref = scipy_least_squares(p.fun, p.x0, p.jac, tr_solver="lsmr")
    assert isinstance(got.x, torch.Tensor)
    _compare(got, ref, same_path=True)


# ---- the 2-D subproblem -----------------------------------------------------------------

def test_trust_region_2d_against_scipy():
    from scipy.optimize._lsq.common import solve_trust_region_2d as scipy_tr2d

    rng = np.random.default_rng(0)
    Bs, gs, ds = [], [], []
    for k in range(40):
        M = rng.standard_normal((2, 2))
        B = M @ M.T if k % 3 else M + M.T  # some indefinite
        Bs.append(B)
        gs.append(rng.standard_normal(2))
        ds.append(10 ** rng.uniform(-2, 1))
    got = solve_trust_region_2d(torch.as_tensor(np.stack(Bs)), torch.as_tensor(np.stack(gs)),
                                torch.as_tensor(ds, dtype=torch.float64))
    for k in range(40):
        ref, _ = scipy_tr2d(Bs[k], gs[k], ds[k])
        p = got[k].numpy()
        assert np.linalg.norm(p) <= ds[k] * (1 + 1e-12)
        # as good a model value; the point itself to ~sqrt(eps) (a quartic's roots near a
        # double root are only that accurate, for numpy's root finder as for ours)
        value = 0.5 * p @ Bs[k] @ p + gs[k] @ p
        value_ref = 0.5 * ref @ Bs[k] @ ref + gs[k] @ ref
        assert value <= value_ref + 1e-12 * (1 + abs(value_ref))
        np.testing.assert_allclose(p, ref, rtol=1e-6, atol=1e-8 * ds[k])


# ---- sparse and operator Jacobians through the engine -------------------------------------

def _to_torch_sparse(A):
    C = A.tocoo()
    idx = np.stack([np.zeros(C.nnz, dtype=np.int64), C.row, C.col])
    return torch.sparse_coo_tensor(idx, C.data, (1, *C.shape), check_invariants=True).coalesce()


class _DenseOperator:
    """The engine's torch linear operator contract, over dense matrices."""

    def __init__(self, J, broken=None):
        self.J = J
        self.shape = tuple(J.shape)
        self.dtype, self.device = J.dtype, J.device
        self.broken = broken  # rows whose matvec returns NaN

    def matvec(self, p):
        out = torch.bmm(self.J, p.unsqueeze(-1)).squeeze(-1)
        if self.broken is not None:
            out = torch.where(self.broken.unsqueeze(-1), float("nan"), out)
        return out

    def rmatvec(self, u):
        return torch.bmm(u.unsqueeze(-2), self.J).squeeze(-2)


def _engine(fun, jac, x0, lb, ub, method="trf", loss="linear", x_scale=1.0, tr_options=None):
    """Run the engine on torch callables: ``fun(x (k, n), ids)``, ``jac(x, f, ids)``."""
    x0 = torch.as_tensor(np.atleast_2d(x0))
    B, n = x0.shape
    ids = torch.arange(B)
    f0 = fun(x0, ids)
    J0 = jac(x0, f0, ids)
    lb = torch.as_tensor(np.broadcast_to(lb, (B, n)).copy())
    ub = torch.as_tensor(np.broadcast_to(ub, (B, n)).copy())
    scale = "jac" if x_scale == "jac" else torch.full((B, n), float(x_scale), dtype=x0.dtype)
    start = initial_state(ids, x0, f0, J0, lb, ub, scale)
    keys = ("x", "cost", "g", "optimality", "active_mask", "nfev", "njev", "status")
    out = {k: torch.empty((B, n) if k in ("x", "g", "active_mask") else (B,),
                          dtype=torch.long if k in ("active_mask", "nfev", "njev", "status")
                          else x0.dtype) for k in keys}
    out["J"] = None
    solve(EngineRun(method=method, fun=fun, jac=jac, start=start, loss=make_loss(loss),
                    ftol=1e-8, xtol=1e-8, gtol=1e-8, max_nfev=None,
                    bounded=bool(np.isfinite(lb.numpy()).any() or np.isfinite(ub.numpy()).any()),
                    jac_scale=x_scale == "jac", use_gram=False, out=out, tr_solver="lsmr",
                    tr_options=tr_options))
    return out


def _broyden_torch(p):
    def fun(x, ids):
        return torch.stack([torch.as_tensor(p.fun(row.numpy().copy())) for row in x])
    return fun


@pytest.mark.parametrize("kind", ["sparse", "operator"])
@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("loss", ["linear", "cauchy"])
def test_sparse_and_operator_jacobians_match_scipy(kind, method, bounded, loss):
    p = Broyden(50)

    def jac(x, f, ids):
        assert x.shape[0] == 1
        A = p.jac_sparse(x[0].numpy())
        if kind == "sparse":
            return _to_torch_sparse(A)
        return _DenseOperator(torch.as_tensor(A.toarray())[None])

    lb, ub = (p.lb, p.ub) if bounded else (-np.inf, np.inf)
    x_scale = "jac" if kind == "sparse" else 1.0
    out = _engine(_broyden_torch(p), jac, p.x0, lb, ub, method, loss, x_scale)
    ref = scipy_least_squares(p.fun, p.x0, p.jac_sparse, method=method, loss=loss,
                              bounds=(lb, ub), x_scale=x_scale, tr_solver="lsmr")
    same_path = loss == "linear" or method == "dogbox"  # see the module notes
    assert_x_close(out["x"][0], ref.x, rtol=None if same_path else 1e-6)
    assert_cost_close(out["cost"][0], ref.cost)
    assert_status_equivalent(int(out["status"][0]), ref.status)
    if same_path:
        assert_counts_close(int(out["status"][0]), ref.status,
                            (int(out["nfev"][0]), int(out["njev"][0])), (ref.nfev, ref.njev))
    # the final Jacobian is handed out as it was given, never densified
    J = out["J"]
    assert isinstance(J, JacobianOperator) and J.kind == kind
    J_ref = ref.jac.toarray() if sp.issparse(ref.jac) else ref.jac
    np.testing.assert_allclose(J.to_dense()[0].numpy(), J_ref, rtol=1e-4, atol=1e-6)


def test_operator_without_column_norms_cannot_scale_by_jac():
    p = Broyden(10)

    def jac(x, f, ids):
        return _DenseOperator(torch.as_tensor(p.jac(x[0].numpy()))[None])

    with pytest.raises(ValueError, match="column norms"):
        JacobianOperator(jac(torch.as_tensor(p.x0)[None], None, None)).scale_rows(
            torch.ones(1, 10, dtype=torch.float64)).column_sq_norms()


# ---- batches ------------------------------------------------------------------------------

def _batch_problem(n=30, B=4, seed=0):
    """B Broyden-like systems with different right-hand sides (one structure)."""
    rng = np.random.default_rng(seed)
    c = torch.as_tensor(rng.uniform(0.5, 1.5, (B, n)))

    def fun(x, ids):
        f = (3 - x) * x + c[ids]
        f = f - torch.nn.functional.pad(x[:, :-1], (1, 0)) - 2 * torch.nn.functional.pad(
            x[:, 1:], (0, 1))
        return f

    def jac_dense(x, f, ids):
        k = x.shape[0]
        J = torch.diag_embed(3 - 2 * x)
        off = torch.ones(k, n - 1, dtype=x.dtype)
        return J - torch.diag_embed(off, -1) - 2 * torch.diag_embed(off, 1)

    x0 = -np.ones((B, n)) + 0.1 * rng.standard_normal((B, n))
    return fun, jac_dense, x0


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_batch_equals_single_problems(method):
    fun, jac, x0 = _batch_problem()
    batch = _engine(fun, jac, x0, -np.inf, np.inf, method)
    for k in range(x0.shape[0]):
        def fun_k(x, ids, k=k):
            return fun(x, ids + k)

        def jac_k(x, f, ids, k=k):
            return jac(x, f, ids + k)

        one = _engine(fun_k, jac_k, x0[k], -np.inf, np.inf, method)
        _same_problem(batch, k, one, 0)


def _same_problem(got, i, ref, j):
    """Problem ``i`` of ``got`` and ``j`` of ``ref``: two code paths, one problem."""
    status = int(ref["status"][j])
    # far starts end in flat valleys by ftol, with x known to ~sqrt(ftol) only
    assert_x_close(got["x"][i], ref["x"][j], rtol=1e-4 if status == 2 else None)
    assert_cost_close(got["cost"][i], ref["cost"][j], rtol=1e-7 if status == 2 else 1e-8)
    assert_status_equivalent(int(got["status"][i]), status)
    assert_counts_close(int(got["status"][i]), status, int(got["nfev"][i]), int(ref["nfev"][j]))


@pytest.mark.parametrize("kind", ["dense", "sparse", "operator"])
def test_batch_of_sparse_and_operator_jacobians(kind):
    """A batch of sparse or operator Jacobians gives the dense batch's results.

    (Selecting, merging and concatenating rows of such Jacobians, as the loop
    does when problems finish apart, is tested in ``test_lsmr.py``.)
    """
    fun, jac_dense, x0 = _batch_problem(B=5, seed=1)

    def jac(x, f, ids):
        J = jac_dense(x, f, ids)
        if kind == "sparse":
            return J.to_sparse_coo().coalesce()
        if kind == "operator":
            return _DenseOperator(J)
        return J

    ref = _engine(fun, jac_dense, x0, -np.inf, np.inf)
    got = _engine(fun, jac, x0, -np.inf, np.inf)
    for k in range(5):
        _same_problem(got, k, ref, k)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_lsmr_breakdown_fails_alone(method):
    """A problem whose products turn non-finite inside LSMR stops; the others are unchanged."""
    fun, jac_dense, x0 = _batch_problem(B=3, seed=2)
    broken = torch.tensor([False, True, False])

    def jac(x, f, ids):
        return _DenseOperator(jac_dense(x, f, ids), broken[ids])

    def jac_ok(x, f, ids):
        return _DenseOperator(jac_dense(x, f, ids))

    clean = _engine(fun, jac_ok, x0, -np.inf, np.inf, method)
    got = _engine(fun, jac, x0, -np.inf, np.inf, method)
    assert int(got["status"][1]) == codes.SINGULAR
    assert int(got["nfev"][1]) == 1
    assert_bitwise_equal(got["x"][0], clean["x"][0])
    assert_bitwise_equal(got["x"][2], clean["x"][2])
    assert got["status"][[0, 2]].tolist() == clean["status"][[0, 2]].tolist()
    assert codes.success(clean["status"]).all()


def test_newton_2d_is_the_cholesky_solution_and_its_definiteness_test():
    rng = np.random.default_rng(21)
    k = 200
    Q = torch.as_tensor(np.linalg.qr(rng.standard_normal((k, 2, 2)))[0])
    eig = torch.as_tensor(rng.choice([-1.0, 0.0, 1e-3, 1.0, 10.0], size=(k, 2)))
    B = Q @ torch.diag_embed(eig) @ Q.transpose(-1, -2)
    B = 0.5 * (B + B.transpose(-1, -2))
    g = torch.as_tensor(rng.standard_normal((k, 2)))
    p, pd = _newton_2d(B, g)
    L, info = torch.linalg.cholesky_ex(B)
    ref_pd = info == 0
    # the same verdict but where an eigenvalue is 0 to rounding (LAPACK may go either way)
    clear = eig.abs().min(-1).values > 1e-6
    assert torch.equal(pd[clear], ref_pd[clear]) and bool(pd[clear].any())
    # (where an eigenvalue is 0 to rounding, both may call the matrix definite and then
    # solve a singular system: any answer is rounding, so only the clear rows compare)
    both = pd & ref_pd & clear
    ref = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    scale = 1 + ref.abs().amax(-1, keepdim=True)
    # one solve of a 2x2 system, conditioning up to 1e4 here
    assert ((p - ref).abs() / scale)[both].max() < 1e-10


def test_orthonormal_pair_spans_the_pair_even_when_nearly_collinear():
    rng = np.random.default_rng(22)
    a = torch.as_tensor(rng.standard_normal((4, 50)))
    b = torch.stack([torch.as_tensor(rng.standard_normal(50)), a[1] * 3.0 + 1e-9 * a[0],
                     a[2] * -2.0, torch.zeros(50, dtype=torch.float64)])
    S, r22 = _orthonormal_pair(a, b)
    _, R = torch.linalg.qr(torch.stack([a, b], dim=-1))
    np.testing.assert_allclose(r22.numpy(), R[:, 1, 1].abs().numpy(), rtol=1e-6, atol=1e-13)
    gram = S.transpose(-1, -2) @ S
    eye = torch.eye(2, dtype=torch.float64)
    for k in (0, 1):  # orthonormal to working precision, the nearly collinear pair too
        assert (gram[k] - eye).abs().max() < 1e-14
    assert S[2, :, 1].abs().max() < 1e-12 or r22[2] < 1e-13  # b along a: no second direction
    assert float(S[3, :, 1].abs().max()) == 0.0  # b = 0: a zero vector, not noise
    # both vectors lie in the span of the basis
    for v in (a, b):
        back = (S @ (S.transpose(-1, -2) @ v.unsqueeze(-1))).squeeze(-1)
        assert ((back - v).abs().max(-1).values / (1 + v.abs().max(-1).values)).max() < 1e-12


def test_subspace_gram_on_the_host_and_with_autograd() -> None:
    """The 2-D model's ``JS^T JS``: numpy's einsum on the host (no torch parallel region),
    torch's product where gradients flow; both the Gram matrix to one evaluation."""
    from torchimize_scipy._engine.steps.trf_lsmr import _gram

    rng = np.random.default_rng(5)
    JS = torch.as_tensor(rng.standard_normal((3, 70_000, 2)))
    ref = torch.einsum("bmi,bmj->bij", JS, JS)
    with recorded_torch_calls() as names:
        G = _gram(JS)
    assert not any(n in ("matmul", "bmm", "__matmul__", "einsum") for n in names)
    assert_close_scaled(G, ref, ONE_EVAL_RTOL)
    leaf = JS.clone().requires_grad_(True)
    G2 = _gram(leaf)
    G2.sum().backward()
    assert_close_scaled(leaf.grad, 2 * JS.sum(-1, keepdim=True).expand(-1, -1, 2),
                        ONE_EVAL_RTOL)


def _saddle(x):  # at x1 = 0 a saddle of the cost; the Gauss-Newton model is flat along x1
    return np.array([x[0] - 1, 2 * x[0] + x[1] ** 2 - 3, x[0] * x[1] ** 2])


def _saddle_jac(x):  # exact: the x1 column is zero at x1 = 0
    return np.array([[1.0, 0.0], [2.0, 2 * x[1]], [x[1] ** 2, 2 * x[0] * x[1]]])


def test_two_variables_take_the_whole_plane_as_scipy():
    """n = 2 with the LSMR step along the gradient, itself an eigenvector of a flat model:
    the second basis vector was zeroed (the model along the gradient only) and the solve
    stayed on the saddle (cost 0.1 against scipy's 0.0902); scipy's QR of the two vectors
    completes the plane, and so does ours now. (The function is even in x1: which way
    the step leaves the saddle is a matter of rounding, so |x| is compared.)"""
    ref = scipy_least_squares(_saddle, [0.5, 0.0], jac=_saddle_jac, tr_solver="lsmr")
    res = least_squares(_saddle, [0.5, 0.0], jac=_saddle_jac, tr_solver="lsmr")
    assert ref.cost < 0.0903
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-9)
    np.testing.assert_allclose(np.abs(res.x), np.abs(ref.x), rtol=1e-6, atol=1e-9)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev)

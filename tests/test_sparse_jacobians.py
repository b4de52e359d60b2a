"""Sparse and operator Jacobians at the frontend: ``jac_sparsity``, scipy.sparse, torch
sparse, ``LinearOperator`` and torch operators; ``tr_solver``/``tr_options`` checks;
``res.jac`` as scipy returns it.

Parity with scipy follows docs/parity.md: ``x`` and ``cost`` within the
problem's tolerances, statuses equivalent. Every validation branch has one
``pytest.raises`` with scipy's message where scipy has one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse as sp
import torch
from _parity import (
    ONE_EVAL_RTOL,
    assert_close_scaled,
    assert_cost_close,
    assert_status_equivalent,
    assert_x_close,
)
from scipy.optimize._lsq.least_squares import construct_loss_function
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from torchimize_scipy import batch_least_squares, least_squares


class Broyden:
    """scipy's test problem (``BroydenTridiagonal`` of its test_least_squares.py)."""

    def __init__(self, n: int = 100, seed: int = 123440) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.x0 = -np.ones(n) + 0.1 * rng.standard_normal(n)
        self.lb = np.linspace(-2, -1.5, n) + 0.1 * rng.standard_normal(n)
        self.ub = np.linspace(-0.8, 0.0, n) + 0.1 * rng.standard_normal(n)
        self.x0 = np.clip(self.x0, self.lb + 1e-3, self.ub - 1e-3)
        i = np.arange(n)
        self.sparsity = sp.coo_array(
            (np.ones(3 * n - 2), (np.r_[i, i[1:], i[:-1]], np.r_[i, i[:-1], i[1:]])),
            shape=(n, n)).tocsr()

    def fun(self, x: np.ndarray) -> np.ndarray:
        f = (3 - x) * x + 1
        f[1:] -= x[:-1]
        f[:-1] -= 2 * x[1:]
        return f

    def jac(self, x: np.ndarray) -> sp.csr_array:
        n = self.n
        return sp.diags_array([-np.ones(n - 1), 3 - 2 * x, -2 * np.ones(n - 1)],
                              offsets=[-1, 0, 1], format="csr")

    def operator(self, x: np.ndarray) -> LinearOperator:
        return aslinearoperator(self.jac(x))


def fun_torch(x: torch.Tensor) -> torch.Tensor:
    """Broyden's residuals of one point, in torch (vmappable)."""
    f = (3 - x) * x + 1
    f = torch.cat([f[:1], f[1:] - x[:-1]])
    return torch.cat([f[:-1] - 2 * x[1:], f[-1:]])


def quiet_scipy(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return so.least_squares(*args, **kwargs)


def check_parity(res, ref, xtol: float = 1e-8) -> None:
    assert_x_close(res.x, ref.x, xtol)
    assert_cost_close(res.cost, ref.cost)
    assert_status_equivalent(res.status, ref.status)


# ---------------------------------------------------------------------------- validation
def test_jac_sparsity_wrong_shape_message() -> None:
    p = Broyden(10)
    with pytest.raises(ValueError, match=r"^`jac_sparsity` has wrong shape\.$"):
        least_squares(p.fun, p.x0, jac_sparsity=p.sparsity[:-1])


def test_jac_sparsity_with_exact_tr_solver_is_scipys_error() -> None:
    p = Broyden(10)
    msg = "tr_solver='exact' is incompatible with `jac_sparsity`."
    with pytest.raises(ValueError) as ref:
        quiet_scipy(p.fun, p.x0, jac_sparsity=p.sparsity, tr_solver="exact")
    assert str(ref.value) == msg
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        least_squares(p.fun, p.x0, jac_sparsity=p.sparsity, tr_solver="exact")


@pytest.mark.parametrize("kind", ["sparse", "operator"])
def test_sparse_jac_with_exact_tr_solver_is_scipys_error(kind: str) -> None:
    p = Broyden(10)
    jac = p.jac if kind == "sparse" else p.operator
    msg = "tr_solver='exact' works only with dense Jacobian matrices."
    with pytest.raises(ValueError, match=msg):
        quiet_scipy(p.fun, p.x0, jac, tr_solver="exact")
    with pytest.raises(ValueError, match=msg):
        least_squares(p.fun, p.x0, jac, tr_solver="exact")


def test_operator_with_x_scale_jac_is_scipys_error() -> None:
    p = Broyden(10)
    msg = "x_scale='jac' can't be used when `jac` returns LinearOperator."
    with pytest.raises(ValueError, match=msg):
        quiet_scipy(p.fun, p.x0, p.operator, x_scale="jac")
    with pytest.raises(ValueError, match=msg):
        least_squares(p.fun, p.x0, p.operator, x_scale="jac")


def test_unknown_lsmr_option_is_a_type_error_naming_it() -> None:
    p = Broyden(10)
    with pytest.raises(TypeError, match="'tol'"):
        quiet_scipy(p.fun, p.x0, p.jac, tr_options={"tol": 1e-10})
    # tr_solver=None chooses 'lsmr' for a sparse Jacobian: its options are checked
    with pytest.raises(TypeError, match="unexpected keyword argument 'tol'"):
        least_squares(p.fun, p.x0, p.jac, tr_options={"tol": 1e-10})


def test_tr_options_with_exact_solver_are_ignored_by_name() -> None:
    """scipy ignores them silently; we ignore them too, with a warning naming them."""
    p = Broyden(10)
    with pytest.warns(UserWarning, match=r"\['atol'\] are ignored with tr_solver='exact'"):
        res = least_squares(p.fun, p.x0, tr_options={"atol": 1e-10})
    assert res.nfev == least_squares(p.fun, p.x0).nfev


@pytest.mark.parametrize("method", ["gn", "gd"])
def test_line_search_methods_refuse_sparse_jacobians(method: str) -> None:
    p = Broyden(10)
    with pytest.raises(ValueError, match=f"method='{method}' works only with dense"):
        least_squares(p.fun, p.x0, p.jac, method=method)


def test_jac_sparsity_with_autograd_is_refused() -> None:
    p = Broyden(10)
    with pytest.raises(ValueError, match="`jac_sparsity` applies to finite differences"):
        least_squares(fun_torch, torch.as_tensor(p.x0), "autograd", jac_sparsity=p.sparsity)


def test_sparse_jac_of_wrong_shape_is_scipys_error() -> None:
    p = Broyden(10)
    with pytest.raises(ValueError, match=r"The return value of `jac` has wrong shape: "
                                         r"expected \(10, 10\), actual \(9, 10\)\."):
        least_squares(p.fun, p.x0, lambda x: p.jac(x)[:-1])


def test_jac_sparsity_with_callable_jac_is_ignored_as_scipy() -> None:
    p = Broyden(10)
    res = least_squares(p.fun, p.x0, lambda x: p.jac(x).toarray(), jac_sparsity=p.sparsity)
    assert isinstance(res.jac, np.ndarray) and res.cost < 1e-20


# ---------------------------------------------------------------------------- parity with scipy
@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("kind", ["sparse", "operator"])
@pytest.mark.parametrize("bounded", [False, True])
def test_callable_sparse_and_operator_jacobians_match_scipy(method, kind, bounded) -> None:
    p = Broyden()
    jac = p.jac if kind == "sparse" else p.operator
    bounds = (p.lb, p.ub) if bounded else (-np.inf, np.inf)
    res = least_squares(p.fun, p.x0, jac, bounds=bounds, method=method)
    ref = quiet_scipy(p.fun, p.x0, jac, bounds=bounds, method=method)
    check_parity(res, ref)
    if kind == "sparse":
        assert sp.issparse(res.jac) and res.jac.format == "csr"
        assert_close_scaled(res.jac.toarray(), ref.jac.toarray(), 1e-6)
    else:
        assert isinstance(res.jac, LinearOperator) and res.jac.shape == (p.n, p.n)
        v = np.linspace(-1, 1, p.n)
        assert_close_scaled(res.jac.matvec(v), ref.jac.matvec(v), 1e-6)
        assert_close_scaled(res.jac.rmatvec(v), ref.jac.rmatvec(v), 1e-6)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("fd", ["2-point", "3-point", "cs"])
def test_jac_sparsity_matches_scipy(method: str, fd: str) -> None:
    p = Broyden()
    res = least_squares(p.fun, p.x0, fd, jac_sparsity=p.sparsity, method=method,
                        bounds=(p.lb, np.inf))
    ref = quiet_scipy(p.fun, p.x0, fd, jac_sparsity=p.sparsity, method=method,
                      bounds=(p.lb, np.inf))
    check_parity(res, ref)
    assert sp.issparse(res.jac) and res.jac.nnz == ref.jac.nnz


def test_tr_solver_none_chooses_as_scipy() -> None:
    p = Broyden(30)
    sparse = least_squares(p.fun, p.x0, p.jac)
    dense = least_squares(p.fun, p.x0, lambda x: p.jac(x).toarray())
    assert sp.issparse(sparse.jac) and isinstance(dense.jac, np.ndarray)
    # jac_sparsity alone makes the finite-difference Jacobian sparse: 'lsmr'
    fd = least_squares(p.fun, p.x0, jac_sparsity=p.sparsity)
    assert sp.issparse(fd.jac)


def test_x_scale_jac_from_sparse_column_norms_matches_scipy() -> None:
    p = Broyden()
    res = least_squares(p.fun, p.x0, p.jac, x_scale="jac")
    ref = quiet_scipy(p.fun, p.x0, p.jac, x_scale="jac")
    check_parity(res, ref)


@pytest.mark.parametrize("loss", ["soft_l1", "cauchy"])
def test_res_jac_of_a_robust_loss_is_the_scaled_sparse_jacobian(loss: str) -> None:
    p = Broyden(40)
    y = np.zeros(p.n)
    y[::7] = 5.0  # outliers: the loss scales their rows

    def fun(x):
        return p.fun(x) - y

    # the losses that flatten the outliers' rows most (cauchy, arctan) make the end a
    # crawl in which both runs stop by ftol hundreds of evaluations apart, with costs
    # about ftol * cost apart: a smaller ftol puts both at the solution
    res = least_squares(fun, p.x0, p.jac, loss=loss, f_scale=0.5, ftol=1e-12)
    ref = quiet_scipy(fun, p.x0, p.jac, loss=loss, f_scale=0.5, ftol=1e-12)
    assert_cost_close(res.cost, ref.cost)
    assert sp.issparse(res.jac)
    # the rows of J(x) at our solution scaled as scipy's scale_for_robust_loss_function does
    f = fun(res.x)
    rho = construct_loss_function(p.n, loss, 0.5)(f)
    w = np.sqrt(np.maximum(rho[1] + 2 * rho[2] * f**2, np.finfo(float).eps))
    assert_close_scaled(res.jac.toarray(), w[:, None] * p.jac(res.x).toarray(), ONE_EVAL_RTOL)


def test_caller_arrays_are_not_mutated() -> None:
    p = Broyden(20)
    x0 = p.x0.copy()
    S = p.sparsity.copy()
    least_squares(p.fun, x0, jac_sparsity=S)
    assert np.array_equal(x0, p.x0)
    assert (S != p.sparsity).nnz == 0


# ---------------------------------------------------------------------------- torch callers
def test_torch_function_with_jac_sparsity_one_call_per_jacobian() -> None:
    p = Broyden(50)
    calls = []

    def fun(x):
        calls.append(1)
        return fun_torch(x)

    x0 = torch.as_tensor(p.x0)
    res = least_squares(fun, x0, jac_sparsity=p.sparsity)
    ref = quiet_scipy(p.fun, p.x0, jac_sparsity=p.sparsity)
    assert isinstance(res.x, torch.Tensor)
    check_parity(res, ref)
    assert res.jac.layout == torch.sparse_coo and res.jac.shape == (p.n, p.n)
    # vmapped: each Jacobian is one call for all its groups (after the vmap probe)
    assert len(calls) <= res.nfev + res.njev + 2


def test_torch_sparse_and_torch_operator_jacobians() -> None:
    p = Broyden(40)

    def jac_sparse(x):
        return torch.as_tensor(p.jac(x.numpy()).toarray()).to_sparse_csr()

    class Op:
        def __init__(self, x):
            self.A = torch.as_tensor(p.jac(x.numpy()).toarray())
            self.shape = tuple(self.A.shape)

        def matvec(self, v):
            return self.A @ v

        def rmatvec(self, u):
            return self.A.T @ u

        def column_norms(self):
            return torch.linalg.vector_norm(self.A, dim=0)

    ref = quiet_scipy(p.fun, p.x0, p.jac, x_scale="jac")
    x0 = torch.as_tensor(p.x0)
    res_s = least_squares(fun_torch, x0, jac_sparse, x_scale="jac")
    res_o = least_squares(fun_torch, x0, Op, x_scale="jac")  # column_norms: 'jac' allowed
    for res in (res_s, res_o):
        check_parity(res, ref)
    assert res_s.jac.layout == torch.sparse_coo
    v = torch.linspace(-1, 1, p.n, dtype=torch.float64)
    assert_close_scaled(res_o.jac.matvec(v).numpy(), ref.jac @ v.numpy(), 1e-6)


# ---------------------------------------------------------------------------- batches
def test_batch_with_jac_sparsity_matches_single_problems() -> None:
    p = Broyden(30)
    rng = np.random.default_rng(3)
    X0 = p.x0 + 0.05 * rng.standard_normal((3, p.n))

    def fun(X):  # vectorised over rows
        F = (3 - X) * X + 1
        F[:, 1:] -= X[:, :-1]
        F[:, :-1] -= 2 * X[:, 1:]
        return F

    res = batch_least_squares(fun, X0, jac_sparsity=p.sparsity)
    for b in range(3):
        ref = least_squares(p.fun, X0[b], jac_sparsity=p.sparsity)
        assert_x_close(res.x[b], ref.x)
        assert_cost_close(res.cost[b], ref.cost)
    assert res.jac is None  # sparse Jacobians of a batch are not kept


def test_batch_jac_sparsity_with_bounds_matches_scipy() -> None:
    """Bounded 'trf' of a batch with jac_sparsity (regression: the regularisation (B,) was
    added to the Coleman-Li term (B, n) without its problem axis, a shape error for B > 1)."""
    p = Broyden(15)
    X0 = np.stack([p.x0, np.clip(p.x0 + 0.02, p.lb + 1e-3, p.ub - 1e-3)])
    res = batch_least_squares(p.fun, X0, jac_sparsity=p.sparsity, bounds=(p.lb, p.ub),
                              vectorized=False)
    for b in range(2):
        ref = quiet_scipy(p.fun, X0[b], jac_sparsity=p.sparsity, bounds=(p.lb, p.ub))
        assert_x_close(res.x[b], ref.x)
        assert_cost_close(res.cost[b], ref.cost)
        assert_status_equivalent(res.status[b], ref.status)


def test_batch_jac_sparsity_shape_is_checked() -> None:
    p = Broyden(10)
    with pytest.raises(ValueError, match=r"^`jac_sparsity` has wrong shape\.$"):
        batch_least_squares(lambda X: X, np.zeros((2, 10)), jac_sparsity=p.sparsity[:-1])


class ShiftedSystems:
    """Problem b: ``f_i = (A_b x)_i + 0.1 sin(x_{i mod n}) - y_{b,i}``, a sparse ``A_b`` each.

    Each problem has another sparsity structure (a random one with a full
    diagonal), so a batch's Jacobian is block diagonal with unequal blocks.
    """

    def __init__(self, B: int = 4, m: int = 40, n: int = 25, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.A = [(sp.random_array((m, n), density=0.08 + 0.04 * b, rng=rng)
                   + sp.eye_array(m, n) * 2.0).tocsr() for b in range(B)]
        self.y = rng.standard_normal((B, m))
        self.x0 = rng.standard_normal((B, n))
        self.cols = np.arange(m) % n

    def fun(self, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        k = int(b[0])
        return self.A[k] @ x + 0.1 * np.sin(x[self.cols]) - self.y[k]

    def jac(self, x: np.ndarray, b: np.ndarray) -> sp.csr_array:
        k = int(b[0])
        m = self.cols.size
        D = sp.csr_array((0.1 * np.cos(x[self.cols]), (np.arange(m), self.cols)),
                         shape=self.A[k].shape)
        return (self.A[k] + D).tocsr()


@pytest.mark.parametrize("form", ["scipy sparse", "LinearOperator"])
def test_batch_callable_jac_returning_sparse_or_operator_values_matches_scipy(form) -> None:
    """batch_least_squares with a row-wise `jac` that returns scipy sparse matrices (problems
    of different structures) or LinearOperators: each problem as scipy's least_squares."""
    p = Broyden(30)
    B = 4
    rng = np.random.default_rng(8)
    X0 = p.x0 + 0.05 * rng.standard_normal((B, p.n))
    shift = np.linspace(0.0, 0.3, B)

    def fun(x, c):
        return p.fun(x) - c

    def jac(x, c):
        J = p.jac(x)
        return aslinearoperator(J) if form == "LinearOperator" else J

    res = batch_least_squares(fun, X0, jac=jac, args=(shift[:, None] * np.ones((B, p.n)),),
                              vectorized=False)
    assert res.jac is None
    for b in range(B):
        ref = quiet_scipy(fun, X0[b], jac=jac, args=(shift[b] * np.ones(p.n),))
        check_parity(type("R", (), {k: getattr(res, k)[b] for k in ("x", "cost", "status")}),
                     ref)
        assert res.nfev[b] == ref.nfev and res.njev[b] == ref.njev


def test_batch_sparse_jacobians_of_different_structures_match_scipy() -> None:
    sy = ShiftedSystems()
    B = len(sy.A)
    ids = np.arange(B, dtype=float)[:, None] * np.ones((B, 1))
    res = batch_least_squares(sy.fun, sy.x0, jac=sy.jac, args=(ids,), vectorized=False,
                              x_scale="jac", bounds=(-3.0, 3.0))
    structures = {tuple(sy.jac(sy.x0[b], ids[b]).indices) for b in range(B)}
    assert len(structures) == B  # four structures in one batch
    for b in range(B):
        ref = quiet_scipy(sy.fun, sy.x0[b], jac=sy.jac, args=(ids[b],), x_scale="jac",
                          bounds=(-3.0, 3.0))
        assert_x_close(res.x[b], ref.x)
        assert_cost_close(res.cost[b], ref.cost)
        assert_status_equivalent(res.status[b], ref.status)


def test_batch_vectorized_torch_sparse_jac_matches_scipy() -> None:
    p = Broyden(20)
    X0 = np.stack([p.x0, p.x0 + 0.01, p.x0 - 0.02])

    def fun_t(X):
        return torch.stack([torch.as_tensor(p.fun(x.numpy())) for x in X])

    def jac_t(X):
        return torch.stack([torch.as_tensor(p.jac(x.numpy()).toarray()) for x in X]).to_sparse()

    res = batch_least_squares(fun_t, torch.as_tensor(X0), jac=jac_t)
    for b in range(3):
        ref = quiet_scipy(p.fun, X0[b], jac=p.jac)
        assert_x_close(res.x[b].numpy(), ref.x)
        assert_cost_close(float(res.cost[b]), ref.cost)


def test_batch_callable_sparse_jac_gets_scipys_errors() -> None:
    p = Broyden(12)
    X0 = np.stack([p.x0, p.x0 + 0.01])
    with pytest.raises(ValueError, match=r"^method='lm' works only with dense Jacobian"):
        batch_least_squares(p.fun, X0, jac=p.jac, vectorized=False, method="lm")
    with pytest.raises(ValueError, match=r"has wrong shape: expected \(12, 12\), actual "
                                         r"\(12, 11\)"):
        batch_least_squares(p.fun, X0, jac=lambda x: p.jac(x)[:, :-1], vectorized=False)
    with pytest.raises(ValueError, match="x_scale='jac' can't be used when `jac` returns "
                                         "LinearOperator"):
        batch_least_squares(p.fun, X0, jac=p.operator, vectorized=False, x_scale="jac")
    with pytest.raises(ValueError, match="method='gn' works only with dense Jacobians"):
        batch_least_squares(p.fun, X0, jac=p.jac, vectorized=False, method="gn")


def test_batch_refuses_a_sparse_jac_after_dense_ones_with_a_clear_error() -> None:
    """The form is learnt at the first problem's start: a later problem's sparse value
    where dense ones came first gets a clear error, not a wrong answer."""
    p = Broyden(12)
    X0 = np.stack([p.x0, p.x0 + 0.01])

    def jac(x):
        J = p.jac(x)
        return J.toarray() if x[0] == X0[0, 0] else J

    with pytest.raises(ValueError, match="returned a sparse matrix or a linear operator"):
        batch_least_squares(p.fun, X0, jac=jac, vectorized=False)


def test_res_jac_takes_the_first_problem_of_a_batched_sparse_jacobian() -> None:
    from torchimize_scipy._jac_forms import result_jacobian

    rng = np.random.default_rng(3)
    dense = torch.as_tensor(rng.standard_normal((2, 6, 4)) * (rng.random((2, 6, 4)) < 0.5))
    J = dense.to_sparse().coalesce()
    out = result_jacobian(J, numpy_caller=True)
    assert isinstance(out, sp.csr_array) and out.has_canonical_format
    assert np.array_equal(out.toarray(), dense[0].numpy())
    out_t = result_jacobian(J, numpy_caller=False)
    assert out_t.layout == torch.sparse_coo and torch.equal(out_t.to_dense(), dense[0])

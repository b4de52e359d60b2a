"""The sparse products' solves keep torch's OpenMP team asleep (issue 13).

``serial_torch`` holds the calling thread's torch count at 1 while the
lsmr step rules build their model and step; the CSR products keep the
caller's count for their own helper threads (``csr.product_threads``).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse as sp
import torch
from _parity import assert_cost_close, assert_x_close
from torch.utils._python_dispatch import TorchDispatchMode

from torchimize_scipy import _blas_threads, least_squares
from torchimize_scipy._engine import csr
from torchimize_scipy._engine.problem import Problem

needs_omp = pytest.mark.skipif(_blas_threads._OMP is None,
                               reason="torch's OpenMP runtime not found")



@needs_omp
def test_serial_torch_holds_this_thread_and_keeps_the_products_count(two_threads) -> None:
    """Inside: torch reads 1 in this thread, the products 2, other threads 2; restored
    after the block, after an error, and by a nested block."""
    seen = {}

    def other() -> None:
        seen["other"] = torch.get_num_threads()

    with _blas_threads.serial_torch(torch.device("cpu")) as did:
        assert did
        assert torch.get_num_threads() == 1
        assert csr.product_threads() == 2
        assert csr.helper_threads() == min(2, csr._CPUS) - 1  # (one CPU: no helper)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with _blas_threads.serial_torch(torch.device("cpu")) as inner:
            assert inner and csr.product_threads() == 2
        assert torch.get_num_threads() == 1 and csr.product_threads() == 2
    assert seen["other"] == 2
    assert torch.get_num_threads() == 2 and csr.product_threads() == 2
    assert getattr(csr._LOCAL, "threads", None) is None
    with pytest.raises(RuntimeError, match="inside"):
        with _blas_threads.serial_torch(torch.device("cpu")):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2 and getattr(csr._LOCAL, "threads", None) is None


def test_serial_torch_does_nothing_on_one_thread_or_another_device() -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_threads.serial_torch(torch.device("cpu")) as did:
            assert not did and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    with _blas_threads.serial_torch(torch.device("meta")) as did:
        assert not did


@needs_omp
def test_row_blocks_inside_serial_torch_are_cut_for_the_callers_threads(two_threads,
                                                                        monkeypatch) -> None:
    """A CSR form made inside the block (LSMR's folded scaling) is cut as outside it."""
    monkeypatch.setattr(csr, "_BLOCK_NNZ", 100)
    rng = np.random.default_rng(3)
    A = (sp.random(200, 60, density=0.2, random_state=rng) + sp.eye(200, 60)).tocoo()
    J = torch.sparse_coo_tensor(np.stack([np.zeros(A.nnz, dtype=np.int64), A.row, A.col]),
                                A.data, (1, 200, 60), check_invariants=True).coalesce()
    outside = csr.BlockCSR(J)
    with _blas_threads.serial_torch(torch.device("cpu")):
        inside = csr.BlockCSR(J)
    assert len(outside._a) == len(inside._a) == 4


class _LargeOps(TorchDispatchMode):
    """Records the aten operations over more than torch's grain size of elements that run
    while the calling thread has several torch threads, inside the trf lsmr rule's model
    and step (the 1-D quadratic of :mod:`quadratic` included)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        out = func(*args, **(kwargs or {}))
        sizes = [a.numel() for a in (*args, out) if isinstance(a, torch.Tensor)
                 and a.layout == torch.strided]
        if max(sizes, default=0) > _blas_threads.GRAIN_SIZE and torch.get_num_threads() > 1:
            rule = ("build_model", "_build_model", "propose_step", "_propose_step")
            if any(f.filename.endswith("trf_lsmr.py") and f.name in rule
                   for f in traceback.extract_stack()):
                self.hits.append(func.__name__)
        return out


def _broyden(n: int):
    def fun(x):
        f = (3 - x) * x + 1
        f[1:] -= x[:-1]
        f[:-1] -= 2 * x[1:]
        return f

    sparsity = sp.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=int)
    return fun, sparsity


@needs_omp
def test_lsmr_step_rule_opens_no_torch_parallel_region(two_threads) -> None:
    """Regression: the trf lsmr step (the 1-D quadratic along the gradient, the subspace
    basis, the step) ran torch operations over m > 32,768 residuals with two threads,
    each leaving an OpenMP worker spinning beside the products' helper thread."""
    n = 40_000
    fun, sparsity = _broyden(n)
    x0 = -np.ones(n)
    mode = _LargeOps()
    with mode:
        res = least_squares(fun, x0, jac_sparsity=sparsity, tr_solver="lsmr", method="trf",
                            x_scale="jac")
    assert mode.hits == []
    ref = so.least_squares(fun, x0, jac_sparsity=sparsity, tr_solver="lsmr", method="trf",
                           x_scale="jac")
    assert_cost_close(res.cost, ref.cost, 1e-8)
    assert_x_close(res.x, ref.x, xtol=1e-8)
    assert torch.get_num_threads() == 2


def test_products_only_cost_on_the_host_is_half_the_sum_of_squares() -> None:
    """The lsmr rules' cost (numpy on this thread for float64 on the CPU) against its
    definition; float32 keeps torch's reduction."""
    rng = np.random.default_rng(5)
    f = torch.as_tensor(rng.standard_normal((3, 50_000)))
    p = Problem(fun=None, jac=None, m=50_000, n=4, loss=None, ftol=1e-8, xtol=1e-8, gtol=1e-8,
                max_nfev=10, jac_scale=False, bounded=False, tr_solver="lsmr")
    ref = 0.5 * np.sum(f.numpy() ** 2, axis=1)
    np.testing.assert_allclose(p.cost(f).numpy(), ref, rtol=1e-13)
    f32 = f.float()
    assert p.cost(f32).dtype == torch.float32
    np.testing.assert_allclose(p.cost(f32).numpy(), ref, rtol=1e-5)


@needs_omp
def test_user_threads_gives_the_callers_counts_back_inside_serial_torch(two_threads) -> None:
    """Inside serial_torch a user call reads the caller's 2 threads, and 1 again after it,
    also after an error; outside serial_torch it does nothing."""
    with _blas_threads.user_threads() as did:
        assert not did and torch.get_num_threads() == 2
    with _blas_threads.serial_torch(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        with _blas_threads.user_threads() as did:
            assert did and torch.get_num_threads() == 2 and csr.product_threads() == 2
            # the engine entered again from the caller's code (a nested solve)
            with _blas_threads.serial_torch(torch.device("cpu")):
                assert torch.get_num_threads() == 1
                with _blas_threads.user_threads():
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1 and csr.product_threads() == 2
        with pytest.raises(RuntimeError, match="user"):
            with _blas_threads.user_threads():
                raise RuntimeError("user")
        assert torch.get_num_threads() == 1 and csr.product_threads() == 2
    assert torch.get_num_threads() == 2
    assert getattr(csr._LOCAL, "saved", None) is None


class _RegionsApart(TorchDispatchMode):
    """Operations over more than torch's grain size of elements run while the calling
    thread has several torch threads: the package's own, and those inside ``fun``."""

    def __init__(self, fun_name: str) -> None:
        super().__init__()
        self.fun_name = fun_name
        self.package: list[str] = []
        self.user: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        out = func(*args, **(kwargs or {}))
        sizes = [a.numel() for a in (*args, out) if isinstance(a, torch.Tensor)
                 and a.layout == torch.strided]
        name = func.__name__.split(".")[0]
        if (max(sizes, default=0) > _blas_threads.GRAIN_SIZE and torch.get_num_threads() > 1
                and name not in _NO_REGION):
            stack = traceback.extract_stack()
            if any(f.name == self.fun_name for f in stack):
                self.user.append(name)
            else:
                where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in stack
                         if "torchimize_scipy" in f.filename.replace("\\", "/")]
                if where:  # (the package's; not the test's own)
                    self.package.append(f"{name} at {where[-1]}")
        return out


#: aten operations that open no parallel region (views, metadata, constructors)
_NO_REGION = {"lift_fresh", "detach", "view", "reshape", "_reshape_alias", "alias", "expand",
              "t", "transpose", "slice", "select", "as_strided", "squeeze", "unsqueeze",
              "unbind", "permute", "empty", "new_empty", "flatten", "_unsafe_view",
              "values", "_values", "indices", "_indices", "crow_indices", "col_indices",
              "is_coalesced", "_sparse_coo_tensor_with_dims_and_tensors", "_nnz",
              "sparse_csr_tensor", "_sparse_csr_tensor_unsafe", "_to_dense"}


def _broyden_torch(x: torch.Tensor) -> torch.Tensor:
    f = (3 - x) * x + 1
    return torch.cat([f[:1], f[1:] - x[:-1]]) - torch.cat([2 * x[1:], x.new_zeros(1)])


@needs_omp
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_whole_sparse_solve_opens_no_parallel_region_of_its_own(two_threads, kind) -> None:
    """Regression: outside the step rules a sparse solve still opened torch parallel
    regions over its n = 40,000 variables (the x0 finiteness checks: five passes each
    over f0 and the Jacobian's values; trf's trial norms, the loop's finiteness sums
    and row writes, the finite-difference steps; 33 for Broyden n = 100,000). Now none;
    a torch ``fun`` still runs with the caller's two threads."""
    n = 40_000
    fun_np, sparsity = _broyden(n)
    seen: list[int] = []

    def fun_torch(x):
        seen.append(torch.get_num_threads())
        return _broyden_torch(x)

    def callback(intermediate_result):
        seen_by_callback.append(torch.get_num_threads())

    seen_by_callback: list[int] = []
    fun = fun_torch if kind == "torch" else fun_np
    x0 = -np.ones(n)
    mode = _RegionsApart("fun_torch")
    with mode:
        res = least_squares(fun, torch.as_tensor(x0) if kind == "torch" else x0,
                            jac_sparsity=sparsity, tr_solver="lsmr", method="trf",
                            callback=callback)
    assert mode.package == []
    assert len(seen_by_callback) > 0 and set(seen_by_callback) == {2}
    if kind == "torch":
        assert len(mode.user) > 0 and set(seen) == {2}
    ref = so.least_squares(fun_np, x0, jac_sparsity=sparsity, tr_solver="lsmr", method="trf")
    assert_cost_close(float(res.cost), ref.cost, 1e-8)
    assert_x_close(np.asarray(res.x), ref.x, xtol=1e-8)
    assert res.nfev == ref.nfev
    assert torch.get_num_threads() == 2


def test_x0_finiteness_checks_read_the_values_once() -> None:
    """The checks at x0 (numpy on the CPU): dense, CSR and COO values, conjugate and
    negative views; a non-finite sparse Jacobian at x0 is refused by name."""
    from torchimize_scipy._frontend import all_finite, jacobian_finite_at_x0

    v = torch.tensor([1.0, 2.0, 3.0])
    assert all_finite(v) and all_finite(-v) and all_finite(v.float())
    assert all_finite(torch.tensor([1 + 2j]).conj())
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("-inf"), 1.0]).neg())
    assert not all_finite(torch.tensor([1.0, float("inf")], requires_grad=True))
    dense = torch.tensor([[0.0, 1.0], [2.0, float("inf")]])
    for layout in ("coo", "csr"):
        ok = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        make = (lambda t: t.to_sparse()) if layout == "coo" else (lambda t: t.to_sparse_csr())
        assert jacobian_finite_at_x0(make(ok))
        assert not jacobian_finite_at_x0(make(dense))
    with pytest.raises(ValueError, match="Jacobian is not finite"):
        least_squares(lambda x: x - 1, np.zeros(3),
                      jac=lambda x: sp.csr_array(np.diag([1.0, np.nan, 1.0])))

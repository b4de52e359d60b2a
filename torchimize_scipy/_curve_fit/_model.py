r"""The whitened model: residuals :math:`L^{-1}(f(x, p) - y)`, its Jacobian, MINPACK's differences.

One class serves both public functions. It calls the user's ``f`` (and
``jac``) in one of two ways:

* row by row (:func:`curve_fit`, as scipy): ``f(x, p_1, ..., p_N)`` with the
  parameters as scalars (numpy float64, or 0-d tensors for torch input), one
  call per parameter vector;
* vectorised (:func:`batch_curve_fit`): one call ``f(x, P[:, :1], ...,
  P[:, N-1:])`` for ``b`` parameter vectors, each parameter a ``(b, 1)``
  column, ``x`` the ``xdata`` of those problems.

Everything after the call is shared: the residuals ``out - y``, the mask of
observations omitted by ``nan_policy='omit'``, the whitening with the
``sigma`` transform (a product with ``1 / sigma``, or one batched triangular
solve with the Cholesky factor of a covariance), and MINPACK's forward
differences (``fdjac2``: :math:`h_j = \sqrt{\max(\mathrm{epsfcn}, \epsilon)}\,
|p_j|`, or that factor alone where :math:`p_j = 0`; Moré, Garbow & Hillstrom,
ANL-80-74, 1980), computed for every problem of the batch at once.
Parameters arrive as numpy arrays or tensors, and the results keep that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from array_api_compat import array_namespace, device

from .. import _implicit as implicit
from .._user_functions import caller_grad, own_value
from ._data import FitData
from ._leastsq import LeastsqBook, as_tensor

#: Residuals per call of a vectorised ``f`` on the CPU (float64: 1 MiB per array
#: of ``f``'s expression); see :meth:`WhitenedModel._chunk_rows`.
CHUNK_ELEMENTS = 2**17


#: Most steps (problems times parameters) of forward differences that are tested and
#: shifted as for one problem (Python floats and a cached mask: cheapest for a few
#: values; a batch's arrays take numpy's own passes, see :meth:`WhitenedModel.fd_jacobian`).
_FEW_STEPS = 32

#: Boolean identity matrices by (size, device): the shifted points of forward differences.
_DIAGONAL_MASKS: dict[tuple[int, str], Any] = {}


def _diagonal_mask(n: int, dev: torch.device | None) -> Any:
    """The ``(n, n)`` boolean identity: a tensor on ``dev``, or numpy for ``None``."""
    key = (n, "numpy" if dev is None else str(dev))
    mask = _DIAGONAL_MASKS.get(key)
    if mask is None:
        mask = np.eye(n, dtype=bool) if dev is None else torch.eye(
            n, dtype=torch.bool, device=dev)
        if len(_DIAGONAL_MASKS) < 64:  # a few sizes and devices per session
            _DIAGONAL_MASKS[key] = mask
    return mask


def _swap_last(a: Any) -> Any:
    return a.transpose(-1, -2) if isinstance(a, torch.Tensor) else a.swapaxes(-1, -2)


def _mask(a: Any, keep: Any) -> Any:
    """Zero the entries of ``a`` whose ``keep`` (broadcast) is False."""
    if isinstance(a, torch.Tensor):
        return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
    return np.where(keep, a, 0.0)


def _mask_residuals(r: Any, keep: Any) -> Any:
    """:func:`_mask` of residuals ``r (b, k, M)``, this call's own array, by ``keep (b, M)``.

    With numpy, where at most a quarter of the problems omit observations
    (a block of pixels with a few NaN pixels, ``nan_policy='omit'``), only
    their rows are masked, in place; the other rows would be selected
    unchanged (the same values as one pass over all rows).
    """
    if isinstance(r, torch.Tensor):
        return _mask(r, keep[..., None, :])
    partial = np.flatnonzero(~keep.all(axis=1))
    if partial.size * 4 > keep.shape[0]:
        return _mask(r, keep[..., None, :])
    if partial.size:
        r[partial] = _mask(r[partial], keep[partial][..., None, :])
    return r


def whiten(a: Any, kind: str | None, T: Any) -> Any:
    """``L^{-1} a`` for the columns ``a (b, M, k)`` of each problem (``T``: 1 or b rows).

    ``kind`` 'diag': ``T (1 or b, M)`` is ``1 / sigma``; 'chol': ``T (1 or b,
    M, M)`` is the lower Cholesky factor, applied by a batched triangular
    solve of each column on its own (numpy arrays pass through torch without
    copies). A solve of several columns at once (BLAS's ``trsm``) rounds a
    column differently by how many others it has and where it stands among
    them, so the residuals of a point whitened alone (a trial) and beside
    others (MINPACK's shifted points) would differ in the last bits, and a
    batch cut into other chunks, whose points are grouped otherwise, would
    give other bits; one column at a time (``trsv``) gives each column the
    same bits wherever it is.
    """
    if kind is None:
        return a
    if kind == "diag":
        if isinstance(a, torch.Tensor):
            T = T.to(a.dtype)
        return T[..., None] * a
    numpy_in = not isinstance(a, torch.Tensor)
    if numpy_in:
        a, T = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(T)
        a = a.to(torch.promote_types(a.dtype, T.dtype))
    T = T.to(a.dtype)
    k = a.shape[-1]
    if k <= 1:
        out = torch.linalg.solve_triangular(T, a, upper=False)
    else:
        out = torch.cat([torch.linalg.solve_triangular(T, a[..., j:j + 1], upper=False)
                         for j in range(k)], -1)
    return out.numpy() if numpy_in else out


class WhitenedModel:
    """Whitened residuals ``(b, M)`` and Jacobians ``(b, M, N)`` of ``f`` on :class:`FitData`.

    ``rowwise`` chooses :func:`curve_fit`'s way of calling ``f`` (one call per
    parameter vector, scalars) over the vectorised one. ``book`` (set for
    'lm' with MINPACK's bookkeeping) records every evaluation.
    """

    #: it calls ``f`` and ``jac`` in the caller's grad mode itself (:meth:`_call`); the
    #: engine calls it in its own (``_user_functions._caller_grad_of``)
    CALLER_GRAD_INSIDE = True

    def __init__(self, f: Callable, jac: Callable | None, data: FitData, n: int,
                 col_deriv: bool, rowwise: bool) -> None:
        self.f = f
        self.jac = jac
        self._grad = torch.is_grad_enabled()  # (the caller's mode at the fit's start)
        self.data = data
        self.n = n
        self.col_deriv = col_deriv
        self.rowwise = rowwise
        self.book: LeastsqBook | None = None
        #: ``curve_fit(method='lm')`` of one parameter: ``jac`` may return its ``M`` values
        #: as ``(M,)`` or ``(1, M)`` too (scipy's ``leastsq`` takes them as the one column)
        self.vector_jac = False
        #: the dtype of the residuals :meth:`residuals` last returned (numpy's or torch's)
        self.residual_dtype: Any = None
        #: ``curve_fit`` (one problem): a covariance ``sigma`` refuses non-finite residuals
        #: or Jacobians at every evaluation with scipy's ``ValueError`` (its triangular
        #: solve checks them); a batch's problem fails alone instead
        self.finite_for_cholesky = False

    def _call(self, fn: Callable, x: Any, P: Any) -> Any:
        """``fn`` at the parameter rows ``P (rows, N)``: outputs stacked along axis 0, in the
        caller's grad mode (:func:`~torchimize_scipy._user_functions.caller_grad`)."""
        with caller_grad(self._grad):
            return self._call_in_mode(fn, x, P)

    def _call_in_mode(self, fn: Callable, x: Any, P: Any) -> Any:
        if not self.rowwise:
            return fn(x, *[P[:, j:j + 1] for j in range(self.n)])
        # Several rows: each output is copied as soon as ``fn`` returns it, before the next
        # call: a model may return the same array every time, refilled (scipy's
        # ``curve_fit`` takes ``f(x) - ydata`` at once, so such a model works there)
        if isinstance(P, torch.Tensor):
            if P.shape[0] == 1:  # (stack copies the one output)
                o = fn(x, *P[0])
                return torch.stack([o if isinstance(o, torch.Tensor) else torch.as_tensor(
                    np.asarray(o), device=P.device, dtype=P.dtype)])
            return torch.stack([o if isinstance(o, torch.Tensor) else torch.as_tensor(
                np.asarray(o), device=P.device, dtype=P.dtype)
                for o in (own_value(fn(x, *p)) for p in P)])
        if P.shape[0] == 1:  # the usual call of curve_fit: no stacking
            return np.asarray(fn(x, *P[0]))[None]
        # (np.array of the list: one C call where np.stack's Python layers cost several
        # times more, and it refuses outputs of different shapes)
        return np.array([np.array(fn(x, *p)) for p in P])

    def _chunk_rows(self, rows: int, repeat: int, like: Any) -> int:
        """Rows of ``P`` per call of ``f`` (a multiple of ``repeat``; ``rows``: one call).

        A vectorised ``f`` on the CPU is called for at most about
        :data:`CHUNK_ELEMENTS` residuals at a time, so that the temporaries
        of a numpy or torch expression stay in the processor's cache instead
        of streaming through memory once per operation (RESULTS: a block of
        10,000 Gaussian peaks). Row by row calls (:func:`curve_fit`), other
        devices, and calls that record gradients are made whole.
        """
        if self.rowwise or rows * self.data.M <= CHUNK_ELEMENTS:
            return rows
        if isinstance(like, torch.Tensor) and (like.device.type != "cpu"
                                               or torch.is_grad_enabled()):
            return rows
        return max(1, CHUNK_ELEMENTS // (repeat * max(self.data.M, 1))) * repeat

    def evaluate(self, P: Any, ids: Any, repeat: int = 1) -> Any:
        """Whitened residuals ``(b * repeat, m)`` at parameters ``P (b * repeat, N)``.

        Rows ``k * repeat``, ..., ``k * repeat + repeat - 1`` of ``P`` belong to
        problem ``ids[k]`` (``repeat > 1``: the shifted points of forward
        differences); the data of each problem are selected once and broadcast
        over its rows. Row by row, ``m`` is the length of ``f - ydata`` (a
        one-point ``ydata`` may broadcast), else ``M``. Large batches call
        ``f`` for consecutive groups of problems (:meth:`_chunk_rows`); the
        groups after the first write their residuals ``out - y`` straight into
        the result's rows (no copy, when nothing is masked or whitened).
        """
        if self.rowwise:  # curve_fit: f is called row by row anyway
            return self._evaluate(P, ids, repeat)
        rows = P.shape[0]
        step = self._chunk_rows(rows, repeat, P)
        if step >= rows:
            return self._evaluate(P, ids, repeat)
        out = None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            dest = None if out is None else out[start:stop]
            part = self._evaluate(P[start:stop], ids[start // repeat:stop // repeat], repeat,
                                  dest)
            if out is None:
                xp = array_namespace(part)
                out = xp.empty((rows, part.shape[1]), dtype=part.dtype, device=device(part))
            if part is not dest:
                out[start:stop] = part
        return out

    def _evaluate(self, P: Any, ids: Any, repeat: int, dest: Any = None) -> Any:
        """:meth:`evaluate` in one call of ``f``; ``dest`` (rows of the caller's result, of
        ``P``'s kind): written and returned when the residuals need no mask or whitening
        and have its dtype (the same subtraction, into ``dest`` instead of a new array)."""
        x, y, T, keep = self.data.select(ids, P, repeat)
        rows = P.shape[0]
        out = self._call(self.f, x, P)
        if self.rowwise:
            y = y.reshape(self.data.yshape)
        torch_in = isinstance(P, torch.Tensor)
        if torch_in and not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out), device=P.device)
        elif not torch_in:
            out = np.asarray(out)
        if self.rowwise:
            if out.ndim == 1:  # 0-d outputs, stacked: one value per row
                out = out.reshape(rows, 1)
            r = out - y
            if r.shape != out.shape and r.shape != (rows, *y.shape):
                # e.g. a column (M, 1) against ydata (M,): f - ydata would be (M, M)
                raise ValueError(
                    f"`f` returned an array of shape {tuple(out.shape[1:])} that does not "
                    f"match `ydata` of shape {tuple(y.shape)}: `f(xdata, *p) - ydata` "
                    f"would have shape {tuple(r.shape[1:])}. Return an array of the "
                    "shape of `ydata` (or a single value).")
            r = r.reshape(rows // repeat, repeat, -1)
        else:
            if out.shape != (rows, self.data.M):
                out = out.expand(rows, self.data.M) if torch_in else np.broadcast_to(
                    out, (rows, self.data.M))
            if dest is not None and keep is None and self.data.tkind is None and (
                    torch.result_type(out, y) if torch_in else np.result_type(out, y)
            ) == dest.dtype:
                sub = torch.sub if torch_in else np.subtract
                sub(out.reshape(-1, repeat, self.data.M), y[..., None, :],
                    out=dest.reshape(-1, repeat, self.data.M))
                return dest
            r = out.reshape(-1, repeat, self.data.M) - y[..., None, :]
        if keep is not None:  # (r: this call's own array, `out - y`)
            r = _mask_residuals(r, keep) if not self.rowwise else _mask(r, keep[..., None, :])
        if self.data.tkind is not None:  # whiten the repeat columns of each problem (one call)
            self._check_for_cholesky(r)
            r = _swap_last(whiten(_swap_last(r), self.data.tkind, T))
        return r.reshape(rows, -1)

    def _check_for_cholesky(self, a: Any) -> None:
        """scipy's ``ValueError`` for values a covariance's triangular solve refuses."""
        if self.finite_for_cholesky and self.data.tkind == "chol":
            finite = bool(torch.isfinite(a).all()) if isinstance(a, torch.Tensor) \
                else bool(np.isfinite(a).all())
            if not finite:
                raise ValueError("array must not contain infs or NaNs")

    def residuals(self, P: Any, ids: Any) -> Any:
        """Whitened residuals, recorded by the book: the function the solver calls."""
        r = self.evaluate(P, ids)
        self.residual_dtype = r.dtype
        book = self.book
        if book is not None and not implicit.evaluating():  # not the solve's (gradients)
            # (the book converts what it keeps; row by row, numpy parameters reach f as
            # scalars, and ``out - y`` is this call's own array: nobody writes either)
            book.record_call(ids, P, r, owned=self.rowwise and type(P) is np.ndarray)
        return r

    def jacobian(self, P: Any, ids: Any) -> Any:
        """The user's Jacobian ``(b, M, N)``, whitened (``col_deriv``: given transposed)."""
        x, _, T, keep = self.data.select(ids, P)
        J = self._call(self.jac, x, P)
        if isinstance(P, torch.Tensor):
            J = J if isinstance(J, torch.Tensor) else torch.as_tensor(
                np.asarray(J), device=P.device, dtype=P.dtype)
        else:
            J = np.asarray(J)
        if self.vector_jac:  # one parameter: (M,), (1, M) or (M, 1), each row the column
            J = J.reshape(J.shape[0], -1, 1)
        elif self.col_deriv:
            J = _swap_last(J)
        if keep is not None:
            J = _mask(J, keep[..., None])
        elif self.data.tkind is None and not self.rowwise:
            # unweighted, a batch's J is the user's own array, which the next call may
            # refill while the engine keeps this one: copied (curve_fit copies its own rows)
            J = own_value(J)
        if self.data.tkind is not None:
            self._check_for_cholesky(J)
        J = whiten(J, self.data.tkind, T)
        if self.book is not None:
            self.book.record_jac(ids, J, lambda: self._value_at(P, ids))
        return J

    def _value_at(self, P: Any, ids: Any) -> Any:
        """Residuals at ``P``, in ``P``'s kind: the book's last ones when they were made
        there (read them only), else new."""
        f0 = self.book.value_at(ids, P) if self.book is not None else None
        if f0 is not None:
            return f0
        f0 = self.evaluate(P, ids)
        if isinstance(P, torch.Tensor):
            return as_tensor(f0).to(P.device)
        return np.asarray(f0)

    def fd_jacobian(self, P: Any, ids: Any, residuals: Any = None) -> Any:
        """MINPACK's forward differences for ``b`` problems (``N`` shifted points each).

        ``residuals``: the residuals at ``P`` as the engine holds them (passed
        to a :class:`~torchimize_scipy._user_functions.WithResiduals` ``jac``);
        used when they have the dtype :meth:`residuals` returns (then they
        are its values, not converted), else those at ``P`` are the book's
        (:meth:`_value_at`).

        One body for numpy and torch parameters: numpy parameters give numpy
        arithmetic, tensors torch operations, the same IEEE operations in
        both. A torch batch (and :func:`curve_fit`'s one problem) that ``f``
        takes in one call is differenced in place in the order ``f`` returns
        the values (a subtraction and a division on the residuals of the
        shifted points, this call's own array: no further buffer) and ``J``
        is that array's transposed view. A numpy batch, and large torch
        batches on the CPU, are differenced in groups of problems as
        :meth:`evaluate` calls ``f`` (one group when ``f`` takes the batch in
        one call; each group's differences computed while its residuals are
        in the cache) into one contiguous ``(b, M, N)`` array: the
        subtraction runs in place on the group's residuals (this call's own
        array), in the order ``f`` returns them, and the division writes its
        quotients transposed into ``J``'s rows (on 8,192 Gaussian peaks, 7 ms
        per Jacobian besides ``f``, median 13 ms, against 17 ms, median 15
        ms, for a subtraction reading the group transposed into ``J`` and a
        division in place there, 40 alternated runs). A transposed view
        would cost the engine a copy of ``J`` per Jacobian (``from_user``
        makes numpy values contiguous), and the engine's ``J^T J`` of a
        transposed view differs in the last bits from that of a contiguous
        ``J`` (MKL's ``bmm``), so the layout stays. For numpy, numpy's own
        strided division writes ``J``: in 0.7-0.8 of the time of torch's
        division into the same transposed destination, and less than a
        division in place followed by a transposed copy (groups of 512
        peaks, one thread, alternated runs).
        The shifted points are selected from
        ``P`` and ``P + h`` by a cached boolean identity, with numpy's and
        torch's own functions (no namespace look-up per call: for one problem
        of :func:`curve_fit` the set-up costs about as much as the calls of
        ``f``).
        """
        book = self.book
        torch_in = isinstance(P, torch.Tensor)
        xp: Any = torch if torch_in else np
        dev = P.device if torch_in else "cpu"
        f0 = residuals if residuals is not None and residuals.dtype == self.residual_dtype \
            else self._value_at(P, ids)  # in P's kind
        b, n = P.shape
        if torch_in:
            rel = torch.as_tensor(book.rel_step, dtype=P.dtype, device=dev)
            h = rel * torch.abs(P)
            h = torch.where(h == 0, rel, h)
        else:
            rel = np.asarray(book.rel_step, dtype=P.dtype)
            h = rel * np.abs(P)
            # (on the host a test is cheaper than the selection. A few steps: ``0.0 in``
            # compares as ``h == 0`` on Python floats, no reduction call; a batch's steps:
            # ``all`` (one pass in C; a NaN counts as nonzero in both), 1 % of the list's
            # time for 10,000 problems)
            if (0.0 in h.ravel().tolist()) if h.size <= _FEW_STEPS else not h.all():
                h = np.where(h == 0, rel, h)
        # row j of each problem's block: P with p_j replaced by p_j + h_j (copied, not
        # P + diag(h): that would turn a parameter -0.0 into +0.0)
        if torch_in or b * n <= _FEW_STEPS:
            shifted = xp.where(_diagonal_mask(n, P.device if torch_in else None),
                               (P + h)[:, None, :], P[:, None, :])
        else:  # n copies of each row, then p_j + h_j written on each block's diagonal:
            # the selection's values, an eighth of its time for 10,000 problems of 4
            shifted = np.repeat(P[:, None, :], n, axis=1)
            shifted.reshape(b, n * n)[:, ::n + 1] = P + h
        Pp = shifted.reshape(b * n, n)
        group = max(1, self._chunk_rows(b * n, n, P) // n)  # problems per call of f
        J = None
        for start in range(0, b, group):
            stop = min(b, start + group)
            F = self._evaluate(Pp if group >= b else Pp[start * n:stop * n],
                               ids if group >= b else ids[start:stop], n)
            F = as_tensor(F).to(dev) if torch_in else np.asarray(F)
            F = F.reshape(stop - start, n, -1)
            if torch_in and torch.is_grad_enabled() and (
                    F.requires_grad or f0.requires_grad or h.requires_grad):
                # autograd: one group (_chunk_rows does not split calls that record gradients)
                J = _swap_last((F - f0[start:stop, None, :]) / h[start:stop, :, None])
            elif group >= b and (torch_in or self.rowwise):  # one call: in place on F
                # (this call's own, see below), in f's row order, and the transposed view
                sub, div = (torch.sub, torch.div) if torch_in else (np.subtract, np.divide)
                sub(F, f0[:, None, :], out=F)
                div(F, h[:, :, None], out=F)
                J = _swap_last(F)
            else:  # each group's differences written transposed into one (b, M, N) array
                # (numpy batches in one call too: the engine would copy a transposed view)
                if J is None:
                    shape = (b, F.shape[-1], n)
                    J = torch.empty(shape, dtype=F.dtype, device=dev) if torch_in else \
                        np.empty(shape, dtype=F.dtype)
                # F is this call's own (evaluate's `out - y` or later): the subtraction in
                # place, in f's order, while it is in the cache; the division writes J's rows
                sub, div = (torch.sub, torch.div) if torch_in else (np.subtract, np.divide)
                sub(F, f0[start:stop, None, :], out=F)
                div(F, h[start:stop, :, None], out=_swap_last(J[start:stop]))
        book.add_fd_evals(ids, n)
        # (numpy J: this call's own array, F's or the one made above; nobody writes it)
        book.record_jac(ids, J, lambda: f0, owned=type(J) is np.ndarray)
        return J

"""scipy's ``leastsq`` (``method='lm'``): its options, messages, ``info`` codes and bookkeeping.

``curve_fit(method='lm')`` runs ``least_squares(method='lm')`` (our MINPACK
Levenberg-Marquardt step rule) but reports what scipy's ``leastsq`` reports:
``info`` (``ier``) 1 to 5 and their messages, evaluation counts that include
the forward differences (``nfev``, ``maxfev``), and ``fjac``/``ipvt``/``qtf``
and ``pcov`` from the Jacobian of MINPACK's *last Jacobian evaluation*.
:class:`LeastsqBook` keeps those counts and Jacobians for B problems.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch

from .._arrays import to_host
from .._engine import status as codes

#: scipy's ``leastsq`` defaults, used for ``method='lm'``.
LEASTSQ_FTOL = 1.49012e-8
LEASTSQ_XTOL = 1.49012e-8
LEASTSQ_GTOL = 0.0
#: Keywords of scipy's ``leastsq`` accepted (and translated) for ``method='lm'``.
LEASTSQ_KEYS = ("col_deriv", "ftol", "xtol", "gtol", "maxfev", "epsfcn", "factor", "diag")
#: least_squares status -> MINPACK ``info`` (the ``ier`` of ``leastsq``).
STATUS_TO_IER = {codes.FTOL: 1, codes.XTOL: 2, codes.FTOL_XTOL: 3, codes.GTOL: 4,
                 codes.MAX_NFEV: 5, codes.FTOL_TINY: 6, codes.XTOL_TINY: 7,
                 codes.GTOL_TINY: 8}
_EPS = float(np.finfo(float).eps)
#: :meth:`LeastsqBook._select`'s index for "every problem, in order".
ALL = slice(None)


def as_tensor(a: Any) -> torch.Tensor:
    """``a`` as a tensor (numpy arrays without a copy, and without a torch operation)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.flags.writeable and a.dtype.kind in "biuf":
        try:
            return torch.from_numpy(a)
        except (TypeError, ValueError):  # e.g. negative strides: torch copies
            pass
    return torch.as_tensor(a)


def _private(value: torch.Tensor, stored: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """A private copy of ``value`` on ``device`` in the dtype of ``stored`` (if any)."""
    dtype = value.dtype if stored is None else stored.dtype
    if value.device != device or value.dtype != dtype:
        return value.to(device, dtype)
    return value.clone()


def _private_any(value: Any, stored: Any, device: torch.device) -> Any:
    """:func:`_private` for a book of one problem on the host, in the kind of ``stored``.

    A numpy ``value`` (and nothing stored yet, or a numpy array) gives a numpy
    copy (a fraction of a microsecond, against a few for a tensor's clone);
    anything else a tensor copy as :func:`_private` makes it.
    """
    if isinstance(stored, np.ndarray) or (stored is None and isinstance(value, np.ndarray)):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.array(value, dtype=value.dtype if stored is None else stored.dtype)
    value = as_tensor(value)
    return _private(value.detach() if value.requires_grad else value, stored, device)


def _kept(value: Any, stored: Any, device: torch.device, owned: bool) -> Any:
    """What a book of one keeps of ``value``: the array itself when ``owned`` (nobody else
    writes it) and of the kept dtype, else :func:`_private_any`'s copy."""
    if owned and type(value) is np.ndarray and (stored is None or (
            type(stored) is np.ndarray and stored.dtype == value.dtype)):
        return value
    return _private_any(value, stored, device)


class MaxfevReached(Exception):
    """Raised inside :func:`curve_fit`'s residual function once ``maxfev`` is spent."""


def reject_loss(kwargs: dict, caller: str) -> None:
    """scipy's ``leastsq`` takes no ``loss``: with ``method='lm'`` it is a TypeError."""
    if "loss" in kwargs:
        raise TypeError(f"{caller}() with method='lm' got an unexpected keyword argument "
                        "'loss' (scipy's leastsq has no robust loss; use method='trf' or "
                        "'dogbox').")


def leastsq_options(kwargs: dict, n: int, user_jac: bool) -> dict:
    """Pop ``leastsq``'s keywords from ``kwargs``, check them as MINPACK does.

    ``x_scale`` is set from ``diag``; the returned dict holds ``ftol, xtol,
    gtol, maxfev, epsfcn`` with ``leastsq``'s defaults.
    """
    opts = {"ftol": kwargs.pop("ftol", LEASTSQ_FTOL), "xtol": kwargs.pop("xtol", LEASTSQ_XTOL),
            "gtol": kwargs.pop("gtol", LEASTSQ_GTOL), "epsfcn": kwargs.pop("epsfcn", None)}
    maxfev = kwargs.pop("maxfev", 0)
    if "max_nfev" in kwargs:
        if maxfev:
            raise TypeError("curve_fit() got both 'maxfev' and 'max_nfev'.")
        maxfev = kwargs.pop("max_nfev") or 0
    factor = kwargs.pop("factor", 100)
    diag = kwargs.pop("diag", None)
    if maxfev == 0:
        maxfev = 100 * (n + 1) if user_jac else 200 * (n + 1)
    opts["maxfev"] = maxfev
    improper = (opts["ftol"] < 0 or opts["xtol"] < 0 or opts["gtol"] < 0 or maxfev < 0
                or factor <= 0
                or (diag is not None and bool(np.any(np.asarray(to_host(diag)) <= 0))))
    if improper:  # MINPACK's info = 0; curve_fit turns it into a RuntimeError
        raise RuntimeError("Optimal parameters not found: Improper input parameters.")
    opts["factor"] = float(factor)
    if diag is not None:
        if "x_scale" in kwargs:
            raise ValueError("Give only one of `diag` and `x_scale`.")
        kwargs["x_scale"] = 1.0 / np.asarray(to_host(diag), dtype=float)
    if opts["epsfcn"] is not None and kwargs.get("diff_step") is not None:
        # (each sets the relative step: one would be dropped)
        raise ValueError("Give only one of `epsfcn` and `diff_step`.")
    return opts


def lm_tolerances(opts: dict) -> dict:
    """``least_squares('lm')`` keywords from ``leastsq``'s options.

    ``least_squares`` needs tolerances of at least machine epsilon;
    ``leastsq`` accepts smaller ones (including ``gtol=0``, its default), and
    MINPACK then stops with its "tolerance too small" codes (``info`` 6, 7,
    8) where they decide. The caller solves inside
    :func:`~torchimize_scipy._validation.leastsq_rules`, which lets them
    through as they are.
    """
    return {"ftol": opts["ftol"], "xtol": opts["xtol"], "gtol": opts["gtol"],
            "max_nfev": opts["maxfev"]}


#: the start of the engine's message for a user Jacobian of the wrong shape
_JAC_SHAPE = re.compile(r"The return value of `jac` has wrong shape: expected (\([^)]*\)), "
                        r"actual (\([^)]*\))")


def dfun_shape_error(e: ValueError) -> TypeError | None:
    """``leastsq``'s ``TypeError`` for a ``jac`` (its ``Dfun``) of the wrong shape, or None.

    scipy's ``curve_fit`` hands its ``jac`` to ``leastsq`` as ``Dfun``, whose
    shape check raises ``TypeError`` with this text (naming curve_fit's
    wrapper, ``_memoized_func``); ``least_squares`` raises ``ValueError``.
    """
    found = _JAC_SHAPE.match(str(e))
    if found is None:
        return None
    return TypeError("leastsq: there is a mismatch between the input and output shape of "
                     "the 'Dfun' argument '_memoized_func'.Shape should be "
                     f"{found.group(1)} but it is {found.group(2)}.")


def epsfcn_diff_step(epsfcn: Any, kwargs: dict) -> None:
    """For a Jacobian scheme of ours, ``epsfcn`` means ``diff_step = sqrt(epsfcn)``."""
    if epsfcn is not None and "diff_step" not in kwargs:
        kwargs["diff_step"] = math.sqrt(max(float(epsfcn), _EPS))


def minpack_step(epsfcn: Any, diff_step: Any, n: int, dtype: Any) -> Any:
    """Relative forward-difference step: ``sqrt(max(epsfcn, eps))`` as MINPACK."""
    eps_mach = float(torch.finfo(dtype).eps)
    if epsfcn is not None:
        return math.sqrt(max(float(epsfcn), eps_mach))
    if diff_step is not None:
        return np.broadcast_to(np.asarray(to_host(diff_step), dtype=float), (n,))
    return math.sqrt(eps_mach)


def leastsq_message(opts: dict, info: int) -> str:
    """``leastsq``'s termination message for MINPACK's ``info`` (1 to 8; scipy's texts)."""
    if info == 1:
        return ("Both actual and predicted relative reductions in the sum of squares\n"
                f"  are at most {opts['ftol']:f}")
    if info == 2:
        return f"The relative error between two consecutive iterates is at most {opts['xtol']:f}"
    if info == 3:
        return ("Both actual and predicted relative reductions in the sum of squares\n"
                f"  are at most {opts['ftol']:f} and the relative error between two "
                f"consecutive iterates is at \n  most {opts['xtol']:f}")
    if info == 4:
        return ("The cosine of the angle between func(x) and any column of the\n"
                f"  Jacobian is at most {opts['gtol']:f} in absolute value")
    if info == 5:
        return f"Number of calls to function has reached maxfev = {opts['maxfev']}."
    if info == 6:
        return (f"ftol={opts['ftol']:f} is too small, no further reduction in the sum of "
                "squares\n  is possible.")
    if info == 7:
        return (f"xtol={opts['xtol']:f} is too small, no further improvement in the "
                "approximate\n  solution is possible.")
    if info == 8:
        return (f"gtol={opts['gtol']:f} is too small, func(x) is orthogonal to the columns "
                "of\n  the Jacobian to machine precision.")
    raise ValueError(f"no leastsq message for info = {info}")


def leastsq_messages(opts: dict) -> dict[int, str]:
    """``leastsq``'s termination messages for MINPACK's ``info`` 1 to 8 (a batch's table;
    one fit formats only its own, :func:`leastsq_message`)."""
    return {info: leastsq_message(opts, info) for info in range(1, 9)}


def status_to_ier(status: torch.Tensor) -> torch.Tensor:
    """MINPACK's ``info`` per problem; 0 for our stops that have none (non-finite, singular)."""
    ier = torch.zeros_like(status)
    for code, info in STATUS_TO_IER.items():
        ier = torch.where(status == code, info, ier)
    return ier


def minpack_qr_outputs(J: np.ndarray, fvec: np.ndarray | None,
                       factors_only: bool = False) -> tuple:
    """``leastsq``'s ``fjac, ipvt, qtf`` and ``R`` from the pivoted QR ``J P = Q R``.

    ``fjac`` is returned as MINPACK stores it (and ``leastsq`` transposes it):
    ``R`` on and above the diagonal, and below it column ``j`` of MINPACK's
    Householder vector ``u_j`` (reflector ``I - u_j u_j^T / u_jj``), which is
    LAPACK's ``tau_j v_j`` for LAPACK's reflector ``I - tau_j v_j v_j^T``
    (``geqp3``'s raw output). ``factors_only`` (``curve_fit`` without
    ``full_output``, whose covariance needs ``R`` and the pivots alone): ``fjac``
    and ``qtf`` are None, and neither ``Q`` (LAPACK's ``orgqr``) nor ``Q^T fvec``
    is formed; ``ipvt`` and ``R`` are the same values.
    """
    m, n = J.shape
    A = np.asarray_chkfinite(J)  # the check of ``scipy.linalg.qr``
    geqp3, orgqr = _qr_routines(A.dtype.char)
    # the pivoted QR once (LAPACK's geqp3, workspace from its query as scipy.linalg.qr
    # sizes it); Q (orgqr of a copy of the same reflectors) is what
    # ``scipy.linalg.qr(J, pivoting=True, mode="economic")`` returns, bit for bit
    raw, jpvt, tau = _lapack(geqp3, A)
    perm = jpvt - 1  # 1-based pivots
    if factors_only:  # (R: the upper triangle of geqp3's leading n x n block)
        return None, perm.astype(np.int32), None, np.triu(raw[:n, :n])
    below = _strictly_lower(m, n)  # (np.triu and np.tril, with one kept mask)
    upper = np.where(below, 0.0, raw)
    R = upper[:n, :n].copy()
    fjac = upper + np.where(below, raw, 0.0) * tau[np.newaxis, :n]
    if m < n:
        Q = _lapack(orgqr, raw[:, :m].copy(), tau, overwrite_a=1)[0]
    else:
        Q = _lapack(orgqr, raw.copy(), tau, overwrite_a=1)[0]
    qtf = Q.T @ fvec
    # A column with nothing below its diagonal (the last of a square J, or exact zeros):
    # LAPACK leaves it alone (tau = 0), MINPACK's qrfac reflects it all the same (its
    # reflector e_j -> -e_j), which negates row j of R and entry j of Q^T f. Taken over
    # where the diagonal is non-zero (MINPACK skips a zero column too).
    k = min(m, n)
    flip = (tau[:k] == 0) & (raw[np.arange(k), np.arange(k)] != 0)
    if flip.any():
        rows = np.flatnonzero(flip)
        fjac[rows] -= 2.0 * upper[rows]  # (R's part of the row; earlier reflectors' kept)
        R[rows[rows < n]] *= -1
        qtf[rows] = -qtf[rows]
    return fjac.T.copy(), perm.astype(np.int32), qtf, R


@functools.lru_cache(maxsize=64)
def _strictly_lower(m: int, n: int) -> np.ndarray:
    """The ``(m, n)`` mask of the entries below the diagonal (read only; a few shapes per
    session)."""
    mask = np.tri(m, n, -1, dtype=bool)
    mask.flags.writeable = False
    return mask


@functools.cache
def _qr_routines(char: str) -> tuple[Any, Any]:
    """LAPACK's ``geqp3`` and ``orgqr`` for arrays of dtype ``char`` (looked up once)."""
    sample = np.empty((1, 1), dtype=char)
    geqp3, = scipy.linalg.get_lapack_funcs(("geqp3",), (sample,))
    orgqr, = scipy.linalg.get_lapack_funcs(("orgqr",), (sample,))
    return geqp3, orgqr


#: LAPACK's optimal workspace by routine and matrix shape (its answer to a query depends
#: on nothing else): one query per shape and session
_LWORK: dict[tuple, Any] = {}


def _lapack(routine: Any, *args: Any, **kwargs: Any) -> tuple:
    """``routine(*args)`` with its optimal workspace (a query the first time for a shape);
    its outputs without ``work`` and ``info``."""
    key = (routine.typecode, routine.__name__, args[0].shape)
    lwork = _LWORK.get(key)
    if lwork is None:
        query = routine(*args, lwork=-1, **kwargs)
        lwork = query[-2][0].real.astype(np.int_)
        if len(_LWORK) < 256:  # a few shapes per session
            _LWORK[key] = lwork
    out = routine(*args, lwork=lwork, **kwargs)
    if out[-1] < 0:
        raise ValueError(f"illegal value in {-out[-1]}th argument of internal LAPACK "
                         "routine")
    return out[:-2]


class LeastsqBook:
    """MINPACK's bookkeeping for ``method='lm'``, per problem of a batch.

    ``trials`` counts residual evaluations after the first Jacobian (MINPACK's
    trial points), ``fd_evals`` those of the forward differences; once a trial
    leaves ``1 + trials + fd_evals >= maxfev`` the problem is ``spent``, and a
    further trial is where MINPACK stops with ``info = 5`` (``hit``).

    At each Jacobian evaluation the book keeps ``summary(J)`` (the Jacobian
    itself, or what the caller needs of it, e.g. ``(J^T J)^{-1}``) and, with
    ``keep_residuals``, the residuals there; the last two are kept, so that
    the one of MINPACK's last Jacobian evaluation is at hand (see
    :meth:`uncounted_jacobian`). With ``keep_jacobians=False`` it keeps
    neither and only counts (:meth:`minpack_njev`): for a caller whose
    engine run evaluates no Jacobian after a problem's last trial
    (``Problem.final_jacobian=False``), so that the engine's final Jacobian
    is MINPACK's last one.

    The per-problem counts and flags are numpy arrays when the book lives on
    the CPU (each update of a few integers then costs a fraction of a torch
    operation's dispatch; the book is updated at every evaluation), tensors
    on other devices (or with ``host=False``); what the book hands out are
    tensors on its device.

    A book of one problem on the host (:func:`curve_fit`'s, ``one``) keeps
    the points, residuals and Jacobians it is given in their own kind: numpy
    copies for a numpy model (the one-problem path records every evaluation,
    and a numpy copy costs a fraction of a tensor's clone), tensors
    otherwise; :meth:`value_at` answers in the kind of the point it is asked
    about, and the counts it hands out are tensors as for any book.

    A batch's book made with ``keep_points=False`` keeps no points and
    residuals at all (:meth:`value_at` answers None): for a caller whose
    Jacobians receive the residuals from the engine
    (:class:`~torchimize_scipy._user_functions.WithResiduals`).
    """

    #: the per-problem counts and flags (numpy arrays on the CPU, else tensors)
    COUNTS = ("trials", "fd_evals", "jac_calls", "spent", "hit", "seen", "jac_after_trial")

    def __init__(self, maxfev: float, rel_step: Any, B: int, device: Any,
                 summary: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 keep_residuals: bool = False, keep_jacobians: bool = True,
                 host: bool | None = None, keep_points: bool = True) -> None:
        self.maxfev = maxfev
        self.rel_step = rel_step
        self.B = B
        self.device = torch.device(device)
        self.summary = summary if summary is not None else (lambda J: J)
        #: no ``summary``: the Jacobian itself is kept (in its own kind for a book of one)
        self._plain_summary = summary is None
        self.keep_residuals = keep_residuals
        self.keep_jacobians = keep_jacobians
        #: counts on the host (numpy) when the book lives on the CPU (``host=False`` keeps
        #: tensors there too: the code other devices run, for the tests)
        self.host = self.device.type == "cpu" and host is not False
        #: one problem on the host: every update is for all rows, values kept in their kind
        self.one = self.host and B == 1
        #: a batch's book keeps each problem's last point and residuals (for
        #: :meth:`value_at`) unless the Jacobians get them from the engine (``False``)
        self.keep_points = keep_points or self.one
        if self.host:
            z, no = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=bool)
        else:
            z = torch.zeros(B, dtype=torch.long, device=self.device)
            no = torch.zeros(B, dtype=torch.bool, device=self.device)
        #: per-problem values ``(B, ...)``: counts, flags (``jac_after_trial``: the last
        #: Jacobian came after the last trial evaluation; :data:`COUNTS`), and tensors: the
        #: last evaluation point and residuals (``last_x``, ``last_f``, from the first call
        #: on) and, from the first Jacobian on, ``summary``/``f`` at the last two Jacobians
        #: (``prev_``)
        self.rows: dict[str, Any] = {
            "trials": z, "fd_evals": z.copy() if self.host else z.clone(),
            "jac_calls": z.copy() if self.host else z.clone(), "spent": no,
            "hit": no.copy() if self.host else no.clone(),
            "seen": no.copy() if self.host else no.clone(),
            "jac_after_trial": no.copy() if self.host else no.clone()}
        #: every problem has been evaluated once (known without reading ``seen``)
        self._seen_all = False

    def _tensor(self, name: str) -> torch.Tensor:
        """The counts or flags ``name`` as a tensor on the book's device."""
        value = self.rows[name]
        return torch.from_numpy(value) if self.host else value

    @property
    def spent(self) -> torch.Tensor:
        """``(B,)``: the ``maxfev`` budget is used up; a further trial is refused."""
        return self._tensor("spent")

    def any_spent(self) -> bool:
        """Whether some problem has used up its budget (:attr:`spent`)."""
        spent = self.rows["spent"]
        return bool(spent[0]) if self.one else bool(spent.any())

    @property
    def hit(self) -> torch.Tensor:
        """``(B,)``: a trial was made with the budget used up (MINPACK's ``info = 5``)."""
        return self._tensor("hit")

    @property
    def jac_calls(self) -> torch.Tensor:
        """``(B,)``: Jacobian evaluations, ours included (see :meth:`uncounted_jacobian`)."""
        return self._tensor("jac_calls")

    def _select(self, ids: torch.Tensor) -> Any:
        """``ids`` as an index: :data:`ALL` when they are all problems in order (no gather).

        Otherwise a tensor on the book's device, with its numpy twin for the host counts.
        """
        if ids.shape[0] == self.B and (self.B == 1 or bool((ids.diff() > 0).all())):
            return ALL
        ids = ids.to(self.device)
        return (ids, ids.numpy()) if self.host else (ids, ids)

    def _get(self, name: str, sel: Any) -> Any:
        t = self.rows[name]
        if sel is ALL:
            return t
        return t[sel[1]] if isinstance(t, np.ndarray) else t.index_select(0, sel[0])

    def _count(self, name: str, sel: Any, value: Any) -> None:
        """Rows ``sel`` of the counts or flags ``name`` set to ``value`` (never in place
        for every row: a new array or tensor)."""
        if sel is ALL:
            self.rows[name] = value
        elif self.host:
            self.rows[name][sel[1]] = value
        else:
            self.rows[name].index_copy_(0, sel[0], value)

    def _put(self, name: str, sel: Any, value: torch.Tensor, copy: bool = False) -> None:
        """Rows ``sel`` of the tensor ``name`` set to ``value``.

        For all rows the stored tensor is replaced (``copy``: by a private
        copy of ``value``, for tensors that others hold), never written in
        place; for some rows it is written in place (allocated at first use).
        """
        t = self.rows.get(name)
        if sel is ALL:
            if copy:  # (numpy copies only in a book of one, see _private_any)
                value = _private_any(value, t, self.device) if self.one else _private(
                    value, t, self.device)
            elif value.device != self.device or (t is not None and value.dtype != t.dtype):
                value = value.to(self.device, value.dtype if t is None else t.dtype)
            self.rows[name] = value
            return
        if t is None:
            t = self.rows[name] = torch.zeros((self.B, *value.shape[1:]), dtype=value.dtype,
                                              device=self.device)
        t.index_copy_(0, sel[0], value.to(self.device, t.dtype))

    def _rows_of(self, ids: Any) -> Any:
        """The index of the problems ``ids`` (:data:`ALL` for a book of one, unread)."""
        return ALL if self.one else self._select(as_tensor(ids))

    def record_call(self, ids: Any, x: Any, r: Any, owned: bool = False) -> None:
        """One residual evaluation of the problems ``ids`` at ``x``, giving ``r``.

        ``x`` and ``r`` are tensors or numpy arrays (a book of one keeps numpy
        copies of numpy ones; the others are kept as tensors). ``owned``: numpy
        ``x`` and ``r`` that nobody else writes (``curve_fit``'s row by row
        evaluation), which a book of one keeps as they are where their dtype is
        the one kept (no copy; the book never writes them either).
        """
        if self.one:
            self._record_call_one(x, r, owned)
            return
        x, r = as_tensor(x), as_tensor(r)
        sel = self._select(as_tensor(ids))
        if sel is ALL and self.host:
            self._record_call_all(x, r)
            return
        started = self._get("jac_calls", sel) > 0  # evaluations after the first Jacobian
        spent = self._get("spent", sel)            # are trials
        self._count("hit", sel, self._get("hit", sel) | (spent & started))
        trials = self._get("trials", sel) + started
        self._count("trials", sel, trials)
        # a trial clears the flag (it can only be set after a Jacobian, i.e. when started)
        self._count("jac_after_trial", sel, started & False)
        if self.keep_points:
            self._put("last_x", sel, x.detach() if x.requires_grad else x, copy=True)
            self._put("last_f", sel, r.detach() if r.requires_grad else r, copy=True)
        if not (sel is ALL and self._seen_all):  # once all are seen, they stay seen
            self._count("seen", sel, started | True)
            self._seen_all = self._seen_all or sel is ALL
        total = 1 + trials + self._get("fd_evals", sel)
        self._count("spent", sel, spent | (started & (total >= self.maxfev)))

    def _record_call_one(self, x: Any, r: Any, owned: bool = False) -> None:
        """:meth:`record_call` for a book of one (``curve_fit``, once per evaluation).

        The updates of :meth:`_record_call_all` decided on the counts' single
        entries (numpy scalars: a tenth of a ufunc call on a one-entry
        array each); an array is replaced only where its value changes (never
        written in place, as everywhere in the book).
        """
        rows = self.rows
        if rows["jac_calls"][0] > 0:  # after the first Jacobian: a trial
            trials = int(rows["trials"][0]) + 1  # (Python ints: no numpy scalar arithmetic)
            rows["trials"] = np.array([trials], dtype=np.int64)
            if rows["spent"][0]:
                if not rows["hit"][0]:
                    rows["hit"] = np.ones(1, dtype=bool)
            elif 1 + trials + int(rows["fd_evals"][0]) >= self.maxfev:
                rows["spent"] = np.ones(1, dtype=bool)
        if rows["jac_after_trial"][0]:
            rows["jac_after_trial"] = np.zeros(1, dtype=bool)
        rows["last_x"] = _kept(x, rows.get("last_x"), self.device, owned)
        rows["last_f"] = _kept(r, rows.get("last_f"), self.device, owned)
        if not self._seen_all:
            rows["seen"] = np.ones(1, dtype=bool)
            self._seen_all = True

    def _record_call_all(self, x: Any, r: Any) -> None:
        """:meth:`record_call` for every problem, counts on the host (the one-problem path
        of ``curve_fit``, once per evaluation): the same updates on numpy arrays, without
        the row selection's indirections. ``x`` and ``r`` are tensors, or numpy arrays
        for a book of one (see :func:`_private_any`)."""
        rows = self.rows
        started = rows["jac_calls"] > 0
        spent = rows["spent"]
        rows["hit"] = rows["hit"] | (spent & started)
        trials = rows["trials"] + started
        rows["trials"] = trials
        rows["jac_after_trial"] = np.zeros(self.B, dtype=bool)
        if self.keep_points:  # private copies (the caller's may be reused); the first's dtype
            rows["last_x"] = _private_any(x, rows.get("last_x"), self.device)
            rows["last_f"] = _private_any(r, rows.get("last_f"), self.device)
        if not self._seen_all:  # once all are seen, they stay seen
            rows["seen"] = np.ones(self.B, dtype=bool)
            self._seen_all = True
        total = 1 + trials + rows["fd_evals"]
        rows["spent"] = spent | (started & (total >= self.maxfev))

    def value_at(self, ids: Any, x: Any) -> Any:
        """The residuals last evaluated at ``x`` for problems ``ids``, if they were made there.

        In the kind of ``x``: a numpy array for a numpy ``x``, else a tensor on
        ``x``'s device (the book's own, not a copy: read it only).
        """
        if "last_x" not in self.rows:
            return None
        sel = self._rows_of(ids)
        if not (sel is ALL and self._seen_all) and not bool(self._get("seen", sel).all()):
            return None
        last_x = self._get("last_x", sel)
        if isinstance(last_x, np.ndarray):  # a book of one, fed numpy arrays
            xn = x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()
            if xn.dtype != last_x.dtype:
                xn = xn.astype(last_x.dtype)
            # (elementwise ==, as torch.equal: -0.0 equals 0.0, NaN nothing; Python floats
            # compare faster than a ufunc and its reduction for a few parameters)
            if xn.shape != last_x.shape or xn.tolist() != last_x.tolist():
                return None
            last_f = self.rows["last_f"]
            return last_f if isinstance(x, np.ndarray) else as_tensor(last_f).to(x.device)
        numpy_x = isinstance(x, np.ndarray)
        x = as_tensor(x)
        device = x.device
        x = x.detach()
        if device != self.device or x.dtype != last_x.dtype:
            x = x.to(self.device, last_x.dtype)
        if not torch.equal(last_x, x):
            return None
        last_f = self._get("last_f", sel)
        if numpy_x:
            return last_f.cpu().numpy()
        return last_f if last_f.device == device else last_f.to(device)

    def record_jac(self, ids: Any, J: Any, residuals: Callable[[], Any],
                   owned: bool = False) -> None:
        """A Jacobian ``J (b, m, n)`` of the problems ``ids``.

        ``residuals()`` gives the residuals at the Jacobian's point, called
        only when the book keeps them. ``J`` and the residuals are tensors or
        numpy arrays (kept as :meth:`record_call` keeps its values; ``owned``:
        a numpy ``J`` that nobody else writes, the forward differences' own
        array, which a book of one keeps without a copy).
        """
        if self.one:
            self._record_jac_one(J, residuals, owned)
            return
        sel = self._rows_of(ids)
        values = {}
        if self.keep_jacobians:
            values["summary"] = self._summarised(J)
        if self.keep_residuals:
            values["f"] = as_tensor(residuals())
        for name, value in values.items():
            if name in self.rows:
                if sel is ALL:  # replaced below, never written in place: no copy needed
                    self.rows["prev_" + name] = self.rows[name]
                else:
                    self._put("prev_" + name, sel, self._get(name, sel).clone())
            self._put(name, sel, value, copy=True)
        self._count("jac_calls", sel, self._get("jac_calls", sel) + 1)
        self._count("jac_after_trial", sel, self._get("trials", sel) > 0)

    def _record_jac_one(self, J: Any, residuals: Callable[[], Any],
                        owned: bool = False) -> None:
        """:meth:`record_jac` for a book of one (``curve_fit``, once per Jacobian): the same
        updates without the row selection and the loop over the kept values."""
        rows = self.rows
        if self.keep_jacobians:
            if self._plain_summary:
                self._keep_one("summary", J, owned)
            else:
                self._keep_one("summary", self._summarised(J))
        if self.keep_residuals:
            self._keep_one("f", residuals())
        rows["jac_calls"] = rows["jac_calls"] + 1
        rows["jac_after_trial"] = rows["trials"] > 0

    def _summarised(self, J: Any) -> Any:
        """:attr:`summary` of the Jacobian ``J`` (a tensor or numpy array), detached, on
        the book's device."""
        J = as_tensor(J)
        J = J.detach() if J.requires_grad else J
        return self.summary(J if J.device == self.device else J.to(self.device))

    def _keep_one(self, name: str, value: Any, owned: bool = False) -> None:
        """Keep ``value`` as ``name`` of a book of one, the previous one as ``prev_<name>``.

        The book's own last residuals (what :meth:`value_at` hands out) are kept
        as they are: the book never writes its arrays in place, so the two
        names may share one private copy; so is an ``owned`` array (:func:`_kept`).
        """
        rows = self.rows
        stored = rows.get(name)
        if stored is not None:
            rows["prev_" + name] = stored
        last_f = rows.get("last_f")
        if value is last_f and (stored is None or type(stored) is type(value)
                                and stored.dtype == value.dtype):
            rows[name] = value
        else:
            rows[name] = _kept(value, stored, self.device, owned)

    def add_fd_evals(self, ids: Any, count: int) -> None:
        """``count`` forward-difference evaluations for each of the problems ``ids``."""
        sel = self._rows_of(ids)
        self._count("fd_evals", sel, self._get("fd_evals", sel) + count)

    def uncounted_jacobian(self, status: torch.Tensor) -> torch.Tensor:
        """Problems whose last Jacobian is one MINPACK never evaluates ``(B,)``.

        Our engine evaluates the Jacobian after an accepted trial that ends the
        run; MINPACK stops right after the trial. The engine's own count drops
        it the same way (``uncounted_jac`` of the 'lm' step rule,
        ``_engine/steps/lm.py``); here it also decides which kept Jacobian is
        MINPACK's last. The order of the evaluations decides (a Jacobian after
        the last trial), not the points: a rejected final trial can land
        exactly on the current iterate. A run that ends on the ``gtol`` test
        needs that Jacobian (MINPACK tests the gradient of the new Jacobian).
        """
        return self._tensor("jac_after_trial") & (status.to(self.device) != codes.GTOL)

    def minpack_njev(self, status: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the Jacobian evaluations MINPACK reports (``njev``)."""
        return self.jac_calls - self.uncounted_jacobian(status).long()

    def at_last_minpack_jacobian(self, status: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kept summaries (then residuals) of MINPACK's last Jacobian, and ``njev``."""
        extra = self.uncounted_jacobian(status)
        out = []
        for name in ["summary"] + (["f"] if self.keep_residuals else []):
            last = as_tensor(self.rows[name])
            prev = as_tensor(self.rows.get("prev_" + name, last))
            pick = extra.reshape(-1, *([1] * (last.ndim - 1)))
            out.append(torch.where(pick, prev, last))
        return (*out, self.jac_calls - extra.long())

    def last_minpack_jacobian_of_one(self, status: int) -> tuple[Any, ...]:
        """:meth:`at_last_minpack_jacobian` of a book of one problem (``B = 1``).

        The kept summary (then residuals) without the batch dimension, as the
        book holds them (not copies: read them only), and ``njev`` as an int;
        ``status`` is the problem's ``least_squares`` status.
        """
        rows = self.rows
        extra = bool(rows["jac_after_trial"][0]) and status != codes.GTOL
        names = ["summary"] + (["f"] if self.keep_residuals else [])
        out = [(rows.get("prev_" + name, rows[name]) if extra else rows[name])[0]
               for name in names]
        return (*out, int(rows["jac_calls"][0]) - int(extra))

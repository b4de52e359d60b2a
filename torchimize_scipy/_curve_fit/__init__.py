r"""``curve_fit`` and ``batch_curve_fit``: scipy's nonlinear regression on our solvers.

:func:`curve_fit` reproduces :func:`scipy.optimize.curve_fit` on
:func:`torchimize_scipy.least_squares`; :func:`batch_curve_fit` fits one model
to B data sets at once on :func:`torchimize_scipy.batch_least_squares`, with
the results a loop of :func:`curve_fit` would give.

The model is :math:`y = f(x, p) + \varepsilon` with :math:`M` observations and
:math:`N` parameters. With the error covariance :math:`\Sigma` (``sigma``
2-D), or :math:`\Sigma = \mathrm{diag}(\sigma_i^2)` (``sigma`` 1-D or scalar,
standard deviations), write :math:`\Sigma = L L^T` (Cholesky) and fit the
*whitened* residuals

.. math::

    r(p) = L^{-1} \bigl(f(x, p) - y\bigr), \qquad
    \hat p = \arg\min_p \lVert r(p) \rVert^2 = \arg\min_p\,
    (f - y)^T \Sigma^{-1} (f - y),

that is :math:`r_i = (f_i - y_i) / \sigma_i` for 1-D ``sigma``. The
minimisation is :func:`torchimize_scipy.least_squares` (or
``batch_least_squares``) for every method, 'lm' included.

Covariance of the estimate (linearisation of the model at :math:`\hat p`;
Seber & Wild, *Nonlinear Regression*, Wiley 1989, ch. 2; Vugrin et al.,
Water Resour. Res. 43, W03423, 2007): with :math:`J = \partial r / \partial p`
at :math:`\hat p`,

.. math::

    \mathrm{Cov}(\hat p) \approx (J^T J)^{-1} \cdot
    \begin{cases} 1 & \text{absolute\_sigma} \\
    s^2 = \lVert r(\hat p) \rVert^2 / (M - N) & \text{otherwise}
    \end{cases}

where :math:`s^2` (the reduced chi-square) rescales ``sigma`` so that the fit
is statistically consistent. :math:`(J^T J)^{-1}` is computed as scipy does:

* 'trf', 'dogbox' (and our 'gn', 'gd'): thin SVD :math:`J = U S V^T`, singular
  values :math:`s_i \le \epsilon \max(M, N) s_1` are discarded and
  :math:`(J^T J)^{+} = V S^{-2} V^T` (Moore-Penrose pseudo-inverse);
* 'lm': QR with column pivoting :math:`J P = Q R` (Businger & Golub 1965,
  MINPACK's ``qrfac``), :math:`(J^T J)^{-1} = P R^{-1} R^{-T} P^T`; an
  exactly singular :math:`R` means the covariance is indeterminate.

:func:`batch_curve_fit` inverts the small matrix :math:`J^T J` directly for
the problems where it is well conditioned (:math:`\kappa_2(J^T J) \le
10^6` in float64, a relative difference of about :math:`10^{-10}` from the
factorisations above, which it costs a fraction of) and factorises
:math:`J` as above for the others.

An indeterminate covariance (singular :math:`R` for 'lm', NaN entries, or
:math:`M \le N` when the scale :math:`s^2` is needed) is returned filled
with ``inf`` together with an :class:`~scipy.optimize.OptimizeWarning`.

scipy's ``leastsq`` (``method='lm'``) takes ``fjac``/``ipvt``/``qtf`` and
``pcov`` from the Jacobian of MINPACK's *last Jacobian evaluation*, which
usually precedes the final step; the Jacobian at the returned ``popt``
would differ from scipy's 'lm' value by about the size of the last step
(typically :math:`10^{-6}`-:math:`10^{-4}` relative). To match scipy, 'lm'
with a callable or the default finite-difference Jacobian emulates MINPACK:
forward differences with MINPACK's step :math:`h_j = \sqrt{\epsilon}\,|p_j|`,
evaluation counts that include them (``nfev``, ``maxfev``), and ``fjac``,
``ipvt``, ``qtf`` and ``pcov`` from the Jacobian of MINPACK's last Jacobian
evaluation (our engine also evaluates one after an accepted final step,
which MINPACK never does; that one is set aside, recognised by the order of
the evaluations: a Jacobian after the last trial). The other Jacobians
('3-point', 'cs', 'autograd') use the Jacobian at the solution.

Where ``leastsq`` starts from non-finite residuals (a NaN ``p0``, a zero
``sigma``, ``check_finite=False`` with an inf in the data), MINPACK evaluates
the Jacobian once and stops on its gradient test; 'lm' here returns what
scipy returns: ``p0``, an indeterminate (``inf``) ``pcov`` with an
:class:`~scipy.optimize.OptimizeWarning`, and ``ier = 4``. The other methods
raise ``least_squares``'s ValueError, naming a zero ``sigma`` when that is
the cause. A ``sigma`` with one entry but two dimensions is refused: scipy
reads it as a standard deviation and fails on the 2-D residuals it makes.

``batch_curve_fit(nan_policy='omit')`` keeps the batch rectangular: each
problem's omitted observations get a zero residual and a zero Jacobian row
(and an identity row and column in a covariance ``sigma``), which leaves the
cost, :math:`J^T J` and the whitening of the kept observations those of the
reduced data set; the reduced chi-square counts each problem's own
observations.

The package holds one module per concern, each written once for B problems
(:func:`curve_fit` is a batch of one that calls ``f`` as scipy does):
:mod:`._data` (``xdata``, ``ydata``, ``sigma``, ``nan_policy``, ``p0`` and
bounds defaults), :mod:`._model` (the whitened residuals and Jacobians,
MINPACK's forward differences), :mod:`._leastsq` (``leastsq``'s options,
messages, ``info`` codes and evaluation bookkeeping), :mod:`._covariance`
(the formulas above) and the two public functions, :mod:`._single` and
:mod:`._batched`.
"""

from ._batched import batch_curve_fit
from ._covariance import PCOV_GRAM_COND_LIMIT
from ._leastsq import LEASTSQ_FTOL, LEASTSQ_GTOL, LEASTSQ_KEYS, LEASTSQ_XTOL, STATUS_TO_IER
from ._single import curve_fit

__all__ = ["curve_fit", "batch_curve_fit", "LEASTSQ_FTOL", "LEASTSQ_XTOL", "LEASTSQ_GTOL",
           "LEASTSQ_KEYS", "STATUS_TO_IER", "PCOV_GRAM_COND_LIMIT"]
#: doctest collects the public functions' examples from here (they live in submodules)
__test__ = {"curve_fit": curve_fit, "batch_curve_fit": batch_curve_fit}

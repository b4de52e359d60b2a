"""Parameter descriptions shared by the parallel functions' docstrings."""

COMMON = r"""
    p : Tensor, shape (B, n)
        Starting points of the ``B`` problems (never modified).
    function : callable
        ``function(p, *args) -> (B, C, N)``: ``N`` residuals in each of ``C``
        cost channels. It always receives the parameters of all ``B``
        problems (rows of finished problems hold their final values), so
        ``args`` may carry per-problem data in any layout; row ``i`` of the
        output must depend on row ``i`` of ``p`` only.
    jac_function : callable, optional
        ``jac_function(p, *args) -> (B, C, N, n)``; default: exact Jacobian by
        autograd.
    args : tuple or list, optional
        Extra arguments of ``function`` and ``jac_function``.
    wvec : Tensor, shape (C,) or (1,), optional
        Non-negative channel weights (default ones; a single weight applies to
        every channel); the cost of a problem is
        ``0.5 * sum_c wvec[c] * ||f_c||**2``, i.e. channel ``c``'s residuals
        are multiplied by ``sqrt(wvec[c])``.
"""


def fill_doc(fn):
    """Put :data:`COMMON` in place of the ``{common}`` line of ``fn``'s docstring."""
    if fn.__doc__:  # None under python -OO
        fn.__doc__ = fn.__doc__.replace("    {common}\n", COMMON.lstrip("\n"))
    return fn

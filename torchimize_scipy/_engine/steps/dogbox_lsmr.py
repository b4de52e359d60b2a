r"""'dogbox' with ``tr_solver='lsmr'``: the Gauss-Newton step of the dogleg from LSMR.

C. Voglis and I. E. Lagaris, WSEAS 2004 (the method, see :mod:`.dogbox`);
LSMR: D. C.-L. Fong and M. A. Saunders, SIAM J. Sci. Comput. 33(5), 2011.

Everything but the Gauss-Newton step is that of :mod:`.dogbox`. The step is
LSMR's solution of :math:`\min_p \lVert J \operatorname{diag}(s \odot
\phi) p + f \rVert` with :math:`\phi` the indicator of the free variables
(the frozen ones take no step), mapped back by :math:`s` (``x_scale``): the
columns of the frozen variables are masked inside the products instead of
being removed, so that a sparse or operator Jacobian is never sliced, and
solving in the scaled variables is what makes LSMR's early stop behave
(LSMR is not invariant to column scaling). The models of the Cauchy step and
of the predicted reduction are evaluated by products. ``tr_options`` go to
LSMR (``damp`` included); ``regularize`` does not apply to 'dogbox'.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from ..._blas_threads import serial_torch
from ..operator import as_operator
from ..problem import Problem
from ..quadratic import build_quadratic_1d, evaluate_quadratic
from ._common import flag_singular
from .dogbox import Dogbox
from .trf_lsmr import host_sparse, lsmr_keywords, run_lsmr


class DogboxLSMR(Dogbox):
    """'dogbox' with the LSMR Gauss-Newton step (``tr_solver='lsmr'``)."""


    def __init__(self, tr_options: dict | None = None, bounded: bool = False) -> None:
        self.keywords, _, _ = lsmr_keywords(tr_options, "dogbox", bounded)

    def build_model(self, problem: Problem, state: dict) -> None:
        with serial_torch(state["x"].device) if host_sparse(state) else nullcontext():
            self._build_model(problem, state)

    def _build_model(self, problem: Problem, state: dict) -> None:
        free = state["free"]
        g_free = torch.where(free, state["g"], 0.0)
        J = as_operator(state["J"])
        scale = state["scale"]
        masked = J.scale_columns(scale * free.to(scale.dtype))
        newton, broke = run_lsmr(masked, state["f"], self.keywords)
        newton = -newton * scale
        state["newton"] = torch.where(free, newton, 0.0)
        flag_singular(state, torch.isfinite(newton).all(-1) & ~broke)
        # -g_free vanishes on the frozen variables: J (-g_free) = J_free (-g_free)
        quad, lin, _ = build_quadratic_1d(J, None, g_free, -g_free)
        state["antigrad_quad"], state["antigrad_lin"] = quad, lin

    def predicted_reduction(self, state: dict, g_free: Tensor, step: Tensor) -> Tensor:
        """The model's decrease through the Jacobian's products (never a dense J)."""
        return -evaluate_quadratic(as_operator(state["J"]), None, g_free, step)

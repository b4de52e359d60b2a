"""Step rules plugged into the shared loop, one module per method."""

from .dogbox import Dogbox
from .dogbox_lsmr import DogboxLSMR
from .gauss_newton import GaussNewton, GradientDescent
from .lm import LevenbergMarquardt
from .trf import TRF
from .trf_lsmr import TRFLSMR

RULES = {
    "trf": TRF,
    "dogbox": Dogbox,
    "lm": LevenbergMarquardt,
    "gn": GaussNewton,
    "gd": GradientDescent,
}

#: the ``tr_solver='lsmr'`` variants, built with ``tr_options``
LSMR_RULES = {"trf": TRFLSMR, "dogbox": DogboxLSMR}


def make_rule(method: str, tr_solver: str = "exact", tr_options: dict | None = None,
              bounded: bool = False):
    """The step rule of ``method`` for ``tr_solver`` ('exact' or 'lsmr')."""
    if tr_solver == "lsmr":
        return LSMR_RULES[method](tr_options, bounded)
    return RULES[method]()


__all__ = ["RULES", "LSMR_RULES", "make_rule", "TRF", "Dogbox", "LevenbergMarquardt",
           "GaussNewton", "GradientDescent", "TRFLSMR", "DogboxLSMR"]

"""Step rules plugged into the shared loop, one module per method."""

from .dogbox import Dogbox
from .gauss_newton import GaussNewton, GradientDescent
from .lm import LevenbergMarquardt
from .trf import TRF

RULES = {
    "trf": TRF,
    "dogbox": Dogbox,
    "lm": LevenbergMarquardt,
    "gn": GaussNewton,
    "gd": GradientDescent,
}

__all__ = ["RULES", "TRF", "Dogbox", "LevenbergMarquardt", "GaussNewton", "GradientDescent"]

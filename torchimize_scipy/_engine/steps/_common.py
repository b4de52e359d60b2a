"""Pieces shared by several step rules."""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem


def column_norms(state: dict) -> Tensor:
    """Euclidean norms of the Jacobian's columns, from the Gram matrix ``J^T J``."""
    return torch.diagonal(state["G"], dim1=-2, dim2=-1).clamp(min=0).sqrt()


def initial_scale(problem: Problem, state: dict) -> None:
    """Set ``scale``/``scale_inv`` from the first Jacobian when ``x_scale='jac'``."""
    if problem.jac_scale:
        scale_inv = column_norms(state)
        scale_inv = torch.where(scale_inv == 0, torch.ones_like(scale_inv), scale_inv)
        state["scale"] = 1.0 / scale_inv
        state["scale_inv"] = scale_inv


def update_jac_scale(problem: Problem, state: dict) -> None:
    """Keep the running maximum of the Jacobian column norms (``x_scale='jac'``)."""
    if problem.jac_scale:
        scale_inv = torch.maximum(column_norms(state), state["scale_inv"])
        state["scale"] = 1.0 / scale_inv
        state["scale_inv"] = scale_inv


def svd_width(problem: Problem, augmented: bool) -> int:
    """Number of singular values kept by :func:`linalg.svd_factors`."""
    if augmented or problem.m >= problem.n:
        return problem.n
    return problem.m


def alloc_svd(state: dict, k: int) -> None:
    """Placeholders for the SVD data of each problem."""
    x = state["x"]
    B, n = x.shape
    state["sv"] = x.new_zeros(B, k)
    state["V"] = x.new_zeros(B, n, k)
    state["uf"] = x.new_zeros(B, k)


def inf_norm(v: Tensor) -> Tensor:
    """Max-norm over the last axis (0 for empty vectors)."""
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])

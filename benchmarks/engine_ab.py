"""Bit-for-bit A/B check of an engine change on the parity problems.

Runs every problem of ``tests/test_parity.py::PROBLEMS`` with every method and
Jacobian kind, each robust loss, ``x_scale='jac'``, small budgets, the same
problems as batches (SVD and Gram routes, rows mixed with a non-finite start),
plus the cases of ``benchmarks/frontend_ab.py`` ('gn', 'gd', the torchimize
API, chunked and streamed batches), and saves ``x, cost, fun, jac, grad,
optimality, active_mask, nfev, njev, status`` of each.

Run it with the old tree and with the new one on the same machine::

    PYTHONPATH=<old tree> python benchmarks/engine_ab.py old.pkl
    PYTHONPATH=<new tree> python benchmarks/engine_ab.py new.pkl
    python benchmarks/engine_ab.py --compare old.pkl new.pkl

``--device-path`` (after the file name) runs the code a GPU runs on the CPU:
the trust-region methods' per-problem scalars stay tensors
(``_engine/host_scalars.HOST = False``) instead of living on the host.

Same machine, same operations: the results must be equal with ``==``
(the count of differing cases is printed).
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

KEYS = ("x", "cost", "fun", "jac", "grad", "optimality", "active_mask", "nfev", "njev",
        "status")
LOSSES = ("soft_l1", "huber", "cauchy", "arctan")


def _fields(res) -> dict:
    out = {}
    for k in KEYS:
        v = res[k] if k in res else None
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v) if v is not None else None
    return out


def _parity_cases():
    from test_parity import JACS, PROBLEMS, is_bounded

    from torchimize_scipy import batch_least_squares, least_squares

    for name, (fun, jac_fn, x0, bounds, args, allows_cs, under) in PROBLEMS.items():
        bounded = is_bounded(bounds)
        for method in ("trf", "dogbox", "lm"):
            if method == "lm" and (bounded or under):
                continue
            for jac in JACS:
                if jac == "cs" and not allows_cs:
                    continue
                j = jac_fn if jac == "analytic" else jac
                yield (f"p-{name}-{method}-{jac}",
                       lambda f=fun, j=j, x=x0, b=bounds, a=args, m=method: least_squares(
                           f, np.array(x, float), jac=j, bounds=b, args=a, method=m))
            if method != "lm":
                for loss in LOSSES:
                    yield (f"p-{name}-{method}-{loss}",
                           lambda f=fun, j=jac_fn, x=x0, b=bounds, a=args, m=method, lo=loss:
                           least_squares(f, np.array(x, float), jac=j, bounds=b, args=a,
                                         method=m, loss=lo, f_scale=0.5))
            yield (f"p-{name}-{method}-xjac",
                   lambda f=fun, j=jac_fn, x=x0, b=bounds, a=args, m=method: least_squares(
                       f, np.array(x, float), jac=j, bounds=b, args=a, method=m,
                       x_scale="jac"))
            for nfev in (1, 2, 5):
                yield (f"p-{name}-{method}-nfev{nfev}",
                       lambda f=fun, j=jac_fn, x=x0, b=bounds, a=args, m=method, k=nfev:
                       least_squares(f, np.array(x, float), jac=j, bounds=b, args=a,
                                     method=m, max_nfev=k))
            # the same problem as a batch: perturbed starts, one non-finite
            if args:
                continue
            x0a = np.array(x0, float)
            rng = np.random.default_rng(len(name))
            X0 = x0a + 0.05 * rng.standard_normal((6, x0a.size))
            if bounded:
                lb, ub = (np.broadcast_to(np.asarray(v, float), x0a.shape) for v in bounds)
                X0 = np.clip(X0, np.nextafter(lb, ub), np.nextafter(ub, lb))
            X0[0] = x0a
            X0[3, 0] = np.nan

            def rowwise(x, f=fun):
                return f(x)

            yield (f"b-{name}-{method}",
                   lambda f=rowwise, X=X0, b=bounds, m=method: batch_least_squares(
                       f, X, bounds=b, method=m, vectorized=False))
            if method != "lm":
                yield (f"b-{name}-{method}-cauchy",
                       lambda f=rowwise, X=X0, b=bounds, m=method: batch_least_squares(
                           f, X, bounds=b, method=m, vectorized=False, loss="cauchy",
                           f_scale=0.3))


def cases():
    yield from _parity_cases()
    import frontend_ab

    for name, call in frontend_ab.cases():
        yield "fe-" + name, call


def run(path: str) -> None:
    import torchimize_scipy

    print("using", torchimize_scipy.__file__)
    torch.set_num_threads(1)
    results = {}
    for name, call in cases():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = call()
            except Exception as exc:  # noqa: BLE001 - the error is the result
                results[name] = ("error", type(exc).__name__, str(exc))
                continue
        if isinstance(res, list):  # functions API: iterates + info
            results[name] = ([x.numpy() for x in res],
                             {k: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
                              for k, v in res.info.items()})
        else:
            results[name] = _fields(res)
    with open(path, "wb") as fh:
        pickle.dump(results, fh)
    print(len(results), "cases written to", path)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == object or b.dtype == object:
            return a.dtype == b.dtype and a.shape == b.shape and all(
                _same(x, y) for x, y in zip(a.ravel(), b.ravel(), strict=True))
        nan_ok = a.dtype.kind in "fc"
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b,
                                                                            equal_nan=nan_ok)
    return type(a) is type(b) and a == b


def compare(p: str, q: str) -> int:
    import frontend_ab

    return frontend_ab.compare(p, q, same=_same)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1].startswith("-") \
            and sys.argv[1] not in ("--compare", "--device-path"):
        print(__doc__)  # (an option is never taken for the output file)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    if "--device-path" in sys.argv:  # the code a GPU runs (per-problem scalars as tensors)
        from torchimize_scipy._engine import host_scalars

        host_scalars.HOST = False
        sys.argv.remove("--device-path")
    run(sys.argv[1])

"""Bit-for-bit A/B check of a refactoring: run a fixed set of problems, save the results.

Run it once with the old code and once with the new one on the same machine
(``PYTHONPATH=<tree> python benchmarks/frontend_ab.py out.pkl``), then compare
the two files with ``python benchmarks/frontend_ab.py --compare a.pkl b.pkl``.
Same machine, same code path: results must be equal with ``==``.
"""

from __future__ import annotations

import pickle
import sys
import warnings

import numpy as np
import torch


def rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


T = np.linspace(0, 3, 25)
Y = 2.0 * np.exp(-1.3 * T) + 0.3 + 0.05 * np.sin(7 * T)
Y[[3, 11]] += 2.0  # outliers


def expo(x, t=T, y=Y):
    return x[0] * np.exp(-x[1] * t) + x[2] - y


def expo_torch(x):
    t, y = torch.as_tensor(T, dtype=x.dtype), torch.as_tensor(Y, dtype=x.dtype)
    return x[0] * torch.exp(-x[1] * t) + x[2] - y


def my_loss(z):
    return np.vstack([np.log1p(z), 1 / (1 + z), -1 / (1 + z) ** 2])


def flatten(res) -> dict:
    out = {}
    for k, v in res.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        out[k] = v
    return out


def cases():
    from torchimize_scipy import batch_least_squares, least_squares

    x0 = np.array([1.0, 0.5, 0.0])
    for method in ("trf", "dogbox", "lm", "gn", "gd"):
        for jac in ("2-point", "3-point", "cs", "autograd", "callable"):
            if jac == "autograd":
                yield (f"ls-{method}-autograd",
                       lambda m=method: least_squares(expo_torch, torch.tensor([1.0, 0.5, 0.0],
                                                      dtype=torch.float64),
                                                      jac="autograd", method=m))
            elif jac == "callable":
                yield (f"ls-{method}-rosen-jac",
                       lambda m=method: least_squares(rosen, [-1.2, 1.0], jac=rosen_jac,
                                                      method=m))
            else:
                yield (f"ls-{method}-{jac}",
                       lambda m=method, j=jac: least_squares(expo, x0, jac=j, method=m))
        if method != "lm":
            for loss in ("soft_l1", "huber", "cauchy", "arctan", my_loss):
                name = loss if isinstance(loss, str) else "callable"
                yield (f"ls-{method}-loss-{name}",
                       lambda m=method, lo=loss: least_squares(expo, x0, method=m, loss=lo,
                                                               f_scale=0.3))
            yield (f"ls-{method}-bounds",
                   lambda m=method: least_squares(expo, x0, method=m,
                                                  bounds=([0, 0.4, -1], [1.5, 3, 0.25])))
            yield (f"ls-{method}-xscale",
                   lambda m=method: least_squares(rosen, [-1.2, 1.0], method=m, x_scale=[2, 0.5],
                                                  max_nfev=40))
            yield (f"ls-{method}-float32",
                   lambda m=method: least_squares(expo_torch, torch.tensor([1.0, 0.5, 0.0]),
                                                  method=m))
            yield (f"ls-{method}-n0", lambda m=method: least_squares(lambda x: np.ones(2),
                                                                     np.zeros(0), method=m))
        yield (f"ls-{method}-xscale-jac",
               lambda m=method: least_squares(rosen, [-1.2, 1.0], method=m, x_scale="jac"))

    rng = np.random.default_rng(0)
    B = 40
    rates = rng.uniform(0.3, 3, B)
    yb = 2 * np.exp(-rates[:, None] * T) + 0.01 * rng.standard_normal((B, T.size))

    def model(x, y):
        return x[:, :1] * np.exp(-x[:, 1:2] * T) - y

    def model_jac(x, y):
        e = np.exp(-x[:, 1:2] * T)
        return np.stack([e, -x[:, :1] * T * e], axis=-1)

    def model_torch(x, y):
        t = torch.as_tensor(T, dtype=x.dtype)
        return x[:, :1] * torch.exp(-x[:, 1:2] * t) - y

    p0 = np.tile([1.0, 1.0], (B, 1))
    p0[5, 0] = np.nan
    for method in ("trf", "dogbox", "lm", "gn", "gd"):
        yield (f"b-{method}", lambda m=method: batch_least_squares(model, p0, args=(yb,),
                                                                   method=m))
        yield (f"b-{method}-jac", lambda m=method: batch_least_squares(
            model, p0, jac=model_jac, args=(yb,), method=m, chunk_size=7))
        yield (f"b-{method}-autograd", lambda m=method: batch_least_squares(
            model_torch, torch.tensor(p0), jac="autograd", args=(torch.tensor(yb),), method=m))
        if method != "lm":
            yield (f"b-{method}-bounds-loss", lambda m=method: batch_least_squares(
                model, p0, args=(yb,), method=m, bounds=([0.5, 0.0], [3.0, 2.5]),
                loss="soft_l1", f_scale=0.1))
            yield (f"b-{method}-callable-loss", lambda m=method: batch_least_squares(
                model, p0, args=(yb,), method=m,
                loss=lambda z: np.stack([np.log1p(z), 1 / (1 + z), -1 / (1 + z) ** 2])))
        yield (f"b-{method}-rowwise", lambda m=method: batch_least_squares(
            lambda x, y: x[0] * np.exp(-x[1] * T) - y, p0, args=(yb,), method=m,
            vectorized=False))

    import torchimize_scipy.functions as tf

    tt = torch.linspace(0, 3, 20, dtype=torch.float64)
    P = torch.tensor([[1.0, 0.7], [2.0, 1.3], [0.5, 0.4]], dtype=torch.float64)
    yy = torch.stack([P[:, :1] * torch.exp(-P[:, 1:] * tt),
                      P[:, :1] * torch.exp(-0.5 * P[:, 1:] * tt)], 1)

    def pf(p):
        return torch.stack([p[:, :1] * torch.exp(-p[:, 1:] * tt),
                            p[:, :1] * torch.exp(-0.5 * p[:, 1:] * tt)], 1) - yy

    def sf(p):
        return p[0] * torch.exp(-p[1] * tt) - yy[0, 0]

    p0t = torch.ones(3, 2, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    yield "f-lma-par", lambda: tf.lsq_lma_parallel(p0t, pf, max_iter=50, wvec=w)
    yield "f-gna-par", lambda: tf.lsq_gna_parallel(p0t, pf, max_iter=50)
    yield "f-gd-par", lambda: tf.gradient_descent_parallel(p0t, pf, l=0.01, max_iter=50)
    yield "f-lma", lambda: tf.lsq_lma(torch.ones(2, dtype=torch.float64), sf, max_iter=50)
    yield "f-gna", lambda: tf.lsq_gna(torch.ones(2, dtype=torch.float64), sf, max_iter=50)
    yield "f-gd", lambda: tf.gradient_descent(torch.ones(2, dtype=torch.float64), sf, l=0.01,
                                              max_iter=50)


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
            results[name] = ([x.numpy() for x in res], flatten(res.info))
        else:
            results[name] = flatten(res)
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
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return type(a) is type(b) and a == b


def compare(p: str, q: str, same=None) -> int:
    """Count the cases of two pickles that differ (``same`` defaults to this module's rule)."""
    same = _same if same is None else same
    with open(p, "rb") as fh:
        a = pickle.load(fh)
    with open(q, "rb") as fh:
        b = pickle.load(fh)
    bad = [k for k in a if k not in b or not same(a[k], b[k])]
    bad += [k for k in b if k not in a]
    print(f"{len(a)} cases, {len(bad)} differ" + (": " + ", ".join(bad) if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    run(sys.argv[1])

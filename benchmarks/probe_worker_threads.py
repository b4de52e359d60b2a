"""Why a dask worker fits faster after ``torch.set_num_threads(1)``: probes without dask.

Each variant runs in a fresh process started as dask's nanny starts its
workers (``multiprocessing`` spawn, with the nanny's ``pre-spawn-environ``:
``MALLOC_TRIM_THRESHOLD_=65536``, ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
``OPENBLAS_NUM_THREADS=1``), imports torch and this package in its main
thread (as the worker's deserialisation does) and fits ``--fits`` blocks of
``--pixels`` Gaussian peaks (``batch_curve_fit``, numpy model, 'lm') in one
thread of a ``ThreadPoolExecutor``, as dask's worker runs its tasks. The
variants differ only in what is done before the first fit:

* ``none``: nothing (a default ``Client()``'s worker);
* ``set-main``: ``torch.set_num_threads(1)`` in the main thread;
* ``set-thread``: ``torch.set_num_threads(1)`` in the executor's thread;
* ``mkl-dynamic``: MKL's ``mkl_set_dynamic(0)`` in the executor's thread
  (one of the things ``torch.set_num_threads`` does besides OpenMP's count);
* ``mallopt``: glibc's thresholds raised (``_dask_workers.worker_allocator``);
* ``mallopt+set-thread``: both;
* ``package``: what the working tree's dask blocks apply by themselves
  (``_dask_workers.worker_allocator`` and, where it exists,
  ``worker_threads``, both forced as on a worker);
* ``tuned-env``: the process started with the README's malloc tunables too.

``--main-threads N`` emulates a main script that sets ``OMP_NUM_THREADS=N``
when it is imported and imports torch (as the benchmarks' ``_env`` module
did): spawn imports the main module again in every child, as ``__mp_main__``,
before the child's own code runs, so torch there starts with ``N`` threads
although the process was started with the nanny's ``OMP_NUM_THREADS=1``.

``--dask`` runs ``torchimize_scipy.xarray.curvefit`` on a fresh
``LocalCluster`` per variant instead (``--workers`` processes, one block of
``--pixels`` each) and reports the workers' CPU per pixel; its variants are
``auto`` (defaults), ``auto-off`` (allocator setting off), ``threads-off``
(thread setting off), ``configured``
(``configure_workers``), ``run-threads`` (``torch.set_num_threads(1)`` by
``client.run``, in the event loop's thread), ``task-threads`` (the same as a
task, in the executor's thread), ``run-mallopt`` (``configure_workers`` with
``torch_threads=None``) and ``package`` (= ``auto``).

Reported: CPU seconds per fit (``time.process_time``, every thread of the
process), for the first fit and the median of the others, and the thread
counts that torch, OpenMP and MKL report.

Usage::

    PYTHONPATH=$PWD python benchmarks/probe_worker_threads.py [--pixels 4000] [--fits 5]
           [--variants none,set-main,set-thread,mkl-dynamic,mallopt,package]
           [--main-threads 2] [--scipy-first 3000] [--rounds 1]
    PYTHONPATH=$PWD python benchmarks/probe_worker_threads.py --dask [--workers 2]
           [--pixels 10000] [--fits 3] [--variants auto,configured] [--main-threads 2]
           [--steps generate,theirs]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __name__ == "__mp_main__" and os.environ.get("PROBE_MAIN_THREADS"):
    # a main script that sets the thread variables at import (as _env.py does), in a child
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = \
        os.environ["PROBE_MAIN_THREADS"]
    import torch  # noqa: F401

NANNY_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TUNED_ENV = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_MMAP_THRESHOLD_": "1073741824"}
VARIANTS = ("none", "set-main", "set-thread", "mkl-dynamic", "mallopt", "mallopt+set-thread",
            "package", "tuned-env")


def gaussian(w, a, mu, s, c):
    import numpy as np

    z = (w - mu) / s
    return a * np.exp(-0.5 * z * z) + c


def _mkl() -> ctypes.CDLL:
    import torch

    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))


def counts() -> dict[str, int]:
    """torch's, OpenMP's and MKL's thread counts as seen by the calling thread."""
    import torch

    lib = _mkl()
    out = {"torch": torch.get_num_threads(), "mkl_max": lib.MKL_Get_Max_Threads()}
    try:
        gomp = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
        out["omp_max"] = gomp.omp_get_max_threads()
        out["omp_dynamic"] = gomp.omp_get_dynamic()
    except (OSError, AttributeError):
        pass
    return out


def child(variant: str, pixels: int, fits: int, scipy_first: int, queue: mp.Queue) -> None:
    try:
        queue.put(_child(variant, pixels, fits, scipy_first))
    except BaseException as exc:  # report, so that the parent does not wait forever
        queue.put({"variant": variant, "error": repr(exc)})
        raise


def _child(variant: str, pixels: int, fits: int, scipy_first: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common  # noqa: F401
    import numpy as np
    import torch

    import torchimize_scipy
    from torchimize_scipy._dask_workers import worker_allocator

    y, _, _ = _common.peak_data(pixels, seed=0)
    start = np.tile((2.0, 0.0, 0.7, 0.0), (pixels, 1))
    if variant == "set-main":
        torch.set_num_threads(1)

    def before() -> dict[str, int]:
        if variant in ("set-thread", "mallopt+set-thread"):
            torch.set_num_threads(1)
        elif variant == "mkl-dynamic":
            _mkl().MKL_Set_Dynamic(0)
        if variant in ("mallopt", "mallopt+set-thread"):
            worker_allocator(force=True)
        if variant == "package":
            from torchimize_scipy import _dask_workers

            worker_allocator(force=True)
            if hasattr(_dask_workers, "worker_threads"):
                _dask_workers.worker_threads(force=True)
        return counts()

    def scipy_fits() -> None:
        import warnings

        from scipy.optimize import OptimizeWarning, curve_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            for i in range(scipy_first):
                curve_fit(gaussian, _common.PEAK_T, y[i % pixels], start[0])

    def fit() -> float:
        t = time.process_time()
        torchimize_scipy.batch_curve_fit(gaussian, _common.PEAK_T, y, start)
        return time.process_time() - t

    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(before).result()
        pool.submit(scipy_fits).result()
        cpu = [pool.submit(fit).result() for _ in range(fits)]
        after = pool.submit(counts).result()
    return {"variant": variant, "cpu": cpu, "before": seen, "after": after}


def run_variant(variant: str, pixels: int, fits: int, scipy_first: int) -> dict:
    env = dict(NANNY_ENV)
    if variant == "tuned-env":
        env.update(TUNED_ENV)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # as the nanny does before spawning
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(variant, pixels, fits, scipy_first, queue))
        proc.start()
        out = queue.get()
        proc.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


# --------------------------------------------------------------------------- on dask workers
DASK_VARIANTS = ("auto", "auto-off", "threads-off", "configured", "run-threads",
                 "task-threads", "run-mallopt", "package")


def _cpu() -> float:
    return time.process_time()


def _auto_off() -> None:
    import dask

    dask.config.set({"torchimize_scipy.worker-allocator": False})


def _threads_off() -> None:
    import dask

    dask.config.set({"torchimize_scipy.worker-threads": False})


def _set_threads() -> dict[str, int]:
    import torch

    torch.set_num_threads(1)
    return counts()


def dask_variant(variant: str, pixels: int, fits: int, workers: int, steps: str) -> list[Any]:
    """Worker CPU seconds per ``curvefit`` of one block of ``pixels`` per worker (fresh cluster).

    The last two entries are the thread counts seen by ``client.run`` (the
    worker's event loop) and by a task (the worker's executor thread).
    """
    import dask
    import dask.array as da
    import distributed
    import xarray as xr

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import PEAK_M, PEAK_T, peak_data

    from torchimize_scipy.dask import configure_workers
    from torchimize_scipy.xarray import curvefit

    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        os.environ.pop(name, None)  # a previous cluster wrote them here
    y, _, _ = peak_data(pixels * workers, seed=0)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        if variant == "auto-off":
            client.run(_auto_off)
        elif variant == "threads-off":
            client.run(_threads_off)
        elif variant == "configured":
            configure_workers(client)
        elif variant == "run-threads":
            client.run(_set_threads)
        elif variant == "task-threads":
            client.submit(_set_threads, pure=False).result()
        elif variant == "run-mallopt":
            configure_workers(client, torch_threads=None)
        client.run(__import__, "torchimize_scipy.xarray")
        if "generate" in steps:  # as bench_xarray.py: blocks made on the workers
            from bench_xarray import make_cube

            cube = make_cube(4 * workers, pixels // 4, 4, 0)
        else:
            cube = xr.DataArray(da.from_array(y.reshape(4 * workers, -1, PEAK_M),
                                              chunks=(4, -1, -1)),
                                dims=("row", "col", "band"), coords={"band": PEAK_T})
        cube = cube.persist()
        distributed.wait(cube.data)
        p0 = {"a": 2.0, "mu": 0.0, "s": 0.7, "c": 0.0}
        curvefit(cube.isel(col=slice(0, 10)), "band", gaussian, p0=p0).compute()  # warm-up
        if "theirs" in steps:  # xarray's curvefit on some pixels first, as bench_xarray.py
            cube.isel(col=slice(0, 500)).curvefit("band", gaussian, p0=p0).compute()
        cpu = []
        for _ in range(fits):
            before = sum(client.run(_cpu).values())
            curvefit(cube, "band", gaussian, p0=p0).compute()
            cpu.append(sum(client.run(_cpu).values()) - before)
        cpu.append(client.run(counts))
        cpu.append([client.submit(counts, pure=False, workers=[w]).result()
                    for w in client.nthreads()])
    return cpu


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--pixels", type=int, default=4000)
    p.add_argument("--fits", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="each variant this many times, alternated")
    p.add_argument("--scipy-first", type=int, default=0,
                   help="scipy curve_fit calls (one per pixel, as xarray's curvefit) in the "
                        "thread before the fits")
    p.add_argument("--steps", default="",
                   help="(with --dask) comma-separated: generate (the cube made on the "
                        "workers), theirs (xarray's curvefit on 500 pixels a row first)")
    p.add_argument("--main-threads", type=int, default=None,
                   help="the main module sets OMP_NUM_THREADS to this in every child")
    p.add_argument("--workers", type=int, default=1, help="(with --dask) worker processes")
    p.add_argument("--variants", default=None,
                   help="comma-separated (default: all but tuned-env; with --dask all)")
    p.add_argument("--dask", action="store_true",
                   help="run xarray's curvefit on a 1-worker LocalCluster instead")
    args = p.parse_args(argv)
    if args.main_threads:
        os.environ["PROBE_MAIN_THREADS"] = str(args.main_threads)  # children inherit it
    if args.dask:
        variants = (args.variants or ",".join(DASK_VARIANTS)).split(",")
        if not set(variants) <= set(DASK_VARIANTS):
            p.error(f"--dask variants: {', '.join(DASK_VARIANTS)}")
        res: dict[str, list] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                res[v].append(dask_variant(v, args.pixels, args.fits, args.workers, args.steps))
        n = args.pixels * args.workers
        print(f"{args.workers} workers x 1 thread, a block of {args.pixels} pixels each, "
              f"{args.fits} fits per cluster, load average {os.getloadavg()[0]:.1f}; worker "
              "CPU us per pixel, each fit; thread counts (event loop, task)")
        for v, outs in res.items():
            for cpu in outs:
                print(f"{v:<13} " + " ".join(f"{1e6 * c / n:7.1f}" for c in cpu[:-2])
                      + f"   {list(cpu[-2].values())[0]} {cpu[-1][0]}")
        return 0
    variants = (args.variants or ",".join(VARIANTS[:-1])).split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            out = run_variant(v, args.pixels, args.fits, args.scipy_first)
            if "error" in out:
                sys.exit(f"variant {v}: {out['error']}")
            rows[v].append(out)
    print(f"{args.pixels} pixels per fit, {args.fits} fits per process, load average "
          f"{os.getloadavg()[0]:.1f}; CPU us per pixel")
    print(f"{'variant':<12} {'first fit':>10} {'later fits':>11}  thread counts before first fit")
    for v, outs in rows.items():
        first = statistics.median(o["cpu"][0] for o in outs)
        later = statistics.median(c for o in outs for c in o["cpu"][1:])
        print(f"{v:<12} {1e6 * first / args.pixels:>10.1f} {1e6 * later / args.pixels:>11.1f}  "
              f"{outs[0]['before']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

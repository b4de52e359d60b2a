"""The library's helper threads (``_engine/csr``) end at interpreter exit.

They are daemon threads that share products and batched factorisations with
the caller. At exit each is told to return (``csr._stop_helpers``, an
``atexit`` handler), so that no helper is left inside a torch, LAPACK or OpenMP
call while those runtimes are torn down; after that, the next product starts
new ones.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from torchimize_scipy._engine import csr, linalg

_ALIVE = ("sum(t.is_alive() and t.name.startswith('torchimize_scipy_csr_')"
          " for t in threading.enumerate())")


def test_no_helper_is_left_at_exit():
    code = textwrap.dedent(f"""
        import atexit, threading
        # registered first, so it runs after the library's own handler (LIFO)
        atexit.register(lambda: print("at exit", {_ALIVE}, flush=True))
        import torch
        from torchimize_scipy._engine import csr, linalg
        A = torch.randn(64, 40, 3, dtype=torch.float64)
        linalg.qr_svd(A, torch.randn(64, 40, dtype=torch.float64))
        csr.CallsOnHelpers([lambda: None] * 4, 1).wait()
        print("running", {_ALIVE}, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "running 1"
    assert lines[-1] == "at exit 0"


def test_helpers_start_again_after_they_were_stopped(monkeypatch):
    csr._stop_helpers()
    ran: list[int] = []
    csr.CallsOnHelpers([lambda i=i: ran.append(i) for i in range(6)], 1).wait()
    assert sorted(ran) == list(range(6))
    assert len(csr._HELPERS) == 1 and csr._HELPERS[0].thread.is_alive()
    # a factorisation shared with the new helper gives the bits of one call
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(70, 40, 3, dtype=torch.float64, generator=gen)
    f = torch.randn(70, 40, dtype=torch.float64, generator=gen)
    monkeypatch.setattr(linalg, "_lapack_helpers", lambda A: 1)
    shared = linalg.qr_svd(A, f)
    csr._stop_helpers()
    monkeypatch.setattr(linalg, "_lapack_helpers", lambda A: 0)
    alone = linalg.qr_svd(A, f)
    for got, want in zip(shared, alone, strict=True):
        assert torch.equal(got, want)

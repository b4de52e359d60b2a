"""torchimize_scipy.xarray.curvefit against xarray's own curvefit on the same data.

Different code paths (one batch per block against one scipy call per pixel):
coefficients are compared by the parity policy (docs/parity.md): both runs
stop at the solution by MINPACK's ftol or xtol test (1.49012e-8, curve_fit's
default), and an ftol stop leaves x known to about sqrt(ftol) of its size
(``assert_x_close`` with that ``rtol``); covariances, evaluated at those
solutions, to the same ``sqrt(ftol)`` of each pixel's largest entry;
structure (names, dims, coordinates, attributes) exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

xr = pytest.importorskip("xarray")
pytest.importorskip("dask.array")

from _parity import assert_x_close  # noqa: E402

from torchimize_scipy.xarray import curvefit  # noqa: E402

X_RTOL = np.sqrt(1.49012e-8)
COV_RTOL = X_RTOL


def gaussian(x, a, mu, s):
    return a * np.exp(-((x - mu) ** 2) / (2 * s**2))


def cube(ny=6, nx=7, nb=40, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    w = np.linspace(-1.0, 1.0, nb)
    a = rng.uniform(0.5, 2.0, (ny, nx, 1))
    mu = rng.uniform(-0.3, 0.3, (ny, nx, 1))
    s = rng.uniform(0.15, 0.3, (ny, nx, 1))
    data = gaussian(w, a, mu, s) + noise * rng.standard_normal((ny, nx, nb))
    return xr.DataArray(data, dims=("y", "x", "band"),
                        coords={"band": w, "y": np.arange(ny), "x": np.arange(nx)},
                        attrs={"units": "counts"})


def assert_fit_parity(got, ref):
    assert set(got.data_vars) == set(ref.data_vars)
    assert got.attrs == ref.attrs
    for name in ref.data_vars:
        g, r = got[name], ref[name]
        assert g.dims == r.dims, name
        assert g.dtype == r.dtype == np.float64
        for c in r.coords:
            np.testing.assert_array_equal(g[c].values, r[c].values)
        gv, rv = g.values, r.values
        np.testing.assert_array_equal(np.isnan(gv), np.isnan(rv), err_msg=name)
        ok = ~np.isnan(rv)
        if name.endswith("coefficients"):
            assert_x_close(np.where(ok, gv, 0.0), np.where(ok, rv, 0.0), rtol=X_RTOL,
                           err_msg=name)
        else:
            scale = np.where(ok, np.abs(rv), 0.0).max(axis=(-2, -1), keepdims=True)
            err = np.where(ok, np.abs(gv - rv), 0.0)
            assert np.all(err <= COV_RTOL * scale), name


def test_dataarray_with_missing_points_matches_xarray():
    data = cube()
    data[0, 0, 5] = np.nan  # one point left out
    data[1, 2, :] = np.nan  # a pixel without any point: NaN, no error
    p0 = {"a": 1.0, "mu": 0.0, "s": 0.2}
    ref = data.curvefit("band", gaussian, p0=p0)
    got = curvefit(data, "band", gaussian, p0=p0)
    assert_fit_parity(got, ref)
    assert np.isnan(got.curvefit_coefficients.values[1, 2]).all()


def test_dask_dataset_stays_lazy_and_matches_xarray():
    data = cube(ny=8, nx=5, seed=1)
    ds = xr.Dataset({"flux": data, "flux2": 2 * data}, attrs={"survey": "synthetic"})
    mu0 = xr.DataArray(np.linspace(-0.2, 0.2, 5), dims="x")  # a guess per column
    kw = {"p0": {"a": 1.0, "mu": mu0, "s": 0.2}, "bounds": {"s": (0.01, 1.0)}}
    ref = ds.curvefit("band", gaussian, **kw)
    lazy = curvefit(ds.chunk({"y": 3, "band": 16}), "band", gaussian, **kw)
    assert lazy.flux_curvefit_coefficients.chunks is not None  # dask-backed
    assert lazy.flux_curvefit_coefficients.data.chunks[0] == (3, 3, 2)
    assert_fit_parity(lazy.compute(scheduler="threads"), ref)


def test_two_coordinates_matches_xarray():
    rng = np.random.default_rng(2)
    xx, yy = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 8))
    coef = rng.uniform(0.5, 1.5, (4, 3))
    z = coef[:, :1, None] * xx + coef[:, 1:2, None] * yy**2 + coef[:, 2:, None]
    data = xr.DataArray(z + 0.01 * rng.standard_normal(z.shape), dims=("t", "v", "u"),
                        coords={"u": xx[0], "v": yy[:, 0]})

    def surface(xy, a, b, c):
        return a * xy[0] + b * xy[1] ** 2 + c

    ref = data.curvefit(["u", "v"], surface)
    got = curvefit(data, ["u", "v"], surface)
    assert_fit_parity(got, ref)


def test_reduce_dims_aggregates_pixels_like_xarray():
    data = cube(ny=3, nx=4, seed=3)
    kw = {"reduce_dims": "x", "p0": {"a": 1.0, "mu": 0.0, "s": 0.2}}
    ref = data.curvefit("band", gaussian, **kw)
    got = curvefit(data, "band", gaussian, **kw)
    assert got.curvefit_coefficients.dims == ("y", "param")
    assert_fit_parity(got, ref)


def test_per_pixel_bounds_choose_the_method_per_pixel():
    # only some pixels bounded: xarray fits those with 'trf', the others with 'lm'
    data = cube(ny=4, nx=4, seed=4)
    upper = xr.DataArray(np.where(np.arange(4) < 2, np.inf, 5.0), dims="x")
    kw = {"p0": {"a": 1.0, "mu": 0.0, "s": 0.2}, "bounds": {"a": (-np.inf, upper)}}
    ref = data.curvefit("band", gaussian, **kw)
    got = curvefit(data, "band", gaussian, **kw)
    assert_fit_parity(got, ref)


def test_default_guesses_from_signature_and_bounds():
    data = cube(ny=2, nx=3, seed=5)

    def shifted(x, a, mu=0.05, s=5.0):  # s = 5 lies outside its bounds: moved inside
        return gaussian(x, a, mu, s)

    kw = {"bounds": {"s": (0.05, 0.6)}}
    ref = data.curvefit("band", shifted, **kw)
    got = curvefit(data, "band", shifted, **kw)
    assert_fit_parity(got, ref)


def test_errors_ignore_gives_nan_and_raise_raises():
    data = cube(ny=2, nx=2, seed=6)
    kw = {"p0": {"a": 1.0, "mu": 0.0, "s": 0.2}, "kwargs": {"maxfev": 3}}
    ref = data.curvefit("band", gaussian, errors="ignore", **kw)
    got = curvefit(data, "band", gaussian, errors="ignore", **kw)
    assert np.isnan(ref.curvefit_coefficients.values).all()
    assert_fit_parity(got, ref)
    with pytest.raises(RuntimeError, match="Optimal parameters not found for 4 of 4"):
        curvefit(data, "band", gaussian, **kw)


def test_skipna_false_rejects_nan():
    data = cube(ny=2, nx=2)
    data[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="contains nan values"):
        curvefit(data, "band", gaussian, skipna=False, p0={"a": 1.0, "mu": 0.0, "s": 0.2})


def test_validation_with_xarrays_messages():
    data = cube(ny=2, nx=2)
    other = xr.DataArray(np.linspace(0, 1, 5), dims="z")
    with pytest.raises(ValueError, match="No arguments to `coords` were identified"):
        curvefit(data, other, gaussian)
    with pytest.raises(ValueError, match="Initial guess for 'a' has unexpected dimensions"):
        curvefit(data, "band", gaussian, p0={"a": data.band})
    with pytest.raises(ValueError, match="Upper bound for 'a' has unexpected dimensions"):
        curvefit(data, "band", gaussian, bounds={"a": (0, data.band)})
    with pytest.raises(ValueError, match='errors must be either "raise" or "ignore"'):
        curvefit(data, "band", gaussian, errors="warn")
    with pytest.raises(ValueError, match="`param_names` must be provided"):
        curvefit(data, "band", lambda x, *p: gaussian(x, *p))


def test_param_names_for_variadic_function():
    data = cube(ny=2, nx=2, seed=7)
    kw = {"param_names": ["a", "mu", "s"], "p0": {"a": 1.0, "mu": 0.0, "s": 0.2}}

    def variadic(x, *p):
        return gaussian(x, *p)

    ref = data.curvefit("band", variadic, **kw)
    got = curvefit(data, "band", variadic, **kw)
    assert list(got.param.values) == ["a", "mu", "s"]
    assert_fit_parity(got, ref)


def test_docstring_example():
    import doctest

    import torchimize_scipy.xarray

    result = doctest.testmod(torchimize_scipy.xarray, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_func_is_called_for_whole_blocks_with_columns():
    # docs/cluster.md: one batch_curve_fit call per block; func gets (b, 1) columns,
    # the P forward-difference steps of every pixel stacked, never one pixel at a time
    data = cube(ny=4, nx=5)  # 20 pixels, one block (numpy-backed)
    four = xr.concat([data.assign_coords(x=data.x + 10 * k) for k in range(4)], dim="x")

    def fit(obj):
        shapes = []

        def recorded(x, a, mu, s):
            shapes.append(np.shape(a))
            return gaussian(x, a, mu, s)

        got = curvefit(obj, "band", recorded, p0={"s": 0.2})
        assert np.isfinite(got.curvefit_coefficients.values).all()
        return shapes

    shapes, shapes4 = fit(data), fit(four)
    assert all(len(sh) == 2 and sh[1] == 1 for sh in shapes + shapes4)
    assert shapes[0] == (20, 1) and shapes4[0] == (80, 1)  # every pixel's residuals at once
    assert (60, 1) in shapes  # a Jacobian: 3 steps for each of the 20 pixels
    # four times the pixels (the same ones): as many calls, each with four times the rows
    assert [(4 * b, 1) for b, _ in shapes] == shapes4


def _decay(t, a, k):
    return a * np.exp(-k * t)


@pytest.mark.parametrize("valid_points", [1, 2])
@pytest.mark.parametrize("errors", ["raise", "ignore"])
def test_pixel_with_fewer_points_than_parameters_raises_as_xarray(valid_points, errors):
    """'lm' (no bounds): xarray's curvefit raises scipy's TypeError for such a pixel,
    whatever ``errors`` says; so do we, with the same message."""
    t = np.linspace(0.0, 3.0, 20)
    Y = 2 * np.exp(-np.outer([0.5, 1.0, 2.0], t))
    Y[2, valid_points:] = np.nan
    func = _decay if valid_points == 1 else (lambda t, a, k, c: a * np.exp(-k * t) + c)
    d = xr.DataArray(Y, dims=("pix", "t"), coords={"t": t})
    with pytest.raises(TypeError) as ref:
        d.curvefit("t", func, errors=errors)
    with pytest.raises(TypeError) as got:
        curvefit(d, "t", func, errors=errors)
    assert str(got.value) == str(ref.value)


def test_pixel_with_fewer_points_than_parameters_bounded_fits_as_xarray():
    """With bounds ('trf') neither raises: the pixel is fitted (inf covariance)."""
    t = np.linspace(0.0, 3.0, 20)
    Y = 2 * np.exp(-np.outer([0.5, 1.0, 2.0], t))
    Y[2, 1:] = np.nan
    d = xr.DataArray(Y, dims=("pix", "t"), coords={"t": t})
    kw = dict(bounds={"k": (0.0, 10.0)})
    with pytest.warns(Warning):
        ref = d.curvefit("t", _decay, **kw)
    with pytest.warns(Warning, match="Covariance of the parameters could not be estimated"):
        got = curvefit(d, "t", _decay, **kw)
    np.testing.assert_allclose(got.curvefit_coefficients.values[:2],
                               ref.curvefit_coefficients.values[:2], rtol=X_RTOL)
    assert np.isfinite(got.curvefit_coefficients.values[2]).all()
    assert np.isinf(got.curvefit_covariance.values[2]).all()
    assert np.isinf(ref.curvefit_covariance.values[2]).all()


def test_failed_pixels_reported_by_errors_without_touching_warning_filters(recwarn,
                                                                         monkeypatch):
    """A failed fit is reported by ``errors`` (NaN with 'ignore'), not by batch_curve_fit's
    OptimizeWarning, and without ``warnings.catch_warnings``, which replaces the
    process-wide filter list (other threads' filters lost under dask's threads)."""
    import warnings

    def refused(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings used during a fit")

    d = cube(ny=2, nx=2)
    monkeypatch.setattr(warnings, "catch_warnings", refused)
    got = curvefit(d, "band", gaussian, p0={"a": 1.0, "mu": 0.0, "s": 0.2},
                   errors="ignore", kwargs={"maxfev": 2})
    monkeypatch.undo()
    assert not [w for w in recwarn if "Optimal parameters not found" in str(w.message)]
    assert np.isnan(got.curvefit_coefficients.values).all()

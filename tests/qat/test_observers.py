"""Range observers: min-max (running and EMA), percentile, MSE search, and their state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat.config import QuantizerConfig
from qat.functional import NonFiniteError, choose_qparams, fake_quantize, qparam_shape
from qat.observers import MinMaxObserver, MSEObserver, PercentileObserver, make_observer, to_rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def config(**kwargs) -> QuantizerConfig:
    return QuantizerConfig(**{"granularity": "tensor", **kwargs})


def test_to_rows_follows_flattened_qparam_order():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    rows = to_rows(x, "group", 16)
    assert rows.shape == (8, 16) and qparam_shape(x.shape, "group", 16) == (2, 4)
    assert rows[5].tolist() == x[1, 16:32].tolist()  # qparam (1, 1) is flat index 5
    cols = to_rows(x, "channel", axis=1)
    assert cols.shape == (64, 2) and cols[3].tolist() == [3.0, 67.0]
    assert to_rows(x, "tensor").shape == (1, 128)


def test_make_observer_picks_the_init_method():
    assert isinstance(make_observer(config(init="minmax"), ()), MinMaxObserver)
    assert isinstance(make_observer(config(init="percentile"), ()), PercentileObserver)
    assert isinstance(make_observer(config(init="mse"), ()), MSEObserver)


def test_minmax_running_keeps_extremes():
    obs = make_observer(config(init="minmax", granularity="channel"), (2,))
    assert not obs.ready
    obs.update(torch.tensor([[-1.0, 2.0, 0.5], [3.0, 4.0, 5.0]]))
    obs.update(torch.tensor([[-0.5, 1.0, 0.0], [-2.0, 3.0, 9.0]]))
    assert obs.lo.tolist() == [-1.0, -2.0] and obs.hi.tolist() == [2.0, 9.0]
    assert obs.ready and int(obs.batches) == 2


def test_minmax_ema_blends_with_decay():
    obs = make_observer(config(init="minmax", ema_decay=0.75), ())
    obs.update(torch.tensor([[-4.0, 4.0]]))
    obs.update(torch.tensor([[-8.0, 2.0]]))
    # lo = 0.75 * -4 + 0.25 * -8, hi = 0.75 * 4 + 0.25 * 2 (binary fractions: exact)
    assert obs.lo.item() == -5.0 and obs.hi.item() == 3.5
    obs.update(torch.tensor([[0.0, 0.0]]))
    assert obs.lo.item() == -3.75 and obs.hi.item() == 2.625


@pytest.mark.parametrize("percentile", [99.0, 97.5, 90.0, 99.99])
@pytest.mark.parametrize("n", [200, 37])
def test_percentile_matches_numpy_nearest_rank(percentile, n):
    rows = torch.randn(3, n) * torch.tensor([[1.0], [5.0], [0.1]])
    obs = make_observer(config(init="percentile", percentile=percentile, granularity="channel"), (3,))
    obs.update(rows)
    data = rows.numpy().astype(np.float64)
    # the smallest value with at least p% of the row at or below it, and its mirror image for lo
    hi = np.percentile(data, percentile, axis=1, method="inverted_cdf")
    lo = -np.percentile(-data, percentile, axis=1, method="inverted_cdf")
    assert obs.hi.tolist() == hi.astype(np.float32).tolist()
    assert obs.lo.tolist() == lo.astype(np.float32).tolist()
    within = torch.quantile(rows, percentile / 100, dim=1, interpolation="higher")
    assert (obs.hi <= within).all()  # nearest rank never exceeds the next-higher order statistic


def test_percentile_100_is_min_max_and_batches_average():
    rows = torch.randn(2, 50)
    obs = make_observer(config(init="percentile", percentile=100.0, granularity="channel"), (2,))
    obs.update(rows)
    assert torch.equal(obs.lo, rows.amin(1)) and torch.equal(obs.hi, rows.amax(1))
    obs.update(rows * 3)
    torch.testing.assert_close(obs.hi, rows.amax(1) * 2, rtol=1e-6, atol=0)  # mean of 1x and 3x


def _sse(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    scale, zero = choose_qparams(lo, hi, cfg.bits, cfg.symmetric, cfg.is_signed)
    return (fake_quantize(rows, scale[:, None], zero[:, None], cfg.qmin, cfg.qmax) - rows).square().sum(1)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (3, False), (8, True), (2, False)])
def test_mse_search_is_never_worse_than_min_max(bits, symmetric):
    cfg = config(init="mse", bits=bits, symmetric=symmetric, granularity="channel")
    rows = torch.randn(16, 128)
    rows[::2, 0] = 12.0  # outliers: clipping them pays off
    obs = make_observer(cfg, (16,))
    obs.update(rows)
    mse_err = _sse(rows, obs.lo, obs.hi, cfg)
    minmax_err = _sse(rows, rows.amin(1), rows.amax(1), cfg)
    assert (mse_err <= minmax_err).all()
    if bits <= 4:  # at 8 bits min-max is already the best for these rows
        assert (mse_err[::2] < minmax_err[::2]).all()  # rows with an outlier strictly improve
    assert (obs.hi <= rows.amax(1)).all() and (obs.lo >= rows.amin(1)).all()


@pytest.mark.parametrize(("symmetric", "width"), [(False, 128), (True, 64), (False, 70_000)])
def test_mse_search_in_chunks_equals_the_whole_tensor_search(symmetric, width, monkeypatch):
    """The chunked, in-place search picks exactly the ranges of the plain search over all rows at once."""
    import qat.observers as observers

    cfg = config(init="mse", bits=4, symmetric=symmetric, granularity="channel")
    rows = torch.randn(1500 if width < 1000 else 3, width) * torch.rand(1500 if width < 1000 else 3, 1)
    rows[::7, 3] = 9.0
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_lo, best_hi = rows.amin(1), rows.amax(1)
    lo, hi = best_lo.clone(), best_hi.clone()
    for ratio in torch.linspace(1.0, observers.MSE_LOWEST, observers.MSE_GRID).tolist():
        err = _sse(rows, lo * ratio, hi * ratio, cfg)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi)
    monkeypatch.setattr(observers, "MSE_CHUNK_ELEMENTS", 1 << 14)  # several chunks; 70,000 wide: a row per chunk
    got_lo, got_hi = make_observer(cfg, (rows.shape[0],)).batch_range(rows)
    assert torch.equal(got_lo, best_lo) and torch.equal(got_hi, best_hi)


@pytest.mark.parametrize("init", ["minmax", "percentile", "mse"])
def test_state_is_in_state_dict_and_restores(init):
    cfg = config(init=init, granularity="channel")
    obs = make_observer(cfg, (4,))
    assert set(obs.state_dict()) == {"lo", "hi", "batches"}
    obs.update(torch.randn(4, 64))
    obs.update(torch.randn(4, 64))
    fresh = make_observer(cfg, (4,))
    fresh.load_state_dict(obs.state_dict())
    assert fresh.ready and int(fresh.batches) == 2
    for a, b in zip(fresh.qparams(), obs.qparams(), strict=True):
        assert torch.equal(a, b)
    fresh.reset()
    assert not fresh.ready and (fresh.lo == 0).all()


def test_qparams_follow_choose_qparams():
    cfg = config(init="minmax", bits=4, symmetric=False)
    obs = make_observer(cfg, ())
    obs.update(torch.tensor([[-1.0, 2.0]]))
    scale, zero = obs.qparams()
    assert scale.item() == pytest.approx(3 / 15) and zero.item() == 5  # 0 - round(-1 / 0.2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observation_raises(bad):
    obs = make_observer(config(init="minmax"), ())
    with pytest.raises(NonFiniteError, match="observed tensor"):
        obs.update(torch.tensor([[0.0, bad]]))
    assert not obs.ready

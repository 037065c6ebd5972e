"""Memorisation check: copies of training slices are flagged, new patients are not; the similarity
is in-body SSIM against every training slice."""
from __future__ import annotations

import numpy as np
import piq
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ctsynth.core.errors import ConfigError, InputError
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.nearest import NearestTrainingSearch, PrivacyAccumulator, body_ssim, similarity, slice_stats

TRAIN, TEST = ("c1", "c2", "c3"), ("c4",)


@pytest.fixture
def store(tiny_store):
    return ProcessedStore(tiny_store)


def _images(store, rows):
    return torch.from_numpy(np.asarray(store.images[rows], np.float32))


def test_copying_generator_is_flagged_and_new_patients_are_not(store):
    train_rows = store.rows_for_cases(TRAIN)
    search = NearestTrainingSearch(store.images, train_rows, downsample=16, candidates=3)
    copied = train_rows[[0, 5, 7, 12, 17]]
    fake = _images(store, copied)                                   # a "generator" that memorised
    g = torch.Generator().manual_seed(0)
    near_copy = (fake + 0.01 * torch.randn(fake.shape, generator=g)).clamp(-1, 1)
    real_test = _images(store, store.rows_for_cases(TEST))

    acc = PrivacyAccumulator(threshold=0.95)
    rows, sims = search.query(fake)
    np.testing.assert_array_equal(rows, copied)                     # finds the very slice it copied
    np.testing.assert_allclose(sims, 1.0, atol=1e-5)
    acc.update("generated", sims)
    rows_nc, sims_nc = search.query(near_copy)
    np.testing.assert_array_equal(rows_nc, copied)
    assert (sims_nc > 0.95).all()                                   # a little noise does not hide a copy
    _, real_sims = search.query(real_test)
    acc.update("real", real_sims)
    s = acc.summary()
    assert s["privacy_generated_share_above"] == 1.0
    assert s["privacy_real_share_above"] == 0.0
    assert s["privacy_n_shareable"] == 0
    assert s["privacy_real_similarity_max"] < 0.95
    assert not acc.shareable(sims).any() and acc.shareable(real_sims).all()


def test_search_matches_brute_force_ssim(store):
    train_rows = store.rows_for_cases(TRAIN)
    queries = _images(store, store.rows_for_cases(TEST))
    train = _images(store, train_rows)
    exact = NearestTrainingSearch(store.images, train_rows)
    stepwise = NearestTrainingSearch(store.images, train_rows, pair_pixels=3 * 32 * 32)     # 3 pairs a step
    assert exact.exhaustive and "every training slice" in exact.distance
    rows, sims = exact.query(queries)
    np.testing.assert_array_equal(rows, stepwise.query(queries)[0])
    for q, row, sim in zip(queries, rows, sims):
        all_sims = body_ssim(q.expand(len(train), -1, -1), train)       # (N_train,) one pair at a time
        assert sim == pytest.approx(float(all_sims.max()), abs=1e-5)
        assert row == train_rows[int(all_sims.argmax())]


def test_similarity_is_the_ssim_metric_over_the_chosen_pixels(store):
    a, b = _images(store, np.arange(4)), _images(store, np.arange(4, 8))
    sa, sb = slice_stats(a), slice_stats(b)
    sa.body[:], sb.body[:] = False, False
    sa.body[:, 5:-5, 5:-5] = True             # piq's pixels: those whose whole 11 x 11 window is inside
    expected = piq.ssim((a[:, None] + 1) / 2, (b[:, None] + 1) / 2, data_range=1.0, reduction="none")
    torch.testing.assert_close(similarity(sa, sb), expected, atol=1e-5, rtol=0)


def test_in_body_ssim_ignores_the_air():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32
    body = ((yy - 0.5) / 0.25) ** 2 + ((xx - 0.5) / 0.3) ** 2 < 1         # 23 % of the slice
    tex = 0.1 + 0.3 * rng.standard_normal(body.shape)
    noisy_air = [np.where(body, tex, -1 + 0.4 * rng.random(body.shape)) for _ in range(2)]   # air < -500 HU
    new_body = [np.where(body, 0.1 + 0.3 * rng.standard_normal(body.shape), -1.0) for _ in range(2)]
    x = torch.tensor(np.stack([noisy_air[0], new_body[0]]), dtype=torch.float32).clamp(-1, 1)
    y = torch.tensor(np.stack([noisy_air[1], new_body[1]]), dtype=torch.float32).clamp(-1, 1)
    ours = body_ssim(x, y)
    whole = piq.ssim((x[:, None] + 1) / 2, (y[:, None] + 1) / 2, data_range=1.0, reduction="none")
    assert ours[0] > 0.98 and whole[0] < 0.9                 # the same body: a copy, whatever the air does
    assert ours[1] < 0.5 and whole[1] > ours[1] + 0.2         # a different body: identical air does not help
    blank = torch.full((2, 32, 32), -1.0)
    blank[1, :4, :4] = -0.9                                   # air only, a little different in a corner
    alone = body_ssim(blank[:1], blank[1:])
    assert body_ssim(blank[:1], blank[:1]).item() == pytest.approx(1.0) and alone.item() < 0.999   # every pixel
    queries = slice_stats(blank[:1]).take((slice(None), None))                 # (1, 1, S, S)
    beside_a_body = similarity(queries, slice_stats(torch.stack([blank[1], x[1]])).take((None,)))   # (1, 2)
    assert beside_a_body[0, 0].item() == pytest.approx(alone.item(), abs=1e-6)   # still every pixel, not the body box


def test_exhaustive_finds_the_nearest_a_low_res_prefilter_misses():
    rng = np.random.default_rng(0)
    body = np.hypot(*(np.mgrid[:32, :32] / 32 - 0.5)) < 0.38
    tex = 0.1 + 0.3 * rng.standard_normal(body.shape)
    copy = np.where(body, tex + 0.15, -1.0)                                 # the query's slice, a little brighter
    decoys = [np.where(body, gaussian_filter(tex, 1.0 + 0.2 * i), -1.0) for i in range(3)]   # right means only
    others = [np.where(body, 0.1 + 0.3 * rng.standard_normal(body.shape), -1.0) for _ in range(4)]
    bank = np.clip(np.stack([*others, *decoys, copy]), -1, 1).astype(np.float32)
    query = torch.tensor(np.where(body, tex, -1.0)[None], dtype=torch.float32).clamp(-1, 1)
    rows = np.arange(len(bank))
    exhaustive = NearestTrainingSearch(bank, rows, downsample=8, candidates=3)
    prefilter = NearestTrainingSearch(bank, rows, downsample=8, candidates=3, budget=0)
    assert exhaustive.exhaustive and not prefilter.exhaustive and "L2 at 8x8" in prefilter.distance
    assert set(prefilter.candidates(query)[0].tolist()) == {4, 5, 6}       # the decoys are nearer at low res
    row, sim = exhaustive.query(query)
    assert row[0] == 7 and sim[0] > 0.95                                    # the copy, flagged
    row, sim = prefilter.query(query)
    assert row[0] in (4, 5, 6) and sim[0] < 0.95                            # missed: the copy would be shared


def test_budget_chooses_the_search(store):
    rows = store.rows_for_cases(TRAIN)
    work = len(rows) * len(rows) * 32 * 32                     # n_queries None: as many as training slices
    assert NearestTrainingSearch(store.images, rows, budget=work).exhaustive
    assert not NearestTrainingSearch(store.images, rows, budget=work - 1).exhaustive
    assert NearestTrainingSearch(store.images, rows, budget=work - 1, n_queries=len(rows) - 1).exhaustive


def test_chunked_prefilter_equals_one_chunk(store):
    train_rows = store.rows_for_cases(TRAIN)
    queries = _images(store, store.rows_for_cases(TEST))
    one = NearestTrainingSearch(store.images, train_rows, downsample=8, candidates=4, chunk=10_000, budget=0)
    many = NearestTrainingSearch(store.images, train_rows, downsample=8, candidates=4, chunk=3, batch=5, budget=0,
                                 pair_pixels=5 * 32 * 32)
    torch.testing.assert_close(one.candidates(queries), many.candidates(queries))
    a, b = one.query(queries), many.query(queries)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)   # float32: steps differ in their crop
    assert "SSIM" in one.distance and "8x8" in one.distance


def test_accumulator_histogram_and_streaming():
    sims = np.array([0.1, 0.5, 0.96, 0.99, -0.2, 0.95])
    whole, parts = PrivacyAccumulator(0.95), PrivacyAccumulator(0.95)
    whole.update("generated", sims)
    for chunk in (sims[:2], sims[2:5], sims[5:]):
        parts.update("generated", chunk)
    parts.update("real", np.array([0.3]))
    whole.update("real", np.array([0.3]))
    assert whole.summary() == parts.summary()
    s = whole.summary()
    assert s["privacy_generated_share_above"] == pytest.approx(2 / 6)   # 0.95 itself passes
    assert s["privacy_n_shareable"] == 4
    assert s["privacy_generated_similarity_max"] == pytest.approx(0.99)
    hist = whole.histogram()
    assert hist["generated"].sum() == 6 and hist["real"].sum() == 1
    assert hist.loc[0, "generated"] == 1                                # −0.2 counted in the first bin


def test_bad_search_inputs(store):
    with pytest.raises(InputError):
        NearestTrainingSearch(store.images, np.array([], np.int64))
    with pytest.raises(ConfigError):
        NearestTrainingSearch(store.images, store.rows_for_cases(TRAIN), candidates=0)

"""Memorisation check: copies of training slices are flagged, new patients are not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctsynth.core.errors import ConfigError, InputError
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.privacy import NearestTrainingSearch, PrivacyAccumulator, pairwise_ssim

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
    exact = NearestTrainingSearch(store.images, train_rows, downsample=16, candidates=len(train_rows))
    rows, sims = exact.query(queries)
    for q, row, sim in zip(queries, rows, sims):
        all_sims = pairwise_ssim(q.expand(len(train), -1, -1), train)   # (N_train,)
        assert sim == pytest.approx(float(all_sims.max()), abs=1e-6)
        assert row == train_rows[int(all_sims.argmax())]


def test_chunked_search_equals_one_chunk(store):
    train_rows = store.rows_for_cases(TRAIN)
    queries = _images(store, store.rows_for_cases(TEST))
    one = NearestTrainingSearch(store.images, train_rows, downsample=8, candidates=4, chunk=10_000)
    many = NearestTrainingSearch(store.images, train_rows, downsample=8, candidates=4, chunk=3, batch=5)
    torch.testing.assert_close(one.candidates(queries), many.candidates(queries))
    a, b = one.query(queries), many.query(queries)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1])
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

"""The output noise model (ctsynth.data.noise, ``model.noise: nps``): known-answer spectra, seeded
samples that do not depend on batching, the GAN step's noisy discriminator input, and a tiny
training whose model file carries the noise into generation, synthesis and ``ctsynth generate``."""
from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import tiny_params, train_on_raw
from ctsynth.core.config import SynthesizeCfg, params_from_dict
from ctsynth.core.errors import ConfigError, ModelFileError
from ctsynth.data import noise, phantom
from ctsynth.data.augment import build_batch_transform
from ctsynth.data.store import ProcessedStore
from ctsynth.synth import generate, synthesize
from ctsynth.synth.inference import MaskToCT, generate_file, load_model
from ctsynth.train.gan import GanPair, LossWeights, gan_step, make_optimizer
from ctsynth.train.history import LOSS_NAMES
from ctsynth.train.networks import build_discriminator, build_generator

S = 48


def _slices(field: np.ndarray, n: int = 12, value: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slices of a constant 0.2 plus ``field`` noise, one big square structure ``value``."""
    masks = np.zeros((n, S, S), np.uint8)
    masks[:, 6:42, 6:42] = value
    return 0.2 + field.astype(np.float32), masks


def test_white_noise_of_known_sigma_measures_flat_at_sigma_squared():
    sigma = 0.03
    images, masks = _slices(np.random.default_rng(0).normal(0, sigma, (12, S, S)))
    rec = noise.measure(images, masks)
    radial = np.asarray(rec["radial_nps"])
    assert rec["size"] == S and radial[0] == 0.0
    assert rec["std"] == pytest.approx(sigma, rel=0.08)
    mid = radial[3:S // 2]                                          # white: the same power at every frequency
    assert mid.std() / mid.mean() < 0.15 and mid.mean() == pytest.approx(sigma ** 2, rel=0.12)
    field = noise.NoiseModel(rec).sample(np.random.default_rng(1))
    assert field.dtype == np.float32 and field.shape == (S, S) and field.std() == pytest.approx(sigma, rel=0.1)


def test_correlated_noise_keeps_its_spectrum_through_measure_and_sample():
    """Gaussian-filtered noise has most power at low frequencies; samples of its model do too."""
    raw = np.random.default_rng(2).normal(0, 1, (12, S, S))
    corr = np.stack([ndimage.gaussian_filter(f, 1.2) for f in raw]) * 0.1
    rec = noise.measure(*_slices(corr))
    radial = np.asarray(rec["radial_nps"])
    assert radial[2:5].mean() > 10 * radial[15:S // 2].mean()
    model = noise.NoiseModel(rec)
    drawn = model.for_keys((7,), [(k,) for k in range(24)])
    again = noise.measure(*_slices(drawn, n=24))                    # what we sample measures as what we measured
    assert again["std"] == pytest.approx(rec["std"], rel=0.15)
    ratio = np.asarray(again["radial_nps"])[2:12] / radial[2:12]
    assert 0.6 < np.median(ratio) < 1.5


def test_a_structure_edge_is_not_noise_and_tiny_regions_are_left_out():
    images = np.zeros((2, S, S), np.float32)
    masks = np.zeros((2, S, S), np.uint8)
    masks[:, 10:30, 10:30] = 1
    images[masks == 1] = 0.5                                        # a flat structure: its edge eroded away
    masks[:, 40:42, 40:42] = 2                                      # 4 px: too small, left out
    images[:, 40:42, 40:42] = np.array([[0.9, -0.9], [0.1, 0.3]])
    assert noise.measure(images, masks)["std"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no structure region"):
        noise.measure(images[:, :5, :5], masks[:, :5, :5])


def _volume(sigma_z: float, n: int = 24, seed: int = 3) -> np.ndarray:
    """(n, S, S) white noise filtered by a Gaussian of 1 px in-plane and ``sigma_z`` along z."""
    raw = np.random.default_rng(seed).normal(0, 1, (n, S, S))
    return ndimage.gaussian_filter(raw, (sigma_z, 1.0, 1.0), mode="wrap") * 0.05


@pytest.mark.parametrize("sigma_z", [0.0, 0.6, 1.2])
def test_the_correlation_along_z_is_measured_between_adjacent_slices(sigma_z):
    """Known answer: Gaussian filtering along z with sigma s correlates neighbours by exp(-1 / (4 s^2))
    at every in-plane frequency (0 for independent slices)."""
    images, masks = _slices(_volume(sigma_z), n=24)
    rec = noise.measure(images, masks, ["a"] * 24, np.arange(24))
    rho = np.asarray(rec["z_corr"])
    expect = 0.0 if sigma_z == 0 else np.exp(-1 / (4 * sigma_z ** 2))
    assert rho[0] == 0.0 and len(rho) == len(rec["radial_nps"])
    assert np.median(rho[2:S // 2]) == pytest.approx(expect, abs=0.08)
    # the pairs are found by case and z, not by position: shuffled rows measure the same, and slices
    # of two cases or two z apart are never paired
    order = np.random.default_rng(0).permutation(24)
    again = noise.measure(images[order], masks[order], ["a"] * 24, np.arange(24)[order])
    assert np.allclose(again["z_corr"], rec["z_corr"])
    apart = noise.measure(images, masks, ["a", "b"] * 12, np.arange(24))       # no two adjacent in one case
    assert not np.any(apart["z_corr"])
    assert "z_corr" not in noise.measure(images, masks)                        # without z: no correlation


def test_samples_along_z_carry_the_measured_correlation_whatever_the_batching():
    images, masks = _slices(_volume(0.9, n=32), n=32)
    rec = noise.measure(images, masks, ["a"] * 32, np.arange(32))
    model = noise.NoiseModel(rec)
    keys = [(5, z) for z in range(40)]
    whole = model.for_keys((3,), keys)
    pieces = np.concatenate([noise.NoiseModel(rec).for_keys((3,), keys[i:i + 7]) for i in range(0, 40, 7)])
    shuffled = np.random.default_rng(1).permutation(40)
    assert np.array_equal(whole, pieces)                                       # batches continue the chain
    assert np.array_equal(noise.NoiseModel(rec).for_keys((3,), [keys[i] for i in shuffled]), whole[shuffled])
    assert np.array_equal(model.for_keys((3,), keys[10:12]), whole[10:12])     # a jump back recomputes
    drawn = noise.measure(*_slices(whole, n=40), ["a"] * 40, np.arange(40))
    assert drawn["std"] == pytest.approx(rec["std"], rel=0.15)               # the same spectrum in every slice
    assert np.median(np.asarray(drawn["z_corr"])[2:20]) == pytest.approx(np.median(rec["z_corr"][2:20]), abs=0.1)
    other = model.for_keys((3,), [(6, z) for z in range(40)])                 # another volume: its own chain
    assert abs(np.corrcoef(other.ravel(), whole.ravel())[0, 1]) < 0.05
    # a record without z_corr (older model files): every slice independent, from its own key
    flat = noise.NoiseModel({k: v for k, v in rec.items() if k != "z_corr"})
    assert np.array_equal(flat.for_keys((3,), keys[:3]),
                          np.stack([flat.sample(np.random.default_rng([3, *k])) for k in keys[:3]]))


def test_samples_are_seeded_per_key_not_per_batch():
    model = noise.NoiseModel(noise.record(np.r_[0.0, np.full(40, 1e-3)], S))
    keys = [(11, z) for z in range(5)]
    whole = model.for_keys((3,), keys)
    assert np.array_equal(whole[2:], model.for_keys((3,), keys[2:]))
    assert not np.allclose(whole, model.for_keys((4,), keys))       # another seed, other noise
    a, b = model.batch(4, (1, 0, 5), "cpu"), model.batch(4, (1, 0, 5), "cpu")
    assert a.shape == (4, 1, S, S) and torch.equal(a, b)
    assert not torch.equal(a, model.batch(4, (1, 1, 5), "cpu"))     # each rank and step its own


def test_the_discriminator_sees_the_noise_and_l1_the_noise_free_slice():
    cfg = tiny_params().model
    torch.manual_seed(0)
    G, D = build_generator(cfg, 2), build_discriminator(cfg, 2)
    cond, real = torch.rand(2, 2, 32, 32), torch.rand(2, 1, 32, 32) * 2 - 1
    start = ({k: v.clone() for k, v in G.state_dict().items()}, {k: v.clone() for k, v in D.state_dict().items()})

    def step(fake_noise):
        G.load_state_dict(start[0])
        D.load_state_dict(start[1])
        opt_g, opt_d = (make_optimizer(m.parameters(), 1e-3, (0.5, 0.999)) for m in (G, D))
        with torch.no_grad():
            expect_l1 = torch.nn.functional.l1_loss(G(cond), real)
        losses = gan_step(GanPair(G, D, D, opt_g, opt_d), cond, real, LossWeights(l1=100.0),
                          torch.autocast("cpu", enabled=False), fake_noise=fake_noise)
        return losses, expect_l1

    clean, l1 = step(None)
    noisy, l1_again = step(torch.randn(2, 1, 32, 32) * 0.5)
    i_l1, i_fake = LOSS_NAMES.index("g_l1"), LOSS_NAMES.index("d_fake")
    assert noisy[i_l1] == pytest.approx(float(l1_again), rel=1e-5) and clean[i_l1] == pytest.approx(float(l1), rel=1e-5)
    assert noisy[i_fake] != pytest.approx(float(clean[i_fake]), rel=1e-4)    # D's fake loss: it judged other pixels


def test_the_batch_transform_draws_the_noise_from_seed_rank_and_step():
    p = tiny_params(train={"augment": "none", "seed": 5})
    rec = noise.record(np.r_[0.0, np.full(30, 1e-3)], 32)
    cond, real = torch.zeros(3, 7, 32, 32), torch.zeros(3, 1, 32, 32)
    t0, t1 = (build_batch_transform(p, 0, ["Myo"], rank, rec) for rank in (0, 1))
    n_a, n_b, n_c = t0(cond, real, 4)[2], t0(cond, real, 4)[2], t1(cond, real, 4)[2]
    assert n_a.shape == (3, 1, 32, 32) and torch.equal(n_a, n_b) and not torch.equal(n_a, n_c)
    assert build_batch_transform(p, 0, ["Myo"])(cond, real, 4)[2] is None


def test_mr_refuses_the_ct_noise_model():
    with pytest.raises(ConfigError, match="model.noise nps.*Rician"):
        params_from_dict({"data": {"modality": "mr"}, "model": {"noise": "nps"}})
    with pytest.raises(ConfigError):
        params_from_dict({"model": {"noise": "poisson"}})


# ------------------------------------------------------------------ a tiny training with the noise model

SMALL, SPACING = (48, 48, 12), (6.0, 6.0, 8.0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    phantom.write_dataset(root / "raw", cases=4, seed=1, shape=SMALL, spacing=SPACING, progress=False)
    p = train_on_raw(root / "raw", root, model={"noise": "nps"})
    return {"root": root, "params": p, "split": json.loads((root / "split.json").read_text())}


def test_the_model_file_carries_the_measured_noise(pipeline):
    root = pipeline["root"]
    model, meta = load_model(root / "generator.pt")
    store = ProcessedStore(root / "processed")
    rows = store.rows_for_cases(pipeline["split"]["train"])
    assert meta["noise"] == noise.measure(np.asarray(store.images[rows]), np.asarray(store.masks[rows]),
                                          store.slices.case.to_numpy()[rows], store.slices.z.to_numpy()[rows])
    assert len(meta["noise"]["z_corr"]) == len(meta["noise"]["radial_nps"])   # (32² slices: regions too small to pair)
    assert 0.002 < meta["noise"]["std"] < 0.05                       # the phantom's 15-25 HU, resized: units of 1000 HU
    masks = np.asarray(store.masks[rows[:6]])
    clean = MaskToCT(model, meta).unit(masks)                        # no seed: the noise-free slice
    a = MaskToCT(model, meta, seed=1, batch_size=6).unit(masks, keys=[(0, z) for z in range(6)])
    b = MaskToCT(model, meta, seed=1, batch_size=2).unit(masks, keys=[(0, z) for z in range(6)])
    assert np.array_equal(a, b) and not np.allclose(a, clean)
    assert np.std(a - clean) == pytest.approx(meta["noise"]["std"], rel=0.3)   # clamping trims a little
    with pytest.raises(ModelFileError, match="noise model is for 16² slices"):
        bad = root / "bad.pt"
        blob = torch.load(root / "generator.pt", weights_only=False)
        blob["preprocess"]["noise"] = {**blob["preprocess"]["noise"], "size": 16}
        torch.save(blob, bad)
        load_model(bad)


def test_generation_is_noisy_seeded_and_slices_match_their_volume(pipeline):
    root, p = pipeline["root"], pipeline["params"]
    generate.run(p, root / "generator.pt", root / "processed", root / "split.json", root / "interim", root / "gen")
    again = dataclasses.replace(p, generate=dataclasses.replace(p.generate, batch_size=3))
    generate.run(again, root / "generator.pt", root / "processed", root / "split.json", root / "interim", root / "gen2")
    first, second = (np.load(root / g / "fake.npy") for g in ("gen", "gen2"))
    prov = json.loads((root / "gen" / "model.json").read_text())
    assert prov["noise"]["seed"] == p.generate.seed and prov["noise"]["std_units"] > 0.005
    # the noise does not depend on batching (bit for bit: test_samples_are_seeded_per_key_not_per_batch);
    # the generator's own output may differ in its last bits between batch sizes on some CPUs (AMD EPYC:
    # test_generate's batch-size test), so a float16 ulp here, a small fraction of the noise's std
    np.testing.assert_allclose(first.astype(np.float32), second.astype(np.float32), rtol=0, atol=1e-3)
    other = dataclasses.replace(p, generate=dataclasses.replace(p.generate, seed=p.generate.seed + 1))
    generate.run(other, root / "generator.pt", root / "processed", root / "split.json", root / "interim", root / "gen3")
    assert not np.array_equal(first, np.load(root / "gen3" / "fake.npy"))
    # ctsynth generate: --seed picks the noise, --no-noise (seed None) gives the noise-free slice
    case = pipeline["split"]["test"][0]
    mask = root / "raw" / f"{case}_label.nii.gz"                     # the MM-WHS values the model's map reads
    outs = {}
    for name, seed in (("s0", 0), ("s0b", 0), ("s1", 1), ("clean", None)):
        stats = generate_file(root / "generator.pt", mask, root / f"{name}.nii.gz", seed=seed)
        outs[name] = np.asanyarray(nib.load(root / f"{name}.nii.gz").dataobj)
    assert stats["noise"] == "none (the noise-free slice)"
    assert np.array_equal(outs["s0"], outs["s0b"]) and not np.array_equal(outs["s0"], outs["s1"])
    assert np.abs(outs["s0"].astype(float) - outs["clean"]).mean() > 1.0     # HU
    p2 = dataclasses.replace(p, synthesize=SynthesizeCfg(cases=1, seed=3))
    synthesize.run(p2, root / "generator.pt", root / "interim", root / "split.json", root / "syn_a")
    synthesize.run(p2, root / "generator.pt", root / "interim", root / "split.json", root / "syn_b")
    a, b = (np.asanyarray(nib.load(root / d / "synth_0001_image.nii.gz").dataobj) for d in ("syn_a", "syn_b"))
    assert np.array_equal(a, b)

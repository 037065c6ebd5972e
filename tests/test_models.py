"""Generator / discriminator shapes, receptive fields and the model file."""
from __future__ import annotations

import pytest
import torch

from ctsynth.core.config import ModelCfg
from ctsynth.core.errors import ModelFileError
from ctsynth.train.networks import (
    Generator,
    PatchDiscriminator,
    _generator_footprint,
    build_discriminator,
    build_generator,
    count_parameters,
    load_generator,
    receptive_field,
    save_generator,
)

PAPER = ModelCfg(gen_depth=7, ngf=64, ndf=64, disc_layers=4, skip_connections=False, head_layers=0)
META = {"image_size": 32, "hu_window": [-1000.0, 1000.0], "structures": ["LV", "Ao"],
        "label_map": {205: "Myo", 500: "LV", 820: "Ao"}, "encoding": "onehot"}


def _empirical_rf(fn, in_shape, out_index) -> int:
    """Extent (pixels, along x) of the input region one output element depends on."""
    x = torch.randn(in_shape, requires_grad=True)
    out = fn(x)
    out[out_index].backward()
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0)
    return int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("skips", [False, True])
def test_paper_generator_maps_256_to_256(skips):
    cfg = ModelCfg(**{**PAPER.__dict__, "skip_connections": skips})
    g = build_generator(cfg, in_channels=7).eval()
    with torch.no_grad():
        out = g(torch.rand(1, 7, 256, 256))
    assert out.shape == (1, 1, 256, 256)
    assert out.abs().max() <= 1
    assert len(g.down) == 7 and len(g.up) == 7
    # filters 64-128-256-512-512-512-512 (capped at 8 x ngf)
    assert [blk[0].out_channels for blk in g.down] == [64, 128, 256, 512, 512, 512, 512]


def test_paper_discriminator_gives_16x16_patches_and_94px_field():
    d = build_discriminator(PAPER, in_channels=7).eval()
    with torch.no_grad():
        out = d(torch.rand(2, 1, 256, 256), torch.rand(2, 7, 256, 256))
    assert out.shape == (2, 1, 16, 16)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert receptive_field(PAPER) == 94
    assert receptive_field(d) == 94
    emp = _empirical_rf(lambda x: d(x[:, :1], x[:, 1:]), (1, 8, 256, 256), (0, 0, 8, 8))
    assert emp == 94


@pytest.mark.parametrize("skips,upsample,head,field", [(True, "transpose", 0, 38), (False, "resize", 0, 38),
                                                       (True, "transpose", 2, 46), (False, "resize", 1, 38)])
def test_generator_receptive_field_matches_gradient_footprint(skips, upsample, head, field):
    cfg = ModelCfg(gen_depth=3, ngf=4, skip_connections=skips, upsample=upsample, head_layers=head)
    g = build_generator(cfg, 1).eval()
    widths = []
    for o in range(48, 56):                                  # one period (2^(depth+1)) of positions
        x = torch.randn(1, 1, 128, 128, requires_grad=True)
        g(x)[0, 0, 64, o].backward()
        cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)) > 0)
        assert (int(cols.min()), int(cols.max())) == _generator_footprint(3, skips, upsample, o, head)
        widths.append(int(cols.max() - cols.min() + 1))
    assert receptive_field(cfg, "generator") == receptive_field(g) == max(widths) == field
    assert receptive_field(PAPER, "generator") == 638        # paper preset: sees the whole 256² slice


def test_options_resize_sigmoid_dropout():
    cfg = ModelCfg(gen_depth=4, ngf=4, upsample="resize", output="sigmoid", dropout=0.5)
    g = build_generator(cfg, 3)
    out = g(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert any(isinstance(m, torch.nn.Dropout) for m in g.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in build_generator(ModelCfg(), 3).modules())


def test_output_blur_low_passes_the_generators_own_output():
    """model.output_blur: the same weights give the Gaussian-blurred slice, with its fine texture gone
    (known answer: the finest frequencies of a Gaussian of sigma 1 px keep < 1 % of their power)."""
    torch.manual_seed(0)
    sharp = build_generator(ModelCfg(gen_depth=3, ngf=4), 3).eval()
    soft = build_generator(ModelCfg(gen_depth=3, ngf=4, output_blur=1.0), 3).eval()
    soft.load_state_dict(sharp.state_dict())                         # a fixed filter: no weights of its own
    cond = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = sharp(cond), soft(cond)
    radius = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-radius ** 2 / 2)
    kernel = (k1[:, None] * k1[None]) / k1.sum() ** 2
    padded = torch.nn.functional.pad(a, (3, 3, 3, 3), mode="reflect")
    assert torch.allclose(b, torch.nn.functional.conv2d(padded, kernel[None, None]), atol=1e-6)
    power = [torch.fft.fft2(x - x.mean()).abs()[..., 12:20, 12:20].pow(2).mean() for x in (a, b)]
    assert power[1] < 0.01 * power[0] and b.abs().max() <= 1
    with pytest.raises(ValueError, match="output_blur"):
        build_generator(ModelCfg(output_blur=-1.0), 3)


def test_head_layers_read_the_condition_at_full_resolution():
    """model.head_layers: known answer — with the head's weights on the up path zeroed and one
    condition channel's centre tap set, the output is tanh(w * that channel + b) pixel for pixel (a
    one-pixel checkerboard no stride-2 layer can place); 0 adds no module (pix2pix's weights)."""
    assert not any("head" in k for k in build_generator(ModelCfg(gen_depth=3, ngf=4, head_layers=0), 3).state_dict())
    g = build_generator(ModelCfg(gen_depth=3, ngf=4, head_layers=1), 3).eval()
    conv = g.head[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4 + 3, 1, (3, 3))
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 4 + 1, 1, 1] = 1.5                     # condition channel 1, after ngf up-path features
        conv.bias.fill_(-0.25)
        cond = torch.zeros(2, 3, 32, 32)
        cond[:, 1, ::2, ::2] = cond[:, 1, 1::2, 1::2] = 1.0   # one-pixel checkerboard
        assert torch.equal(g(cond), torch.tanh(1.5 * cond[:, 1:2] - 0.25))
    two = build_generator(ModelCfg(gen_depth=3, ngf=4, head_layers=2), 3)
    assert two(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in two.head) == 1
    with pytest.raises(ValueError, match="head_layers"):
        build_generator(ModelCfg(head_layers=-1), 3)


def test_init_is_pix2pix_normal():
    g = build_generator(ModelCfg(gen_depth=3, ngf=16), 2)
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.002
    assert count_parameters(g) > 0 and isinstance(g, Generator)
    assert isinstance(build_discriminator(ModelCfg(), 2), PatchDiscriminator)


@pytest.mark.parametrize("head", [0, 2])
def test_model_file_round_trip_with_weights_only(tmp_path, head):
    cfg = ModelCfg(gen_depth=5, ngf=8, head_layers=head)
    g = build_generator(cfg, 2)
    g(torch.rand(4, 2, 32, 32))                           # move BN running stats off their init
    g = g.to(memory_format=torch.channels_last).eval()
    path = tmp_path / "gen.pt"
    save_generator(path, g, cfg.__dict__, 2, META, {"step": 7})
    blob = torch.load(path, weights_only=True)
    assert blob["preprocess"]["label_map"] == {"205": "Myo", "500": "LV", "820": "Ao"}
    model, meta = load_generator(path)
    assert not model.training
    assert meta["in_channels"] == 2 and meta["extra"]["step"] == 7
    assert meta["preprocess"]["structures"] == ["LV", "Ao"] and meta["model_cfg"]["ngf"] == 8
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), g(x), atol=1e-5)     # saved channels_last, loaded contiguous
        assert torch.equal(model(x), g.to(memory_format=torch.contiguous_format)(x))


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04truncated zip"])
def test_load_generator_rejects_garbage(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.pt"):
        load_generator(path)


def test_load_generator_rejects_missing_truncated_and_foreign(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_generator(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match="not a ctsynth generator"):
        load_generator(foreign)
    good = tmp_path / "good.pt"
    save_generator(good, build_generator(ModelCfg(gen_depth=2, ngf=4), 1), ModelCfg(gen_depth=2, ngf=4).__dict__,
                   1, META)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated.pt"):
        load_generator(truncated)
    mismatched = tmp_path / "mismatched.pt"
    blob = torch.load(good, weights_only=True)
    blob["model_cfg"]["ngf"] = 8
    torch.save(blob, mismatched)
    with pytest.raises(ModelFileError, match="inconsistent"):
        load_generator(mismatched)


def test_save_generator_refuses_non_plain_extra(tmp_path):
    with pytest.raises(TypeError):
        save_generator(tmp_path / "g.pt", build_generator(ModelCfg(gen_depth=2, ngf=4), 1),
                       ModelCfg(gen_depth=2, ngf=4).__dict__, 1, META, {"bad": object()})
    assert not (tmp_path / "g.pt").exists()

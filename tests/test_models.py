"""The ADM UNet, the toy MLP and the presets."""
import pytest
import torch

from adv_dpm.models import PRESETS, MLPDenoiser, UNet, build_model
from adv_dpm.models.unet import num_groups, timestep_embedding
from adv_dpm.nn import GroupNormAct

SMALL = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(4,), num_head_channels=16)


@pytest.fixture(autouse=True, scope="module")
def native_convs():
    """oneDNN compiles kernels for every new conv shape (seconds each on a busy 2-core CPU); the
    tiny test models run faster on PyTorch's native convs."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def randomized(model, seed=0):
    """``model`` with every parameter random (at init the zeroed output convs hide most of the net)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch=3, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_num_groups_is_the_largest_divisor_up_to_32():
    assert [num_groups(c) for c in (1, 3, 16, 20, 32, 48, 64, 96, 192, 33)] == [1, 3, 16, 20, 32, 24, 32, 32, 32, 11]


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 9)
    assert emb.shape == (3, 9) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(5))
    assert torch.allclose(emb[:, :4].square() + emb[:, 4:8].square(), torch.ones(3, 4))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_unet_output_shape(learn_sigma):
    model = UNet(**SMALL, learn_sigma=learn_sigma)
    x, t = inputs()
    assert model(x, t).shape == (3, 2 if learn_sigma else 1, 8, 8)


def test_unet_resblock_updown_and_out_channels():
    model = UNet(**{**SMALL, "channel_mult": (1, 2, 2)}, resblock_updown=True, out_channels=2, learn_sigma=True)
    x, t = inputs()
    assert model(x, t).shape == (3, 4, 8, 8)


def test_unet_class_conditional():
    model = randomized(UNet(**SMALL, num_classes=10))
    x, t = inputs()
    y = torch.tensor([0, 3, 9])
    out = model(x, t, y)
    assert out.shape == (3, 1, 8, 8)
    assert not torch.allclose(out, model(x, t, torch.tensor([1, 4, 8])))
    with pytest.raises(ValueError, match="class labels y"):
        model(x, t)
    with pytest.raises(ValueError, match="class labels y"):
        UNet(**SMALL)(x, t, y)


def test_unet_rejects_bad_configs():
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(**{**SMALL, "attention_resolutions": (2,)})
    with pytest.raises(ValueError, match="not divisible"):
        UNet(**{**SMALL, "image_size": 6, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match="heads"):
        UNet(**{**SMALL, "num_head_channels": 24})


def test_norms_are_fused():
    model = UNet(**SMALL, resblock_updown=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNormAct) for m in norms)
    assert {m.act for m in norms} == {"silu", None}
    assert model.middle_block[1].norm.act is None


def test_zero_output_at_init():
    model = UNet(**SMALL, learn_sigma=True, num_classes=4)
    x, t = inputs()
    assert torch.equal(model(x, t, torch.tensor([0, 1, 2])), torch.zeros(3, 2, 8, 8))
    assert torch.equal(MLPDenoiser()(torch.randn(5, 2), torch.arange(5)), torch.zeros(5, 2))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_channels_last_matches_nchw(scale_shift):
    model = randomized(UNet(**SMALL, use_scale_shift_norm=scale_shift, resblock_updown=True)).eval()
    x, t = inputs()
    ref = model(x, t)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_cl, t), ref, rtol=1e-4, atol=1e-4)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_cl, t), ref, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_every_parameter():
    model = randomized(UNet(**SMALL, resblock_updown=True, learn_sigma=True, num_classes=3))
    x, t = inputs()
    x.requires_grad_(True)
    model(x, t, torch.tensor([0, 1, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert x.grad.abs().sum() > 0


def test_bf16_autocast_forward():
    model = randomized(UNet(**SMALL))
    x, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    ref = model(x, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_presets_build_with_expected_sizes():
    counts = {}
    with torch.device("meta"):
        for name in PRESETS:
            counts[name] = n_params(build_model(name))
        # improved-diffusion's CIFAR-10 model: conv resampling and 4 heads, 52.5M parameters
        improved_diffusion_cifar = n_params(build_model("cifar10", resblock_updown=False))
    print("parameters:", counts, "cifar10 without resblock_updown:", improved_diffusion_cifar)
    assert counts["cifar10"] == 57_094_662             # + resblock up/down, as the paper's run
    assert improved_diffusion_cifar == 52_546_438
    assert counts["imagenet64"] == 295_904_454         # ADM's 296M
    assert counts["digits-tiny"] < counts["digits-small"] < 10_000_000


def test_config_rebuilds_the_model():
    with torch.device("meta"):
        model = build_model("cifar10", dropout=0.1)
        assert model.config["dropout"] == 0.1 and model.config["arch"] == "unet"
        assert n_params(build_model(model.config)) == n_params(model)
    mlp = build_model("toy2d", learn_sigma=True)
    assert isinstance(mlp, MLPDenoiser) and mlp.config["learn_sigma"]
    rebuilt = build_model(mlp.config)
    rebuilt.load_state_dict(mlp.state_dict())
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("cifar100")


def test_digits_tiny_trains():
    model = build_model("digits-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = inputs(batch=4, size=model.config["image_size"])
    for _ in range(2):
        loss = (model(x, t)[:, :1] - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < x.square().mean()


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_mlp(learn_sigma):
    model = randomized(MLPDenoiser(learn_sigma=learn_sigma, hidden=32, depth=2))
    x = torch.randn(7, 2, requires_grad=True)
    out = model(x, torch.randint(0, 1000, (7,)))
    assert out.shape == (7, 4 if learn_sigma else 2)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model(x, torch.tensor(5)).shape == out.shape      # a scalar t is broadcast
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.zeros(7, dtype=torch.long), torch.zeros(7, dtype=torch.long))

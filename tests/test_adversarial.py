"""The adversarial half of the VQGAN objective: PatchGAN shapes and init, GAN losses by
hand, the adaptive weight, LeCam, the start-step rule, a tiny two-player step, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.config import AdversarialConfig, ConfigError, load_config
from tokenizer.losses.adaptive import ConvTap, adaptive_weight, adaptive_weight_at
from tokenizer.losses.adversarial import (
    adversarial_active,
    discriminator_loss,
    discriminator_lr_factor,
    discriminator_terms,
    generator_loss,
    generator_terms,
)
from tokenizer.losses.lecam import LeCam
from tokenizer.nn.discriminator import PatchDiscriminator

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- the discriminator -------------------------------------------------------------------


@pytest.mark.parametrize("size,layers,side", [(64, 2, 14), (64, 3, 6), (256, 2, 62), (256, 3, 30)])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_logits_shape(size: int, layers: int, side: int, norm: str) -> None:
    disc = PatchDiscriminator(ndf=8, layers=layers, norm=norm)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, side, side)
    assert disc.output_size(size) == side


def test_widths_double_and_cap_at_eight_times() -> None:
    disc = PatchDiscriminator(ndf=4, layers=5)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, nn.Conv2d)]
    # input layer, 4 stride-2 layers (x2, x4, x8, x8 capped), the stride-1 layer, logits
    assert widths == [4, 8, 16, 32, 32, 32, 1]


def test_taming_init_and_biases() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=64, layers=3, norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    gains = torch.cat([m.weight for m in disc.modules() if isinstance(m, nn.BatchNorm2d)])
    assert gains.mean().item() == pytest.approx(1.0, abs=0.01)
    assert gains.std().item() == pytest.approx(0.02, rel=0.2)
    # Convs followed by a norm carry no bias; the first and the last do.
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(
        c.bias is not None
        for c in PatchDiscriminator(layers=3, norm="none").modules()
        if isinstance(c, nn.Conv2d)
    )


def test_group_norm_has_no_buffers_and_from_config() -> None:
    cfg = AdversarialConfig(disc_ndf=8, disc_layers=2, disc_norm="group")
    disc = PatchDiscriminator.from_config(cfg)
    assert list(disc.buffers()) == []
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    assert disc(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


# --- GAN losses --------------------------------------------------------------------------


def test_hinge_losses_by_hand() -> None:
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5]: (2.5/3 + 3.5/3) / 2
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(1.0)
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(0.5 / 3)


def test_non_saturating_losses_by_hand() -> None:
    real = sum(_softplus(-v) for v in REAL.tolist()) / 3
    fake = sum(_softplus(v) for v in FAKE.tolist()) / 3
    assert discriminator_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(
        0.5 * (real + fake)
    )
    gen = sum(_softplus(-v) for v in FAKE.tolist()) / 3
    assert generator_loss(FAKE, "non_saturating").item() == pytest.approx(gen)


def test_losses_take_patch_maps_in_bf16() -> None:
    logits = torch.randn(2, 1, 6, 6)
    expected = discriminator_loss(logits, -logits, "hinge")
    got = discriminator_loss(logits.bfloat16(), (-logits).bfloat16(), "hinge")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), abs=0.02)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="wgan"):
        discriminator_loss(REAL, FAKE, "wgan")
    with pytest.raises(ValueError, match="wgan"):
        generator_loss(FAKE, "wgan")


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_gradient_signs(kind: str) -> None:
    # Inside the hinge margins, so every hinge gradient is non-zero.
    fake = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    generator_loss(fake, kind).backward()
    assert (fake.grad < 0).all()  # the generator gains by raising its fakes' logits
    real = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    fake = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    discriminator_loss(real, fake, kind).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # real up, fake down


# --- the adaptive weight -----------------------------------------------------------------


class _TinyGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.leaky_relu(self.body(x), 0.2))


def _generator_losses(scale: float = 1.0):
    torch.manual_seed(0)
    gen, critic = _TinyGenerator(), nn.Conv2d(3, 1, 4, stride=2, padding=1)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out = gen(x)
    rec = scale * F.mse_loss(out, target)
    gan = generator_loss(critic(out), "hinge")
    return gen, rec, gan


def test_adaptive_weight_by_hand() -> None:
    gen, rec, gan = _generator_losses()
    (g_rec,) = torch.autograd.grad(rec, gen.last.weight, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan, gen.last.weight, retain_graph=True)
    expected = 0.8 * g_rec.norm() / (g_gan.norm() + 1e-4)
    got = adaptive_weight(rec, gan, gen.last.weight, weight=0.8)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad and got.dim() == 0
    (rec + got * gan).backward()  # the graph is kept for the real backward
    assert gen.last.weight.grad is not None


def test_adaptive_weight_finite_without_adversarial_gradient_and_clamped() -> None:
    gen, rec, gan = _generator_losses()
    flat = 0.0 * gan  # depends on the last layer, but its gradient is 0
    (g_rec,) = torch.autograd.grad(rec, gen.last.weight, retain_graph=True)
    got = adaptive_weight(rec, flat, gen.last.weight)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(min(g_rec.norm().item() / 1e-4, 1e4), rel=1e-5)
    gen, rec, gan = _generator_losses(scale=1e9)
    assert adaptive_weight(rec, gan, gen.last.weight, weight=0.5).item() == 0.5e4


def test_adaptive_weight_names_a_wrong_last_layer() -> None:
    gen, rec, gan = _generator_losses()
    unrelated = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="last layer"):
        adaptive_weight(rec, gan, unrelated)


def _tapped_losses(scale: float = 1.0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    gen, critic = _TinyGenerator(), nn.Conv2d(3, 1, 4, stride=2, padding=1)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with ConvTap(gen.last) as tap, torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        out = gen(x)
    rec = scale * F.mse_loss(out.float(), target)
    gan = generator_loss(critic(out.float()), "hinge")
    return gen, tap, rec, gan


def test_adaptive_weight_from_tapped_activations_matches() -> None:
    gen, tap, rec, gan = _tapped_losses()
    assert tap._handle is None  # the hook is gone after the with block
    expected = adaptive_weight(rec, gan, gen.last.weight, weight=0.8)
    got = adaptive_weight_at(rec, gan, tap, weight=0.8)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # The rebuilt weight gradient is the conv's own.
    (g_rec,) = torch.autograd.grad(rec, gen.last.weight, retain_graph=True)
    (g_out,) = torch.autograd.grad(rec, tap.output, retain_graph=True)
    torch.testing.assert_close(tap.weight_grad(g_out), g_rec)
    # generator_terms takes either form of the last layer.
    cfg = AdversarialConfig(weight=0.8, adaptive=True)
    logits = tap.output.new_zeros(()) + gan.neg()  # a logit map whose hinge loss is `gan`
    by_tap = generator_terms(logits, cfg, 0, rec_loss=rec, last_layer=tap)
    by_weight = generator_terms(logits, cfg, 0, rec_loss=rec, last_layer=gen.last.weight)
    assert by_tap.adaptive_weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert by_weight.adaptive_weight.item() == pytest.approx(expected.item(), rel=1e-5)
    gen, tap, rec, gan = _tapped_losses(scale=1e9)
    assert adaptive_weight_at(rec, gan, tap, weight=0.5).item() == 0.5e4


def test_adaptive_weight_from_tapped_activations_under_bf16() -> None:
    gen, tap, rec, gan = _tapped_losses(dtype=torch.bfloat16)
    expected = adaptive_weight(rec, gan, gen.last.weight)
    assert adaptive_weight_at(rec, gan, tap).item() == pytest.approx(expected.item(), rel=0.05)


def test_conv_tap_refuses_before_a_forward_and_non_convs() -> None:
    with pytest.raises(TypeError, match="Conv2d"):
        ConvTap(nn.Linear(2, 2))
    tap = ConvTap(nn.Conv2d(3, 3, 1))
    with pytest.raises(RuntimeError, match="forward"):
        adaptive_weight_at(torch.zeros(()), torch.zeros(()), tap)
    tap.close()


# --- LeCam -------------------------------------------------------------------------------


def test_lecam_ema_and_penalty_by_hand() -> None:
    lecam = LeCam(decay=0.9)
    lecam.update(torch.full((4,), 2.0), torch.full((4,), -1.0))
    assert lecam.ema_real.item() == pytest.approx(0.2)  # 0.9 * 0 + 0.1 * 2
    assert lecam.ema_fake.item() == pytest.approx(-0.1)
    lecam.update(torch.full((4,), 2.0), torch.full((4,), -1.0))
    assert lecam.ema_real.item() == pytest.approx(0.38)  # 0.9 * 0.2 + 0.1 * 2
    # relu(real - ema_fake) = relu([0.5 + 0.19, -0.5 + 0.19]) = [0.69, 0]
    # relu(ema_real - fake) = relu([0.38 - 0, 0.38 - 1]) = [0.38, 0]
    real, fake = torch.tensor([0.5, -0.5]), torch.tensor([0.0, 1.0])
    expected = 0.69**2 / 2 + 0.38**2 / 2
    assert lecam.penalty(real, fake).item() == pytest.approx(expected)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


def test_lecam_forward_updates_first_through_reduce_mean() -> None:
    lecam = LeCam(decay=0.5)
    seen: list[torch.Tensor] = []

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return t * 0 + torch.tensor([4.0, -2.0])  # what the other ranks' means would give

    reg = lecam(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), reduce_mean)
    assert torch.equal(seen[0], torch.tensor([1.0, 0.0]))
    assert (lecam.ema_real.item(), lecam.ema_fake.item()) == (2.0, -1.0)
    # relu(1 - (-1))^2 = 4; relu(2 - 0)^2 = 4
    assert reg.item() == pytest.approx(8.0)


def test_discriminator_terms_with_lecam() -> None:
    cfg = AdversarialConfig(weight=0.5, lecam_weight=0.1, lecam_decay=0.9)
    lecam = LeCam(cfg.lecam_decay)
    terms = discriminator_terms(REAL, FAKE, cfg, lecam)
    assert terms.gan.item() == pytest.approx(1.0)
    assert terms.lecam.item() > 0
    assert terms.d_loss.item() == pytest.approx(1.0 + 0.1 * terms.lecam.item())
    assert terms.logits_real.item() == pytest.approx(0.5)
    assert terms.logits_fake.item() == pytest.approx(-0.5 / 3)
    off = discriminator_terms(REAL, FAKE, AdversarialConfig(weight=0.5), LeCam())
    assert off.lecam.item() == 0.0 and off.d_loss.item() == pytest.approx(1.0)
    assert set(terms.scalars()) == {
        "disc/loss",
        "disc/gan",
        "disc/lecam",
        "disc/logits_real",
        "disc/logits_fake",
    }


# --- when the adversarial half acts ------------------------------------------------------


def test_start_step_rule() -> None:
    cfg = AdversarialConfig(weight=0.5, start_step=100)
    assert not adversarial_active(99, cfg)
    assert adversarial_active(100, cfg)
    assert not adversarial_active(10**6, AdversarialConfig(weight=0.0))
    logits = torch.tensor([0.5, -0.5], requires_grad=True)
    idle = generator_terms(logits, cfg, step=99)
    assert idle.adaptive_weight.item() == 0.0 and idle.weighted.item() == 0.0
    active = generator_terms(logits, cfg, step=100)
    assert active.adaptive_weight.item() == 0.5
    assert active.weighted.item() == pytest.approx(0.5 * active.g_loss.item())


def test_adaptive_needs_its_inputs() -> None:
    cfg = AdversarialConfig(weight=0.5, adaptive=True)
    with pytest.raises(ValueError, match="last_layer"):
        generator_terms(torch.zeros(2, requires_grad=True), cfg, step=0)


def test_discriminator_lr_is_zero_then_warms_up_then_constant() -> None:
    factor = discriminator_lr_factor(AdversarialConfig(start_step=10, warmup_steps=4))
    assert [factor(s) for s in (0, 9, 10, 11, 13, 14, 10**6)] == [
        0.0,
        0.0,
        0.25,
        0.5,
        1.0,
        1.0,
        1.0,
    ]
    assert discriminator_lr_factor(AdversarialConfig())(0) == 1.0


# --- one step of each player -------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_generator_and_discriminator_steps(norm: str) -> None:
    torch.manual_seed(0)
    cfg = AdversarialConfig(
        weight=0.5, adaptive=True, disc_ndf=8, disc_layers=2, disc_norm=norm, lecam_weight=0.1
    )
    gen, disc, lecam = _TinyGenerator(), PatchDiscriminator.from_config(cfg), LeCam()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr * 10, betas=tuple(cfg.betas))
    real = torch.rand(4, 3, 16, 16) * 2 - 1  # 2x2 patch logits at 2 layers
    gen_before = [p.detach().clone() for p in gen.parameters()]
    disc_before = [p.detach().clone() for p in disc.parameters()]

    # Generator step: the discriminator judges but must not learn from it.
    fake = gen(real)
    disc.requires_grad_(False)
    rec = F.mse_loss(fake, real)
    g = generator_terms(disc(fake), cfg, step=0, rec_loss=rec, last_layer=gen.last.weight)
    disc.requires_grad_(True)
    assert g.adaptive_weight.item() > 0
    (rec + g.weighted).backward()
    opt_g.step()
    assert all(p.grad is None for p in disc.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(gen_before, gen.parameters(), strict=True))

    # Discriminator step on the detached fakes.
    fixed_fake = fake.detach()
    first = discriminator_terms(disc(real), disc(fixed_fake), cfg, lecam)
    first.d_loss.backward()
    opt_d.step()
    opt_d.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(disc_before, disc.parameters(), strict=True))
    for _ in range(5):
        terms = discriminator_terms(disc(real), disc(fixed_fake), cfg, lecam)
        terms.d_loss.backward()
        opt_d.step()
        opt_d.zero_grad()
    with torch.no_grad():
        last = discriminator_terms(disc(real), disc(fixed_fake), cfg, lecam)
    assert last.gan.item() < first.gan.item()
    assert last.logits_real.item() > last.logits_fake.item()


# --- config ------------------------------------------------------------------------------


def test_config_keys_and_values() -> None:
    cfg = load_config(
        overrides=[
            "loss.adversarial.weight=0.5",
            "loss.adversarial.start_step=20000",
            "loss.adversarial.loss=non_saturating",
            "loss.adversarial.adaptive=true",
            "loss.adversarial.disc_norm=group",
            "loss.adversarial.lecam_weight=0.001",
            "loss.adversarial.betas=[0.5,0.9]",
        ]
    )
    adv = cfg.loss.adversarial
    assert (adv.weight, adv.start_step, adv.loss, adv.adaptive) == (
        0.5,
        20000,
        "non_saturating",
        True,
    )
    assert adv.disc_norm == "group" and adv.betas == [0.5, 0.9]


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.adversarial.wieght=0.5", r"loss\.adversarial\.wieght"),
        ("loss.adversarial.loss=wgan", r"loss\.adversarial\.loss must be one of"),
        ("loss.adversarial.disc_norm=layer", r"loss\.adversarial\.disc_norm"),
        ("loss.adversarial.weight=-1", r"loss\.adversarial\.weight must be >= 0"),
        ("loss.adversarial.lecam_decay=1.0", r"loss\.adversarial\.lecam_decay"),
        ("loss.adversarial.disc_layers=0", r"loss\.adversarial\.disc_layers"),
        ("loss.adversarial.lr=0", r"loss\.adversarial\.lr"),
        ("loss.adversarial.betas=[0.5]", r"loss\.adversarial\.betas"),
        ("loss.adversarial.adaptive=maybe", r"loss\.adversarial\.adaptive"),
    ],
)
def test_config_refuses(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_config_refuses_a_discriminator_deeper_than_the_image() -> None:
    deep = ["data.resolution=16", "model.channels=[8]", "loss.adversarial.disc_layers=3"]
    with pytest.raises(ConfigError, match=r"loss\.adversarial\.disc_layers.*data\.resolution"):
        load_config(overrides=[*deep, "loss.adversarial.weight=0.5"])
    load_config(overrides=deep)  # no discriminator: nothing to fit

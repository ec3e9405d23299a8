"""adv_dpm.diffusion: schedules, forward process, losses, timestep samplers and samplers."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from adv_dpm.diffusion import (LossSecondMomentSampler, Schedule, UniformSampler, beta_schedule,
                               create_timestep_sampler, diffusion_loss, logsnr_timesteps, method_timesteps, q_sample,
                               sample, space_timesteps, vb_terms)
from adv_dpm.diffusion.schedule import extract, on_device

METHODS = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm_solver++", {})]
METHOD_IDS = ["ddpm", "ddim", "ddim-eta1", "dpm_solver++"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cosine():
    return Schedule.named("cosine", 1000)


# ---------------------------------------------------------------- schedules

def test_linear_betas_scale_with_the_number_of_steps():
    for n in (1000, 250):
        betas = beta_schedule("linear", n)
        assert betas.dtype == torch.float64 and len(betas) == n
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / n, rel=1e-12)
        assert betas[-1].item() == pytest.approx(0.02 * 1000 / n, rel=1e-12)


def test_cosine_betas_follow_alpha_bar_and_are_capped(cosine):
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = cosine.betas
    assert betas.max().item() == 0.999 and betas[-1].item() == 0.999
    assert betas[0].item() == pytest.approx(1 - alpha_bar(1 / 1000) / alpha_bar(0), rel=1e-9)
    uncapped = int((betas < 0.999).sum())
    expected = torch.tensor([alpha_bar((i + 1) / 1000) / alpha_bar(0) for i in range(uncapped)], dtype=torch.float64)
    torch.testing.assert_close(cosine.alphas_cumprod[:uncapped], expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alphas_cumprod_decrease_and_tables_agree(name):
    s = Schedule.named(name, 200)
    ac = s.alphas_cumprod
    assert s.betas.dtype == ac.dtype == torch.float64
    assert (ac[1:] < ac[:-1]).all() and (ac > 0).all() and (ac < 1).all()
    torch.testing.assert_close(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2, torch.ones_like(ac))
    torch.testing.assert_close(s.posterior_variance[1:], s.betas[1:] * (1 - ac[:-1]) / (1 - ac[1:]))
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == s.posterior_variance[1].log()


def test_respaced_keeps_alphas_cumprod_and_maps_to_original_steps(cosine):
    keep = space_timesteps(1000, 10)
    r = cosine.respaced(keep)
    assert r.num_timesteps == 10 and r.timestep_map.tolist() == keep
    torch.testing.assert_close(r.alphas_cumprod, cosine.alphas_cumprod[keep], rtol=1e-12, atol=1e-15)
    rr = r.respaced([0, 4, 9])  # respacing composes: the map still points to the original steps
    assert rr.timestep_map.tolist() == [keep[0], keep[4], keep[9]]
    torch.testing.assert_close(rr.alphas_cumprod, cosine.alphas_cumprod[rr.timestep_map], rtol=1e-12, atol=1e-15)
    full = cosine.respaced(range(1000))
    torch.testing.assert_close(full.betas, cosine.betas, rtol=1e-12, atol=1e-15)


def test_space_timesteps():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim8") == list(range(0, 1000, 125))
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim6")  # no integer stride gives 6 of 10 steps
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


@pytest.mark.parametrize("count", [1, 5, 10, 50, 900, 1000])
def test_logsnr_timesteps_are_distinct_and_span_the_schedule(cosine, count):
    steps = logsnr_timesteps(cosine, count)
    assert len(steps) == count and steps == sorted(set(steps))
    assert steps[-1] == 999 and (count == 1 or steps[0] == 0)


def test_logsnr_timesteps_are_uniform_in_logsnr():
    s = Schedule.named("linear", 1000)
    lam = s.log_snr[logsnr_timesteps(s, 10)]
    gaps = lam[:-1] - lam[1:]
    assert (gaps - gaps.mean()).abs().max() < 0.05 * gaps.mean()


# ---------------------------------------------------------------- forward process and losses

@pytest.mark.parametrize("target", ["original", "delta_detach", "delta"])
def test_q_sample_matches_closed_form(cosine, target):
    g = gen(0)
    x0, eps, delta = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    a = cosine.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - cosine.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t, tgt = q_sample(cosine, x0, t, eps)
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tgt, eps)
    x_t, tgt = q_sample(cosine, x0, t, eps, delta, target)
    torch.testing.assert_close(x_t, a * x0 + s * eps + delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tgt, eps if target == "original" else eps + delta / s, rtol=1e-12, atol=1e-12)
    x_t32, _ = q_sample(cosine, x0.float(), t, eps.float())  # float32 coefficients
    torch.testing.assert_close(x_t32, (a * x0 + s * eps).float())


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_mse_is_zero_when_the_model_predicts_the_target(cosine, learn_sigma):
    g = gen(1)
    x0, eps, delta = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    x_in, target = q_sample(cosine, x0, t, eps, 0.1 * delta)
    v = torch.rand(4, 3, 5, 5, generator=g) * 2 - 1
    out = torch.cat([target, v], 1) if learn_sigma else target
    terms = diffusion_loss(cosine, out, x_in, x0, t, target, learn_sigma)
    assert terms["mse"].shape == (4,) and terms["mse"].abs().max() == 0
    assert ("vb" in terms) == learn_sigma
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"] if learn_sigma else terms["mse"])
    other = diffusion_loss(cosine, out + 0.5, x_in, x0, t, target, learn_sigma)["mse"]
    torch.testing.assert_close(other, torch.full((4,), 0.25))


def test_vb_terms_match_an_independent_float64_computation():
    """ADM's VLB on a tiny case: the posterior from Bayes' rule, the model mean from DDPM's
    eq. 11, the KL from torch.distributions, the decoder from the exact normal CDF."""
    s = Schedule.named("linear", 100)
    g = gen(2)
    b, shape = 4, (4, 2, 3, 3)
    x0 = (torch.randint(0, 256, shape, generator=g) / 127.5 - 1).double()
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the edge bins of the decoder
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 99])
    x_t, _ = q_sample(s, x0, t, eps)
    eps_pred = eps + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    bits = vb_terms(s, torch.cat([eps_pred, v], 1), x0, x_t, t)

    beta, ac = s.betas, s.alphas_cumprod
    for i in range(b):
        ti = int(t[i])
        a_t, ab_t, ab_prev = 1 - beta[ti], ac[ti], ac[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)
        mean_p = (x_t[i] - beta[ti] / (1 - ab_t).sqrt() * eps_pred[i]) / a_t.sqrt()
        post_var = beta * (1 - torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])) / (1 - ac)
        log_var_p = (v[i] + 1) / 2 * beta[ti].log() + (1 - v[i]) / 2 * post_var[max(ti, 1)].log()
        p = Normal(mean_p, (0.5 * log_var_p).exp())
        if ti == 0:
            upper = torch.where(x0[i] > 0.999, torch.ones_like(x0[i]), p.cdf(x0[i] + 1 / 255))
            lower = torch.where(x0[i] < -0.999, torch.zeros_like(x0[i]), p.cdf(x0[i] - 1 / 255))
            expected = -(upper - lower).log().mean() / math.log(2)
            assert bits[i].item() == pytest.approx(expected.item(), rel=2e-3)
        else:
            precision = a_t / beta[ti] + 1 / (1 - ab_prev)  # q(x_{t-1} | x_t, x_0) by Bayes' rule
            mean_q = (a_t.sqrt() * x_t[i] / beta[ti] + ab_prev.sqrt() * x0[i] / (1 - ab_prev)) / precision
            q = Normal(mean_q, precision.rsqrt().expand_as(mean_q))
            expected = kl_divergence(q, p).mean() / math.log(2)
            assert bits[i].item() == pytest.approx(expected.item(), rel=1e-9)


def test_hybrid_vb_trains_only_the_variance_and_is_scaled():
    s = Schedule.named("cosine", 100)
    g = gen(3)
    x0, eps = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 40, 99])
    x_t, target = q_sample(s, x0, t, eps)
    out = torch.randn(3, 4, 4, 4, generator=g).requires_grad_()
    terms = diffusion_loss(s, out, x_t, x0, t, target, learn_sigma=True)
    torch.testing.assert_close(terms["vb"], vb_terms(s, out.detach(), x0, x_t, t) * 0.1)
    terms["vb"].sum().backward()
    assert out.grad[:, :2].abs().max() == 0 and out.grad[:, 2:].abs().max() > 0


# ---------------------------------------------------------------- timestep samplers

def test_create_timestep_sampler():
    assert isinstance(create_timestep_sampler("uniform", 10), UniformSampler)
    assert isinstance(create_timestep_sampler("loss-second-moment", 10), LossSecondMomentSampler)
    with pytest.raises(ValueError, match="timestep sampler"):
        create_timestep_sampler("importance", 10)


def test_uniform_sampler():
    t, w = UniformSampler(50).sample(1000, "cpu", generator=gen(0))
    assert t.dtype == torch.long and t.shape == (1000,) and 0 <= t.min() and t.max() < 50
    assert w.dtype == torch.float32 and (w == 1).all()
    assert torch.equal(t, UniformSampler(50).sample(1000, "cpu", generator=gen(0))[0])


def warmed_up_sampler(n=20, history=4):
    sampler = LossSecondMomentSampler(n, history=history)
    for k in range(history):
        t = torch.arange(n)
        sampler.update(t, (t + 1).float() * (1 + 0.1 * torch.rand(n, generator=gen(k))))
    return sampler


def test_loss_second_moment_sampler_prefers_high_loss_timesteps():
    sampler = LossSecondMomentSampler(20, history=4)
    uniform = torch.full((20,), 1 / 20, dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), uniform)
    sampler.update(torch.arange(20), torch.ones(20))  # one loss each: not warmed up yet
    torch.testing.assert_close(sampler.probabilities(), uniform)
    sampler = warmed_up_sampler()
    p = sampler.probabilities()
    assert sampler.warmed_up() and p.sum().item() == pytest.approx(1.0)
    assert p[-1] > 10 * p[0] and (p[-5:].min() > p[:5].max())
    t, w = sampler.sample(4000, "cpu", generator=gen(5))
    torch.testing.assert_close(w, (1 / (20 * p[t])).float())
    assert (t >= 10).float().mean() > 0.7


def test_loss_second_moment_history_keeps_the_newest_losses():
    sampler = LossSecondMomentSampler(3, history=2)
    sampler.update(torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert sampler.loss_history[1].tolist() == [2.0, 3.0] and sampler.loss_counts.tolist() == [0, 2, 0]
    # the batched update equals ADM's one-loss-at-a-time update, repeated timesteps included
    sampler, history, counts = LossSecondMomentSampler(7, history=3), torch.zeros(7, 3, dtype=torch.float64), [0] * 7
    for k in range(6):
        t, losses = torch.randint(7, (9,), generator=gen(k)), torch.rand(9, generator=gen(k + 10))
        sampler.update(t, losses)
        for ti, loss in zip(t.tolist(), losses.double().tolist()):
            if counts[ti] == 3:
                history[ti] = torch.cat([history[ti, 1:], torch.tensor([loss], dtype=torch.float64)])
            else:
                history[ti, counts[ti]] = loss
                counts[ti] += 1
        assert torch.equal(sampler.loss_history, history) and sampler.loss_counts.tolist() == counts


def test_timestep_sampler_state_round_trips():
    sampler = warmed_up_sampler()
    state = sampler.state_dict()
    restored = LossSecondMomentSampler(20, history=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities(), rtol=0, atol=0)
    for s in (sampler, restored):
        s.update(torch.tensor([0, 3, 3]), torch.tensor([50.0, 1.0, 2.0]))
    for a, b in zip(sampler.sample(64, "cpu", gen(9)), restored.sample(64, "cpu", gen(9))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="loss_history"):
        LossSecondMomentSampler(20, history=5).load_state_dict(state)


# ---------------------------------------------------------------- samplers

X_STAR = torch.linspace(-0.9, 0.9, 3 * 4 * 4).reshape(1, 3, 4, 4)


def point_oracle(schedule, learn_sigma, calls=None):
    """The exact denoiser of data that is the single point X_STAR (a v half in [-1, 1] if learned)."""
    def model_fn(x, t):
        if calls is not None:
            calls.append(t.clone())
        assert t.dtype == torch.long
        a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = ((x.double() - a * X_STAR.double()) / s).to(x.dtype)
        return torch.cat([eps, torch.cos(x)], 1) if learn_sigma else eps
    return model_fn


@pytest.mark.parametrize("method,kwargs", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_samplers_recover_a_point_mass(cosine, method, kwargs, learn_sigma):
    for steps in (5, 10, 50):
        x = sample(point_oracle(cosine, learn_sigma), cosine, (2, 3, 4, 4), method, steps, learn_sigma=learn_sigma,
                   generator=gen(steps), **kwargs)
        torch.testing.assert_close(x, X_STAR.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,kwargs", METHODS, ids=METHOD_IDS)
def test_samplers_call_the_model_steps_times_at_original_timesteps(cosine, method, kwargs):
    calls = []
    x, trajectory = sample(point_oracle(cosine, True, calls), cosine, (2, 3, 4, 4), method, 8, learn_sigma=True,
                           generator=gen(0), return_trajectory=True, **kwargs)
    expected = method_timesteps(cosine, method, 8)[::-1]
    assert len(calls) == 8 and [int(c[0]) for c in calls] == expected
    assert all(c.shape == (2,) and (c == c[0]).all() for c in calls)
    assert [t for _, t in trajectory] == expected and trajectory[-1][1] == 0
    assert all(xt.shape == (2, 3, 4, 4) for xt, _ in trajectory)


@pytest.mark.parametrize("method,kwargs", METHODS, ids=METHOD_IDS)
def test_sampling_is_deterministic_given_the_generator(cosine, method, kwargs):
    def model_fn(x, t):  # not an oracle: the result depends on the whole path
        return torch.cat([torch.tanh(x) * (1 + t.view(-1, 1, 1, 1) / 1000), torch.sin(x)], 1)

    def run(seed):
        return sample(model_fn, cosine, (2, 3, 4, 4), method, 10, learn_sigma=True, generator=gen(seed), **kwargs)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("method,kwargs", METHODS, ids=METHOD_IDS)
def test_epsilon_scaling(cosine, method, kwargs):
    def model_fn(x, t):
        return torch.cat([torch.tanh(x) * (1 + t.view(-1, 1, 1, 1) / 1000), torch.sin(x)], 1)

    def scaled(x, t):  # eps multiplied by lambda, the variance half untouched
        out = model_fn(x, t)
        return torch.cat([out[:, :3] * 1.1, out[:, 3:]], 1)

    def run(fn, lam):
        return sample(fn, cosine, (2, 3, 4, 4), method, 10, es_lambda=lam, learn_sigma=True, generator=gen(4), **kwargs)
    plain = run(model_fn, 1.0)
    assert torch.equal(run(model_fn, 1.0), sample(model_fn, cosine, (2, 3, 4, 4), method, 10, learn_sigma=True,
                                                  generator=gen(4), **kwargs))
    torch.testing.assert_close(run(scaled, 1.1), plain, rtol=1e-4, atol=1e-5)
    assert (run(model_fn, 1.1) - plain).abs().max() > 1e-3


def test_ode_samplers_converge_on_gaussian_data():
    """Data N(mu, sd^2): the exact denoiser is linear and the probability-flow ODE maps x_T to
    mu + sd (x_T - a_T mu) / sqrt(a_T^2 sd^2 + s_T^2). DDIM converges at first order,
    DPM-Solver++(2M) at second order and beats DDIM at equal NFE."""
    s, mu, sd = Schedule.named("linear", 1000), 0.3, 0.5

    def model_fn(x, t):
        a = s.sqrt_alphas_cumprod[t].view(-1, 1)
        sig = s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1)
        x0 = mu + a * sd ** 2 / (a ** 2 * sd ** 2 + sig ** 2) * (x - a * mu)
        return (x - a * x0) / sig

    x_T = torch.randn(256, 1, generator=gen(0), dtype=torch.float64)
    a, sig = s.sqrt_alphas_cumprod[-1], s.sqrt_one_minus_alphas_cumprod[-1]
    exact = mu + sd * (x_T - a * mu) / (a ** 2 * sd ** 2 + sig ** 2).sqrt()
    err = {m: [(sample(model_fn, s, x_T.shape, m, n, learn_sigma=False, clip_denoised=False, x_T=x_T) - exact)
               .abs().max().item() for n in (10, 20, 40, 100)] for m in ("ddim", "dpm_solver++")}
    for m, e in err.items():
        assert e == sorted(e, reverse=True), (m, e)
    assert err["ddim"][2] / err["ddim"][3] == pytest.approx(2.5, rel=0.2)  # first order
    assert err["dpm_solver++"][2] / err["dpm_solver++"][3] > 2.5 ** 1.8  # second order
    assert all(d < i / 4 for d, i in zip(err["dpm_solver++"], err["ddim"]))
    assert err["dpm_solver++"][3] < 1e-3


def test_sample_rejects_bad_arguments(cosine):
    fn = point_oracle(cosine, False)
    with pytest.raises(ValueError, match="method"):
        sample(fn, cosine, (1, 3, 4, 4), "euler", 5, learn_sigma=False)
    with pytest.raises(ValueError, match="eta"):
        sample(fn, cosine, (1, 3, 4, 4), "ddpm", 5, eta=0.5, learn_sigma=False)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(fn, cosine, (1, 3, 4, 4), "ddim", 5, eta=-1.0, learn_sigma=False)
    for es_lambda in (0.0, -1.0):
        with pytest.raises(ValueError, match="es_lambda must be > 0"):
            sample(fn, cosine, (1, 3, 4, 4), "ddim", 5, es_lambda=es_lambda, learn_sigma=False)
    with pytest.raises(ValueError, match="channels"):
        sample(fn, cosine, (1, 3, 4, 4), "ddim", 5, learn_sigma=True)


def test_schedule_tables_are_copied_to_a_device_once():
    """extract on device tensors copies a table there once, not at each call (a copy from host
    memory waits for the GPU's queue); the 'meta' device stands in for a GPU."""
    sched, meta = Schedule.named("cosine", 50), torch.device("meta")
    first = on_device(sched.sqrt_alphas_cumprod, meta)
    assert first.device == meta and on_device(sched.sqrt_alphas_cumprod, meta) is first
    assert on_device(sched.betas, torch.device("cpu")) is sched.betas
    like = torch.empty(2, 3, 4, 4, device=meta)
    assert extract(sched.sqrt_alphas_cumprod, torch.tensor([0, 7], device=meta), like).shape == (2, 1, 1, 1)

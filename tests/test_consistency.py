"""Consistency models (adv_dpm.consistency and the trainer's 'cd' / 'ct' objectives): the
consistency function's boundary, the ODE steps against closed forms, the free-AT update
against an independent implementation of PAPER.md's CM-AT loop, exact resume, sampling,
evaluation and errors naming the bad setting."""
import math

import pytest
import torch

from adv_dpm import consistency as cm
from adv_dpm.diffusion import Schedule
from adv_dpm.evaluate import evaluate
from adv_dpm.train import TrainConfig, Trainer, train

TOY = dict(data="toy:gmm", model="toy2d", model_overrides={"hidden": 32, "depth": 2}, batch_size=16,
           diffusion_steps=100, log_interval=2, save_interval=1000, num_samples=4, sample_steps=3, scales=10)


def config(tmp_path, **kw):
    return TrainConfig(**{**TOY, "run_dir": str(tmp_path / "run"), **kw})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A diffusion model checkpoint of the toy set to distill."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(TrainConfig(**{**TOY, "total_steps": 4, "mode": "standard", "ema_rate": "0.5", "lr": 1e-2}, run_dir=str(run)))
    return str(run / "checkpoint.pt")


def test_timestep_grid_spans_zero_to_the_last_timestep_with_sigma_at_most_80():
    schedule = Schedule.named("cosine", 1000)
    grid = cm.timestep_grid(schedule, 50)
    sigma = schedule.sqrt_recipm1_alphas_cumprod
    assert len(grid) == 51 and grid[0] == 0 and (grid.diff() > 0).all()
    assert sigma[grid[-1]] <= cm.SIGMA_MAX < sigma[grid[-1] + 1]
    top = int(grid[-1])
    assert cm.timestep_grid(schedule, top).tolist() == list(range(top + 1))
    for bad in (0, top + 1, 2.0, True):
        with pytest.raises(ValueError, match="scales"):
            cm.timestep_grid(schedule, bad)


def test_consistency_function_is_the_identity_at_t0_and_the_denoiser_later():
    schedule = Schedule.named("cosine", 1000)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = torch.randn_like(x)
    t = torch.tensor([0, 0, 0])
    assert torch.equal(cm.consistency_fn(schedule, out, x, t, learn_sigma=False), x)
    t = torch.tensor([1, 10, 500])
    a = schedule.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = (x - (1 - a ** 2).sqrt() * out) / a
    f = cm.consistency_fn(schedule, out, x, t, learn_sigma=False)
    c_skip, c_out = cm.boundary_coefficients(t, 1000)
    torch.testing.assert_close(f, c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * x0)
    assert c_out.min() > 0.998 and (c_skip + c_out ** 2 - 1).abs().max() < 1e-12   # LCM's, c_skip ~ 0 after t = 0
    # learn_sigma: the epsilon half only
    both = torch.cat([out, torch.randn_like(out)], dim=1)
    assert torch.equal(cm.consistency_fn(schedule, both, x, t, learn_sigma=True), f)


@pytest.mark.parametrize("solver", cm.SOLVERS)
def test_an_ode_step_with_the_true_noise_lands_on_the_forward_process(solver):
    schedule = Schedule.named("linear", 1000)
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t, s = torch.tensor([999, 500, 10, 1, 700]), torch.tensor([900, 499, 0, 0, 3])
    a = schedule.sqrt_alphas_cumprod
    x_t = a[t, None] * x0 + (1 - a[t, None] ** 2).sqrt() * eps
    x_s = cm.ode_step(lambda x, i: eps, schedule, x_t, t, s, solver)
    torch.testing.assert_close(x_s, a[s, None] * x0 + (1 - a[s, None] ** 2).sqrt() * eps, rtol=1e-10, atol=1e-10)


def test_the_solvers_local_errors_have_their_orders_on_gaussian_data():
    """Data N(0, c^2 I): the exact eps is s x / (a^2 c^2 + s^2) and the ODE in y = x / a is
    solved by y(sigma) proportional to sqrt(c^2 + sigma^2). Halving the step divides the local
    error of DDIM (Euler) by 4 and that of Heun by 8."""
    schedule, c = Schedule.named("cosine", 1000), 0.5
    a, s = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
    sigma = schedule.sqrt_recipm1_alphas_cumprod
    x = torch.randn(3, 4, dtype=torch.float64)
    eps_fn = lambda x, i: s[i, None] * x / (a[i, None] ** 2 * c * c + s[i, None] ** 2)   # noqa: E731
    t = torch.tensor([400, 400, 400])

    def error(solver, h):
        u = t - h
        exact = a[u, None] * x / a[t, None] * ((c * c + sigma[u] ** 2) / (c * c + sigma[t] ** 2)).sqrt()[:, None]
        return (cm.ode_step(eps_fn, schedule, x, t, u, solver) - exact).abs().max().item()
    ddim, heun = [error("ddim", h) / error("ddim", h // 2) for h in (40, 20)], \
        [error("heun", h) / error("heun", h // 2) for h in (40, 20)]
    assert all(3.5 < r < 4.5 for r in ddim) and all(7 < r < 9 for r in heun), (ddim, heun)
    assert error("heun", 20) < error("ddim", 20) / 10


def test_distances():
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    d = (a - b).flatten(1)
    torch.testing.assert_close(cm.distance(a, b, "l2"), (d ** 2).mean(1))
    torch.testing.assert_close(cm.distance(a, b, "l1"), d.abs().mean(1))
    c = 0.00054 * math.sqrt(75)
    torch.testing.assert_close(cm.distance(a, b, "pseudo_huber"), ((d ** 2).sum(1) + c * c).sqrt() - c)
    assert cm.distance(a, a, "pseudo_huber").abs().max() == 0
    with pytest.raises(ValueError, match="loss_norm"):
        cm.distance(a, b, "lpips")


def test_multistep_sampling_visits_the_grid_from_its_top():
    schedule = Schedule.named("cosine", 100)
    grid = cm.timestep_grid(schedule, 10).tolist()
    assert cm.sampling_timesteps(schedule, 10, 1) == [grid[-1]]
    assert cm.sampling_timesteps(schedule, 10, 2) == [grid[-1], grid[5]]
    assert cm.sampling_timesteps(schedule, 10, 10) == grid[:0:-1]
    with pytest.raises(ValueError, match="steps"):
        cm.sampling_timesteps(schedule, 10, 11)
    net = torch.nn.Linear(2, 2).double()
    model_fn = lambda x, t: net(x)   # noqa: E731
    x_T = torch.randn(6, 2, dtype=torch.float64)
    one = cm.sample(model_fn, schedule, x_T.shape, 1, scales=10, learn_sigma=False, x_T=x_T)
    t = torch.full((6,), grid[-1])
    with torch.no_grad():
        assert torch.equal(one, cm.consistency_fn(schedule, net(x_T), x_T, t, False).clamp(-1, 1))
    two, path = cm.sample(model_fn, schedule, x_T.shape, 2, scales=10, learn_sigma=False, x_T=x_T,
                          generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert [step for _, step in path] == [grid[-1], grid[5]] and torch.equal(path[0][0], x_T)
    assert two.shape == x_T.shape and two.abs().max() <= 1


def paper_cm_free_at_batch(model, target, optimizer, schedule, x0, t, s, eps, steps, lr, max_norm, mu, at_target,
                           teacher=None, budget="input"):
    """PAPER.md's CM-AT loop for one batch in plain PyTorch: LCM's boundary, the DDIM teacher
    step (cd) or the step of the noise x implies given x0 (ct), pseudo-Huber distance, the target
    an EMA of rate mu; budget 'noise' scales each sample's step and radius by its s_t."""
    a_tab, s_tab = schedule.sqrt_alphas_cumprod.float(), schedule.sqrt_one_minus_alphas_cumprod.float()
    T = schedule.num_timesteps

    def f(net, x, i):
        x0_hat = (x - s_tab[i][:, None] * net(x, i)) / a_tab[i][:, None]
        u = 10.0 * i.double() * 1000 / T
        c_skip, c_out = 0.25 / (u ** 2 + 0.25), u / (u ** 2 + 0.25).sqrt()
        return c_skip.float()[:, None] * x + c_out.float()[:, None] * x0_hat

    def step_to_s(x):
        e = (x - a_tab[t][:, None] * x0) / s_tab[t][:, None] if teacher is None else teacher(x, t)
        return a_tab[s][:, None] * (x - s_tab[t][:, None] * e) / a_tab[t][:, None] + s_tab[s][:, None] * e

    x_t = a_tab[t][:, None] * x0 + s_tab[t][:, None] * eps
    with torch.no_grad():
        x_s = step_to_s(x_t)
    delta = torch.zeros_like(x0)
    rho = math.sqrt(x0[0].numel()) * max_norm
    if budget == "noise":
        lr, rho = lr * s_tab[t][:, None], rho * s_tab[t][:, None]
    c = 0.00054 * math.sqrt(x0[0].numel())
    for k in range(steps):
        x_adv = (x_t + delta).detach().requires_grad_()
        with torch.no_grad():
            goal = f(target, x_s, s)
        loss = (((f(model, x_adv, t) - goal) ** 2).sum(1) + c * c).sqrt().sub(c).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for p, q in zip(target.parameters(), model.parameters()):
                p.lerp_(q, 1 - mu)
        if k < steps - 1:
            g = x_adv.grad
            delta = delta + lr * g / g.norm(dim=1, keepdim=True).clamp_min(1e-8)
            norm = delta.norm(dim=1, keepdim=True)
            delta = torch.where(norm > rho, delta * rho / norm, delta)
            if at_target == "consistent":
                with torch.no_grad():
                    x_s = step_to_s(x_t + delta)


@pytest.mark.parametrize("objective, at_target, budget", [
    *[(o, a, "input") for o in ("ct", "cd") for a in cm.AT_TARGETS], ("ct", "consistent", "noise"),
    ("cd", "invariant", "noise")])
def test_free_at_matches_an_independent_implementation_of_the_paper(tmp_path, teacher, objective, at_target, budget):
    import copy
    # cd: the student starts from the teacher's last weights, not its EMA (the teacher): a student
    # equal to its teacher has losses so small that Adam's updates amplify float32 rounding
    settings = dict(objective=objective, teacher=teacher if objective == "cd" else "", mode="free_at", adv_steps=3,
                    adv_lr=0.5, adv_max_norm=0.3, lr=1e-2, target_ema=0.5, adv_cm_target=at_target,
                    init_from=teacher if objective == "cd" else "", adv_budget=budget)
    trainer = Trainer(config(tmp_path, **settings))
    model = copy.deepcopy(trainer.model)
    target_net = copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    # the batch the trainer will draw: same iterator position and noise generator
    x0 = next(Trainer(config(tmp_path / "twin", mode="standard")).batches).x
    gen = torch.Generator().set_state(trainer.noise.get_state())
    n = torch.randint(10, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t, s = trainer.grid[n + 1], trainer.grid[n]
    trainer.train_batch()
    paper_cm_free_at_batch(model, target_net, optimizer, trainer.schedule, x0, t, s, eps, 3, 0.5, 0.3, 0.5, at_target,
                           trainer.teacher and trainer.teacher.model, budget)
    assert trainer.step == 3
    for (name, p), q, e in zip(trainer.model.named_parameters(), model.parameters(), target_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(trainer.target_params[name], e, rtol=1e-5, atol=1e-6)


def test_consistency_training_steps_with_the_noise_its_input_implies(tmp_path):
    """CT's ODE step from the clean x_t uses the batch's eps, bit for bit; from x_t + delta it uses
    eps + delta / sqrt(1 - abar_t), the noise that makes x_t + delta a sample of x0 at t (as free
    AT's shifted DPM target does), and lands on the forward process of that noise at s."""
    trainer = Trainer(config(tmp_path, objective="ct", mode="free_at", adv_cm_target="consistent"))
    (m,) = trainer._micro_batches()
    a, sigma = trainer.schedule.sqrt_alphas_cumprod, trainer.schedule.sqrt_one_minus_alphas_cumprod
    clean = cm.ode_step(lambda x, t: m["eps"], trainer.schedule, m["x_t"], m["t"], m["s"])
    assert torch.equal(trainer._ode_step(m, m["x_t"]), clean)
    delta = 0.3 * torch.randn_like(m["x_t"])
    implied = m["eps"].double() + delta.double() / sigma[m["t"]][:, None]
    forward = a[m["s"]][:, None] * m["x0"].double() + sigma[m["s"]][:, None] * implied
    torch.testing.assert_close(trainer._ode_step(m, m["x_t"] + delta).double(), forward, rtol=1e-5, atol=1e-5)


def test_distillation_starts_at_the_teacher_and_its_first_loss_is_its_own_inconsistency(tmp_path, teacher):
    trainer = Trainer(config(tmp_path, objective="cd", teacher=teacher, mode="standard"))
    for p, q in zip(trainer.params, trainer.teacher.model.parameters()):
        assert torch.equal(p, q)
    for ema in trainer.emas.values():
        assert all(torch.equal(e, p) for e, p in zip(ema, trainer.params))
    loss, _ = trainer.train_batch()
    assert 0 < loss < 1 and trainer.step == 1


@pytest.mark.parametrize("mode, updates", [("standard", 1), ("free_at", 3), ("pgd_at", 1)])
def test_updates_per_batch(tmp_path, teacher, mode, updates):
    trainer = Trainer(config(tmp_path, objective="cd", teacher=teacher, mode=mode, teacher_solver="heun",
                             loss_norm="l2", adv_cm_target="consistent", microbatch=8))
    before = [p.detach().clone() for p in trainer.params]
    loss, skipped = trainer.train_batch()
    assert trainer.step == updates and math.isfinite(loss) and skipped == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_resumed_run_continues_the_same_trajectory(tmp_path, teacher):
    settings = dict(objective="cd", teacher=teacher, mode="free_at", ema_rate="0.9", target_ema=0.95)
    straight = Trainer(config(tmp_path / "a", total_steps=12, **settings))
    straight.train()
    Trainer(config(tmp_path / "b", total_steps=6, **settings)).train()
    resumed = Trainer(config(tmp_path / "b", total_steps=12, **settings))
    assert resumed.step == 6
    resumed.train()
    for rate in straight.emas:
        for p, q in zip(straight.emas[rate], resumed.emas[rate]):
            assert torch.equal(p, q)
    for p, q in zip(straight.params, resumed.params):
        assert torch.equal(p, q)


def test_evaluate_samples_a_consistency_model_with_its_sampler(tmp_path, teacher):
    run = train(config(tmp_path, objective="ct", mode="free_at", total_steps=3))
    rows = evaluate(run / "checkpoint.pt", num_samples=16, exposure=True, progress=False)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("consistency", n) for n in (1, 2, 4)]
    assert all(math.isfinite(r["swd"]) and r["mode"] == "ct free_at" for r in rows)
    assert all(math.isfinite(r["exposure_ratio"]) for r in rows[1:])
    with pytest.raises(ValueError, match="samplers: 'ddim' does not sample a consistency model"):
        evaluate(run / "checkpoint.pt", samplers=["ddim"], num_samples=16, progress=False)
    # perturbed model inputs: a zero budget is plain sampling, a positive one changes the samples
    clean = evaluate(run / "checkpoint.pt", nfes=[2], num_samples=16, robustness_budget=0.0, progress=False)[0]
    assert clean["swd_random"] == clean["swd_adversarial"] == clean["swd"]
    moved = evaluate(run / "checkpoint.pt", nfes=[2], num_samples=16, robustness_budget=0.5, progress=False)[0]
    assert moved["swd"] == clean["swd"] and moved["swd_random"] != clean["swd"] != moved["swd_adversarial"]
    with pytest.raises(ValueError, match="samplers: 'consistency' does not sample a diffusion model"):
        evaluate(teacher, samplers=["consistency"], num_samples=16, progress=False)


def test_cli_samples_a_consistency_model(tmp_path):
    import numpy as np

    from adv_dpm import cli
    run = train(config(tmp_path, objective="ct", mode="standard", total_steps=2))
    cli.main(["sample", str(run / "checkpoint.pt"), "--steps", "2", "--num", "5", "--out", str(tmp_path / "s.png")])
    x = np.load(tmp_path / "s.npz")["arr_0"]
    assert x.shape == (5, 2) and np.isfinite(x).all()


@pytest.mark.parametrize("settings, message", [
    (dict(objective="edm"), "objective must be one of"),
    (dict(objective="cd"), "teacher: objective 'cd' distills"),
    (dict(objective="ct", teacher="x.pt"), "teacher: objective 'cd' distills"),
    (dict(objective="ct", mode="ip"), "mode 'ip'"),
    (dict(objective="ct", schedule_sampler="loss-second-moment"), "schedule_sampler must be 'uniform'"),
    (dict(objective="ct", scales=99), "scales: expected an integer in"),
    (dict(objective="ct", target_ema=1.0), "target_ema must be in"),
    (dict(objective="ct", sample_steps=11), "sample_steps"),
    (dict(objective="ct", teacher_solver="euler"), "teacher_solver must be one of"),
    (dict(objective="ct", loss_norm="lpips"), "loss_norm must be one of"),
    (dict(objective="ct", adv_cm_target="clean"), "adv_cm_target must be one of"),
])
def test_bad_settings_name_the_setting(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **settings)


def test_a_teacher_must_match_the_run(tmp_path, teacher):
    with pytest.raises(ValueError, match="teacher: .* diffusion_steps=100"):
        Trainer(config(tmp_path, objective="cd", teacher=teacher, diffusion_steps=200))
    with pytest.raises(ValueError, match="teacher: .* noise_schedule='cosine'"):
        Trainer(config(tmp_path, objective="cd", teacher=teacher, noise_schedule="linear"))
    student = train(config(tmp_path / "ct", objective="ct", mode="standard", total_steps=1))
    with pytest.raises(ValueError, match="teacher: .* holds a consistency model"):
        Trainer(config(tmp_path, objective="cd", teacher=str(student / "checkpoint.pt")))


def test_the_sample_grid_of_an_image_model_uses_consistency_sampling(tmp_path, monkeypatch):
    calls = []
    original = cm.sample
    monkeypatch.setattr(cm, "sample", lambda *a, **kw: calls.append(a[3]) or original(*a, **kw))
    run = train(TrainConfig(data="digits", model="digits-tiny", objective="ct", mode="free_at", batch_size=8,
                            total_steps=3, num_samples=4, sample_steps=2, run_dir=str(tmp_path / "run")))
    assert calls == [2]
    assert (run / "samples_0000003.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

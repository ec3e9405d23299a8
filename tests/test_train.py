"""The trainer: the free-AT update against an independent implementation of PAPER.md's loop,
exact resume, the modes' update counts, DDP gradient sync, and the command line."""
import json
import math
import os

import pytest
import torch

from adv_dpm.diffusion import LossSecondMomentSampler, Schedule
from adv_dpm.train import TrainConfig, Trainer
from adv_dpm.utils import to_device, to_host

TOY = dict(data="toy:gmm", model="toy2d", model_overrides={"hidden": 32, "depth": 2}, batch_size=16,
           diffusion_steps=100, log_interval=2, save_interval=1000, num_samples=4, sample_steps=3)


def config(tmp_path, **kw):
    return TrainConfig(**{**TOY, "run_dir": str(tmp_path / "run"), **kw})


def paper_free_at_batch(model, optimizer, schedule, x0, t, w, eps, steps, lr, max_norm, budget="input"):
    """PAPER.md's free-AT loop for one batch, in plain PyTorch (target 'delta_detach', no VLB term);
    budget 'noise' scales each sample's step and radius by its noise level s_t."""
    a = schedule.sqrt_alphas_cumprod.float()[t][:, None]
    s = schedule.sqrt_one_minus_alphas_cumprod.float()[t][:, None]
    delta = torch.zeros_like(x0)
    rho = math.sqrt(x0[0].numel()) * max_norm
    if budget == "noise":
        lr, rho = lr * s, rho * s
    for k in range(steps):
        x_adv = (a * x0 + s * eps + delta).detach().requires_grad_()
        target = eps + delta.detach() / s
        loss = (w * ((target - model(x_adv, t)) ** 2).mean(1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if k < steps - 1:
            g = x_adv.grad
            delta = delta + lr * g / g.norm(dim=1, keepdim=True).clamp_min(1e-8)
            norm = delta.norm(dim=1, keepdim=True)
            delta = torch.where(norm > rho, delta * rho / norm, delta)


@pytest.mark.parametrize("budget", ["input", "noise"])
def test_free_at_matches_an_independent_implementation_of_the_paper(tmp_path, budget):
    trainer = Trainer(config(tmp_path, mode="free_at", adv_steps=3, adv_lr=0.5, adv_max_norm=0.3, lr=1e-2,
                             adv_budget=budget))
    twin = Trainer(config(tmp_path, mode="standard", lr=1e-2))
    twin.model.load_state_dict(trainer.model.state_dict())
    # the batch the trainer will draw: same iterator position and noise generator
    x0 = next(twin.batches).x
    gen = torch.Generator().set_state(trainer.noise.get_state())
    t, w = trainer.timesteps.sample(x0.shape[0], "cpu", generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    trainer.train_batch()
    paper_free_at_batch(twin.model, twin.optimizer, twin.schedule, x0, t, w, eps, 3, 0.5, 0.3, budget)
    assert trainer.step == 3
    for (name, p), q in zip(trainer.model.named_parameters(), twin.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _example(name):
    """A module of examples/, as a user would run it (the folder is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_loop_is_the_papers_free_at(tmp_path):
    """examples/free_at_loop.py, a training loop of its own on the public ops, takes PAPER.md's
    updates; its script trains, samples and plots."""
    import copy
    from adv_dpm.models.mlp import MLPDenoiser
    example = _example("free_at_loop")
    schedule = Schedule.named("cosine", 100)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, depth=2)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)   # a zero output layer has no input gradient
    twin = copy.deepcopy(model)
    x0, eps, t = torch.randn(16, 2), torch.randn(16, 2), torch.randint(100, (16,))
    options = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    example.free_at_batch(model, options[0], x0, t, eps, schedule.alphas_cumprod.float(), steps=3, adv_lr=0.5,
                          adv_max_norm=0.3)
    paper_free_at_batch(twin, options[1], schedule, x0, t, torch.ones(16, 1), eps, 3, 0.5, 0.3)
    # the two take sqrt(abar) in float32 and float64: Adam's normalization magnifies that rounding where a
    # gradient is near zero (a wrong update moves a weight by about lr = 1e-2)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    samples = example.main(["--pretrain", "2", "--updates", "3", "--out", str(tmp_path / "gmm.png")])
    assert samples.shape == (2000, 2) and torch.isfinite(samples).all() and (tmp_path / "gmm.png").stat().st_size


@pytest.mark.parametrize("mode, updates", [("standard", 1), ("ip", 1), ("free_at", 3), ("pgd_at", 1)])
def test_updates_per_batch(tmp_path, mode, updates):
    trainer = Trainer(config(tmp_path, mode=mode, adv_steps=3))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, skipped = trainer.train_batch()
    assert trainer.step == updates and math.isfinite(loss) and skipped == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


GPU = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_host_tensors_reach_the_device_with_their_values(device):
    t = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    moved = to_device(t, device)
    assert moved.device.type == device and torch.equal(moved.cpu(), t)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_device_tensors_reach_the_host_with_their_values(device):
    t = torch.randn(1000, device=device)
    host, wait = to_host(t * 2)
    wait()
    assert host.device.type == "cpu" and torch.equal(host, (t * 2).cpu())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["free_at", "pgd_at"])
@pytest.mark.cuda
def test_a_batch_trains_on_the_gpu(tmp_path, mode, precision):
    """The trainer's whole batch on a GPU, as the GPU benchmarks train: a UNet (fused GroupNorm) in
    bf16 or fp16 (the loss scale read by the CUDA kernels) and channels_last, host tensors copied
    without waiting, the fused ops on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    trainer = Trainer(config(tmp_path, data="digits", model="digits-tiny", model_overrides={}, precision=precision,
                             channels_last=True, mode=mode, adv_steps=3, device="cuda"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, skipped = trainer.train_batch()
    assert math.isfinite(float(loss)) and int(skipped) == 0 and trainer.step == (3 if mode == "free_at" else 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["standard", "free_at", "pgd_at"])
def test_a_batch_reads_nothing_back_from_the_device(tmp_path, mode, precision, monkeypatch):
    """On a GPU a value read back (item, bool, int, float of a tensor) makes the host wait for the
    queued kernels: a batch leaves its loss and skipped count on the device for the log, and fp16
    its loss scale and whether the scaler skipped the update."""
    trainer = Trainer(config(tmp_path, mode=mode, adv_steps=3, precision=precision))
    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _real=real: (
            reads.append(_name), _real(self, *a))[1])
    loss, skipped = trainer.train_batch()
    monkeypatch.undo()
    assert not reads and float(loss) > 0 and int(skipped) == 0


def test_the_timestep_sampler_learns_each_batch_before_it_draws_the_next(tmp_path):
    """loss-second-moment (the paper's): the replays' losses reach the sampler in order before its
    next draw or a checkpoint, not in the middle of a replay, where reading them back would make
    the host wait for the GPU before it queues the backward pass."""
    trainer = Trainer(config(tmp_path, mode="free_at", adv_steps=3, schedule_sampler="loss-second-moment"))
    events, update, sample = [], trainer.timesteps.update, trainer.timesteps.sample
    learned = LossSecondMomentSampler(trainer.cfg.diffusion_steps)
    trainer.timesteps.update = lambda t, losses: (events.append("update"), learned.update(t, losses), update(t, losses))
    trainer.timesteps.sample = lambda *a, **k: (events.append("sample"), sample(*a, **k))[1]
    trainer.train_batch()
    assert events == ["sample"]
    trainer.train_batch()
    state = trainer.state_dict()["timestep_sampler"]
    assert events == ["sample"] + ["update"] * 3 + ["sample"] + ["update"] * 3
    assert torch.equal(state["loss_counts"], learned.loss_counts) and int(learned.loss_counts.sum()) > 0


@pytest.mark.parametrize("mode", ["standard", "free_at", "pgd_at"])
def test_metrics_are_logged_at_multiples_of_the_log_interval(tmp_path, mode):
    trainer = Trainer(config(tmp_path, mode=mode, adv_steps=3, total_steps=6, log_interval=2))
    trainer.train()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    logged = [int(r.split(",")[0]) for r in rows]
    assert logged == ([2, 4, 6] if mode != "free_at" else [3, 6])   # free AT: 3 updates per batch


def test_the_diffusers_example_trains_a_patched_unet2dmodel_with_free_at(tmp_path, capsys):
    """examples/diffusers_free_at.py: diffusers' model, schedule and sampler with patch_model and
    the example loop's free-AT batch."""
    pytest.importorskip("diffusers")
    example = _example("diffusers_free_at")
    samples, losses = example.main(["--pretrain", "2", "--updates", "3", "--out", str(tmp_path / "digits.png")])
    assert "patch_model: 8 blocks fused" in capsys.readouterr().out
    assert samples.shape == (64, 1, 8, 8) and torch.isfinite(samples).all()
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "digits.png").stat().st_size


def test_perturbation_counts_samples_whose_gradient_is_not_finite():
    from adv_dpm.adversarial import AdversarialConfig, Perturbation
    x_t = torch.randn(4, 3, 8, 8)
    perturbation = Perturbation(x_t, torch.randn_like(x_t), torch.full((4,), 0.5), AdversarialConfig())
    for bad in ([1], [1, 3]):
        x_in, target = perturbation.inputs()
        x_in.grad = torch.randn_like(x_in)
        x_in.grad[bad] = float("nan")
        perturbation.update(x_in, target)
    assert int(perturbation.skipped) == 3


def test_noise_budget_steps_on_the_implied_noise_with_the_targets_gradient():
    """Budget 'noise' under target 'delta': u = delta / c moves by lr along dL/du = c dL/dx + dL/dtarget,
    normalized per sample, and is projected onto ||u|| <= sqrt(d) max_norm; the input is x_t + c u, the
    target eps + u."""
    from adv_dpm.adversarial import AdversarialConfig, Perturbation
    gen = torch.Generator().manual_seed(0)
    x_t, eps, grad_x, grad_target = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(4))
    c = torch.tensor([0.05, 0.5, 1.0])
    perturbation = Perturbation(x_t, eps, c, AdversarialConfig(lr=0.3, max_norm=0.05, target="delta", budget="noise"))
    x_in, target = perturbation.inputs()
    assert target.requires_grad
    x_in.grad, target.grad = grad_x, grad_target
    perturbation.update(x_in, target)
    c4 = c[:, None, None, None]
    g = (c4 * grad_x + grad_target).double()
    u = 0.3 * g / g.flatten(1).norm(dim=1)[:, None, None, None]
    rho = math.sqrt(32) * 0.05
    u = u * (rho / u.flatten(1).norm(dim=1)).clamp(max=1)[:, None, None, None]
    torch.testing.assert_close(perturbation.delta.double(), c4 * u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(perturbation.x_in.double(), x_t + c4 * u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(perturbation.target.double(), eps + u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", ["input", "noise"])
@pytest.mark.parametrize("target", ["delta_detach", "delta"])
def test_random_direction_steps_along_the_generators_gaussian_whatever_the_gradient(budget, target):
    """Direction 'random': each step goes lr along a fresh N(0, I) draw of the generator, normalized per
    sample; the gradient (even a non-finite one) does not enter, and the target follows the step."""
    from adv_dpm.adversarial import AdversarialConfig, Perturbation
    gen = torch.Generator().manual_seed(0)
    x_t, eps = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(2))
    c = torch.tensor([0.05, 0.5, 1.0])[:, None, None, None]
    config = AdversarialConfig(lr=0.3, max_norm=1.0, target=target, budget=budget, direction="random")
    deltas = []
    for grad in (torch.randn(3, 2, 4, 4, generator=gen), torch.full((3, 2, 4, 4), float("nan"))):
        perturbation = Perturbation(x_t, eps, c.flatten(), config, torch.Generator().manual_seed(7))
        for _ in range(2):
            x_in, y = perturbation.inputs()
            x_in.grad = grad
            if y.requires_grad:   # target 'delta'
                y.grad = grad
            perturbation.update(x_in, y)
        assert int(perturbation.skipped) == 0
        deltas.append(perturbation.delta)
    draws = torch.Generator().manual_seed(7)
    z1, z2 = (torch.randn(3, 2, 4, 4, generator=draws).double() for _ in range(2))
    unit = [z / z.flatten(1).norm(dim=1)[:, None, None, None] for z in (z1, z2)]
    u = 0.3 * (unit[0] + unit[1])   # within the radius sqrt(32): no projection
    expected = c * u if budget == "noise" else u
    torch.testing.assert_close(deltas[0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deltas[1], deltas[0])
    torch.testing.assert_close(perturbation.target.double(), eps + expected / c, rtol=1e-5, atol=1e-5)


def test_adversarial_config_names_a_bad_direction():
    from adv_dpm.adversarial import AdversarialConfig
    with pytest.raises(ValueError, match=r"direction must be one of \('gradient', 'random'\), got 'sideways'"):
        AdversarialConfig(direction="sideways")
    with pytest.raises(ValueError, match="direction"):
        TrainConfig(adv_direction="sideways")


def test_random_direction_reaches_the_trainer(tmp_path):
    """The same batch's replays with the ascent and with random directions move the weights differently."""
    weights = []
    for direction in ("gradient", "random"):
        trainer = Trainer(config(tmp_path / direction, mode="free_at", adv_steps=3, adv_direction=direction))
        trainer.train_batch()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("direction", ["gradient", "random"])
def test_resumed_run_continues_the_same_trajectory(tmp_path, direction):
    settings = dict(mode="free_at", adv_target="delta", schedule_sampler="loss-second-moment", ema_rate="0.9,0.99",
                    adv_direction=direction)
    straight = Trainer(config(tmp_path / "a", total_steps=12, **settings))
    straight.train()
    assert int(straight.timesteps.loss_counts.sum()) > 0   # the trainer feeds the sampler its losses
    first = Trainer(config(tmp_path / "b", total_steps=6, **settings))
    first.train()
    resumed = Trainer(config(tmp_path / "b", total_steps=12, **settings))
    assert resumed.step == 6
    resumed.train()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    for rate in straight.emas:
        for p, q in zip(straight.emas[rate], resumed.emas[rate]):
            assert torch.equal(p, q)
    assert (tmp_path / "b" / "run" / "metrics.csv").exists()


def test_ctrl_c_finishes_the_batch_saves_and_the_rerun_continues_the_same_trajectory(tmp_path, monkeypatch):
    """Also the metrics: the row in progress at the stop covers the batches before it as well."""
    import signal
    before = signal.getsignal(signal.SIGINT)   # Python's default handler, or SIG_IGN in a background job
    settings = dict(total_steps=12, mode="free_at", save_interval=1000, log_interval=6)
    straight = Trainer(config(tmp_path / "a", **settings))
    straight.train()
    interrupted = Trainer(config(tmp_path / "b", **settings))
    train_batch = interrupted.train_batch

    def batch_then_signal():   # Ctrl-C during the first batch's replays, between two metrics rows
        result = train_batch()
        if interrupted.step == 3:
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(interrupted, "train_batch", batch_then_signal)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = Trainer(config(tmp_path / "b", **settings))
    assert resumed.step == 3
    resumed.train()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    rows = [[{k: r[k] for k in ("step", "loss", "skipped")} for r in map(json.loads, path.read_text().splitlines())]
            for path in (tmp_path / "a" / "run" / "metrics.jsonl", tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows[0]] == [6, 12] and rows[1] == rows[0]
    assert signal.getsignal(signal.SIGINT) is before   # the trainer's handler is gone


def test_resume_drops_metric_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed between checkpoints logged rows that its resumed run logs again."""
    run = config(tmp_path, total_steps=6, mode="standard", log_interval=1)
    trainer = Trainer(run)
    trainer.train()
    path = tmp_path / "run" / "metrics.csv"
    assert [int(r.split(",")[0]) for r in path.read_text().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]
    state = torch.load(trainer.checkpoint_path, weights_only=False)
    state["step"] = 4   # as if killed after logging steps 5 and 6
    torch.save(state, trainer.checkpoint_path)
    jsonl = tmp_path / "run" / "metrics.jsonl"
    jsonl.write_text(jsonl.read_text() + '{"step": 7, "lo')   # a line cut off by the kill
    Trainer(run).train()
    assert [int(r.split(",")[0]) for r in path.read_text().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(r)["step"] for r in jsonl.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    trainer.checkpoint_path.unlink()   # killed before its first checkpoint: the rerun starts afresh
    Trainer(run).train()
    assert [json.loads(r)["step"] for r in jsonl.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_resuming_a_run_dir_of_another_model_is_refused(tmp_path, capsys):
    Trainer(config(tmp_path, total_steps=2, mode="standard")).train()
    with pytest.raises(ValueError, match=r"holds another model \(it differs in \['hidden'\]\)"):
        Trainer(config(tmp_path, model_overrides={"hidden": 16, "depth": 2}))
    Trainer(config(tmp_path, total_steps=2, mode="standard", lr=2e-4))
    assert "settings changed from the checkpoint's: lr 0.0001 -> 0.0002" in capsys.readouterr().out
    # what the run is (its mode, objective, EMAs) is not changed by resuming it: that would relabel its model
    for change, shown in [(dict(mode="pgd_at"), "mode 'standard' -> 'pgd_at'"),
                          (dict(mode="standard", ema_rate="0.99"), "ema_rate '0.9999' -> '0.99'"),
                          (dict(mode="standard", objective="ct"), "objective 'diffusion' -> 'ct'")]:
        with pytest.raises(ValueError, match=rf"holds a run of other settings \({shown}\).*--init_from"):
            Trainer(config(tmp_path, total_steps=2, **change))
    # tuples in the settings come back from config.json as lists: still the same run
    images = dict(data="digits", model="digits-tiny", batch_size=4, total_steps=1, mode="standard")
    Trainer(config(tmp_path / "unet", **images, model_overrides={"channel_mult": (1, 2)})).train()
    assert Trainer(config(tmp_path / "unet", **images, model_overrides={"channel_mult": [1, 2]})).step == 1
    assert "settings changed" not in capsys.readouterr().out


@pytest.mark.parametrize("change, error, match", [
    (dict(total_steps="abc"), TypeError, r"total_steps must be int, got 'abc'"),
    (dict(total_steps=5.7), TypeError, r"total_steps must be int, got 5.7"),
    (dict(channels_last=1), TypeError, r"channels_last must be bool, got 1"),
    (dict(batch_size=True), TypeError, r"batch_size must be int, got True"),
    (dict(num_samples=0), ValueError, r"num_samples must be >= 1, got 0"),
    (dict(sample_steps=0), ValueError, r"sample_steps must be >= 1, got 0"),
])
def test_settings_are_checked_before_anything_runs(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        config(tmp_path, **change)
    assert config(tmp_path, lr=1).lr == 1   # an int where a float is expected is a number all the same


@pytest.mark.parametrize("data, model, fitting", [("toy:rings", "digits-tiny", "toy2d"), ("digits", "toy2d", "digits-tiny")])
def test_a_model_preset_for_other_data_is_refused(tmp_path, data, model, fitting):
    with pytest.raises(ValueError, match=rf"model '{model}' does not take data '{data}' .*'{fitting}'"):
        Trainer(config(tmp_path, data=data, model=model, model_overrides={}))
    assert not (tmp_path / "run").exists()


def test_fine_tuning_loads_weights_with_a_fresh_optimizer(tmp_path):
    base = Trainer(config(tmp_path / "base", total_steps=4, mode="standard", ema_rate="0.9"))
    base.train()
    tuned = Trainer(config(tmp_path / "tuned", mode="free_at", ema_rate="0.9,0.5", init_from=str(base.checkpoint_path)))
    for p, q in zip(base.model.parameters(), tuned.model.parameters()):
        assert torch.equal(p, q)
    assert tuned.step == 0 and not tuned.optimizer.state
    # EMAs: the checkpoint's at its rate (as ADM's resume), the weights where it has none, or all from the weights
    base_ema, = base.emas.values()
    assert all(torch.equal(e, b) for e, b in zip(tuned.emas[0.9], base_ema))
    assert not all(torch.equal(e, p) for e, p in zip(tuned.emas[0.9], base.model.parameters()))
    assert all(torch.equal(e, p) for e, p in zip(tuned.emas[0.5], base.model.parameters()))
    restarted = Trainer(config(tmp_path / "restarted", ema_rate="0.9", init_ema="weights",
                               init_from=str(base.checkpoint_path)))
    assert all(torch.equal(e, p) for e, p in zip(restarted.emas[0.9], base.model.parameters()))


def test_an_update_the_fp16_scaler_skips_leaves_the_emas_alone(tmp_path):
    trainer = Trainer(config(tmp_path, mode="free_at", adv_steps=2, precision="fp16", ema_rate="0.5",
                             total_steps=2))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # the first scaled loss overflows
    params = [p.detach().clone() for p in trainer.model.parameters()]
    for e in trainer.emas[0.5]:
        e.zero_()   # an EMA that an EMA step would move
    trainer.train_batch()
    assert trainer.step == 2
    assert all(torch.equal(p, q) for p, q in zip(params, trainer.model.parameters()))   # overflowed: no update ...
    assert all(not e.any() for e in trainer.emas[0.5])                                  # ... and no EMA step


def test_an_update_the_fp16_scaler_takes_moves_the_emas(tmp_path):
    trainer = Trainer(config(tmp_path, mode="standard", precision="fp16", ema_rate="0.5", total_steps=1))
    for e in trainer.emas[0.5]:
        e.zero_()
    trainer.train_batch()
    assert trainer.step == 1
    for e, p in zip(trainer.emas[0.5], trainer.model.parameters()):
        torch.testing.assert_close(e, 0.5 * p, rtol=0, atol=0)   # 0 + 0.5 (p - 0)


def test_fp16_trains_with_a_grad_scaler_that_is_resumed(tmp_path):
    cfg = config(tmp_path, mode="free_at", precision="fp16", total_steps=6, save_interval=3)
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled()
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    resumed = Trainer(cfg)
    assert resumed.step == 6 and resumed.scaler.get_scale() == trainer.scaler.get_scale()


def test_fused_adamw_matches_the_per_tensor_loop_on_channels_last_weights(tmp_path):
    """The trainer's fused AdamW reads each gradient in its parameter's layout (torch's CPU kernel
    misreads a contiguous gradient of a channels_last weight without a word); autograd's layout
    contract gives it that layout, which this checks against the per-tensor loop."""
    runs = [Trainer(config(tmp_path / str(i), data="digits", model="digits-tiny", model_overrides={}, batch_size=8,
                           mode="standard", channels_last=True, lr=1e-2)) for i in range(2)]
    runs[1].optimizer = torch.optim.AdamW(runs[1].model.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    assert runs[0].optimizer.defaults["fused"] and any(
        p.dim() == 4 and not p.is_contiguous() for p in runs[0].model.parameters())
    for trainer in runs:
        trainer.train_batch()
    # one update from the same gradients (a second would start from weights that differ by rounding, which
    # Adam's normalization magnifies to about lr where a gradient is near zero); a misread gradient moves
    # most weights by about lr = 1e-2
    assert runs[0].step == 1
    for (name, fused), loop in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_model_follows_the_eager_trajectory(tmp_path):
    runs = [Trainer(config(tmp_path / str(c), mode="free_at", total_steps=3, compile=c)) for c in (False, True)]
    for trainer in runs:
        trainer.train()
    for eager, compiled in zip(*(t.model.parameters() for t in runs)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (modes.append(mode), model)[1])
    Trainer(config(tmp_path, compile=True, compile_mode="reduce-overhead"))
    Trainer(config(tmp_path, compile=False, compile_mode="max-autotune"))
    assert modes == ["reduce-overhead"]
    with pytest.raises(ValueError, match=r"compile_mode must be one of \('default', 'reduce-overhead'"):
        config(tmp_path, compile=True, compile_mode="fast")


@pytest.mark.cuda
def test_cuda_graphs_train_the_unet_as_eager_does(tmp_path):
    """compile_mode 'reduce-overhead' (CUDA graph trees) under the free-AT loop: the replays read
    the input gradient of the graphed backward before the next forward overwrites it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    settings = dict(data="digits", model="digits-tiny", model_overrides={}, mode="free_at", adv_steps=3,
                    channels_last=True, device="cuda")
    runs = [Trainer(config(tmp_path / str(c), **settings, compile=c, compile_mode="reduce-overhead"))
            for c in (False, True)]
    losses = [[float(t.train_batch()[0]) for _ in range(3)] for t in runs]
    assert all(math.isfinite(v) for v in losses[1])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-5)


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import sys
    import types
    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    Trainer(config(tmp_path, mode="standard", total_steps=4)).train()
    assert calls[0] == ("open", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close",)
    assert ("train/loss", 2) in calls and ("train/loss", 4) in calls and ("train/updates_per_s", 4) in calls
    calls.clear()
    Trainer(config(tmp_path / "off", mode="standard", total_steps=2, tensorboard=False)).train()
    assert calls == []


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        config(tmp_path, mode="adversarial")
    with pytest.raises(ValueError, match="adversarial target must be one of"):
        config(tmp_path, adv_target="eps")
    with pytest.raises(ValueError, match="ema_rate values must be in"):
        config(tmp_path, ema_rate="1.5")


def _ddp_worker(rank, world, port, run_dir, out, objective):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**{**TOY, "run_dir": run_dir, "mode": "free_at", "batch_size": 16,
                                     "objective": objective, "scales": 10}))
    stop = ["SIGTERM"] if rank == 1 else []   # a stop request on one rank stops both
    torch.save((trainer._agree([]), trainer._agree(stop), stop), f"{out}/agree{rank}.pt")
    trainer.train_batch()
    torch.save([p.detach() for e in trainer.emas.values() for p in [*trainer.params, *e]], f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("objective", ["diffusion", "ct"])
def test_ddp_two_cpu_processes_keep_the_replicas_in_sync(tmp_path, objective):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path), objective),
                                nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(a) == len(b) > 0
    for p, q in zip(a, b):
        assert torch.equal(p, q)   # each rank saw different data: equal only if gradients were all-reduced
    assert torch.load(tmp_path / "agree0.pt", weights_only=True) == (False, True, ["another rank"])
    assert torch.load(tmp_path / "agree1.pt", weights_only=True) == (False, True, ["SIGTERM"])


def test_cli_train_with_config_file_and_flag_overrides(tmp_path, capsys):
    from adv_dpm.cli import main
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "toy:rings"\nmodel = "toy2d"\nbatch_size = 16\ndiffusion_steps = 50\n'
                   'total_steps = 3\nlog_interval = 1\n')
    main(["train", "--config", str(cfg), "--mode", "standard", "--run-dir", str(tmp_path / "cli"),   # either spelling
          "--model_overrides", '{"hidden": 16, "depth": 1}'])
    assert "run directory" in capsys.readouterr().out
    saved = (tmp_path / "cli" / "config.json").read_text()
    assert '"mode": "standard"' in saved and '"total_steps": 3' in saved
    cfg.write_text('data = "toy:rings\n')
    with pytest.raises(SystemExit, match=r"config file .*run.toml does not parse: "):
        main(["train", "--config", str(cfg)])
    cfg.write_text('data = "toy:rings"\nlearning_rate = 0.1\n')
    with pytest.raises(SystemExit, match=r"unknown setting\(s\) \['learning_rate'\]"):
        main(["train", "--config", str(cfg)])


def test_cli_long_options_take_either_word_separator():
    import argparse
    from adv_dpm.cli import _respelled
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples")
    parser.add_argument("--run_dir")
    parser.add_argument("-q", action="store_true")
    argv = ["--num_samples=3", "--run-dir", "a_b-c", "-q", "--no_such-flag", "--"]
    assert _respelled(argv, parser) == ["--num-samples=3", "--run_dir", "a_b-c", "-q", "--no_such-flag", "--"]


def test_cli_errors_are_one_line_messages(tmp_path):
    from adv_dpm.cli import main
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    cases = [(["train", "--data", "folder:/nowhere", "--run_dir", str(tmp_path / "r")], r"/nowhere is not a directory"),
             (["train", "--device", "cuda:7", "--run_dir", str(tmp_path / "r")] if not torch.cuda.is_available()
              else ["train", "--mode", "fast"], r"CUDA is not available|mode must be one of"),
             (["train", "--sample_method", "euler"], r"sample_method must be one of"),
             (["sample", str(broken)], r"cannot read .*checkpoint.pt, truncated or not a torch file"),
             (["sample", str(tmp_path / "none.pt")], r"no file .*none.pt")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=rf"adv-dpm {argv[0]}: error: .*({message})"):
            main(argv)

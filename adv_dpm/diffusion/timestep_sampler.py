"""Training timestep samplers (ADM's ScheduleSampler family).

``sample`` draws t with probability p(t) and returns importance weights 1 / (T p(t)), so that
the weighted loss stays an unbiased estimate of the uniform-t objective.
"""
import torch


class TimestepSampler:
    """Draws timesteps from ``probabilities()``; subclasses may learn them from ``update``
    (``learns_from_losses``: the trainer gathers and passes the losses only to those)."""

    learns_from_losses = False

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps

    def probabilities(self):
        """(T,) float64 probabilities of the timesteps."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size, device, generator=None):
        """(t, weights): a (B,) LongTensor of timesteps and their float32 importance weights on
        ``device``. Drawn on the generator's device (the CPU without one)."""
        p = self.probabilities()
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(draw_device), batch_size, replacement=True, generator=generator).cpu()
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t, losses):
        """Record the per-sample ``losses`` of timesteps ``t`` (all ranks' values, gathered by the caller)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class UniformSampler(TimestepSampler):
    """p(t) = 1 / T, weights exactly 1."""

    def sample(self, batch_size, device, generator=None):
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(self.num_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device), torch.ones(batch_size, device=device)


class LossSecondMomentSampler(TimestepSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last ``history`` losses of each timestep,
    mixed with ``uniform_prob`` of the uniform distribution; uniform until every timestep has
    ``history`` losses (ADM's LossSecondMomentResampler)."""

    learns_from_losses = True

    def __init__(self, num_timesteps, history=10, uniform_prob=0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self):
        return bool((self.loss_counts == self.history).all())

    def probabilities(self):
        if not self.warmed_up():
            return super().probabilities()
        w = self.loss_history.pow(2).mean(dim=1).sqrt()
        return w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t, losses):
        """Append each loss to its timestep's history (in batch order), dropping the oldest beyond ``history``."""
        t, losses = t.cpu(), losses.detach().cpu().double()
        steps, group, sizes = t.unique(return_inverse=True, return_counts=True)
        order = group.argsort(stable=True)
        rank = torch.empty_like(order)  # position of each loss among those of its timestep
        rank[order] = torch.arange(len(t)) - (sizes.cumsum(0) - sizes)[group[order]]
        counts = self.loss_counts[steps]
        merged = torch.cat([self.loss_history[steps], losses.new_zeros(len(steps), int(sizes.max()))], dim=1)
        merged[group, counts[group] + rank] = losses  # the new losses after the recorded ones
        start = (counts + sizes - self.history).clamp(min=0)  # keep the newest ``history``
        self.loss_history[steps] = merged.gather(1, start[:, None] + torch.arange(self.history))
        self.loss_counts[steps] = (counts + sizes).clamp(max=self.history)

    def state_dict(self):
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state):
        if state["loss_history"].shape != self.loss_history.shape:
            raise ValueError(f"loss_history must have shape {tuple(self.loss_history.shape)} (num_timesteps, history), "
                             f"got {tuple(state['loss_history'].shape)}")
        self.loss_history = state["loss_history"].to(torch.float64).clone()
        self.loss_counts = state["loss_counts"].to(torch.long).clone()


SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentSampler}


def create_timestep_sampler(name, num_timesteps):
    """The sampler named 'uniform' or 'loss-second-moment' (ADM's names)."""
    if name not in SAMPLERS:
        raise ValueError(f"timestep sampler must be one of {list(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](num_timesteps)

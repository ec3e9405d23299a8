"""The trainer: standard training, DDPM-IP, free adversarial training and PGD-style AT of a
diffusion model, or of a consistency model by distillation or training (PAPER.md), on one CPU,
one GPU or many (torchrun).

Progress is counted in optimizer updates (``step``): free AT and PGD AT take K replays per
batch, free AT updating the parameters on every replay, PGD only on the last. The whole
training state lives in one file, ``<run_dir>/checkpoint.pt``, written atomically at batch
boundaries; a run restarted with the same run_dir resumes from it and continues the same
trajectory.
"""
import contextlib
import copy
import csv
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import consistency as cm
from . import data as datasets
from .adversarial import AdversarialConfig, Perturbation
from .diffusion import METHODS, Schedule, create_timestep_sampler, diffusion_loss, q_sample
from .diffusion.losses import split_output
from .diffusion.schedule import on_device
from .models import PRESETS, build_model
from .utils import atomic_save, atomic_write, read_checkpoint, resolve_device, save_image_grid, to_device, to_host

MODES = ("standard", "ip", "free_at", "pgd_at")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INIT_EMA = ("checkpoint", "weights")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every setting of a run; names follow guided-diffusion's flags where one exists."""
    data: str = "digits"                 # 'digits' (8x8) | 'digits16' | 'toy:rings' | 'toy:gmm' | 'cifar10:ROOT' |
                                         # 'folder:ROOT' | 'npz:PATH' (adv_dpm.data.load_dataset)
    model: str = "digits-tiny"           # model preset (adv_dpm.models.PRESETS)
    model_overrides: dict = field(default_factory=dict)  # JSON of preset fields to change, e.g. '{"dropout": 0.1}'
    diffusion_steps: int = 1000          # T
    noise_schedule: str = "cosine"       # 'cosine' | 'linear'
    schedule_sampler: str = "uniform"    # 'uniform' | 'loss-second-moment'
    mode: str = "free_at"                # 'standard' | 'ip' (DDPM-IP) | 'free_at' | 'pgd_at'
    adv_steps: int = 3                   # K: replays per batch (free_at, pgd_at)
    adv_lr: float = 0.1                  # L2 length of each ascent step on delta, over the whole sample (0.1:
                                         # RMS 0.0018 per element at 3x32x32; 0 keeps only the replays)
    adv_max_norm: float = 0.1            # per-element radius: ||delta|| <= sqrt(d) * adv_max_norm
    adv_target: str = "delta_detach"     # 'delta_detach' | 'delta' | 'original'
    adv_budget: str = "input"            # 'input': adv_lr, adv_max_norm in units of x_t (PAPER.md) | 'noise':
                                         # per sample in units of its noise level sqrt(1 - abar_t)
    adv_direction: str = "gradient"      # 'gradient': the ascent (PAPER.md) | 'random': steps of the same length
                                         # along Gaussian directions (the control for the adversarial direction)
    ip_gamma: float = 0.1                # DDPM-IP input perturbation strength
    objective: str = "diffusion"         # 'diffusion' (epsilon prediction) | 'cd' (consistency distillation of
                                         # `teacher`) | 'ct' (consistency training); see adv_dpm.consistency
    teacher: str = ""                    # cd: checkpoint of the diffusion model to distill (its EMA weights); the
                                         # student takes its architecture and, unless init_from, its weights
    scales: int = 50                     # cd/ct: N, intervals of the timestep grid 0 = t_0 < ... < t_N (sigma <= 80)
    teacher_solver: str = "ddim"         # cd: the teacher's ODE step from t_{n+1} to t_n, 'ddim' | 'heun' (2 calls)
    loss_norm: str = "pseudo_huber"      # cd/ct: distance to the target, 'pseudo_huber' (iCT's) | 'l2' | 'l1'
    target_ema: float = 0.95             # cd/ct: the target network is this EMA of the online one (0: its weights)
    adv_cm_target: str = "invariant"     # cd/ct with AT: the target from the clean x_{t_{n+1}} ('invariant') or
                                         # recomputed from the perturbed one ('consistent': cd one more teacher
                                         # call; ct the noise the perturbed input implies)
    lr: float = 1e-4                     # AdamW learning rate
    weight_decay: float = 0.0            # AdamW weight decay
    batch_size: int = 64                 # global batch (split over ranks)
    microbatch: int = 0                  # per-rank micro-batch for gradient accumulation (0: none)
    ema_rate: str = "0.9999"             # comma-separated rates
    total_steps: int = 1000              # optimizer updates (free AT: rounded up to whole batches of K)
    precision: str = "fp32"              # 'fp32' | 'bf16' | 'fp16' (autocast; fp16 with a grad scaler)
    compile: bool = False                # torch.compile the model
    compile_mode: str = "default"        # its mode: 'default' | 'reduce-overhead' (CUDA graphs: no launch
                                         # cost per kernel on a GPU) | 'max-autotune' | 'max-autotune-no-cudagraphs'
    channels_last: bool = False          # channels_last memory format for images and model
    log_interval: int = 50               # optimizer updates between metric rows
    sample_interval: int = 0             # updates between sample grids (0: only at the end)
    save_interval: int = 500             # updates between checkpoints
    num_samples: int = 64                # images in each sample grid
    sample_method: str = "ddim"          # sampler of the grids: 'ddpm' | 'ddim' | 'dpm_solver++' (consistency
                                         # models: always multistep consistency sampling)
    sample_steps: int = 20               # NFE of the grids
    tensorboard: bool = True             # also log to <run_dir>/tensorboard when tensorboard is installed
    run_dir: str = "runs/default"        # where the checkpoint, metrics and pictures go; resumes from it
    init_from: str = ""                  # fine-tune: weights of this checkpoint, fresh optimizer
    init_ema: str = "checkpoint"         # with init_from, EMAs: 'checkpoint' (its EMAs of the same rates, as
                                         # ADM's resume; other rates from the weights) | 'weights'
    seed: int = 0                        # seeds the weights, data order and noise
    device: str = "auto"                 # 'auto' (CUDA when there is a GPU) | 'cpu' | 'cuda' | 'cuda:N'

    def __post_init__(self):
        for f in dataclasses.fields(self):   # a config file's values arrive as written
            value = getattr(self, f.name)
            integral = f.type is float and isinstance(value, int)   # an int where a float goes is a number too
            if isinstance(value, bool) != (f.type is bool) or not (isinstance(value, f.type) or integral):
                raise TypeError(f"{f.name} must be {f.type.__name__}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "total_steps", "diffusion_steps", "log_interval", "save_interval", "num_samples",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_method not in METHODS:
            raise ValueError(f"sample_method must be one of {METHODS}, got {self.sample_method!r}")
        if self.init_ema not in INIT_EMA:
            raise ValueError(f"init_ema must be one of {INIT_EMA}, got {self.init_ema!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        self._check_consistency()
        self.ema_rates()
        self.adversarial()

    def _check_consistency(self):
        choices = {"objective": cm.OBJECTIVES, "teacher_solver": cm.SOLVERS, "loss_norm": cm.LOSS_NORMS,
                   "adv_cm_target": cm.AT_TARGETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.objective == "diffusion":
            return
        cm.timestep_grid(Schedule.named(self.noise_schedule, self.diffusion_steps), self.scales)
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"target_ema must be in [0, 1), got {self.target_ema!r}")
        if (self.objective == "cd") != bool(self.teacher):
            raise ValueError("teacher: objective 'cd' distills the checkpoint named by teacher, and only 'cd' takes "
                             f"one; got objective={self.objective!r}, teacher={self.teacher!r}")
        if self.mode == "ip":
            raise ValueError(f"mode 'ip' (DDPM-IP) is a diffusion-training baseline; objective {self.objective!r} "
                             "takes 'standard', 'free_at' or 'pgd_at'")
        if self.schedule_sampler != "uniform":
            raise ValueError(f"schedule_sampler must be 'uniform' with objective {self.objective!r} (the grid "
                             f"interval is drawn uniformly), got {self.schedule_sampler!r}")
        if self.sample_steps > self.scales:
            raise ValueError(f"sample_steps ({self.sample_steps}) must be <= scales ({self.scales}): a consistency "
                             "model is sampled on its timestep grid")

    def ema_rates(self):
        try:
            rates = [float(r) for r in str(self.ema_rate).split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"ema_rate must be comma-separated numbers, got {self.ema_rate!r}") from None
        if not all(0 <= r < 1 for r in rates):
            raise ValueError(f"ema_rate values must be in [0, 1), got {self.ema_rate!r}")
        return rates

    def adversarial(self):
        return AdversarialConfig(self.adv_steps, self.adv_lr, self.adv_max_norm, self.adv_target, self.adv_budget,
                                 self.adv_direction)

    @property
    def replays(self):
        """Forward/backward passes per batch: K for the AT modes, else 1."""
        return self.adv_steps if self.mode in ("free_at", "pgd_at") else 1


@contextlib.contextmanager
def _stop_requests():
    """A list that SIGINT (Ctrl-C) or SIGTERM appends the signal's name to while training runs:
    the loop finishes its batch, saves and stops. A second signal interrupts at once."""
    requests = []

    def request(signum, _frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signal.Signals(signum).name)
        tqdm.write(f"{requests[0]}: stopping after this batch (again to stop at once)")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _as_json(settings):
    """Settings as JSON gives them back (tuples as lists): a run's config.json resumes it."""
    return json.loads(json.dumps(settings))


def _distributed():
    """(rank, world_size), initializing the process group under torchrun: NCCL for CUDA tensors, gloo
    beside it for host tensors (the ranks agree on stopping through one, see Trainer._agree)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    """Owns the model, its EMAs, the optimizer and all the state a resume needs."""

    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.rank, self.world = _distributed()
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must divide over {self.world} ranks")
        self.run_dir = Path(config.run_dir)
        torch.manual_seed(config.seed + self.rank)
        self.data = datasets.load_dataset(config.data)
        self.batches = datasets.BatchIterator(self.data, config.batch_size // self.world, config.seed, self.rank,
                                              self.world)
        self.teacher = self._load_teacher() if config.objective == "cd" else None
        if self.teacher is None:
            self._check_preset_takes_data()
        self.model = (build_model(self.teacher.model.config, **config.model_overrides) if self.teacher is not None else
                      build_model(config.model, **self._shape_overrides())).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.learn_sigma = self.model.config.get("learn_sigma", False)
        self.schedule = Schedule.named(config.noise_schedule, config.diffusion_steps)
        self.timesteps = create_timestep_sampler(config.schedule_sampler, config.diffusion_steps)
        self.unlearned_losses = []   # (t, losses) on their way to the host, for the timestep sampler
        self.consistency = config.objective != "diffusion"
        if self.consistency:
            self.grid = cm.timestep_grid(self.schedule, config.scales)
        # torch's fused AdamW (one kernel over all parameters): on a 2-core CPU its step took a
        # quarter of the per-tensor loop's time.
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda") or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.noise = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.step = 0
        self.window = []   # (loss, skipped) of each batch since the last metrics row, on the device
        self.tb = None
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=None if self.device.type == "cpu"
                                                               else [self.device.index])
                    if self.world > 1 else self.model)
        self.forward = torch.compile(self.ddp, mode=config.compile_mode) if config.compile else self.ddp
        # after DDP's broadcast of rank 0's weights: every rank's EMAs start from the same weights
        rates = config.ema_rates() + ([config.target_ema] if self.consistency else [])
        self.emas = {rate: [p.detach().clone() for p in self.params] for rate in rates}
        if self.consistency:   # the target network: the model's modules with these weights
            self.target_params = dict(zip([n for n, _ in self.model.named_parameters()], self.emas[config.target_ema]))
        if not self._resume():
            if config.init_from:
                self._init_from(config.init_from)
            elif self.teacher is not None:
                self._init_from_teacher()

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def name(self):
        """What is trained how, e.g. 'free_at' or 'cd free_at'."""
        return cm.run_label(self.cfg.objective, self.cfg.mode)

    def _check_preset_takes_data(self):
        points = self.data.x.dim() == 2   # 2-D points take the MLP, images the UNet
        arch = PRESETS.get(self.cfg.model, {}).get("arch")
        if arch is not None and (arch == "mlp") != points:
            fitting = sorted(name for name, p in PRESETS.items() if (p["arch"] == "mlp") == points)
            raise ValueError(f"model {self.cfg.model!r} does not take data {self.cfg.data!r} "
                             f"({'2-D points' if points else 'images'}): use a model preset of {fitting}")

    def _shape_overrides(self):
        x = self.data.x
        if x.dim() == 2:
            return {**self.cfg.model_overrides}
        return {"image_size": x.shape[-1], "in_channels": x.shape[1], **self.cfg.model_overrides}

    @property
    def checkpoint_path(self):
        return self.run_dir / "checkpoint.pt"

    def state_dict(self):
        self._learn_losses()
        return {"config": dataclasses.asdict(self.cfg), "model_config": self.model.config, "step": self.step,
                "model": self.model.state_dict(), "ema": {str(r): e for r, e in self.emas.items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "timestep_sampler": self.timesteps.state_dict(), "batches": self.batches.state_dict(),
                "window": [(float(loss), int(skipped)) for loss, skipped in self.window],
                "rng": {"torch": torch.get_rng_state(), "noise": self.noise.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def save(self):
        """The training state to <run_dir>/checkpoint.pt, atomically (rank 0 only)."""
        if self.rank == 0:
            atomic_save(self.state_dict(), self.checkpoint_path)

    def _resume(self):
        if not self.checkpoint_path.exists():
            return False
        state = read_checkpoint(self.checkpoint_path, self.device)
        saved_model, model = _as_json(state["model_config"]), _as_json(self.model.config)
        if saved_model != model:
            differ = sorted(k for k in {**saved_model, **model} if saved_model.get(k) != model.get(k))
            raise ValueError(f"{self.checkpoint_path} holds another model (it differs in {differ}); "
                             f"resume with the run's settings ({self.run_dir / 'config.json'}) or use another run_dir")
        saved, now = _as_json(state["config"]), _as_json(dataclasses.asdict(self.cfg))
        fixed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in ("objective", "mode", "ema_rate", "target_ema")
                 if saved.get(k) != now[k]]
        if fixed:
            raise ValueError(f"{self.checkpoint_path} holds a run of other settings ({'; '.join(fixed)}): resume it "
                             f"with its own ({self.run_dir / 'config.json'}), or train in another run_dir "
                             f"(--init_from {self.checkpoint_path} starts from its weights)")
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                   if k not in ("run_dir", "device", "total_steps") and saved.get(k) != v]
        if changed:
            self.log(f"resuming with settings changed from the checkpoint's: {'; '.join(changed)}")
        self.model.load_state_dict(state["model"])
        for rate, params in state["ema"].items():
            for e, p in zip(self.emas[float(rate)], params):
                e.copy_(p)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.timesteps.load_state_dict(state["timestep_sampler"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.noise.set_state(state["rng"]["noise"].cpu())
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.step = state["step"]
        # the batches of the metrics row in progress: a resumed run writes the rows it would have
        self.window = [(torch.tensor(loss, device=self.device), skipped) for loss, skipped in state.get("window", [])]
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")
        return True

    def _drop_metrics_after(self, step):
        """Metric rows logged after the checkpoint (a run killed between saves, or before its
        first) are logged again by this run: drop them, and any line cut off by the kill, so
        every step appears once."""
        def step_of(line, csv_row):
            try:
                return int(float(line.split(",", 1)[0])) if csv_row else int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                return None

        for name in ("metrics.jsonl", "metrics.csv") if self.rank == 0 else ():
            path = self.run_dir / name
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            header = lines[:1] if name.endswith(".csv") else []
            kept = header + [r for r in lines[len(header):] if r.endswith("\n")
                             and (s := step_of(r, bool(header))) is not None and s <= step]
            if kept != lines:
                atomic_write(path, "".join(kept) if len(kept) > len(header) else "")

    def _load_teacher(self):
        """The EMA model of the ``teacher`` checkpoint (frozen), checked against this run's data and schedule."""
        from .evaluate import load_checkpoint, sample_shape
        teacher = load_checkpoint(self.cfg.teacher, device=self.device)
        if teacher.consistency:
            raise ValueError(f"teacher: {self.cfg.teacher} holds a consistency model; distill a diffusion model")
        for name in ("noise_schedule", "diffusion_steps"):
            if teacher.config[name] != getattr(self.cfg, name):
                raise ValueError(f"teacher: {self.cfg.teacher} was trained with {name}={teacher.config[name]!r}; "
                                 f"distill it with the same (this run has {getattr(self.cfg, name)!r})")
        if tuple(sample_shape(teacher)) != tuple(self.data.x.shape[1:]):
            raise ValueError(f"teacher: {self.cfg.teacher} models samples of shape {tuple(sample_shape(teacher))}, "
                             f"the data {self.cfg.data!r} has {tuple(self.data.x.shape[1:])}")
        teacher.model.requires_grad_(False)
        if self.cfg.channels_last:
            teacher.model.to(memory_format=torch.channels_last)
        return teacher

    def _init_from_teacher(self):
        """Consistency distillation starts the student, its EMAs and its target at the teacher."""
        with torch.no_grad():
            for p, q in zip(self.params, self.teacher.model.parameters()):
                p.copy_(q)
            for ema in self.emas.values():
                torch._foreach_copy_(ema, self.params)
        self.log(f"initialized the student from the teacher {self.cfg.teacher} (step {self.teacher.step})")

    def _init_from(self, path):
        """Fine-tuning as the paper's protocol: weights from ``path``, fresh optimizer; the EMAs
        from its EMAs of the same rates (``init_ema='checkpoint'``) or from the weights; a
        consistency model's target network from the weights."""
        state = read_checkpoint(path, self.device)
        self.model.load_state_dict(state["model"])
        saved = {float(r): e for r, e in state.get("ema", {}).items()} if self.cfg.init_ema == "checkpoint" else {}
        if self.consistency:
            saved.pop(self.cfg.target_ema, None)
        for rate, params in self.emas.items():
            for e, p in zip(params, saved.get(rate, self.params)):
                e.copy_(p.detach())
        from_checkpoint = sorted(set(saved) & set(self.emas))
        self.log(f"initialized weights from {path} (step {state.get('step')}), EMAs "
                 f"{from_checkpoint or 'none'} from its EMAs, the others from its weights; optimizer state not loaded")

    def log(self, message):
        if self.rank == 0:
            tqdm.write(message)

    # -- one batch ----------------------------------------------------------------------------
    def _autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _micro_batches(self):
        """The batch as micro-batches: each a dict with x0, y, t, weights, eps, the clean x_t and c_noise
        (consistency models: also the grid's next timestep s < t and x_s, one ODE step from x_t)."""
        x0, y = next(self.batches)
        x0 = to_device(x0, self.device)
        if self.cfg.channels_last and x0.dim() == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = None if y is None or not self.model.config.get("num_classes") else to_device(y, self.device)
        if self.consistency:   # an interval n of the grid, uniformly: t = t_{n+1}, s = t_n
            n = torch.randint(len(self.grid) - 1, (x0.shape[0],), generator=self.noise)
            t_cpu, s, weights = self.grid[n + 1], to_device(self.grid[n], self.device), torch.ones(x0.shape[0])
        else:
            self._learn_losses()
            t_cpu, weights = self.timesteps.sample(x0.shape[0], "cpu", generator=self.noise)
        eps = to_device(torch.randn(x0.shape, generator=self.noise), self.device)
        t, weights = to_device(t_cpu, self.device), to_device(weights, self.device)
        size = self.cfg.microbatch or x0.shape[0]
        micro = []
        for i in range(0, x0.shape[0], size):
            part = slice(i, i + size)
            m = {"x0": x0[part], "y": None if y is None else y[part], "t": t[part], "w": weights[part],
                 "eps": eps[part], "share": x0[part].shape[0] / x0.shape[0]}
            m["x_t"], m["target"] = q_sample(self.schedule, m["x0"], m["t"], m["eps"])
            m["c_noise"] = on_device(self.schedule.sqrt_one_minus_alphas_cumprod, self.device)[m["t"]].float()
            if self.cfg.mode == "ip":   # DDPM-IP: eps' = eps + gamma * xi, target stays eps
                xi = to_device(torch.randn(m["x0"].shape, generator=self.noise), self.device)
                delta = self.cfg.ip_gamma * m["c_noise"].reshape(-1, *[1] * (xi.dim() - 1)) * xi
                m["x_t"], m["target"] = q_sample(self.schedule, m["x0"], m["t"], m["eps"], delta, "original")
            if self.consistency:
                m["s"] = s[part]
                m["x_s"] = self._ode_step(m, m["x_t"])
            # a consistency model's perturbation moves the input only (no eps): its target follows from x_s
            m["perturbation"] = Perturbation(m["x_t"], None if self.consistency else m["eps"], m["c_noise"],
                                             self.cfg.adversarial(), self.noise)
            micro.append(m)
        return micro

    @torch.no_grad()
    def _ode_step(self, m, x):
        """x at timestep t moved to s by the teacher's ODE step (cd) or (ct) by the noise that x implies
        given x0: eps at the clean x_t, eps + delta / sqrt(1 - abar_t) at x_t + delta."""
        if self.teacher is None:
            c_noise = m["c_noise"].reshape(-1, *[1] * (x.dim() - 1))
            return cm.ode_step(lambda x, t: m["eps"] + (x - m["x_t"]) / c_noise, self.schedule, x, m["t"], m["s"])

        def teacher_eps(x, t):
            with self._autocast():
                out = self.teacher.model(x, t, m["y"])
            return split_output(out.float(), x, self.teacher.learn_sigma)[0]
        return cm.ode_step(teacher_eps, self.schedule, x, m["t"], m["s"], self.cfg.teacher_solver)

    def _consistency_loss(self, m, x_in, out):
        """Per-sample distance of the online f(x_in, t) to the target network's f(x_s, s)."""
        with torch.no_grad():
            with self._autocast():
                target = torch.func.functional_call(self.model, self.target_params, (m["x_s"], m["s"], m["y"]))
            target = cm.consistency_fn(self.schedule, target.float(), m["x_s"], m["s"], self.learn_sigma)
        online = cm.consistency_fn(self.schedule, out.float(), x_in, m["t"], self.learn_sigma)
        return cm.distance(online, target, self.cfg.loss_norm)

    def _replay(self, micro, update_parameters):
        """One forward/backward over the batch; returns the per-sample losses (detached)."""
        losses = []
        for j, m in enumerate(micro):
            x_in, target = m["perturbation"].inputs()
            sync = update_parameters and j == len(micro) - 1
            context = self.ddp.no_sync() if self.world > 1 and not sync else contextlib.nullcontext()
            with context, self._autocast():
                out = self.forward(x_in, m["t"], m["y"])
            if self.consistency:
                per_sample = self._consistency_loss(m, x_in, out)
            else:
                per_sample = diffusion_loss(self.schedule, out.float(), x_in, m["x0"], m["t"], target,
                                            self.learn_sigma)["loss"]
            loss = (per_sample * m["w"]).mean() * m["share"]
            if update_parameters:
                self.scaler.scale(loss).backward()
            else:   # PGD ascent step: input gradients only, parameters untouched
                shifted = target is not None and target.requires_grad
                grads = torch.autograd.grad(self.scaler.scale(loss), [x_in] + ([target] if shifted else []))
                x_in.grad = grads[0]
                if shifted:
                    target.grad = grads[1]
            m["inputs"] = (x_in, target)
            losses.append(per_sample.detach())
        return torch.cat(losses)

    def _optimizer_step(self, grad_scale):
        """One update of gradients carrying the loss scale ``grad_scale``; the EMAs follow only
        when the parameters moved (fp16: the scaler skips a step with non-finite gradients and
        lowers its scale, as ADM does). The step counts either way."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # outside autograd: no detached alias per tensor (~500 in ADM's model)
            if not self.scaler.is_enabled():
                for rate, ema in self.emas.items():
                    torch._foreach_lerp_(ema, self.params, 1 - rate)
            elif self.emas:
                # Whether the scaler skipped the step stays on the device, as the EMAs' weight (0 if
                # it did): reading it back would make the host wait for the GPU at every update.
                moved = (self.scaler._get_scale_async() >= grad_scale).reshape(()).float()
                for rate, ema in self.emas.items():
                    diff = torch._foreach_sub(self.params, ema)
                    torch._foreach_mul_(diff, moved * (1 - rate))
                    torch._foreach_add_(ema, diff)
        self.step += 1

    def _update_perturbations(self, micro, grad_scale):
        for m in micro:
            m["perturbation"].update(*m["inputs"], grad_scale=grad_scale)
            if self.consistency and self.cfg.adv_cm_target == "consistent":
                m["x_s"] = self._ode_step(m, m["perturbation"].x_in)

    def _record_losses(self, t, losses):
        """All ranks' per-sample losses, for a timestep sampler that learns from them (no gathering
        for one that does not). They go to the host without the host waiting for the GPU; the
        sampler takes them, in order, before it draws or its state is read (``_learn_losses``):
        what it draws is the same as with each replay's losses taken at once."""
        if not self.timesteps.learns_from_losses:
            return
        if self.world > 1:
            gathered_t, gathered_l = [torch.empty_like(t) for _ in range(self.world)], [
                torch.empty_like(losses) for _ in range(self.world)]
            dist.all_gather(gathered_t, t)
            dist.all_gather(gathered_l, losses)
            t, losses = torch.cat(gathered_t), torch.cat(gathered_l)
        self.unlearned_losses.append((to_host(t), to_host(losses)))

    def _learn_losses(self):
        """The recorded losses to the timestep sampler, oldest first (waits for their copies)."""
        for (t, t_copied), (losses, losses_copied) in self.unlearned_losses:
            t_copied()
            losses_copied()
            self.timesteps.update(t, losses)
        self.unlearned_losses.clear()

    def train_batch(self):
        """K replays of one batch (one for standard and DDPM-IP). Returns the last replay's mean loss
        and the count of samples whose ascent was skipped, as tensors on the device: reading them
        waits for the GPU, which the training loop does only at its log interval."""
        micro = self._micro_batches()
        t = torch.cat([m["t"] for m in micro])
        replays = self.cfg.replays
        for k in range(replays):
            update = self.cfg.mode != "pgd_at" or k == replays - 1
            losses = self._replay(micro, update)
            self._record_losses(t, losses)
            # fp16: the loss scale of this replay's gradients, as a device tensor (a copy: the
            # optimizer step updates the scaler's in place).
            grad_scale = self.scaler._get_scale_async().clone() if self.scaler.is_enabled() else 1.0
            if update:
                self._optimizer_step(grad_scale)
            if k < replays - 1:
                self._update_perturbations(micro, grad_scale)
        return losses.mean(), sum(m["perturbation"].skipped for m in micro)

    # -- the loop -----------------------------------------------------------------------------
    def train(self):
        """Train to ``total_steps`` updates, logging, sampling and saving on the way. A batch's
        free-AT replays are not split: the run ends at the first whole batch at or past it."""
        cfg = self.cfg
        per_batch = cfg.replays if cfg.mode == "free_at" else 1
        if cfg.total_steps > self.step and (cfg.total_steps - self.step) % per_batch:
            end = self.step + -(-(cfg.total_steps - self.step) // per_batch) * per_batch
            self.log(f"total_steps={cfg.total_steps}: free AT takes {per_batch} updates per batch, so training "
                     f"ends at step {end}")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            self._drop_metrics_after(self.step)
        self.tb = self._tensorboard()
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=self.rank != 0, desc=self.name, unit="update")
        start, last_save = time.perf_counter(), self.step
        def crossed(interval, before):   # did the last batch's updates pass a multiple of interval?
            return interval and self.step // interval != before // interval

        updates_in_window = 0
        with _stop_requests() as stop:
            while self.step < cfg.total_steps and not self._agree(stop):
                before = self.step
                self.window.append(self.train_batch())
                updates_in_window += self.step - before
                bar.update(self.step - before)
                if crossed(cfg.log_interval, before):   # reading the losses waits for the GPU: only here
                    elapsed = time.perf_counter() - start
                    mean = torch.stack([loss for loss, _ in self.window]).mean().item()
                    bar.set_postfix(loss=f"{mean:.4f}")
                    self._write_metrics({"step": self.step, "loss": mean,
                                         "skipped": int(sum(skipped for _, skipped in self.window)),
                                         "updates_per_s": updates_in_window / elapsed, "time": time.time()})
                    self.window, start, updates_in_window = [], time.perf_counter(), 0
                if crossed(cfg.sample_interval, before):
                    self.sample_grid()
                if self.step - last_save >= cfg.save_interval:
                    self.save()
                    last_save = self.step
        bar.close()
        if self.tb is not None:
            self.tb.close()
        self.save()
        if self.world > 1:
            dist.barrier()   # no rank exits (and has torchrun stop the others) before the checkpoint is written
        self.plot_losses()
        if stop:
            self.log(f"stopped by {stop[0]} at step {self.step}: checkpoint saved; rerun the same command to resume")
            raise KeyboardInterrupt(stop[0])
        self.sample_grid()
        return self.run_dir

    def _agree(self, stop):
        """Whether to stop now: a stop request on any rank stops all of them after the same batch."""
        if self.world == 1:
            return bool(stop)
        # A host flag where the process group takes host tensors (gloo): a flag on the GPU would make
        # every batch wait for the kernels queued before it (a process group of NCCL alone needs one).
        flag = torch.tensor([float(bool(stop))], device="cpu" if "gloo" in dist.get_backend() else self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop:
            stop.append("another rank")
        return bool(flag.item())

    def _tensorboard(self):
        """A SummaryWriter into <run_dir>/tensorboard (rank 0), or None when off or not installed."""
        if self.rank != 0 or not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)

    def _write_metrics(self, row):
        if self.rank != 0:
            return
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def ema_model(self, rate=None):
        """A copy of the model holding the EMA weights of ``rate`` (default: the first rate)."""
        rate = next(iter(self.emas)) if rate is None else rate
        model = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.emas[rate]):
                p.copy_(e)
        return model

    def sample_grid(self):
        """cfg.num_samples samples of the EMA model to <run_dir>/samples_<step>.png (rank 0)."""
        if self.rank != 0 or self.data.x.dim() != 4:
            return None
        from .evaluate import Loaded   # the sampling a checkpoint gets: diffusion or consistency
        loaded = Loaded(self.ema_model(), self.schedule, dataclasses.asdict(self.cfg), self.learn_sigma, self.step)
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        x_T = torch.randn((self.cfg.num_samples, *self.data.x.shape[1:]), generator=g).to(self.device)
        with torch.no_grad():
            x = loaded.sample(x_T.shape, self.cfg.sample_method, self.cfg.sample_steps, device=self.device, x_T=x_T)
        path = self.run_dir / f"samples_{self.step:07d}.png"
        save_image_grid(x, path)
        return path

    def plot_losses(self):
        """<run_dir>/loss.png from metrics.csv (rank 0; skipped without matplotlib)."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 20 else None)
        ax.set(xlabel="optimizer update", ylabel="training loss", title=f"{self.name} on {self.cfg.data}")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=120)
        plt.close(fig)
        return self.run_dir / "loss.png"


def train(config: TrainConfig):
    """Train (or resume) a run; returns its directory."""
    return Trainer(config).train()

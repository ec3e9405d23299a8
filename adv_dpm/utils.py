"""Small helpers: atomic writes, image grids, the CPU's name."""
import contextlib
import math
import os
import platform
import uuid
from pathlib import Path

import torch


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@contextlib.contextmanager
def atomic_open(path):
    """A binary file whose content replaces ``path`` only when the block completes: write to a
    temporary file beside it, fsync, rename. A crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the mode open() gives (umask applies)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CHECKPOINT_KEYS = {"config", "model_config", "model", "ema", "step"}


def checkpoint_file(path):
    """The checkpoint that ``path`` names: the file itself, or a run directory's checkpoint.pt."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() and (path / "checkpoint.pt").is_file() else path


def read_checkpoint(path, device="cpu"):
    """The state dict of a trainer checkpoint, or an error that says what is wrong with the file."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint: cannot read {path}, truncated or not a torch file? "
                         f"({e.__class__.__name__}: {e})") from e
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise ValueError(f"checkpoint: {path} is not an adv-dpm trainer checkpoint (checkpoint.pt of a run)")
    return state


def resolve_device(name):
    """torch.device for a device setting: 'auto' is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible"
        raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, {build})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def to_device(t, device):
    """``t`` on ``device``. From host memory to a GPU it goes through pinned memory, without the host
    waiting: a copy from pageable memory waits for every kernel queued before it, as a read-back does."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t):
    """(copy, wait): a host copy of ``t`` and a function that returns once the copy holds t's
    values. From a GPU the copy goes to pinned memory without the host waiting for the kernels
    queued before it; ``wait`` waits for them, so a caller can queue more work first."""
    if t.device.type != "cuda":
        return t.cpu(), lambda: None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied.synchronize


def atomic_save(obj, path):
    """torch.save to ``path`` atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def atomic_write(path, data):
    """Write ``data`` (str or bytes) to ``path`` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def save_image_grid(images, path, nrow=None):
    """(N, C, H, W) images in [-1, 1] as one PNG grid (atomically)."""
    from PIL import Image
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = x[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, 256 // max(grid.shape[1:]))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_open(path) as f:
        image.save(f, format="PNG")
    return Path(path)

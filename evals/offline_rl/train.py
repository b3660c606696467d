"""Train, save, resume and load Decision Transformers (Chen et al., 2021) for the D4RL locomotion tasks.

Training follows the DT paper and the Hugging Face example in its canonical configuration:
``transformers.DecisionTransformerModel`` with K = 20 timesteps of context, 3 layers, hidden size 128,
1 head, ReLU, dropout 0.1, a 1000-step timestep embedding, ``tanh`` actions, returns-to-go divided by
1000; AdamW (lr 1e-4, weight decay 1e-4), linear warmup then a constant rate, gradients clipped at 0.25;
the mean squared error of the predicted actions over the real (unpadded) steps of each segment.

Batches: a trajectory is drawn with probability proportional to its length, a start step uniformly
within it, and the (up to) K steps from there are left-padded to K with zeros and attention mask 0.
States are normalized with the dataset's mean and standard deviation (+1e-6); returns-to-go are the
undiscounted sums of the remaining rewards of the trajectory, divided by ``return_scale``.

Output folder of :func:`train_dt` (``namm-transfer rl train``)::

    config.json, model.safetensors   the model (``save_pretrained``; load with :func:`load_dt`)
    namm_transfer_dt.json           sidecar: env, state_mean / state_std, return_scale, target_return,
                                    context length, dataset metadata, training summary, last evaluation
    train_log.jsonl                 one line per logged step (step, loss, lr, seconds, ...) and per evaluation
    README.md                       the card, generated from the log and the sidecar (:func:`write_card`)
    checkpoints/step-NNNNNNN/       resumable state: model.safetensors, trainer_state.safetensors
                                    (optimizer moments, torch RNG) and trainer_state.json (step, optimizer
                                    hyperparameters, scheduler, numpy RNG, elapsed time). No pickle anywhere.

:func:`load_dt` reads these folders and the layout of the public Hugging Face checkpoints
(``edbeeching/decision-transformer-gym-{env}-{level}``: ``config.json`` plus ``pytorch_model.bin`` or
``model.safetensors``, without any state normalization), and the Decision Transformers shipped with the
package (``"shipped:hopper"``, in ``namm_transfer/weights/dt/{env}-{level}/``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from namm_transfer.results import atomic_write_text
from namm_transfer.run_folder import (
    LOG_FILE,
    RunConfig,
    TrainClock,
    TrainState,
    append_log,
    clean_json,
    fmt_number,
    latest_checkpoint,
    log_start,
    markdown_table,
    optimizer_from_flat,
    optimizer_to_flat,
    package_versions,
    read_checkpoint,
    read_log,
    resume_run,
    sha256_file,
    utc_now,
    write_checkpoint,
)

from .envs import ENVS, get_env_info

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import DecisionTransformerModel

__all__ = [
    "CANONICAL",
    "SIDECAR",
    "TrainConfig",
    "TrainResult",
    "TrajectorySampler",
    "build_dt",
    "latest_checkpoint",
    "load_dt",
    "resolve_dt",
    "ship_dt",
    "shipped_dt_dir",
    "train_dt",
    "write_card",
]

logger = logging.getLogger(__name__)

SIDECAR = "namm_transfer_dt.json"
"""Name of the sidecar file holding the state normalization and the evaluation settings of a DT."""
SIDECAR_FORMAT = "namm-transfer-dt/1"
CARD_FILE = "README.md"

CANONICAL: dict[str, Any] = {
    "context_length": 20,
    "n_layer": 3,
    "hidden_size": 128,
    "n_head": 1,
    "activation_function": "relu",
    "dropout": 0.1,
    "max_ep_len": 1000,
    "return_scale": 1000.0,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "warmup": 10_000,
    "grad_clip": 0.25,
    "batch_size": 64,
}
"""The DT paper's / Hugging Face example's configuration for the D4RL locomotion tasks."""

PAPER_MEDIUM_SCORES = {"hopper": 67.6, "halfcheetah": 42.6, "walker2d": 74.0}
"""DT paper, D4RL normalized scores on the original D4RL medium datasets (for the card only)."""

# buffers that old GPT-2 checkpoints saved and current transformers no longer keeps in the state dict
_HARMLESS_KEYS = re.compile(r"^(encoder\.)?h\.\d+\.attn\.(bias|masked_bias)$")


# ----------------------------------------------------------------------------------------------------------------
# configuration
TRAIN_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig(RunConfig):
    """Settings of one Decision Transformer training run (defaults: the canonical configuration)."""

    env: str = "hopper"
    """Task: hopper, halfcheetah or walker2d; ``hopper-po`` etc. for the positions-only tasks (:mod:`.pomdp`)."""
    level: str = "medium"
    """Dataset level (medium, medium-replay, expert); names the default dataset and the output."""
    dataset: str | None = None
    """D4RL-format HDF5 file; default ``dataset_path(env, level)`` (written by ``namm-transfer rl collect``)."""
    steps: int = 6_000
    """Gradient steps in total (a resumed run continues up to this number). 6,000 (the shipped DTs) take about
    45 min on one idle core here (~0.45 core-seconds per step); the DT paper trained 100k."""
    batch_size: int = 64
    context: int = 20
    """K, timesteps per training segment (and the canonical evaluation window). Long-context DTs use 200 or more
    (600+ tokens), up to ``max_ep_len`` for whole episodes, so that the cached rollout's long history is in
    their training distribution."""
    prefix_fraction: float = 0.0
    """Share of each batch's segments that start at their episode's first step (episode prefixes, the history a
    cached rollout holds); the others start uniformly within the episode. 0 (default): the canonical sampling."""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup: int = 1_000
    """Linear warmup steps (the DT paper: 10k of its 100k): lr * min(1, (step + 1) / warmup), constant afterwards."""
    grad_clip: float = 0.25
    hidden_size: int = 128
    n_layer: int = 3
    n_head: int = 1
    dropout: float = 0.1
    max_ep_len: int = 1000
    """Size of the timestep embedding (longest episode the model can act in)."""
    return_scale: float = 1000.0
    target_return: float | None = None
    """Evaluation return-to-go (unscaled); default: the DT paper's for the task."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    """Precision of the training forward pass: ``float32``, or ``bfloat16`` autocast (weights, optimizer state and
    the loss stay float32; the saved model is float32 either way)."""
    threads: int | None = None
    """torch CPU threads (None: leave torch's setting)."""
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 5000
    """Steps between canonical evaluations (0: only the final one)."""
    eval_episodes: int = 5
    eval_max_ep_len: int | None = None
    """Steps per evaluation episode (default: max_ep_len)."""
    final_eval: bool = True
    version: str = "v5"
    """Gymnasium MuJoCo version of the evaluation env."""

    def __post_init__(self) -> None:
        self.env = get_env_info(self.env).name
        for name in ("steps", "batch_size", "context", "hidden_size", "n_layer", "n_head", "max_ep_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("warmup must be >= 0 and log_every, checkpoint_every, keep_checkpoints >= 1")
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if not 0.0 <= self.prefix_fraction <= 1.0:
            raise ValueError(f"prefix_fraction must be in [0, 1], got {self.prefix_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.return_scale <= 0 or self.grad_clip <= 0:
            raise ValueError("lr, return_scale and grad_clip must be > 0")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.eval_max_ep_len is None:
            self.eval_max_ep_len = self.max_ep_len
        if self.eval_max_ep_len > self.max_ep_len:
            raise ValueError(f"eval_max_ep_len {self.eval_max_ep_len} exceeds max_ep_len {self.max_ep_len}")

    def resolved_target_return(self) -> float:
        return float(self.target_return if self.target_return is not None else get_env_info(self.env).target_return)


# identity of a run: a checkpoint may only be resumed by a run that agrees on these (a checkpoint written before
# dtype was a setting reads back as float32, which it was)
_IDENTITY = (
    "env",
    "level",
    "version",
    "batch_size",
    "context",
    "prefix_fraction",
    "lr",
    "weight_decay",
    "warmup",
    "grad_clip",
    "hidden_size",
    "n_layer",
    "n_head",
    "dropout",
    "max_ep_len",
    "return_scale",
    "seed",
    "dtype",
)


@dataclass
class TrainResult:
    """What :func:`train_dt` did."""

    output: Path
    step: int
    """Steps done so far (== config.steps when finished)."""
    finished: bool
    """False when stopped early (``stop_at``); the folder then holds a checkpoint to resume from."""
    losses: list[float] = field(default_factory=list)
    """Loss of every step run in this call, in order."""
    final_loss: float | None = None
    eval: dict[str, Any] | None = None
    steps_per_second: float | None = None
    resumed_from: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# model
def build_dt(state_dim: int, act_dim: int, config: TrainConfig | None = None) -> DecisionTransformerModel:
    """A randomly initialized ``DecisionTransformerModel`` in the configuration of ``config`` (canonical default).

    Uses the current torch RNG for the initialization.
    """
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    c = config or TrainConfig()
    cfg = DecisionTransformerConfig(
        state_dim=int(state_dim),
        act_dim=int(act_dim),
        hidden_size=c.hidden_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.hidden_size,
        activation_function="relu",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        max_ep_len=c.max_ep_len,
        action_tanh=True,
        n_positions=1024,
        bos_token_id=0,  # vocab_size is 1 (a DT has no vocabulary); GPT-2's 50256 only triggers warnings
        eos_token_id=0,
    )
    return DecisionTransformerModel(cfg)


# ----------------------------------------------------------------------------------------------------------------
# data
class TrajectorySampler:
    """Length-weighted K-step segments of a D4RL-format dataset, as tensors ready for the model.

    A segment is the (up to) K steps from its start: a step drawn uniformly within the trajectory, or, for a
    share ``prefix_fraction`` of the segments, the trajectory's first step (an episode prefix: what a cached
    rollout holds at each step). With K at least the longest trajectory a prefix is the whole episode.

    Args:
        data: flat dict in the D4RL layout (:func:`~.datasets.read_d4rl_hdf5`).
        context: K.
        return_scale: returns-to-go are divided by this.
        max_ep_len: timesteps are clipped to ``max_ep_len - 1``.
        state_mean, state_std: (state_dim,) normalization; default the dataset's (std + 1e-6).
        prefix_fraction: share of segments that start at step 0 (0: every start uniform, the canonical sampling;
            no random numbers are drawn for it then, so the canonical batches are unchanged).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        context: int = 20,
        return_scale: float = 1000.0,
        max_ep_len: int = 1000,
        state_mean: Any = None,
        state_std: Any = None,
        prefix_fraction: float = 0.0,
    ) -> None:
        from .datasets import dataset_stats, split_trajectories

        if not 0.0 <= prefix_fraction <= 1.0:
            raise ValueError(f"prefix_fraction must be in [0, 1], got {prefix_fraction}")
        self.prefix_fraction = float(prefix_fraction)
        trajs = [t for t in split_trajectories(data) if len(t["rewards"]) > 0]
        if not trajs:
            raise ValueError("the dataset holds no trajectory")
        self.stats = dataset_stats(trajs)
        self.state_mean = np.asarray(self.stats["state_mean"] if state_mean is None else state_mean, np.float32)
        self.state_std = np.asarray(self.stats["state_std"] if state_std is None else state_std, np.float32)
        self.context = int(context)
        self.return_scale = float(return_scale)
        self.max_ep_len = int(max_ep_len)
        lengths = np.array([len(t["rewards"]) for t in trajs], dtype=np.int64)
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.p = lengths / lengths.sum()
        states = np.concatenate([t["observations"] for t in trajs]).astype(np.float32)
        self.states = (states - self.state_mean) / self.state_std
        self.actions = np.concatenate([t["actions"] for t in trajs]).astype(np.float32)
        rtg = []
        for t in trajs:
            r = np.asarray(t["rewards"], dtype=np.float64)
            rtg.append(np.cumsum(r[::-1])[::-1])  # R_t = sum_{t' >= t} r_t'
        self.rtg = (np.concatenate(rtg) / self.return_scale).astype(np.float32)
        self.timesteps = np.concatenate([np.arange(n) for n in lengths]).clip(max=self.max_ep_len - 1)
        self.state_dim = self.states.shape[1]
        self.act_dim = self.actions.shape[1]
        self.num_trajectories = len(trajs)
        self.num_steps = int(lengths.sum())

    def sample(self, rng: np.random.Generator, batch_size: int, device: Any = "cpu") -> dict[str, torch.Tensor]:
        """One batch: ``states`` (B, W, state_dim), ``actions`` (B, W, act_dim), ``returns_to_go`` (B, W, 1),
        ``timesteps`` (B, W) long, ``attention_mask`` (B, W) long (left padding = 0), padded entries zero.

        W is the longest segment of the batch (at most K; K whenever one segment is K steps long): columns that
        would be padding in every row are left out, which saves long-context batches of short episodes most of
        their compute and changes no real token's output."""
        import torch

        k = self.context
        traj = rng.choice(len(self.lengths), size=batch_size, p=self.p)
        length = self.lengths[traj]
        start = (rng.random(batch_size) * length).astype(np.int64).clip(max=length - 1)
        if self.prefix_fraction > 0:
            start = np.where(rng.random(batch_size) < self.prefix_fraction, 0, start)
        n = np.minimum(k, length - start)  # real steps of each segment
        w = int(n.max())
        j = np.arange(w)[None, :]
        valid = j >= (w - n)[:, None]
        idx = self.offsets[traj][:, None] + start[:, None] + j - (w - n)[:, None]
        idx = np.where(valid, idx, 0)
        mask = valid.astype(np.int64)

        def take(a: np.ndarray) -> torch.Tensor:
            out = a[idx]
            out = out * valid.reshape(valid.shape + (1,) * (out.ndim - 2))
            return torch.from_numpy(np.ascontiguousarray(out)).to(device)

        return {
            "states": take(self.states),
            "actions": take(self.actions),
            "returns_to_go": take(self.rtg)[..., None],
            "timesteps": take(self.timesteps).long(),
            "attention_mask": torch.from_numpy(mask).to(device),
        }


def _load_dataset(cfg: TrainConfig) -> tuple[dict[str, Any], Path]:
    from .datasets import dataset_path, read_d4rl_hdf5
    from .pomdp import base_name, is_partial

    path = Path(cfg.dataset).expanduser() if cfg.dataset else dataset_path(cfg.env, cfg.level, cfg.version)
    partial = is_partial(cfg.env)
    how = (
        f"derive it with `namm-transfer rl derive-po --env {base_name(cfg.env)} --level {cfg.level}` (from the "
        f"dataset of `namm-transfer rl collect --env {base_name(cfg.env)} --level {cfg.level}`)"
        if partial
        else f"collect it with `namm-transfer rl collect --env {cfg.env} --level {cfg.level}`"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {path} does not exist; {how} or pass --dataset PATH (a D4RL-format HDF5 file)"
        )
    data = read_d4rl_hdf5(path)
    info = get_env_info(cfg.env)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    if (obs_dim, act_dim) != (info.state_dim, info.act_dim):
        hint = f"; {how}" if partial else "; is it a dataset of another task?"
        raise ValueError(
            f"dataset {path} has observations of size {obs_dim} and actions of size {act_dim}, but {cfg.env} needs "
            f"{info.state_dim} and {info.act_dim}{hint}"
        )
    meta_env = (data.get("metadata") or {}).get("env_name")
    if meta_env:
        try:
            same = get_env_info(str(meta_env)).name == cfg.env
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"dataset {path} was collected on {meta_env!r}, not {cfg.env!r}")
    return data, path


# ----------------------------------------------------------------------------------------------------------------
# resumable checkpoints (safetensors + JSON, never pickle)
def _save_checkpoint(
    output: Path, step: int, st: TrainState, cfg: TrainConfig, train_seconds: float, data_sha256: str
) -> Path:
    import torch
    from safetensors.torch import save_file

    def write(folder: Path) -> dict[str, Any]:
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in st.model.state_dict().items()},
            str(folder / "model.safetensors"),
        )
        opt_tensors, opt_meta = optimizer_to_flat(st.optimizer)
        tensors = dict(opt_tensors)
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and str(cfg.device).startswith("cuda"):
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.torch_cuda.{i}"] = s.cpu()
        save_file(tensors, str(folder / "trainer_state.safetensors"))
        return {
            "format": "namm-transfer-dt-checkpoint/1",
            "step": step,
            "config": cfg.to_dict(),
            "dataset_sha256": data_sha256,
            "optimizer": opt_meta,
            "scheduler": st.scheduler.state_dict(),  # lr_lambdas is [None]: the lambda is rebuilt from the config
            "numpy_rng": clean_json(st.rng.bit_generator.state),
            "created": utc_now(),
            "train_seconds": train_seconds,
        }

    return write_checkpoint(output, step, cfg.keep_checkpoints, write)


def _load_checkpoint(path: Path, st: TrainState, cfg: TrainConfig, data_path: Path, data_sha256: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state = read_checkpoint(path, cfg, _IDENTITY, "delete the folder")
    saved_sha = state.get("dataset_sha256")  # absent in checkpoints written before it was recorded
    if saved_sha is not None and saved_sha != data_sha256:
        raise ValueError(
            f"checkpoint {path} was trained on another dataset (sha256 {saved_sha[:16]}...) than {data_path} "
            f"(sha256 {data_sha256[:16]}...); pass the dataset it was trained on, or use another --output or "
            "delete the folder to start afresh"
        )
    weights = load_file(str(path / "model.safetensors"))
    st.model.load_state_dict(weights, strict=True)
    tensors = load_file(str(path / "trainer_state.safetensors"))
    optimizer_from_flat(st.optimizer, tensors, state["optimizer"])
    st.scheduler.load_state_dict(dict(state["scheduler"]))
    st.rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.torch_cuda.")]
    if cuda_states and torch.cuda.is_available() and str(cfg.device).startswith("cuda"):
        torch.cuda.set_rng_state_all(cuda_states)
    return state


# ----------------------------------------------------------------------------------------------------------------
# training
def _evaluate(model: Any, cfg: TrainConfig, mean: np.ndarray, std: np.ndarray, device: str) -> dict[str, Any]:
    from .rollout import run_episodes

    t0 = time.perf_counter()
    res = run_episodes(
        model,
        cfg.env,
        cfg.eval_episodes,
        mode="canonical",
        target_return=cfg.resolved_target_return(),
        state_mean=mean,
        state_std=std,
        return_scale=cfg.return_scale,
        max_ep_len=int(cfg.eval_max_ep_len or cfg.max_ep_len),
        seed=cfg.seed,
        device=device,
        context_length=cfg.context,
        version=cfg.version,
    )
    return {
        "normalized_score": res["score"],
        "normalized_score_std": res["score_std"],
        "return_mean": res["return_mean"],
        "returns": res["returns"],
        "lengths": res["lengths"],
        "episodes": cfg.eval_episodes,
        "max_ep_len": cfg.eval_max_ep_len,
        "seeds": [cfg.seed + i for i in range(cfg.eval_episodes)],
        "target_return": cfg.resolved_target_return(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train_dt(
    config: TrainConfig,
    output: str | os.PathLike[str],
    *,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a Decision Transformer; resumable, see the module docstring for the output folder.

    Args:
        config: the run's settings.
        output: output folder (created). If it holds a checkpoint of the same run, training resumes from the
            newest one (``resume=True``); a checkpoint of a different run (other seed, sizes, ...) is an error.
        resume: False starts afresh (existing checkpoints and log are removed).
        stop_at: stop once this step is reached, leaving a checkpoint and no final model (time-sliced runs; a
            later call resumes). The result then has ``finished=False``.
        progress: show a tqdm progress bar.
        on_step: called as ``on_step(step, loss)`` after every step (``step`` counts from 1).

    Returns:
        A :class:`TrainResult`. When finished, the folder holds the model (``save_pretrained``), the
        sidecar, the log and the card.

    Raises:
        FileNotFoundError: no dataset. DatasetFormatError: a malformed dataset. ValueError: a dataset of another
        task, or a checkpoint of another run.
    """
    import torch

    cfg = config
    out = Path(output).expanduser()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    data, data_path = _load_dataset(cfg)
    data_sha256 = sha256_file(data_path)
    sampler = TrajectorySampler(
        data, cfg.context, cfg.return_scale, cfg.max_ep_len, prefix_fraction=cfg.prefix_fraction
    )
    stats = sampler.stats
    device = torch.device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model: Any = build_dt(sampler.state_dim, sampler.act_dim, cfg)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    st = TrainState(model, opt, sched, rng)
    step, elapsed = resume_run(out, lambda ckpt: _load_checkpoint(ckpt, st, cfg, data_path, data_sha256), resume)
    resumed_from = step or None
    if step == 0:
        log_start(
            log_path,
            {
                "config": cfg.to_dict(),
                "dataset": str(data_path),
                "num_trajectories": sampler.num_trajectories,
                "num_steps": sampler.num_steps,
                "time": utc_now(),
            },
        )

    target = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    losses: list[float] = []
    window: list[float] = []
    last_eval: dict[str, Any] | None = None
    bar = None
    if progress and step < target:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.env}", unit="step", dynamic_ncols=True)
    model.train()
    clock = TrainClock(elapsed)
    try:
        while step < target:
            batch = sampler.sample(rng, cfg.batch_size, device)
            lr = opt.param_groups[0]["lr"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                out_ = model(
                    states=batch["states"],
                    actions=batch["actions"],
                    rewards=None,
                    returns_to_go=batch["returns_to_go"],
                    timesteps=batch["timesteps"],
                    attention_mask=batch["attention_mask"],
                    return_dict=True,
                )
            mask = batch["attention_mask"].bool()
            loss = ((out_.action_preds.float() - batch["actions"]) ** 2)[mask].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
            losses.append(value)
            window.append(value)
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                bar.update(1)
            elapsed = clock.tick()
            if step % cfg.log_every == 0 or step == target:
                entry = {
                    "step": step,
                    "loss": value,
                    "loss_avg": float(np.mean(window)),
                    "lr": lr,
                    "seconds": round(elapsed, 3),
                    "steps_per_second": round(step / elapsed, 3) if elapsed > 0 else None,
                }
                append_log(log_path, entry)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss_avg']:.4f}", lr=f"{lr:.2e}")
                window = []
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                last_eval = _evaluate(model, cfg, sampler.state_mean, sampler.state_std, str(device))
                model.train()
                append_log(log_path, {"step": step, "event": "eval", **last_eval})
                logger.info("%s step %d: normalized score %.1f", cfg.env, step, last_eval["normalized_score"])
                clock.skip()
            if step % cfg.checkpoint_every == 0 or step == target:
                _save_checkpoint(out, step, st, cfg, elapsed, data_sha256)
                clock.skip()
    finally:
        if bar is not None:
            bar.close()

    final_loss = losses[-1] if losses else _last_loss(log_path)
    sps = step / elapsed if elapsed > 0 else None
    if step < cfg.steps:
        return TrainResult(out, step, False, losses, final_loss, last_eval, sps, resumed_from)

    # finished: final evaluation, model, sidecar, card
    model.eval()
    if cfg.final_eval and cfg.eval_episodes > 0:
        evaluated = [e for e in read_log(log_path) if e.get("event") == "eval" and e.get("step") == step]
        if evaluated:
            last_eval = {k: v for k, v in evaluated[-1].items() if k not in ("step", "event")}
        else:
            last_eval = _evaluate(model, cfg, sampler.state_mean, sampler.state_std, str(device))
            append_log(log_path, {"step": step, "event": "eval", **last_eval})
            logger.info("%s final: normalized score %.1f", cfg.env, last_eval["normalized_score"])
    model.to("cpu").save_pretrained(str(out), safe_serialization=True)
    weights = out / "model.safetensors"
    sidecar = {
        "format": SIDECAR_FORMAT,
        "env": cfg.env,
        "level": cfg.level,
        "gym_id": get_env_info(cfg.env).gym_id(cfg.version),
        "state_dim": sampler.state_dim,
        "act_dim": sampler.act_dim,
        "state_mean": sampler.state_mean.tolist(),
        "state_std": sampler.state_std.tolist(),
        "return_scale": cfg.return_scale,
        "target_return": cfg.resolved_target_return(),
        "context_length": cfg.context,
        "max_ep_len": cfg.max_ep_len,
        "dataset": {
            "path": str(data_path),
            "sha256": data_sha256,
            "num_trajectories": sampler.num_trajectories,
            "num_steps": sampler.num_steps,
            "return_mean": stats["return_mean"],
            "return_std": stats["return_std"],
            "normalized_return_mean": float(get_env_info(cfg.env).normalized_score(stats["return_mean"])),
            "metadata": data.get("metadata") or {},
        },
        "training": {
            "steps": step,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "warmup": cfg.warmup,
            "grad_clip": cfg.grad_clip,
            "dropout": cfg.dropout,
            "seed": cfg.seed,
            "device": str(device),
            "final_loss": final_loss,
            "seconds": round(elapsed, 1),
            "steps_per_second": round(sps, 3) if sps else None,
            "config": cfg.to_dict(),
        },
        "eval": last_eval,
        "content_hash": sha256_file(weights),
        "weights": weights.name,
        "created": utc_now(),
        "versions": package_versions("namm-transfer", "torch", "transformers", "gymnasium", "mujoco"),
    }
    atomic_write_text(out / SIDECAR, json.dumps(clean_json(sidecar), indent=2) + "\n")
    write_card(out)
    logger.info("%s: trained %d steps -> %s", cfg.env, step, out)
    return TrainResult(out, step, True, losses, final_loss, last_eval, sps, resumed_from)


def _last_loss(log_path: Path) -> float | None:
    for e in reversed(read_log(log_path)):
        if "loss" in e:
            return float(e["loss"])
    return None


# ----------------------------------------------------------------------------------------------------------------
# card
def write_card(folder: str | os.PathLike[str], name: str | None = None, run_folder: str | None = None) -> Path:
    """Write ``README.md`` of a trained DT folder from its ``namm_transfer_dt.json`` and ``train_log.jsonl``.

    ``name``: the shipped name (``rl train --ship-name``, e.g. ``hopper-medium-long``), which the title and the
    loading example use; ``None``: ``{env}-{level}``. ``run_folder``: the run folder the model was trained in, for
    the loading example (default: this folder's path as given).
    """
    folder = Path(folder)
    side = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    log = read_log(folder / LOG_FILE)
    env, level = side["env"], side.get("level", "?")
    tr = side.get("training") or {}
    ds = side.get("dataset") or {}
    meta = ds.get("metadata") or {}
    ev = side.get("eval") or {}
    c = tr.get("config") or {}
    canonical = all(
        c.get(k) == v
        for k, v in (
            ("context", 20),
            ("n_layer", 3),
            ("hidden_size", 128),
            ("n_head", 1),
            ("dropout", 0.1),
            ("max_ep_len", 1000),
            ("return_scale", 1000.0),
        )
    )
    name = name or f"{env}-{level}"
    lines = [
        f"# Decision Transformer: {name}",
        "",
        f"A `transformers.DecisionTransformerModel` trained by `namm-transfer rl train`: K = {c.get('context')}, "
        f"{c.get('n_layer')} layers, hidden {c.get('hidden_size')}, {c.get('n_head')} head(s), ReLU, dropout "
        f"{c.get('dropout')}, max_ep_len {c.get('max_ep_len')}, returns scaled by {c.get('return_scale')} "
        f"({'the canonical configuration of the DT paper' if canonical else 'not the canonical configuration'}).",
    ]
    if c.get("prefix_fraction"):
        lines += [
            "",
            f"Long context: {c.get('prefix_fraction')} of the training segments are episode prefixes (from the "
            "episode's first step), the history a cached rollout holds; the others start anywhere in an episode.",
        ]
    if "-po" in str(env):
        lines += ["", "Partially observable task: the observations are the joint positions only (velocities removed)."]
    lines += [
        "",
        "## Data",
        f"- dataset: `{Path(ds.get('path', '?')).name}` (sha256 `{str(ds.get('sha256', '?'))[:16]}...`)",
        f"- {ds.get('num_trajectories', '?')} trajectories, {ds.get('num_steps', '?')} transitions; behaviour "
        f"return {fmt_number(ds.get('return_mean'))} +- {fmt_number(ds.get('return_std'))} "
        f"(D4RL normalized {fmt_number(ds.get('normalized_return_mean'))})",
    ]
    if meta.get("behaviour_policy"):
        lines.append(f"- behaviour policy: {meta['behaviour_policy']}, {meta.get('gym_id', '')}")
    lines += [
        "",
        "## Training",
        f"- {tr.get('steps', '?')} steps, batch {tr.get('batch_size', '?')}, AdamW lr {tr.get('lr')} "
        f"(linear warmup {tr.get('warmup')} steps), weight decay {tr.get('weight_decay')}, grad clip "
        f"{tr.get('grad_clip')}, seed {tr.get('seed')}",
        f"- final loss {fmt_number(tr.get('final_loss'), 4)}; {fmt_number(tr.get('seconds'), 0)} s on "
        f"{tr.get('device')} ({fmt_number(tr.get('steps_per_second'), 2)} steps/s)",
        "",
        f"## Evaluation ({'canonical ' if c.get('context') == 20 else ''}K-step window, K = {c.get('context')})",
    ]
    if c.get("prefix_fraction"):
        lines += [
            "",
            "Scored by `rl train`'s own evaluation, the model's K-step window. Its cached long-history score (every "
            "step since the episode's first, the mode memory policies manage) is measured by `namm-transfer eval "
            f"--target decision-transformer --model shipped:{name}`.",
            "",
        ]
    evals = [e for e in log if e.get("event") == "eval"]
    if evals:
        lines += markdown_table(
            ["step", "D4RL normalized score", "return", "episodes"],
            [
                [
                    e["step"],
                    f"{fmt_number(e.get('normalized_score'))} +- {fmt_number(e.get('normalized_score_std'))}",
                    fmt_number(e.get("return_mean")),
                    e.get("episodes"),
                ]
                for e in evals
            ],
        )
    else:
        lines.append("- not evaluated")
    if ev:
        lines += [
            "",
            f"Final: **{fmt_number(ev.get('normalized_score'))} +- {fmt_number(ev.get('normalized_score_std'))}** "
            f"D4RL normalized score over {ev.get('episodes')} episodes (seeds {ev.get('seeds')}), target return "
            f"{ev.get('target_return')}, at most {ev.get('max_ep_len')} steps.",
        ]
    paper = PAPER_MEDIUM_SCORES.get(env)
    if paper is not None and level == "medium":
        lines += [
            f"For reference, the DT paper reports {paper} on the original D4RL {env}-medium dataset; this model was "
            "trained on the project's own data (see Data) and usually for fewer steps, so the numbers are not "
            "directly comparable.",
        ]
    losses = [e for e in log if "loss" in e]
    if losses:
        marks = sorted({losses[int(round(i * (len(losses) - 1) / 10))]["step"] for i in range(11)})
        by_step = {e["step"]: e for e in losses}
        lines += ["", "## Loss"]
        lines += markdown_table(
            ["step", "loss (mean since last log)", "lr"],
            [
                [s, fmt_number(by_step[s].get("loss_avg", by_step[s].get("loss")), 4), f"{by_step[s].get('lr', 0):.2e}"]
                for s in marks
            ],
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from namm_transfer.evals.offline_rl import load_dt",
        "",
        "# the copy shipped with the package (`rl train --ship`)",
        f'model, info = load_dt("shipped:{name}")',
        "# or the run folder it was trained in",
        f'model, info = load_dt("{run_folder or folder.as_posix()}")',
        "```",
        "",
        f"State normalization, return scale and target return are in `{SIDECAR}`.",
        "",
    ]
    path = folder / CARD_FILE
    atomic_write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------------------------
# shipped models and loading
def shipped_dt_dir() -> Path:
    """``namm_transfer/weights/dt``: where the Decision Transformers shipped with the package live."""
    import namm_transfer

    return Path(namm_transfer.__file__).resolve().parent / "weights" / "dt"


SHIP_FILES = ("config.json", "model.safetensors", SIDECAR, CARD_FILE, LOG_FILE)


def ship_dt(folder: str | os.PathLike[str], name: str | None = None) -> Path:
    """Copy a trained DT (model, sidecar, log; no checkpoints) to ``shipped_dt_dir()/name``, with its card
    written for that name.

    ``name`` defaults to ``{env}-{level}`` from the sidecar. Returns the shipped folder.
    """
    folder = Path(folder)
    side = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    name = name or f"{side['env']}-{side.get('level', 'medium')}"
    dest = shipped_dt_dir() / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in SHIP_FILES:
        if (folder / f).is_file():
            shutil.copy2(folder / f, dest / f)
    write_card(dest, name=name, run_folder=folder.as_posix())  # the card names the shipped model
    logger.info("shipped %s -> %s", folder, dest)
    return dest


def _missing_shipped(env: str, level: str, where: Path) -> FileNotFoundError:
    base = env.removesuffix("-po")
    collect = f"`namm-transfer rl collect --env {base} --level {level}`"
    if base != env:  # a positions-only task trains on a dataset derived from the fully observed one
        collect += f", `namm-transfer rl derive-po --env {env} --level {level}`"
    return FileNotFoundError(
        f"no shipped Decision Transformer for {env}-{level} (looked in {where}). Train one with {collect} and "
        f"then `namm-transfer rl train --env {env} --level {level} --ship`, or pass a model folder or hub id with "
        "--model (training/dt-long.sh runs these steps)"
    )


def resolve_dt(spec: str | os.PathLike[str] | None, env: str | None = None, level: str = "medium") -> str:
    """Turn a ``--model`` value into a model source for one env.

    Accepted: None / ``"shipped"`` (the shipped DT of ``env``), ``"shipped:ENV[-LEVEL]"``, per-env lists
    ``"hopper=PATH,walker2d=PATH"``, templates with ``{env}`` (``"edbeeching/decision-transformer-gym-{env}-medium"``),
    or one path / hub id used as is.
    """
    if spec is None:
        spec = "shipped"
    text = os.fspath(spec)
    if "=" in text and not Path(text).exists():
        table: dict[str, str] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"--model {text!r}: give every entry as ENV=PATH (got {part!r})")
            key, value = part.split("=", 1)
            table[get_env_info(key.strip()).name] = value.strip()
        if env is None:
            raise ValueError(f"--model {text!r} lists models per env; say which env")
        name = get_env_info(env).name
        if name not in table:
            raise ValueError(f"--model {text!r} has no entry for {name}; add {name}=PATH")
        return resolve_dt(table[name], env, level)
    if "{env}" in text:
        if env is None:
            raise ValueError(f"--model {text!r} is a template; say which env")
        return text.replace("{env}", get_env_info(env).name)
    if text == "shipped":
        if env is None:
            raise ValueError("'shipped' needs an env (or use 'shipped:hopper')")
        return f"shipped:{get_env_info(env).name}-{level}"
    return text


def _shipped_folder(spec: str, env: str | None, level: str) -> tuple[Path, str, str]:
    rest = spec.split(":", 1)[1].strip() or (env or "")
    if not rest:
        raise ValueError("'shipped:' needs a task name, e.g. 'shipped:hopper'")
    from .pomdp import lookup

    partial = lookup(rest)
    if partial is not None:  # "hopper-po-medium": the task is two words
        name, tail = partial.name, rest[len(partial.name) + 1 :]
    else:
        parts = rest.split("-", 1)
        name, tail = get_env_info(parts[0]).name, parts[1] if len(parts) > 1 else ""
    lvl = tail or level
    root = shipped_dt_dir()
    return root / f"{name}-{lvl}", name, lvl


def _infer_env(text: str) -> str | None:
    from .pomdp import PO_ENVS

    low = text.lower()
    for table in (PO_ENVS, ENVS):  # "hopper-po" before "hopper", which it contains
        hits = [name for name in table if re.search(rf"(^|[^a-z]){name}([^a-z]|$)", low)]
        if hits:
            return hits[0] if len(hits) == 1 else None
    return None


def _stats_from(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / SIDECAR
        data = json.loads(path.read_text(encoding="utf-8"))
    if "state_mean" not in data or "state_std" not in data:
        raise ValueError(f"normalization source {source!r} has no state_mean / state_std")
    return data


def load_dt(
    path_or_id: str | os.PathLike[str],
    *,
    env: str | None = None,
    level: str = "medium",
    stats: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    dataset: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[DecisionTransformerModel, dict[str, Any]]:
    """Load a Decision Transformer and what is needed to act with it.

    Args:
        path_or_id: a folder written by :func:`train_dt` (or any folder with ``config.json`` and
            ``model.safetensors`` or ``pytorch_model.bin``, the layout of ``edbeeching/decision-transformer-gym-*``),
            ``"shipped:ENV"`` / ``"shipped:ENV-LEVEL"`` (a DT shipped with the package), ``"shipped"`` with
            ``env``, or a Hugging Face hub id (downloaded with ``huggingface_hub``; needs a network).
            ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)`` only.
        env: the task the model is for; checked against the checkpoint's state / action sizes. Default: the
            sidecar's, else a task named in the path, else the only task with the checkpoint's sizes.
        level: dataset level of ``"shipped"`` names and of the default dataset.
        stats: state normalization: a sidecar-style JSON file (or a folder holding ``namm_transfer_dt.json``) or
            a dict with ``state_mean`` and ``state_std`` (optionally ``return_scale``, ``target_return``,
            ``context_length``). Overrides the folder's own sidecar.
        dataset: a D4RL-format file to compute the normalization from (when there is no sidecar and no ``stats``).
            Without either, the default dataset of ``env`` is used if it exists (with a warning).
        device, dtype: where and in what precision the model is returned (eval mode).

    Returns:
        ``(model, info)``: info holds ``source``, ``path``, ``format`` (``"namm-transfer"`` or ``"hf"``),
        ``weights`` (file name), ``content_hash`` (sha256 of the weights file), ``env``, ``state_mean`` /
        ``state_std`` ((state_dim,) float64 arrays), ``stats_source``, ``return_scale``, ``target_return``,
        ``context_length``, ``max_ep_len``, ``state_dim``, ``act_dim`` and ``sidecar`` (the sidecar dict or None).

    Raises:
        FileNotFoundError: nothing found (for shipped names: the commands that create it).
        ValueError: unreadable or mismatched weights, sizes that do not match ``env``, no normalization available.
    """
    import torch
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    text = os.fspath(path_or_id)
    if text == "shipped" or text.startswith("shipped:"):
        if text == "shipped":
            if env is None:
                raise ValueError("load_dt('shipped') needs env=...")
            text = f"shipped:{get_env_info(env).name}"
        folder, shipped_env, shipped_level = _shipped_folder(text, env, level)
        if not (folder / "config.json").is_file():
            raise _missing_shipped(shipped_env, shipped_level, folder)
        env = env or shipped_env
        source_kind = "shipped"
    else:
        folder = Path(text).expanduser()
        source_kind = "path"
        if folder.is_file() and folder.name == "config.json":
            folder = folder.parent
        elif folder.is_file():
            folder = folder.parent
        if not folder.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
                folder = _download(text)
                source_kind = "hub"
            else:
                raise FileNotFoundError(
                    f"no Decision Transformer at {folder}: give a folder with config.json and model.safetensors "
                    "(or pytorch_model.bin), 'shipped:ENV', or a Hugging Face hub id"
                )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a Decision Transformer folder: {config_path} is missing")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from err
    if raw.get("model_type") not in (None, "decision_transformer"):
        raise ValueError(
            f"{config_path} describes a {raw.get('model_type')!r} model, not a Decision Transformer "
            "(model_type 'decision_transformer')"
        )
    config = DecisionTransformerConfig.from_pretrained(str(folder))

    # weights
    st_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st_file.is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(st_file))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"cannot read {st_file} ({err}); the file is corrupt or truncated") from err
        weights_file = st_file
    elif bin_file.is_file():
        try:
            state = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"cannot read {bin_file} safely ({err}); only plain tensor state dicts are loaded "
                "(torch.load with weights_only=True)"
            ) from err
        if not isinstance(state, Mapping):
            raise ValueError(f"{bin_file} holds a {type(state).__name__}, not a state dict of tensors")
        weights_file = bin_file
    else:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")
    sidecar_path = folder / SIDECAR
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.is_file() else None

    # which env, and do the sizes match it
    state_dim, act_dim = int(config.state_dim), int(config.act_dim)
    if env is None and sidecar:
        env = sidecar.get("env")
    if env is None:
        env = _infer_env(text) or _infer_env(folder.name)
    if env is None:
        from .pomdp import PO_ENVS

        tasks = {**ENVS, **PO_ENVS}
        matches = [n for n, i in tasks.items() if (i.state_dim, i.act_dim) == (state_dim, act_dim)]
        env = matches[0] if len(matches) == 1 else None
    if env is not None:
        info_env = get_env_info(env)
        env = info_env.name
        if (state_dim, act_dim) != (info_env.state_dim, info_env.act_dim):
            raise ValueError(
                f"the Decision Transformer at {folder} has state_dim={state_dim} and act_dim={act_dim}, but {env} "
                f"has observations of size {info_env.state_dim} and actions of size {info_env.act_dim}; use a "
                f"model trained on {env}"
            )
    if sidecar and sidecar.get("env") and env is not None and get_env_info(sidecar["env"]).name != env:
        raise ValueError(f"the Decision Transformer at {folder} was trained on {sidecar['env']}, not {env}")

    model: Any = DecisionTransformerModel(config)
    state = {k: v for k, v in state.items() if not _HARMLESS_KEYS.match(k)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"the weights in {weights_file} do not fit the model of {config_path}: {err}") from err
    missing = [k for k in missing if not _HARMLESS_KEYS.match(k)]
    if missing or unexpected:
        raise ValueError(
            f"the weights in {weights_file} do not fit a DecisionTransformerModel with {config_path}: missing "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{weights_file}: tensor {name} contains NaN or inf")

    # normalization
    norm: dict[str, Any] | None = None
    stats_source = None
    if stats is not None:
        norm, stats_source = _stats_from(stats), f"stats:{stats if not isinstance(stats, Mapping) else 'dict'}"
    elif sidecar is not None and "state_mean" in sidecar:
        norm, stats_source = sidecar, "sidecar"
    else:
        data_file = Path(dataset).expanduser() if dataset is not None else None
        if data_file is None and env is not None:
            from .datasets import dataset_path

            candidate = dataset_path(env, level)
            if candidate.is_file():
                data_file = candidate
                logger.warning(
                    "%s has no state normalization; computing it from the local dataset %s. A model trained on the "
                    "original D4RL data needs D4RL's statistics: pass stats=JSON for it",
                    folder,
                    candidate,
                )
        if data_file is not None:
            from .datasets import dataset_stats, read_d4rl_hdf5, split_trajectories

            ds = dataset_stats(split_trajectories(read_d4rl_hdf5(data_file)))
            norm, stats_source = {"state_mean": ds["state_mean"], "state_std": ds["state_std"]}, f"dataset:{data_file}"
    if norm is None:
        raise ValueError(
            f"the Decision Transformer at {folder} carries no state normalization (no {SIDECAR}); Hugging Face "
            "checkpoints do not store it. Pass stats=JSON / --stats JSON (a file with state_mean and state_std of "
            "the model's training data) or dataset=PATH / --dataset PATH (a D4RL-format file to compute them from)"
        )
    mean = np.asarray(norm["state_mean"], dtype=np.float64).reshape(-1)
    std = np.asarray(norm["state_std"], dtype=np.float64).reshape(-1)
    if mean.shape != (state_dim,) or std.shape != (state_dim,):
        raise ValueError(
            f"state normalization from {stats_source} has sizes {mean.shape[0]} / {std.shape[0]}, the model's "
            f"state_dim is {state_dim}"
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError(f"state normalization from {stats_source} is not finite and positive")
    target_return = norm.get("target_return") or (sidecar or {}).get("target_return")
    if target_return is None and env is not None:
        target_return = get_env_info(env).target_return

    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    info: dict[str, Any] = {
        "source": text if source_kind != "shipped" else f"shipped:{folder.name}",
        "kind": source_kind,
        "path": str(folder),
        "format": "namm-transfer" if sidecar else "hf",
        "weights": weights_file.name,
        "content_hash": sha256_file(weights_file),
        "env": env,
        "state_dim": state_dim,
        "act_dim": act_dim,
        "max_ep_len": int(config.max_ep_len),
        "state_mean": mean,
        "state_std": std,
        "stats_source": stats_source,
        "return_scale": float(norm.get("return_scale") or (sidecar or {}).get("return_scale") or 1000.0),
        "target_return": None if target_return is None else float(target_return),
        "context_length": int(norm.get("context_length") or (sidecar or {}).get("context_length") or 20),
        "sidecar": sidecar,
    }
    logger.info("loaded Decision Transformer %s (%s, sha256 %s)", info["source"], env, info["content_hash"][:12])
    return model, info


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            hub_id, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin", SIDECAR, "*.md"]
        )
    except Exception as err:  # offline, unknown repo, ...
        raise FileNotFoundError(
            f"could not download the Decision Transformer {hub_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}); without a network pass a local folder (config.json + weights) or a shipped model"
        ) from err
    return Path(path)

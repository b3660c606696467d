"""CMA-ES evolution of a NAMM (pycma), with incremental stages and exact resumption.

Defaults follow the paper: population 32, elite ratio 0.5 (``mu = 16``), initial sigma 0.065,
initial mean 0, and the deployed model is the CMA-ES *mean*. The full 4,172 x 4,172 covariance
learns slowly at this population and its state is ~282 MB, so the separable (diagonal) variant
is the default here (``separable=True``); ``separable=False`` gives full CMA-ES.

Resumption without pickles. A run directory holds ``run.json`` (settings), ``log.jsonl`` (one
line per generation: the fitness of every member and a hash of the resulting mean),
``normalization.safetensors`` (the frozen feature statistics), an optional ``init.safetensors``
(warm-start mean) and ``namm/`` (the current mean as a NAMM checkpoint). On restart the CMA-ES
state is rebuilt by replaying ``ask``/``tell`` with the logged fitness values from the same seed:
pycma draws its samples from a seeded NumPy generator, so the replay reproduces the state
bit for bit; the logged hash of every mean is checked on the way. The state that travels
between machines is therefore a few kilobytes plus the log, and no file is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_namm
from ..namm import NAMM, NAMMConfig
from ..policies.namm_policy import NAMMPolicy
from ..results import atomic_write_bytes, atomic_write_text
from ..session import attach
from .fitness import RETAINED_MEASURE, EncodedPrompt, FitnessConfig, FitnessEvaluator, GenerationResult

__all__ = ["StageConfig", "EvolutionConfig", "Evolution", "estimate_normalization", "pool_key"]

logger = logging.getLogger(__name__)


@dataclass
class StageConfig:
    tasks: list[str]
    generations: int
    lengths: list[int] | None = None
    """The stage's prompt lengths (tokens): its prompts come from the pools ``pool_key(task, lengths)``. None: the
    run's default pools, keyed by the task name alone (the command line's ``--lengths``)."""


def pool_key(task: str, lengths: list[int] | None) -> str:
    """The key of a task's prompt pool at the given lengths (``task`` for the default pool, else ``task@L1,L2``)."""
    return task if lengths is None else f"{task}@{','.join(str(n) for n in lengths)}"


@dataclass
class EvolutionConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(["passkey"], 10)])
    population: int = 32
    elite_ratio: float = 0.5
    sigma0: float = 0.065
    separable: bool = True
    length_normalized_features: bool = False
    """``NAMMConfig.length_normalized_features`` of the run's NAMM (outside the spec; False is the paper's)."""
    seed: int = 1
    prompts_per_task: int = 2
    """Prompts each task contributes to one generation (the same for every member)."""
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    model: str = "unknown"
    """Recorded in checkpoints' provenance."""
    sink_tokens: int = 0
    """The first positions every member always keeps (``NAMMConfig.sink_tokens`` of the run's NAMM and of every
    saved mean); 0 is the paper's rule."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvolutionConfig:
        d = dict(d)
        d["stages"] = [StageConfig(**s) for s in d["stages"]]
        d["fitness"] = FitnessConfig(**d["fitness"])
        return cls(**d)


def _describe_stages(stages: list[StageConfig]) -> str:
    return "; ".join(
        f"{','.join(s.tasks)}:{s.generations}" + (f"@{','.join(map(str, s.lengths))}" if s.lengths else "")
        for s in stages
    )


REPLAY_TOLERANCE = 1e-5
"""Largest difference (relative to max(1, |value|)) allowed between a replayed and a logged step size, or a
replayed and a saved mean, when the replay is not bit-exact (another machine made the run)."""


def _mean_hash(mean: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(mean, dtype=np.float64).tobytes()).hexdigest()[:16]


@torch.no_grad()
def estimate_normalization(
    model: Any, namm: NAMM, prompts: list[EncodedPrompt], update_interval: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled mean / std of the 17 EMA bins on the full-cache model (namm-spec.md, "Normalization")."""
    policy = NAMMPolicy(namm, collect_statistics=True)
    device = next(model.parameters()).device
    with attach(model, policy, update_interval=update_interval, chunk_size=chunk_size) as mem:
        for pr in prompts:
            mem.prefill(torch.tensor([pr.ids], device=device))
    return policy.finalize_statistics()


class Evolution:
    """Run or resume a CMA-ES evolution in ``run_dir``.

    Args:
        run_dir: folder of the run (created; an existing run resumes; a run with other settings is refused).
        config: settings; ignored when resuming except that they must match the stored ones.
        model: the host language model (any supported decoder LM).
        prompt_pools: task name -> training prompts to draw each generation's prompts from.
        init: optional warm-start NAMM (its weights become the initial mean and its normalization is reused).
        identity: further settings a resumed run must share, stored in run.json (the command line passes what
            builds ``prompt_pools``: the prompt lengths and pool size; ``init`` is checked by its content against
            init.safetensors). A run folder made before they were recorded adopts them, with a warning.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: EvolutionConfig,
        model: Any,
        prompt_pools: dict[str, list[EncodedPrompt]],
        init: NAMM | None = None,
        namm_config: NAMMConfig | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        import cma  # noqa: F401  (fail early with a clear ImportError)

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.pools = prompt_pools
        self.config = self._load_or_store_config(config, json.loads(json.dumps(identity or {})))
        missing = {pool_key(t, s.lengths) for s in self.config.stages for t in s.tasks} - set(prompt_pools)
        if missing:
            raise ValueError(f"no prompts for tasks {sorted(missing)}; have {sorted(prompt_pools)}")
        base = namm_config or (init.config if init is not None else NAMMConfig())
        flag = self.config.length_normalized_features
        if init is not None and init.config.length_normalized_features != flag:
            raise ValueError(
                f"the initial NAMM was made with length_normalized_features={init.config.length_normalized_features}, "
                f"this run uses {flag}: its weights and normalization fit other features; start from a NAMM made "
                "with the same setting (or none)"
            )
        self.namm = NAMM(replace(base, sink_tokens=self.config.sink_tokens, length_normalized_features=flag))
        self._init_normalization_and_mean(init)
        self.evaluator = FitnessEvaluator(model, self.namm, self.config.fitness)
        self.log_path = self.run_dir / "log.jsonl"
        self.history = self._read_log()
        self.es = self._new_es()
        self._replay()

    # ----- setup -------------------------------------------------------------------------------------
    def _load_or_store_config(self, config: EvolutionConfig, identity: dict[str, Any]) -> EvolutionConfig:
        path = self.run_dir / "run.json"
        if path.exists():
            record = json.loads(path.read_text())
            stored = EvolutionConfig.from_dict(record["config"])
            if stored.fitness.ratio != config.fitness.ratio:
                raise ValueError(
                    f"run directory {self.run_dir} was evolved with ratio {stored.fitness.ratio} (run.json), this run "
                    f"asks for {config.fitness.ratio}; resume with the run's own --ratio, or use another --run-dir"
                )
            diff = sorted(k for k, v in config.to_dict().items() if stored.to_dict().get(k) != v)
            if "identity" in record:
                old = record["identity"]
                diff += sorted(k for k in set(old) | set(identity) if old.get(k, ...) != identity.get(k, ...))
            if "stages" in diff:
                raise ValueError(
                    f"run directory {self.run_dir} holds a run with other settings: it was started with the stages "
                    f"{_describe_stages(stored.stages)}; given now: {_describe_stages(config.stages)}. A run resumes "
                    "only with its own stages (exact replay); use another --run-dir for other stages"
                )
            if diff:
                raise ValueError(
                    f"run directory {self.run_dir} holds a run with other settings (differs in {diff}); "
                    "use another --run-dir, or the same settings to resume"
                )
            if "identity" not in record and identity and self.is_writer:
                logger.warning(
                    "%s did not record these settings; recording this run's (%s): make sure they are the ones it "
                    "was started with",
                    path,
                    ", ".join(sorted(identity)),
                )
                atomic_write_text(path, json.dumps({**record, "identity": identity}, indent=2))
            return stored
        if self.is_writer:
            atomic_write_text(path, json.dumps({"config": config.to_dict(), "identity": identity}, indent=2))
        return config

    def _init_normalization_and_mean(self, init: NAMM | None) -> None:
        """Frozen normalization (from ``init``, the run folder, or a full-cache estimate) and the initial mean.

        Every rank computes the same values; only the writer (rank 0) stores them.
        """
        from safetensors.torch import load_file
        from safetensors.torch import save as st_save

        norm_path = self.run_dir / "normalization.safetensors"
        init_path = self.run_dir / "init.safetensors"
        started = (self.run_dir / "log.jsonl").exists() and (self.run_dir / "log.jsonl").stat().st_size > 0
        if init_path.exists():
            x0 = load_file(str(init_path))["flat"]
            if init is not None and not torch.equal(init.get_flat().cpu(), x0):
                raise ValueError(
                    f"run directory {self.run_dir} started from another initial mean (init.safetensors) than the "
                    "--init / --warm-start given now; use another --run-dir, or the run's own to resume"
                )
        elif init is not None:
            if started:  # checked before anything is written: the folder stays resumable
                raise ValueError(
                    f"run directory {self.run_dir} started without an initial mean; resume it without --init / "
                    "--warm-start, or use another --run-dir"
                )
            x0 = init.get_flat()
            if self.is_writer:
                atomic_write_bytes(init_path, st_save({"flat": x0.contiguous()}))
        else:
            x0 = None
        if norm_path.exists():
            stats = load_file(str(norm_path))
            mean, std = stats["mean"], stats["std"]
        elif init is not None and bool(init.normalization_ready):
            mean, std = init.feature_mean.clone(), init.feature_std.clone()
        else:
            stage1 = self.config.stages[0]
            prompts = [p for t in stage1.tasks for p in self.pools[pool_key(t, stage1.lengths)]]
            logger.info("estimating normalization statistics on %d stage-1 prompts (full cache)", len(prompts))
            mean, std = estimate_normalization(
                self.model, self.namm, prompts, self.config.fitness.update_interval, self.config.fitness.chunk_size
            )
        if self.is_writer and not norm_path.exists():
            atomic_write_bytes(norm_path, st_save({"mean": mean.contiguous(), "std": std.contiguous()}))
        self.namm.set_normalization(mean, std)
        self.x0 = x0.double().numpy() if x0 is not None else None

    def _new_es(self) -> Any:
        import cma

        cfg = self.config
        x0 = self.x0 if self.x0 is not None else np.zeros(self.namm.n_params)
        # a private generator (not NumPy's global one) so that nothing else in the process can shift the
        # samples; the replay on resume then reproduces them exactly
        rng = np.random.default_rng(cfg.seed)
        opts = {
            "randn": lambda *shape: rng.standard_normal(shape),
            "popsize": cfg.population,
            "CMA_mu": max(1, int(round(cfg.population * cfg.elite_ratio))),
            "CMA_diagonal": bool(cfg.separable),
            "seed": cfg.seed,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "maxiter": 10**9,
            "tolfun": 0,
            "tolx": 0,
            "tolflatfitness": 10**9,
            "tolstagnation": 10**9,
        }
        return cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)

    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        rows = []
        lines = self.log_path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # killed while writing the last line: that generation is redone
                    logger.warning("ignoring a truncated last line in %s", self.log_path)
                    atomic_write_text(self.log_path, "".join(ln + "\n" for ln in lines[:-1]))
                    break
                raise ValueError(f"{self.log_path} line {i + 1} is corrupt; cannot resume") from None
        return rows

    def _replay(self) -> None:
        """Rebuild the CMA-ES state by replaying the logged generations (same samples, logged fitness).

        On the machine (and library versions) that made the run the replay is bit-exact: every generation's
        mean hash matches. Elsewhere (the device machine and this one, say) BLAS and NumPy builds round
        differently, so the hashes differ in the last bits while the state is the same up to rounding; then
        each generation's step size must match the logged one and the final mean the saved checkpoint
        (``namm/``, float32) to within :data:`REPLAY_TOLERANCE`, else the run cannot be resumed.
        """
        saved_generations = self._saved_generations()
        at_saved = None  # the replayed mean after the generations the saved mean was made at
        exact = True
        for i, row in enumerate(self.history):
            xs = self.es.ask()
            self.es.tell(xs, [-f for f in row["fitness"]])
            if i + 1 == saved_generations:
                at_saved = np.array(self.es.mean, dtype=np.float64)
            if _mean_hash(self.es.mean) == row["mean_hash"]:
                continue
            exact = False
            if abs(float(self.es.sigma) - row["sigma"]) > REPLAY_TOLERANCE * max(1.0, abs(row["sigma"])):
                raise RuntimeError(
                    f"replaying generation {row['generation']} gave step size {float(self.es.sigma)!r}, the log "
                    f"says {row['sigma']!r}: the run was made with another pycma version or settings"
                )
        if self.history and not exact:
            saved = self.run_dir / "namm" / "model.safetensors"
            if not saved.exists() or at_saved is None:
                raise RuntimeError(
                    f"the replay of {self.run_dir} is not bit-exact on this machine and there is no saved mean "
                    f"({saved}) of a logged generation to check it against; resume on the machine that made the run"
                )
            from safetensors.torch import load_file

            flat = load_file(str(saved))["flat"].double().numpy()
            diff = float(np.max(np.abs(flat - at_saved)))
            scale = max(1.0, float(np.max(np.abs(flat))))
            if diff > REPLAY_TOLERANCE * scale:
                raise RuntimeError(
                    f"replaying {self.run_dir} gave a CMA-ES mean {diff:.3g} away from the saved one: the run was "
                    "made with another pycma version or settings"
                )
            logger.warning(
                "replayed %d generations of %s up to rounding (another machine or NumPy build made them): the "
                "mean differs from the saved one by %.2g at most; resuming from the replay",
                len(self.history),
                self.run_dir,
                diff,
            )
        if self.history:
            logger.info("resumed %s after %d generations", self.run_dir, len(self.history))
            if saved_generations != len(self.history) and self.is_writer:
                # killed between a generation's log line and its checkpoint: the log is the record, the mean follows
                logger.warning(
                    "the saved mean of %s was made after %s generation(s), the log holds %d; saving the replayed mean",
                    self.run_dir,
                    saved_generations,
                    len(self.history),
                )
                self.save_mean()

    def _saved_generations(self) -> int | None:
        """The number of generations behind the saved mean (``namm/``), from its provenance; None without one."""
        path = self.run_dir / "namm" / "config.json"
        try:
            value = json.loads(path.read_text())["provenance"]["generations"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return int(value) if isinstance(value, int) else None

    # ----- running -------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return len(self.history)

    @property
    def total_generations(self) -> int:
        return sum(s.generations for s in self.config.stages)

    def stage_of(self, generation: int) -> tuple[int, StageConfig]:
        g = generation
        for i, s in enumerate(self.config.stages):
            if g < s.generations:
                return i, s
            g -= s.generations
        return len(self.config.stages) - 1, self.config.stages[-1]

    def prompts_for(self, generation: int) -> list[EncodedPrompt]:
        """The generation's prompts: a seeded draw per task (the same for every member)."""
        _, stage = self.stage_of(generation)
        rng = np.random.default_rng([self.config.seed, generation])  # never the global RNG pycma uses
        chosen = []
        for task in stage.tasks:
            pool = self.pools[pool_key(task, stage.lengths)]
            k = min(self.config.prompts_per_task, len(pool))
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
        return chosen

    def step(self) -> dict[str, Any]:
        """Run one generation, log it, and checkpoint the mean."""
        g = self.generation
        stage_idx, _ = self.stage_of(g)
        t0 = time.time()
        xs = self.es.ask()
        thetas = torch.tensor(np.stack(xs), dtype=torch.float32)
        result = self._evaluate_distributed(thetas, self.prompts_for(g))
        self.es.tell(xs, [-float(f) for f in result.fitness])
        row = {
            "generation": g,
            "stage": stage_idx,
            "fitness": [float(f) for f in result.fitness],
            "fitness_mean": float(np.mean(result.fitness)),
            "fitness_best": float(np.max(result.fitness)),
            "retained_mean": float(np.mean(result.retained)),
            "retained_of_best": float(result.retained[int(np.argmax(result.fitness))]),
            "retained_measure": RETAINED_MEASURE,
            "task_ratio_mean": {k: float(np.mean(v)) for k, v in result.task_ratio.items()},
            "sigma": float(self.es.sigma),
            "mean_hash": _mean_hash(self.es.mean),
            "seconds": round(time.time() - t0, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        row.update(self._compute_record(g))
        self.history.append(row)
        if self.is_writer:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.save_mean()
        return row

    def _compute_record(self, generation: int) -> dict[str, Any]:
        """What the log records of a generation's compute besides its seconds: the member-prompts evaluated
        (population x prompts) and where (the card's "compute" and "where trained")."""
        device = self.evaluator.device
        if device.type == "cuda":
            where = f"cuda ({torch.cuda.get_device_name(device)})"
        else:
            where = f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            where += f" x {dist.get_world_size()} ranks"
        return {"member_prompts": self.config.population * len(self.prompts_for(generation)), "device": where}

    # ----- distribution -------------------------------------------------------------------------------
    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes the log and checkpoints when torch.distributed is initialized."""
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _evaluate_distributed(self, thetas: torch.Tensor, prompts: list[EncodedPrompt]) -> GenerationResult:
        """Evaluate the population, split over torch.distributed ranks when a process group exists.

        Every rank runs the same CMA-ES (same seed, same fitness values after the gather), evaluates
        its contiguous slice of members, and all-gathers the results, so all ranks stay identical
        and only rank 0 writes. Launch with ``torchrun --nproc-per-node N -m namm_transfer.cli evolve``
        (gloo on CPU, nccl on GPUs).
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.evaluator.evaluate(thetas, prompts)
        world, rank = dist.get_world_size(), dist.get_rank()
        bounds = np.linspace(0, thetas.shape[0], world + 1).astype(int)
        mine = self.evaluator.evaluate(thetas[bounds[rank] : bounds[rank + 1]], prompts)
        tasks = sorted(mine.task_ratio)
        n_max = int(np.max(np.diff(bounds)))
        local = np.zeros((n_max, 2 + len(tasks)))
        n = len(mine.fitness)
        local[:n, 0], local[:n, 1] = mine.fitness, mine.retained
        for j, t in enumerate(tasks):
            local[:n, 2 + j] = mine.task_ratio[t]
        send = torch.tensor(local, dtype=torch.float64)
        gathered = [torch.zeros_like(send) for _ in range(world)]
        dist.all_gather(gathered, send)  # tensors only: nothing is pickled between processes
        rows = np.concatenate([g.numpy()[: bounds[r + 1] - bounds[r]] for r, g in enumerate(gathered)])
        return GenerationResult(
            fitness=rows[:, 0],
            task_ratio={t: rows[:, 2 + j] for j, t in enumerate(tasks)},
            retained=rows[:, 1],
            full_scores=mine.full_scores,
        )

    def mean_namm(self) -> NAMM:
        net = NAMM(self.namm.config)
        net.set_flat(torch.tensor(np.asarray(self.es.mean), dtype=torch.float32))
        net.set_normalization(self.namm.feature_mean, self.namm.feature_std)
        return net

    def save_mean(self, path: str | Path | None = None, name: str | None = None) -> Path:
        prov = {
            "trainer": "namm_transfer.evolution (pycma CMA-ES, deployed = mean)",
            "model": self.config.model,
            "generations": self.generation,
            "stages": [asdict(s) for s in self.config.stages],
            "population": self.config.population,
            "separable": self.config.separable,
            "sigma0": self.config.sigma0,
            "seed": self.config.seed,
            "update_interval": self.config.fitness.update_interval,
            "warm_start": self.x0 is not None,
            "last_fitness_mean": self.history[-1]["fitness_mean"] if self.history else None,
        }
        return save_namm(self.mean_namm(), path or self.run_dir / "namm", provenance=prov, name=name)

    def run(self, generations: int | None = None, callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run up to ``generations`` more generations (default: until the last stage ends)."""
        end = (
            self.total_generations
            if generations is None
            else min(self.total_generations, self.generation + generations)
        )
        while self.generation < end:
            row = self.step()
            logger.info(
                "gen %d stage %d fitness mean %.4f best %.4f retained %.3f (%.1fs)",
                row["generation"],
                row["stage"],
                row["fitness_mean"],
                row["fitness_best"],
                row["retained_mean"],
                row["seconds"],
            )
            if callback is not None:
                callback(row)

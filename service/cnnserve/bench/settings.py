"""The benchmark's settings: one typed object, built by ``cnnserve bench`` from its flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Budget", "BenchSettings", "SMOKE_BUDGET"]


@dataclass(frozen=True)
class Budget:
    """How long each point runs."""

    # 3.5 s + 1 s (was 4 s + 2 s): 65 load points keep the full run under 20 minutes on 2 cores (20.9 min
    # with the KServe and --processes points at the old figures); repetitions stay 3, scenarios all.
    duration_s: float = 3.5  # one repetition of a load point; the timed phase of an in-process point
    warmup_s: float = 1.0  # thrown away before every point
    reps: int = 3  # repetitions of a load point (timed points: at least this many calls)


# --smoke: seconds in all (CI runs it).
SMOKE_BUDGET = Budget(duration_s=0.25, warmup_s=0.1)


@dataclass(frozen=True)
class BenchSettings:
    out: Path  # results.json, README.md, PNGs
    work_dir: Path  # model artifacts (reused) and the run's server state
    budget: Budget = Budget()
    smoke: bool = False  # seconds-long: in-process models, echo, a gateway on the in-process backend
    concurrency: tuple[int, ...] = (1, 8, 64)
    models: tuple[str, ...] = ("lenet", "alexnet")  # smoke runs: LeNet only
    only: frozenset[str] | None = None  # run these scenario names only (None: all)
    gateway_args: tuple[str, ...] = ()  # extra `cnnserve gateway` flags (e.g. --max-in-flight=4)
    finetune_steps: int = 10  # measured steps, at least
    cold_start_reps: int = 3

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only

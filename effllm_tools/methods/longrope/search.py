"""Evolutionary search over per-pair RoPE rescale factors (LongRoPE v1 §3.2, LongRoPE2 §3.2).

A candidate is ``(rcd, k)``: ``k[i]`` is the factor of pair ``i`` in units of ``step`` (integers, so
the search grid is exact and candidates compare exactly), searched for ``i >= rcd``; the pairs below
the real critical dimension ``rcd`` are derived NTK-style (``rope.fill_lower_dims``). LongRoPE2
searches ``rcd`` too, a few pairs at or below the theoretical critical dimension, and bounds the
searched factors below by the extension ratio ``s``; LongRoPE v1 searches every pair (``rcd = 0``)
with factors from 1. Factors are monotone non-decreasing in ``i`` in both.

The loop follows the official v1 code (``evolution/algorithms/genetic_base.py``, ``dim_mono.py``):
the initial population is the initial candidate plus mutations of it; each iteration keeps the
``parents`` best, adds ``mutations`` mutated parents and ``crossovers`` children of two parents (a
failed crossover mutates the first parent instead); a candidate seen before is not evaluated twice.
Defaults (``dim_mono.json``): population 64, 40 iterations, 16 mutations, 16 crossovers, 32 parents,
step 0.01, mutation probability 0.3, 20 crossover tries.

Seeded (``random.Random(seed)``) and resumable: after every iteration the population, the search curve
and the RNG state go to a JSON state file, and every objective value is cached there as soon as it is
known, so a resumed search replays the interrupted iteration without re-evaluating and ends exactly
where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effllm_tools.methods.longrope.rope import fill_lower_dims

STATE_VERSION = 1


@dataclass(frozen=True)
class SearchSpace:
    """Where candidates live: ``n`` pairs, factors in ``[kmin, kmax] * step`` at and above ``rcd``."""

    n: int
    step: float
    kmin: int
    kmax: int
    rcd_lo: int = 0
    rcd_hi: int = 0

    def factors(self, rcd: int, k: tuple[int, ...]) -> list[float]:
        upper = [round(v * self.step, 10) for v in k[rcd:]]
        return fill_lower_dims(upper[0], rcd) + upper if upper else fill_lower_dims(1.0, rcd)

    def valid(self, rcd: int, k: tuple[int, ...]) -> bool:
        tail = k[rcd:]
        return (self.rcd_lo <= rcd <= self.rcd_hi and all(self.kmin <= v <= self.kmax for v in tail)
                and all(a <= b for a, b in zip(tail, tail[1:], strict=False)))

    def canonical(self, rcd: int, k: list[int]) -> tuple[int, tuple[int, ...]]:
        """Pairs below ``rcd`` are derived: stored as 0 so equal factor vectors have equal keys."""
        return rcd, tuple([0] * rcd + list(k[rcd:]))

    def snap(self, values: Iterable[float]) -> list[int]:
        return [min(self.kmax, max(self.kmin, round(v / self.step))) for v in values]


@dataclass
class SearchSettings:
    """The evolution's keys (official ``dim_mono.json`` defaults); ``SearchConfig`` inherits them."""

    population: int = 64
    iterations: int = 40
    mutations: int = 16
    crossovers: int = 16
    parents: int = 32
    mutation_prob: float = 0.3
    max_crossover_tries: int = 20
    max_mutation_tries: int = 200


@dataclass
class SearchResult:
    rcd: int
    k: tuple[int, ...]
    factors: list[float]
    objective: float
    curve: list[float]  # best objective after initialisation and after each iteration
    evaluations: int
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _key(rcd: int, k: tuple[int, ...]) -> str:
    return f"{rcd}:" + ",".join(map(str, k))


class Evolution:
    """One search: candidates, the objective cache, the RNG and the state file."""

    def __init__(self, space: SearchSpace, objective: Callable[[list[float]], float], settings: SearchSettings,
                 seed: int, state_path: Path | None = None, fingerprint: str = "") -> None:
        self.space, self.objective, self.s = space, objective, settings
        self.rng = random.Random(seed)
        self.state_path, self.fingerprint = state_path, fingerprint
        self.cache: dict[str, float] = {}  # every objective value known, kept across an interruption
        self.history: set[str] = set()  # candidates made so far on this run's timeline (novelty check)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    # -- objective with cache ------------------------------------------------------------------
    def value(self, rcd: int, k: tuple[int, ...]) -> float:
        key = _key(rcd, k)
        self.history.add(key)
        if key not in self.cache:
            v = float(self.objective(self.space.factors(rcd, k)))
            self.cache[key] = v if math.isfinite(v) else float("inf")
            self._save_cache()
        return self.cache[key]

    # -- operators -----------------------------------------------------------------------------
    def mutate(self, rcd0: int, k0: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """Resample each searched pair with probability p between its neighbours (v1 ``dim_mono``)."""
        sp, p = self.space, self.s.mutation_prob
        cand = (rcd0, k0)
        for _ in range(self.s.max_mutation_tries):
            rcd, k = rcd0, list(k0)
            if sp.rcd_hi > sp.rcd_lo and self.rng.random() < p:
                rcd = min(sp.rcd_hi, max(sp.rcd_lo, rcd0 + self.rng.choice((-1, 1))))
                if rcd < rcd0:
                    k[rcd] = k[rcd0]
            for i in range(rcd, sp.n):
                if self.rng.random() < p:
                    lo = k[i - 1] if i > rcd else sp.kmin
                    hi = k[i + 1] if i + 1 < sp.n else sp.kmax
                    k[i] = self.rng.randint(lo, max(lo, hi))
            cand = sp.canonical(rcd, k)
            if sp.valid(*cand) and _key(*cand) not in self.history:
                return cand
        return cand  # the grid is exhausted near this parent: a repeat, served from the cache

    def crossover(self, a: tuple[int, tuple[int, ...]], b: tuple[int, tuple[int, ...]]
                  ) -> tuple[int, tuple[int, ...]] | None:
        """Uniform crossover of the searched pairs; ``None`` when no new valid child turns up."""
        sp = self.space
        if a == b:
            return None
        for _ in range(self.s.max_crossover_tries):
            rcd = a[0] if self.rng.random() < 0.5 else b[0]
            k = list(a[1]) if a[0] <= b[0] else list(b[1])  # the parent defining the most pairs
            start = max(a[0], b[0])
            for i in range(start, sp.n):
                k[i] = b[1][i] if self.rng.random() < 0.5 else a[1][i]
            cand = sp.canonical(rcd, k)
            if sp.valid(*cand) and _key(*cand) not in self.history:
                return cand
        return None

    # -- state -------------------------------------------------------------------------------------
    def _write(self, payload: dict[str, Any]) -> None:
        assert self.state_path is not None
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.state_path)

    def _load(self) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("version") != STATE_VERSION or data.get("fingerprint") != self.fingerprint:
            return None
        return data

    def _save_cache(self) -> None:
        if self.state_path is None:
            return
        data = self._load() or {"version": STATE_VERSION, "fingerprint": self.fingerprint}
        data["cache"] = self.cache
        self._write(data)

    def _save(self, iteration: int, population: list[tuple[int, tuple[int, ...]]], curve: list[float]) -> None:
        if self.state_path is None:
            return
        version, internal, gauss = self.rng.getstate()
        self._write({"version": STATE_VERSION, "fingerprint": self.fingerprint, "iteration": iteration,
                     "population": [[r, list(k)] for r, k in population], "curve": curve, "cache": self.cache,
                     "history": sorted(self.history), "rng": [version, list(internal), gauss]})

    # -- main loop --------------------------------------------------------------------------------
    def run(self, init: tuple[int, tuple[int, ...]], *, resume: bool = False,
            progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
            starts: Iterable[tuple[int, tuple[int, ...]]] = (),
            on_iteration: Callable[[int, float, int], None] | None = None) -> SearchResult:
        """Search from ``init``: the initial population is ``init``, then the valid new ``starts``
        (extra starting candidates, at most ``population - 1``), then mutations of ``init``.
        ``on_iteration(iteration, best objective, evaluations)`` follows initialisation (0) and
        every iteration."""
        s = self.s
        if not resume and self.state_path is not None and self.state_path.exists():
            self.state_path.unlink()  # a fresh search never mixes with an old one's cache
        state = self._load() if resume else None
        start, resumed = 0, None
        if state is not None:
            self.cache = {k: float(v) for k, v in state.get("cache", {}).items()}
        if state is not None and "iteration" in state:
            start = resumed = int(state["iteration"])
            population = [(int(r), tuple(k)) for r, k in state["population"]]
            curve = [float(c) for c in state["curve"]]
            self.history = set(state["history"])
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        else:
            init = self.space.canonical(*init)
            self.value(*init)
            population = [init]
            for extra in starts:
                cand = self.space.canonical(extra[0], list(extra[1]))
                if len(population) < s.population and self.space.valid(*cand) and cand not in population:
                    population.append(cand)
                    self.value(*cand)
            while len(population) < s.population:
                population.append(self.mutate(*init))
                self.value(*population[-1])
            curve = [min(self.value(*c) for c in population)]
            self._save(0, population, curve)
            if on_iteration is not None:
                on_iteration(0, curve[-1], self.evaluations)
        steps: Iterable[int] = range(start, s.iterations)
        if progress is not None:
            steps = progress(steps, s.iterations - start)
        for it in steps:
            parents = sorted(population, key=lambda c: self.value(*c))[: s.parents]
            children = []
            for _ in range(s.mutations):
                children.append(self.mutate(*parents[self.rng.randrange(len(parents))]))
                self.value(*children[-1])  # evaluated as made, so the next novelty check sees it
            for _ in range(s.crossovers):
                i, j = sorted(self.rng.sample(range(len(parents)), 2)) if len(parents) > 1 else (0, 0)
                child = self.crossover(parents[i], parents[j])
                children.append(child if child is not None else self.mutate(*parents[i]))
                self.value(*children[-1])
            population = parents + children
            curve.append(min(self.value(*c) for c in population))
            self._save(it + 1, population, curve)
            if on_iteration is not None:
                on_iteration(it + 1, curve[-1], self.evaluations)
        best = min(population, key=lambda c: self.value(*c))
        return SearchResult(best[0], best[1], self.space.factors(*best), self.value(*best), curve,
                            self.evaluations, resumed)

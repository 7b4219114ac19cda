"""Glue for ``longrope2``, ``longrope`` and the ``pi`` / ``ntk`` / ``yarn`` baselines.

All five write config-only checkpoints: the weights are unchanged (unless ``finetune_tokens`` > 0),
``max_position_embeddings`` becomes the target length and the RoPE parameters are ones plain
transformers understands:

- ``pi`` (arXiv 2306.15595): type ``linear``, factor ``s``;
- ``ntk``: static NTK-aware base change, written as ``longrope`` with short = long factors
  ``s^{2i/(d-2)}`` and attention factor 1 (exact; transformers' only NTK type is the dynamic one);
- ``yarn`` (arXiv 2309.00071): type ``yarn``, factor ``s``, beta_fast 32, beta_slow 1;
- ``longrope`` (v1, arXiv 2402.13753) and ``longrope2`` (arXiv 2502.20082): type ``longrope`` with the
  searched long factors, short factors of one and the attention factor the search used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from effllm_tools.errors import BadInputError, UnsupportedError
from effllm_tools.methods.longrope import rope
from effllm_tools.methods.longrope.install import check_plain_rope, rotary_slots
from effllm_tools.methods.longrope.search import SearchSettings
from effllm_tools.registry import MethodSpec, StageResult, register_method
from effllm_tools.reporting import format_duration


@dataclass
class ScalingConfig:
    """Recipe keys of ``pi`` and ``ntk``."""

    target_length: int | None = None  # the new context window in tokens
    original_length: int | None = None  # default: the model's max_position_embeddings

    def validate(self) -> None:
        if self.target_length is None:
            raise BadInputError("target_length is required (e.g. --target-length 32768)")
        if self.target_length < 2:
            raise BadInputError(f"target_length must be a positive token count, got {self.target_length}")
        if self.original_length is not None and self.original_length < 2:
            raise BadInputError(f"original_length must be a positive token count, got {self.original_length}")

    def check_model(self, model_config: Any) -> None:
        """Checks that need the model's config only (the runner calls this before loading weights)."""
        lengths_for(model_config, self)


@dataclass
class YarnConfig(ScalingConfig):
    """Recipe keys of ``yarn``."""

    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.beta_fast) and math.isfinite(self.beta_slow) and self.beta_fast > self.beta_slow > 0):
            raise BadInputError(f"yarn: need beta_fast > beta_slow > 0 (rotations per window: the ramp runs from "
                                f"beta_slow to beta_fast), got beta_fast {self.beta_fast}, beta_slow {self.beta_slow}")


@dataclass
class SearchConfig(SearchSettings, ScalingConfig):
    """Recipe keys of ``longrope`` (v1): the evolution's settings (``SearchSettings``, defaults from
    the official ``dim_mono.json``) and the search space, objective and fine-tuning keys below."""

    step: float = 0.01
    factor_cap: float = 2.0  # searched factors stay <= factor_cap * s
    mscale: str | float = "su"  # attention factor: su (transformers' longrope rule), yarn, none, or a number
    dataset: str = "austen-emma"  # haystack text of the search documents (disjoint from the PPL eval novel)
    samples: int = 4  # documents per candidate evaluation
    # tokens per search document (default: target_length); a list spreads the documents over several
    # lengths (document i has length eval_length[i % n]): transformers applies the long factors at
    # every length above the original window, so a search can score them at 16k as well as at 32k
    eval_length: int | list[int] | None = None
    finetune_tokens: int = 0  # > 0: mixed context-window fine-tuning after the search
    finetune_lr: float = 2e-5
    finetune_short_fraction: float = 0.3

    def validate(self) -> None:
        super().validate()
        positive = ("population", "mutations", "crossovers", "parents", "samples", "max_crossover_tries",
                    "max_mutation_tries")
        for name in positive:
            if getattr(self, name) < 1:
                raise BadInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iterations < 0 or self.finetune_tokens < 0:
            raise BadInputError("iterations and finetune_tokens must not be negative")
        if self.parents > self.population:
            raise BadInputError(f"parents ({self.parents}) must not exceed population ({self.population})")
        if not 0 < self.step <= 1 or not 0 < self.mutation_prob <= 1 or self.factor_cap < 1:
            raise BadInputError("step and mutation_prob must lie in (0, 1], factor_cap must be >= 1")
        if not 0 <= self.finetune_short_fraction <= 1 or self.finetune_lr <= 0:
            raise BadInputError("finetune_short_fraction must lie in [0, 1] and finetune_lr be positive")
        try:
            rope.resolve_mscale(self.mscale, 2.0, 4096)
        except ValueError as err:
            raise BadInputError(str(err)) from None

    def default_eval_lengths(self, original: int, target: int) -> list[int]:
        """The search documents' lengths when ``eval_length`` is not given: the target's."""
        return [target]

    def check_model(self, model_config: Any) -> None:
        """The scaling checks, and the search documents' lengths against the model's window."""
        original, target, _ = lengths_for(model_config, self)
        search_lengths(self, original, target)

    def plan_details(self, model_config: Any) -> dict[str, Any]:
        """What ``--dry-run`` shows beyond the keys: the length of every search document of a candidate
        (``eval_length`` resolved and cycled over ``samples``) and the attention factor."""
        original, target, s = lengths_for(model_config, self)
        return {"search_documents": search_documents(self, original, target),
                "attention_factor": round(rope.resolve_mscale(self.mscale, s, original), 4)}


@dataclass
class LongRoPE2Config(SearchConfig):
    """Recipe keys of ``longrope2``: v1's plus the needle objective and the critical-dimension range."""

    needles: int = 3  # needles per search document
    # six documents per candidate; with eval_length unset, four of half the target length and two of the
    # target (default_eval_lengths): the long factors serve every length past the original window
    samples: int = 6
    critical_dim_range: int = 4  # the real critical dimension is searched this many pairs below theory
    # extra starting candidates: factors of c * s at and above each candidate critical dimension, one
    # per c here (e.g. [1.2, 1.5]); the released LLaMA3-8B factors sit 1.4-1.6x above s there, and the
    # neighbour-bounded mutation rarely lifts a plateau at s (default: none, the single official start)
    init_scales: list[float] = dataclasses.field(default_factory=list)

    def default_eval_lengths(self, original: int, target: int) -> list[int]:
        """Half the target twice and the target once (document i has length ``[h, h, t][i % 3]``), where half
        the target still exceeds the original window; else the target. The long factors serve every
        length past the window, and on the demo model documents of the target length alone left 16k
        windows 2% worse (BENCHMARKS.md, "LongRoPE2's default search documents")."""
        half = target // 2
        return [half, half, target] if half > original else [target]

    def validate(self) -> None:
        super().validate()
        if self.needles < 1 or self.critical_dim_range < 0:
            raise BadInputError("needles must be >= 1 and critical_dim_range >= 0")
        if any(c < 1 or c > self.factor_cap for c in self.init_scales):
            raise BadInputError(f"init_scales must lie in [1, factor_cap = {self.factor_cap}], got {self.init_scales}")


def lengths(ctx: Any, cfg: ScalingConfig) -> tuple[int, int, float]:
    """(original, target, s); target <= original is bad input (exit 2)."""
    return lengths_for(ctx.model.config, cfg)


def lengths_for(model_config: Any, cfg: ScalingConfig) -> tuple[int, int, float]:
    """:func:`lengths` from a model config alone (checked before any weight is loaded)."""
    check_plain_rope(model_config)
    native = getattr(model_config, "max_position_embeddings", None)
    original = cfg.original_length or native
    if not original:
        raise BadInputError("the model config has no max_position_embeddings; set original_length")
    target = int(cfg.target_length or 0)
    if target <= original:
        raise BadInputError(f"target_length {target} must exceed the original context of {original} tokens")
    if native and target < native:
        raise BadInputError(f"target_length {target} is below the model's window of {native} tokens "
                            "(max_position_embeddings): extending never shrinks it")
    return int(original), target, target / original


def rebuild_rotary(model: Any) -> None:
    """Re-create the rotary module from the (new) config so the in-memory model matches the written one."""
    from effllm_tools.pipeline.arch import get_arch

    arch = get_arch(model)
    module = rotary_slots(model)[0][0]
    device = next((b.device for b in module.buffers()), None)
    parent_name, _, child = arch.rotary_emb.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    fresh = type(module)(config=model.config)
    setattr(parent, child, fresh.to(device) if device is not None else fresh)


def _finish(ctx: Any, params: dict[str, Any], target: int, metrics: dict[str, Any]) -> StageResult:
    rope.write_rope_config(ctx.model.config, params, target)
    rebuild_rotary(ctx.model)
    shown = {k: v for k, v in params.items() if k not in ("long_factor", "short_factor")}
    return StageResult(metrics={"rope_type": params["rope_type"], "rope_parameters": shown,
                                "max_position_embeddings": target, **metrics})


def apply_pi(ctx: Any, cfg: ScalingConfig) -> StageResult:
    check_plain_rope(ctx.model)
    original, target, s = lengths(ctx, cfg)
    base, _ = rope.rope_base_and_dim(ctx.model.config)
    params = {"rope_type": "linear", "rope_theta": base, "factor": s}
    return _finish(ctx, params, target, {"scale": s, "original_length": original, "attention_factor": 1.0})


def apply_ntk(ctx: Any, cfg: ScalingConfig) -> StageResult:
    check_plain_rope(ctx.model)
    original, target, s = lengths(ctx, cfg)
    base, dim = rope.rope_base_and_dim(ctx.model.config)
    factors = rope.ntk_factors(s, dim)
    params = rope.longrope_parameters(base, factors, original, target, 1.0)
    params["short_factor"] = list(factors)  # static NTK: the same frequencies at every length
    return _finish(ctx, params, target, {"scale": s, "original_length": original, "attention_factor": 1.0,
                                         "long_factor": factors})


def apply_yarn(ctx: Any, cfg: YarnConfig) -> StageResult:
    check_plain_rope(ctx.model)
    original, target, s = lengths(ctx, cfg)
    base, _ = rope.rope_base_and_dim(ctx.model.config)
    params = {"rope_type": "yarn", "rope_theta": base, "factor": s, "original_max_position_embeddings": original,
              "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow}
    return _finish(ctx, params, target, {"scale": s, "original_length": original,
                                         "attention_factor": rope.yarn_mscale(s)})


def search_space(cfg: SearchConfig, *, v2: bool, base: float, dim: int, original: int, s: float
                 ) -> tuple[Any, tuple[int, tuple[int, ...]], int]:
    """The search grid, the initial candidate and the theoretical critical dimension."""
    from effllm_tools.methods.longrope.search import SearchSpace

    n = dim // 2
    tcd = min(rope.critical_dim(base, dim, original), n - 1)
    kmax = max(1, round(cfg.factor_cap * s / cfg.step))
    if v2:  # LongRoPE2 §3.2: λ >= s at and above the real critical dimension, searched in [tcd - r, tcd]
        kmin = math.ceil(s / cfg.step - 1e-9)
        space = SearchSpace(n, cfg.step, kmin, max(kmin, kmax), max(1, tcd - cfg.critical_dim_range), tcd)
        init = (tcd, tuple([0] * tcd + [kmin] * (n - tcd)))  # YaRN-like start: s at and above tcd, NTK below
    else:  # v1: every pair searched from 1, starting from static NTK
        space = SearchSpace(n, cfg.step, round(1 / cfg.step), kmax, 0, 0)
        init = (0, tuple(space.snap(rope.ntk_factors(s, dim))))
    return space, init, tcd


def extra_starts(cfg: SearchConfig, space: Any, s: float) -> list[tuple[int, tuple[int, ...]]]:
    """LongRoPE2's ``init_scales`` starts: flat factors c * s from each candidate critical dimension."""
    starts = []
    for c in getattr(cfg, "init_scales", []):
        k = min(space.kmax, max(space.kmin, round(c * s / cfg.step)))
        for rcd in range(space.rcd_hi, space.rcd_lo - 1, -1):
            starts.append((rcd, tuple([0] * rcd + [k] * (space.n - rcd))))
    return starts


def search_lengths(cfg: SearchConfig, original: int, target: int) -> list[int]:
    """The search documents' lengths (``eval_length``: one length or a list; default
    ``cfg.default_eval_lengths``)."""
    given = cfg.eval_length if cfg.eval_length is not None else cfg.default_eval_lengths(original, target)
    lengths = list(given) if isinstance(given, list) else [given]
    if not lengths:
        raise BadInputError("eval_length must name at least one length")
    for n in lengths:
        if n <= original:
            raise BadInputError(f"eval_length {n} must exceed the original context {original} (long factors)")
        if n > target:
            raise BadInputError(f"eval_length {n} exceeds target_length {target}: a search document past the new "
                                "window scores positions the output never serves")
    return [int(n) for n in lengths]


def search_documents(cfg: SearchConfig, original: int, target: int) -> list[int]:
    """The length of every document a candidate is scored on: :func:`search_lengths` cycled over
    ``samples`` (document i has length ``lengths[i % n]``, as :func:`.objective.make_objective` builds them)."""
    lengths = search_lengths(cfg, original, target)
    return [lengths[i % len(lengths)] for i in range(cfg.samples)]


def _announce_cost(objective: Any, announce: Any) -> Any:
    """``objective`` that reports the time of its first call (the search's cost estimate, up front)."""
    first = [True]

    def timed(factors: list[float]) -> float:
        t0 = time.perf_counter()
        value = objective(factors)
        if first[0]:
            first[0] = False
            announce(time.perf_counter() - t0)
        return value

    return timed


def _fingerprint(ctx: Any, cfg: SearchConfig, method: str) -> str:
    payload = {"method": method, "config": dataclasses.asdict(cfg), "seed": ctx.recipe.seed,
               "model": ctx.recipe.model, "dtype": str(next(ctx.model.parameters()).dtype), "device": ctx.device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_search(ctx: Any, cfg: SearchConfig, *, v2: bool) -> StageResult:
    """LongRoPE v1 / LongRoPE2: evolutionary search, optional fine-tuning, config write."""
    from effllm_tools.data.needles import load_haystack
    from effllm_tools.methods.longrope.objective import make_objective
    from effllm_tools.methods.longrope.search import Evolution

    method = "longrope2" if v2 else "longrope"
    check_plain_rope(ctx.model)
    original, target, s = lengths(ctx, cfg)
    base, dim = rope.rope_base_and_dim(ctx.model.config)
    mscale = rope.resolve_mscale(cfg.mscale, s, original)
    space, init, tcd = search_space(cfg, v2=v2, base=base, dim=dim, original=original, s=s)
    doc_lengths, docs = search_lengths(cfg, original, target), search_documents(cfg, original, target)
    if ctx.tokenizer is None:
        raise UnsupportedError("context-extension search needs the model's tokenizer to build documents")
    hay = load_haystack(ctx.tokenizer, cfg.dataset)
    ctx.model.to(ctx.device).eval()
    objective, data_meta = make_objective(ctx.model, hay, kind="needle" if v2 else "ppl", lengths=doc_lengths,
                                          samples=cfg.samples, needles=getattr(cfg, "needles", 0), mscale=mscale,
                                          seed=ctx.recipe.seed, device=ctx.device)
    state = ctx.state_dir / method / "search.json" if ctx.state_dir is not None else None
    budget = cfg.population + cfg.iterations * (cfg.mutations + cfg.crossovers)
    timed = _announce_cost(objective, lambda dt: ctx.reporter.info(
        f"{method}: one candidate ({cfg.samples} documents of {'/'.join(map(str, docs))} tokens) took {dt:.1f} s "
        f"on {ctx.device}; the search evaluates at most {budget} candidates: up to {format_duration(dt * budget)} "
        f"(Ctrl-C and --resume continue it; smaller: --set {method}.population=... / iterations=... / parents=..., "
        f"parents <= population)"))

    def on_iteration(it: int, best: float, evaluations: int) -> None:
        ctx.reporter.info(f"{method}: iteration {it}/{cfg.iterations}, best objective {best:.4f} "
                          f"(ppl {math.exp(best):.3f}), {evaluations} evaluations, {format_duration(time.perf_counter() - t0)}")

    evo = Evolution(space, timed, cfg, ctx.recipe.seed, state, _fingerprint(ctx, cfg, method))
    t0 = time.perf_counter()
    result = evo.run(init, resume=ctx.resume, starts=extra_starts(cfg, space, s), on_iteration=on_iteration,
                     progress=lambda steps, total: ctx.reporter.progress_iter(steps, f"{method} search", total=total))
    search_s = time.perf_counter() - t0
    ctx.reporter.info(f"{method}: best objective {result.objective:.4f} (ppl {math.exp(result.objective):.3f}) "
                      f"after {result.evaluations} evaluations, {search_s:.1f} s")
    metrics: dict[str, Any] = {
        "scale": s, "original_length": original, "attention_factor": mscale, "long_factor": result.factors,
        "theoretical_critical_dim": tcd, "critical_dim": result.rcd if v2 else None,
        "search_objective": result.objective, "search_ppl": math.exp(result.objective),
        "initial_objective": result.curve[0] if result.curve else None,
        "search_curve": result.curve, "search_curve_ppl": [math.exp(v) for v in result.curve],
        "search_evaluations": result.evaluations, "search_s": search_s, "search_resumed_from": result.resumed_from,
        "search_data": data_meta,
    }
    if cfg.finetune_tokens > 0:
        from effllm_tools.methods.longrope.finetune import mixed_window_finetune

        metrics.update(mixed_window_finetune(
            ctx.model, hay, long_factors=result.factors, mscale=mscale, short_len=original, long_len=max(docs),
            tokens=cfg.finetune_tokens, lr=cfg.finetune_lr, short_fraction=cfg.finetune_short_fraction,
            seed=ctx.recipe.seed, device=ctx.device, reporter=ctx.reporter))
    ctx.model.to("cpu")
    params = rope.longrope_parameters(base, result.factors, original, target, mscale)
    return _finish(ctx, params, target, metrics)


def apply_longrope(ctx: Any, cfg: SearchConfig) -> StageResult:
    return run_search(ctx, cfg, v2=False)


def apply_longrope2(ctx: Any, cfg: LongRoPE2Config) -> StageResult:
    return run_search(ctx, cfg, v2=True)


_SPECS = (
    ("longrope2", "LongRoPE2: needle-driven evolutionary search of per-dimension RoPE factors",
     LongRoPE2Config, apply_longrope2, "arXiv 2502.20082"),
    ("longrope", "LongRoPE v1: evolutionary search of RoPE factors on long-document perplexity",
     SearchConfig, apply_longrope, "arXiv 2402.13753"),
    ("pi", "position interpolation (linear RoPE scaling)", ScalingConfig, apply_pi, "arXiv 2306.15595"),
    ("ntk", "static NTK-aware RoPE base scaling (written as longrope factors)", ScalingConfig, apply_ntk, ""),
    ("yarn", "YaRN RoPE scaling (beta_fast 32, beta_slow 1)", YarnConfig, apply_yarn, "arXiv 2309.00071"),
)
for _name, _summary, _config, _apply, _paper in _SPECS:
    register_method(MethodSpec(_name, "extend-context", "extend-context", _summary, config=_config, apply=_apply,
                               paper=_paper))

"""Run a recipe: load once, apply every stage in one process, write one checkpoint."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effllm_tools.errors import BadInputError
from effllm_tools.io.load import LoadedModel, load_config, load_model, resolve_source
from effllm_tools.io.save import PROVENANCE_FILE, check_output_path, output_lock, write_checkpoint
from effllm_tools.provenance import base_record, recipe_hash
from effllm_tools.recipe import Recipe
from effllm_tools.reporting import Reporter

QUANT_METHOD = "effllm"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA GPU is available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StageContext:
    """What a method's ``apply`` gets: the model and the shared services of the run."""

    loaded: LoadedModel
    recipe: Recipe
    device: str
    reporter: Reporter
    layers_prefix: str
    arch: Any
    state_dir: Path | None = None
    resume: bool = False
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    _calibration: Any = None
    _text_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def progress_iter(self, items: list, label: str):
        return self.reporter.progress_iter(items, label, total=len(items))

    def record_module(self, name: str, spec: dict[str, Any]) -> None:
        """A method that swapped ``name`` for a packed module records its format spec here."""
        self.modules[name] = spec

    def calibration(self) -> Any:
        """The recipe's calibration windows, tokenized and sampled once per run."""
        if self._calibration is None:
            from effllm_tools.data.calibration import sample_calibration, tokenize_text
            from effllm_tools.data.sources import load_text

            cal = self.recipe.calibration
            text = load_text(cal["dataset"], field=cal["field"])
            ids = tokenize_text(self.tokenizer, text.text)
            self._calibration = sample_calibration(ids, cal["nsamples"], cal["seqlen"], self.recipe.seed)
            self._text_meta = {"dataset": cal["dataset"], "text_sha256": text.meta.get("sha256")}
        return self._calibration

    def calibration_record(self) -> dict[str, Any] | None:
        """Provenance of the calibration data, if a stage used any."""
        if self._calibration is None:
            return None
        starts = self._calibration.meta.get("starts")
        meta = {k: v for k, v in self._calibration.meta.items() if k != "starts"}
        return {**self._text_meta, **meta, "sample_sha256": self._calibration.sha256, "windows": len(starts or [])}


def layers_prefix_of(model: Any, arch: Any) -> str:
    from effllm_tools.pipeline.arch import decoder_layers

    layers = decoder_layers(model, arch)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise BadInputError("cannot locate the decoder layers in the model")


#: Stage kinds that rewrite the dense linear weights: they need a checkpoint whose weights are not packed.
DENSE_KINDS = ("rotate", "prune", "weight-quant")


def check_stages_against_config(recipe: Recipe, model_config: Any) -> None:
    """Stage checks that need only the model's config (a stage config's ``check_model``), so bad
    input such as a target length below the model's window fails before any weight is loaded; and
    no weight rewrite of an already quantized checkpoint (its linears are packed modules)."""
    qc = getattr(model_config, "quantization_config", None)
    if qc:
        qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
        done = qc.get("methods") or [qc.get("quant_method", "unknown")]
        for stage in recipe.stages:
            if stage.spec.kind in DENSE_KINDS:
                raise BadInputError(f"{stage.method}: the input is already quantized ({', '.join(map(str, done))}); "
                                    f"{stage.spec.verb} takes a checkpoint with dense weights")
    for stage in recipe.stages:
        check = getattr(stage.config, "check_model", None)
        if check is not None:
            check(model_config)


def check_recipe_output(recipe: Recipe, source: Any) -> None:
    """The recipe's output path against the source and the overwrite rule (``check_output_path``)."""
    check_output_path(Path(recipe.output["path"]), overwrite=recipe.output["overwrite"],
                      inputs=[source.input_path] if source.path else [])


def check_before_loading(recipe: Recipe, model: str | None) -> tuple[Any, Any]:
    """Everything the run and ``--dry-run`` refuse before a weight is loaded: no model, no output path,
    the output path's rules, the stages against the model config, a missing calibration or stage text.
    Returns (source, config)."""
    from effllm_tools.data.sources import check_text_spec

    if model is None:
        raise BadInputError("the recipe names no model (set 'model:' or pass MODEL)")
    if not recipe.output.get("path"):
        raise BadInputError("no output directory: pass -o/--output or set output.path in the recipe")
    source = resolve_source(model)
    check_recipe_output(recipe, source)
    config = load_config(source)
    check_stages_against_config(recipe, config)
    if recipe.needs_calibration:
        check_text_spec(recipe.calibration["dataset"])
    for st in recipe.stages:  # a stage's own text (longrope's needle documents)
        dataset = st.to_dict().get("dataset")
        if isinstance(dataset, str):
            check_text_spec(dataset)
    return source, config


def plan_recipe(recipe: Recipe, *, model: str | None = None) -> dict[str, Any]:
    """``--dry-run``: validate and describe without loading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from effllm_tools.pipeline.arch import get_arch

    source, config = check_before_loading(recipe, recipe.model if model is None else model)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    meta.tie_weights()  # from_config leaves a tied LM head untied: it would count twice
    arch = get_arch(config)
    prefix = layers_prefix_of(meta, arch)
    linears = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]
    params = sum(p.numel() for p in meta.parameters())
    return {
        "model": source.describe(),
        "model_type": config.model_type,
        "parameters": params,
        "stages": [st.to_dict() for st in recipe.stages],
        # what a stage resolves from the model's config (a stage config's ``plan_details``), e.g. the
        # search documents' lengths that a default eval_length stands for
        "stage_details": [getattr(st.config, "plan_details", lambda _c: {})(config) for st in recipe.stages],
        "matched_linear_modules": len(linears),
        "estimated_host_memory_gb": round(params * 4 / 1e9 * 1.2, 2),
        "calibration": recipe.calibration if recipe.needs_calibration else None,
    }


def input_history(source: Any) -> list[dict[str, Any]]:
    """The stages an effllm input went through (its provenance's ``history`` and ``stages``), oldest
    first, so a chain of commands keeps its record: [{"method", "config", "metrics", "output"}]."""
    prov_path = source.path / PROVENANCE_FILE if source.kind == "directory" and source.path else None
    if prov_path is None or not prov_path.is_file():
        return []
    try:
        prov = json.loads(prov_path.read_text())
        return [*prov.get("history", []),
                *({**st, "output": str(source.path)} for st in prov.get("stages", []))]
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged record does not stop a run
        return []


def run_recipe(recipe: Recipe, *, device: str = "auto", dtype: str | None = None, reporter: Reporter | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Load the model, apply the stages, write the output. Returns the result record."""
    from effllm_tools.pipeline.arch import get_arch

    reporter = reporter or Reporter()
    source, _ = check_before_loading(recipe, recipe.model)
    out = Path(recipe.output["path"])
    with output_lock(out):  # a second run on the same -o would delete this one's state and output
        device = resolve_device(device)
        logging.getLogger("effllm").debug("recipe %s on %s, seed %d, stages %s, calibration %s", recipe.model, device,
                                          recipe.seed, [st.to_dict() for st in recipe.stages], recipe.calibration)
        seed_everything(recipe.seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        loaded = load_model(recipe.model, device="cpu", dtype=dtype)
        timings["load_s"] = time.perf_counter() - t0
        arch = get_arch(loaded.model.config)
        state_dir = out.parent / f".{out.name}.state"
        has_state = lambda: state_dir.is_dir() and any(state_dir.iterdir())  # noqa: E731 - read twice below
        if not resume and has_state():
            logging.getLogger("effllm").warning(
                "an interrupted run's saved state is in %s and this run starts over, replacing it: stop now and "
                "rerun with --resume to continue from it instead", state_dir)
        ctx = StageContext(loaded, recipe, device, reporter, layers_prefix_of(loaded.model, arch), arch,
                           state_dir=state_dir, resume=resume)
        stage_records = []
        for i, stage in enumerate(recipe.stages):
            reporter.info(f"stage {i}: {stage.method}")
            t = time.perf_counter()
            try:
                result = stage.spec.apply(ctx, stage.config)
            except BaseException:  # Ctrl-C, SIGTERM, a crash: the saved state stays for --resume
                if has_state():
                    logging.getLogger("effllm").warning(
                        "the interrupted run's saved state (finished calibration layers, search iterations) is "
                        "kept in %s: the same command with --resume continues from it (delete the folder to "
                        "start over)", state_dir)
                raise
            for key in ("quantized_modules", "pruned_modules"):
                if result.metrics.get(key) == 0:
                    raise BadInputError(f"{stage.method}: no linear layer was changed (does `ignore` match them all?)")
            timings[f"stage{i}_{stage.method}_s"] = time.perf_counter() - t
            stage_records.append({"method": stage.method, "config": stage.to_dict(), "metrics": result.metrics})
        if ctx.modules:
            loaded.model.config.quantization_config = {
                "quant_method": QUANT_METHOD, "version": 1,
                "methods": [st.method for st in recipe.stages], "modules": ctx.modules,
            }
        metrics = {k: v for rec in stage_records for k, v in rec["metrics"].items()}
        recipe_dict = portable_recipe(recipe.to_dict(), out, source)
        provenance = {
            **base_record(device),
            "source": source.describe(),
            "history": input_history(source),
            "recipe_sha256": recipe_hash(recipe_dict),
            "seed": recipe.seed,
            "data": ctx.calibration_record(),
            "stages": stage_records,
            "metrics": metrics,
        }
        t = time.perf_counter()
        written = write_checkpoint(loaded.model, loaded.tokenizer, out, overwrite=recipe.output["overwrite"],
                                   provenance={**provenance, "timings": timings}, recipe=recipe_dict)
        timings["write_s"] = time.perf_counter() - t
        if state_dir.exists():
            shutil.rmtree(state_dir, ignore_errors=True)
        return {"output_dir": str(written), "metrics": metrics, "timings": timings, "stages": stage_records,
                "provenance": provenance}


def portable_recipe(recipe: dict[str, Any], out: Path, source: Any) -> dict[str, Any]:
    """The recipe as saved beside an output: the local paths the run read (the model directory or
    .gguf file as ``source`` resolved it, text files and folders named as datasets) absolute, and
    ``output.path`` the output's, so that ``effllm run OUT/effllm_recipe.yaml`` works from any directory.
    Hub ids, ``demo`` and named datasets stay names, as the loaders read them (a named set wins over a
    same-named local folder unless the spec looks like a path)."""
    from effllm_tools.data.sources import names_a_set

    def dataset(value: Any) -> Any:
        if isinstance(value, str) and value and not names_a_set(value) and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    model = recipe.get("model")
    if source.kind in ("directory", "gguf"):
        model = str(source.path / source.gguf_file) if source.kind == "gguf" else str(source.path)
    saved = {**recipe, "model": model, "output": {**recipe.get("output", {}), "path": str(out.expanduser().resolve())}}
    if isinstance(saved.get("calibration"), dict):
        saved["calibration"] = {**saved["calibration"], "dataset": dataset(saved["calibration"].get("dataset"))}
    saved["stages"] = [{**st, "dataset": dataset(st["dataset"])} if "dataset" in st else st
                       for st in recipe.get("stages", [])]
    return saved

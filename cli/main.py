"""The ``effllm`` command line: parse flags, build a recipe, call effllm_tools, render. No algorithms."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from effllm_cli.output import RichReporter, Terminated, Ui, effllm_version, run_guarded

app = typer.Typer(
    name="effllm",
    help="Compress and extend pretrained LLM checkpoints. MODEL is a transformers directory, a .gguf file, "
    "a hub id, or 'demo' (the offline SmolLM2-135M model). Exit codes: 0 ok, 1 internal error, 2 bad input, "
    "3 out of memory, 4 unsupported model or method, 5 quality gate failed, 130 interrupted, 143 terminated.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Options shared by the commands (Typer has no option groups: these aliases keep them identical).
ModelArg = Annotated[str, typer.Argument(help="Model directory, .gguf file, hub id, or 'demo'.", show_default=False)]
# Compress verbs take MODEL optionally so that `--list-methods` needs none; _require_model checks it.
CompressModelArg = Annotated[str | None, typer.Argument(help="Model directory, .gguf file, hub id, or 'demo'.",
                                                        show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Output directory (must not exist unless --overwrite).")]
MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help="Method name (see --list-methods).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key=value, e.g. rtn.bits=3.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", help="Text: file, folder, .jsonl, or a named set (austen, pydocs, calib-mix, ...).")]
FieldOpt = Annotated[str, typer.Option("--field", help="JSONL field holding the text.")]
NsamplesOpt = Annotated[int | None, typer.Option("--nsamples", help="Calibration windows.")]
SeqlenCalOpt = Annotated[int | None, typer.Option("--calib-seqlen", help="Tokens per calibration window.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes on the CPU).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (as stored), float32, bfloat16 or float16.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Validate and show the plan; read headers only, write nothing.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its saved state (calibration layers, search iterations).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one schema-versioned JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="Debug logs and tracebacks.")]
ListOpt = Annotated[bool, typer.Option("--list-methods", help="List the methods of this command and exit.")]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"effllm {effllm_version()}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """effllm: compress and extend LLM checkpoints."""


def _finish(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _require_model(model: str | None) -> str:
    from effllm_tools.errors import BadInputError

    if model is None:  # an empty one reaches io.load.resolve_source, which says so for every verb
        raise BadInputError("missing argument MODEL (a model directory, .gguf file, hub id, or 'demo')")
    return model


def _list_methods(ui: Ui, verb: str) -> None:
    from effllm_tools.registry import all_methods

    rows = [m for m in all_methods().values() if m.verb == verb]
    payload = {"methods": [{"name": m.name, "available": m.available, "summary": m.summary, "paper": m.paper,
                            "keys": list(m.keys())} for m in rows]}
    plain = "\n".join(f"{m.name:<12} {'available' if m.available else 'not available'}  {m.summary}" for m in rows)
    ui.result(payload, plain)


def _flag_as_typed(key: str, value: Any) -> str:
    """A stage-key flag as the user typed it: ``--bits 3``, ``--symmetric`` / ``--asymmetric``."""
    if isinstance(value, bool):
        return {"symmetric": "--symmetric" if value else "--asymmetric"}.get(key, f"--{key.replace('_', '-')} {value}")
    return f"--{key.replace('_', '-')} {value}"


def _same_value(a: Any, b: Any) -> bool:
    """Whether a flag's value and a --set's YAML value name the same setting: equal as given, as text,
    or once both are read as YAML (flag "0.5" and --set 0.5; 4 and 4.0)."""
    import yaml

    def as_yaml(v: Any) -> Any:
        try:
            return yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            return v

    return a == b or str(a) == str(b) or as_yaml(a) == as_yaml(b)


def _compress(ui: Ui, verb: str, model: str, output: Path | None, method: str, stage_keys: dict[str, Any], *,
              sets: list[str] | None, dataset: str | None, field: str, nsamples: int | None, calib_seqlen: int | None,
              seed: int, device: str, dtype: str, overwrite: bool, dry_run: bool, resume: bool) -> None:
    """Build a one-stage recipe from flags and run it (or plan it with --dry-run)."""
    from effllm_tools.errors import BadInputError
    from effllm_tools.recipe import apply_override, parse_recipe
    from effllm_tools.registry import get_method

    spec = get_method(method, verb)  # unknown / unavailable methods exit before anything loads
    if dataset is not None and "dataset" in spec.keys():  # a method with its own text (longrope's needle
        stage_keys = {**stage_keys, "dataset": dataset}    # documents) takes --dataset as that key
        dataset = None
    calibration = {k: v for k, v in {"dataset": dataset, "field": field, "nsamples": nsamples,
                                     "seqlen": calib_seqlen}.items() if v is not None}
    raw: dict[str, Any] = {
        "version": 1, "model": model, "seed": seed, "calibration": calibration,
        "stages": [{"method": method, **{k: v for k, v in stage_keys.items() if v is not None}}],
        "output": {"path": str(output) if output else None, "overwrite": overwrite},
    }
    flagged = {("stages", 0, k): (_flag_as_typed(k, v), v) for k, v in stage_keys.items() if v is not None}
    flagged.update({("calibration", k): (f"{flag} {v}", v) for k, flag, v in (
        ("dataset", "--dataset", dataset), ("nsamples", "--nsamples", nsamples), ("seqlen", "--calib-seqlen", calib_seqlen))
        if v is not None})
    if output:
        flagged[("output", "path")] = (f"-o {output}", str(output))
    for item in sets or []:
        apply_override(raw, item)
    for path, (typed, value) in flagged.items():  # a --set that silently replaced a flag hides a mistake
        node: Any = raw
        for part in path:
            node = node[part] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        if not _same_value(node, value):
            raise BadInputError(f"{typed} and --set {'.'.join(map(str, path))}={node} disagree: give one of them")
    recipe = parse_recipe(raw, source="command line")
    _execute(ui, recipe, device=device, dtype=dtype, dry_run=dry_run, resume=resume)


def _execute(ui: Ui, recipe: Any, *, device: str, dtype: str, dry_run: bool, resume: bool) -> None:
    from effllm_tools.reporting import key_values
    from effllm_tools.runner import plan_recipe, run_recipe

    if dry_run:
        plan = plan_recipe(recipe)
        lines = [f"model: {plan['model']['spec']} ({plan['model_type']}, {plan['parameters'] / 1e6:.1f}M parameters)"]
        for i, (st, details) in enumerate(zip(plan["stages"], plan["stage_details"], strict=True)):
            lines.append(f"stage {i}: {st['method']} {key_values(st, skip=('method',))}")
            if details:
                lines.append(f"stage {i} resolved: {key_values(details)}")
        if plan.get("calibration"):
            lines.append(f"calibration: {key_values(plan['calibration'])}")
        lines.append(f"matched linear modules: {plan['matched_linear_modules']}")
        lines.append(f"estimated host memory: {plan['estimated_host_memory_gb']} GB")
        if recipe.output.get("path"):
            lines.append(f"output: {recipe.output['path']}")
        ui.result({"dry_run": True, "plan": plan}, "\n".join(lines))
        return
    result = run_recipe(recipe, device=device, dtype=None if dtype == "auto" else dtype,
                        reporter=RichReporter(ui), resume=resume)
    ui.result({k: result[k] for k in ("output_dir", "metrics", "timings", "stages")}, result["output_dir"])


@app.command()
def quantize(
    model: CompressModelArg = None, output: OutOpt = None, method: MethodOpt = "rtn",
    bits: Annotated[int | None, typer.Option("--bits", help="Weight bits.")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="Group size (<= 0: per output channel).")] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", help="Grid type.")] = None,
    sets: SetOpt = None, dataset: DatasetOpt = None, field: FieldOpt = "text", nsamples: NsamplesOpt = None,
    calib_seqlen: SeqlenCalOpt = None, seed: SeedOpt = 0, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, resume: ResumeOpt = False, json: JsonOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False, list_methods: ListOpt = False,
) -> None:
    """Quantize weights: effllm quantize --method rtn --bits 4 --group-size 64 demo -o out/"""
    ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command="quantize")
    if list_methods:
        return _finish(run_guarded(ui, lambda: _list_methods(ui, "quantize")))
    keys = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    _finish(run_guarded(ui, lambda: _compress(
        ui, "quantize", _require_model(model), output, method or "rtn", keys, sets=sets, dataset=dataset, field=field,
        nsamples=nsamples, calib_seqlen=calib_seqlen, seed=seed, device=device, dtype=dtype, overwrite=overwrite,
        dry_run=dry_run, resume=resume)))


def _simple_verb(verb: str, default_method: str, doc: str, extra: dict[str, tuple[type, str]]) -> None:
    """Register a compress verb whose stage keys are the given extra options."""

    def command(
        model: CompressModelArg = None, output: OutOpt = None, method: MethodOpt = default_method, sets: SetOpt = None,
        dataset: DatasetOpt = None, field: FieldOpt = "text", nsamples: NsamplesOpt = None,
        calib_seqlen: SeqlenCalOpt = None, seed: SeedOpt = 0, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
        overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, resume: ResumeOpt = False, json: JsonOpt = False,
        quiet: QuietOpt = False, verbose: VerboseOpt = False, list_methods: ListOpt = False, **keys: Any,
    ) -> None:
        ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command=verb)
        if list_methods:
            return _finish(run_guarded(ui, lambda: _list_methods(ui, verb)))
        _finish(run_guarded(ui, lambda: _compress(
            ui, verb, _require_model(model), output, method or default_method, keys, sets=sets, dataset=dataset, field=field,
            nsamples=nsamples, calib_seqlen=calib_seqlen, seed=seed, device=device, dtype=dtype,
            overwrite=overwrite, dry_run=dry_run, resume=resume)))

    import inspect
    import typing

    sig = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)  # resolve the string annotations
    params = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values()
              if p.kind != inspect.Parameter.VAR_KEYWORD]
    for name, (tp, help_text) in extra.items():
        opt = typer.Option("--" + name.replace("_", "-"), help=help_text)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[tp | None, opt]))
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    app.command(verb)(command)


_simple_verb("quantize-kv", "aqua-kv", "Quantize the KV cache: effllm quantize-kv --method aqua-kv MODEL -o OUT",
             {"bits": (int, "KV bits.")})
_simple_verb("prune", "wanda", "Prune weights: effllm prune --method wanda --sparsity 2:4 MODEL -o OUT",
             {"sparsity": (str, "A ratio such as 0.5, or N:M such as 2:4.")})
_simple_verb("extend-context", "longrope2",
             "Extend the context window: effllm extend-context --method longrope2 --target-length 32768 MODEL -o OUT",
             {"target_length": (int, "New context length in tokens."),
              "finetune_tokens": (int, "longrope2/longrope: mixed context-window fine-tuning budget in tokens.")})
_simple_verb("sparsify-attn", "seer", "Block-sparse attention gates: effllm sparsify-attn --method seer MODEL -o OUT",
             {"sparsity": (float, "Target attention sparsity.")})


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    model: Annotated[str | None, typer.Option("--model", help="Override the recipe's model.")] = None,
    output: OutOpt = None, sets: SetOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, resume: ResumeOpt = False, json: JsonOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Run a recipe (several stages, one process): effllm run recipes/rtn-4bit.yaml -o out/"""
    ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command="run")

    def body() -> None:
        from effllm_tools.recipe import load_recipe_file

        overrides = list(sets or [])
        if model:
            overrides.append(f"model={model}")
        if output:
            overrides.append(f"output.path={output}")
        if overwrite:
            overrides.append("output.overwrite=true")
        _execute(ui, load_recipe_file(recipe, overrides), device=device, dtype=dtype, dry_run=dry_run, resume=resume)

    _finish(run_guarded(ui, body))


def _check_gate(flag: str, limit: float | None, low: float, high: float) -> None:
    """A quality gate's limit must be a finite number in [low, high] (NaN passed every result)."""
    import math

    from effllm_tools.errors import BadInputError

    if limit is not None and not (math.isfinite(limit) and low <= limit <= high):
        bound = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
        raise BadInputError(f"{flag} must be a finite number {bound}, got {limit}")


def _gated_result(ui: Ui, res: dict[str, Any], plain: str, gate: str, limit: float | None, *, failed: bool,
                  message: str) -> None:
    """Print an evaluation result with its quality gate (``--max-ppl`` / ``--min-accuracy``): a failed
    gate still prints the result (status ``gate_failed``), then exits 5 with ``message``."""
    from effllm_tools.errors import QualityGateError

    if limit is not None:
        res["gate"] = {gate: limit, "passed": not failed}
    if failed:  # the keys every failure's JSON object has (README, Exit codes)
        res = {**res, "exit_code": int(QualityGateError.exit_code), "error": message}
    ui.result(res, plain, status="gate_failed" if failed else "ok")
    if failed:
        raise QualityGateError(message)


@app.command("eval-ppl")
def eval_ppl(
    model: ModelArg,
    dataset: Annotated[str, typer.Option("--dataset", help="Evaluation text (file, folder, .jsonl or named set).")] = "austen-prideprejudice",
    field: FieldOpt = "text",
    seqlen: Annotated[int, typer.Option("--seqlen", help="Window length in tokens.")] = 2048,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 1,
    kld_base: Annotated[str | None, typer.Option("--kld-base", help="Also report KL(base || MODEL) per token.")] = None,
    max_ppl: Annotated[float | None, typer.Option("--max-ppl", help="Exit 5 if the perplexity exceeds this.")] = None,
    allow_beyond_max: Annotated[bool, typer.Option("--allow-beyond-max", help="Allow --seqlen above max_position_embeddings.")] = False,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Perplexity by the GPTQ protocol: effllm eval-ppl demo --seqlen 512 --max-tokens 20480 --json"""
    ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command="eval-ppl")

    def body() -> None:
        from effllm_tools.eval.run import run_eval_ppl

        _check_gate("--max-ppl", max_ppl, 0.0, float("inf"))
        res = run_eval_ppl(model, dataset=dataset, field=field, seqlen=seqlen, max_tokens=max_tokens,
                           batch_size=batch_size, kld_base=kld_base, device=device, dtype=dtype, seed=seed,
                           reporter=RichReporter(ui), allow_beyond_max=allow_beyond_max)
        ppl = res["metrics"]["ppl"]
        plain = f"ppl {ppl:.4f}" + (f"  kld {res['metrics']['kld']:.5f}" if kld_base else "")
        finite = math.isfinite(ppl)
        if not finite:  # NaN / inf: broken weights or an overflow, never a passing measurement
            logging.getLogger("effllm").warning("the perplexity is not finite (%s): the model produced NaN or "
                                                "infinite losses", ppl)
        _gated_result(ui, res, plain, "max_ppl", max_ppl, failed=max_ppl is not None and not (finite and ppl <= max_ppl),
                      message=(f"perplexity {ppl:.4f} exceeds --max-ppl {max_ppl}" if finite
                               else f"perplexity is not finite ({ppl}); --max-ppl {max_ppl} fails"))

    _finish(run_guarded(ui, body))


@app.command("eval-passkey")
def eval_passkey(
    model: ModelArg,
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated lengths in tokens (prompt + generated answer).")] = "2048,8192",
    depths: Annotated[str, typer.Option("--depths", help="Comma-separated needle depths in [0, 1].")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option("--trials", help="Prompts per (length, depth).")] = 5,
    dataset: Annotated[str, typer.Option("--dataset", help="Haystack text (file, folder, .jsonl or named set).")] = "austen-persuasion",
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="Exit 5 if the accuracy is below this.")] = None,
    allow_beyond_max: Annotated[bool, typer.Option("--allow-beyond-max", help="Allow lengths above max_position_embeddings.")] = False,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", seed: SeedOpt = 0, json: JsonOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Passkey retrieval accuracy: effllm eval-passkey MODEL --lengths 2048,8192 --depths 0,0.5,1 --trials 5 --json"""
    ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command="eval-passkey")

    def body() -> None:
        from effllm_tools.eval.passkey import parse_list, run_eval_passkey

        _check_gate("--min-accuracy", min_accuracy, 0.0, 1.0)
        res = run_eval_passkey(model, lengths=parse_list(lengths, int, "lengths"), depths=parse_list(depths, float, "depths"),
                               trials=trials, dataset=dataset, device=device, dtype=dtype, seed=seed,
                               allow_beyond_max=allow_beyond_max, reporter=RichReporter(ui))
        acc = res["metrics"]["accuracy"]
        plain = "\n".join([f"accuracy {acc:.3f}"] + [f"  {n:>7} tokens: {a:.3f}"
                                                      for n, a in res["metrics"]["accuracy_by_length"].items()])
        _gated_result(ui, res, plain, "min_accuracy", min_accuracy, failed=min_accuracy is not None and acc < min_accuracy,
                      message=f"passkey accuracy {acc:.3f} is below --min-accuracy {min_accuracy}")

    _finish(run_guarded(ui, body))


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="An effllm output directory (or any transformers checkpoint).")],
    json: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False,
) -> None:
    """What a checkpoint holds: methods applied, bits, sparsity, rope scaling, provenance."""
    ui = Ui(quiet=quiet, verbose=verbose, json_mode=json, command="inspect")

    def body() -> None:
        from effllm_tools.errors import BadInputError
        from effllm_tools.io.inspect import inspect_checkpoint, render_inspection

        if not path.strip():
            raise BadInputError("empty PATH argument (an unset variable, or a failed command in a chain?)")
        if path == "demo":  # the base demo model's cached folder, as every other verb reads it
            from effllm_tools.io.demo import ensure_demo_checkpoint

            info = inspect_checkpoint(ensure_demo_checkpoint())
        else:
            info = inspect_checkpoint(Path(path))
        ui.result(info, render_inspection(info))

    _finish(run_guarded(ui, body))


def _parser_error(err: BaseException) -> bool:
    """A usage error of the argument parser (click's, or the copy Typer vendors): exit code 2, a message."""
    return any(c.__name__ == "UsageError" for c in type(err).__mro__) and hasattr(err, "format_message")


def main() -> None:
    """Run the app; a usage error that the parser finds (an unknown option, a value of the wrong type)
    is one ``effllm: error:`` line, exit 2, and with ``--json`` an error object on stdout, like every
    other error. SIGTERM is handled like Ctrl-C (clean-up, the error line, exit 143)."""
    import signal

    def _terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except Exception as err:  # noqa: BLE001 - only the parser's usage errors are handled here
        if not _parser_error(err):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `effllm`: the help, on stderr, as usage
            err.show()  # type: ignore[attr-defined]
            sys.exit(2)
        args = sys.argv[1:]
        ui = Ui(json_mode="--json" in args, command=next((a for a in args if not a.startswith("-")), ""))
        code = ui.fail(2, err.format_message().strip().splitlines()[0])  # type: ignore[attr-defined]
    code = code if isinstance(code, int) else 0
    if code == 0:  # done and reported: a Ctrl-C / SIGTERM in the ~1 s of interpreter teardown that follows
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (freeing the model, thread pools) must not turn a
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # complete output into exit 130 / 143
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Bad input: one line naming the problem, the documented exit code, input untouched, no output left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import run_cli, tree_digest


def _assert_clean_failure(proc, code, needle, out=None):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, proc.stderr  # one line, no traceback
    assert err_lines[0].startswith("effllm: error: ") and needle in err_lines[0], err_lines[0]
    assert proc.stdout == ""
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def test_missing_model_path(tmp_path):
    out = tmp_path / "o"
    proc = run_cli("quantize", str(tmp_path / "nope"), "-o", str(out))
    _assert_clean_failure(proc, 2, "no such file or directory", out)


@pytest.mark.parametrize("verb", ["quantize", "prune", "extend-context"])
def test_missing_model_argument(tmp_path, verb):
    proc = run_cli(verb, "-o", str(tmp_path / "o"))
    _assert_clean_failure(proc, 2, "missing argument MODEL", tmp_path / "o")


def test_truncated_safetensors(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = tree_digest(broken)
    out = tmp_path / "o"
    proc = run_cli("quantize", str(broken), "-o", str(out))
    _assert_clean_failure(proc, 2, "safetensors", out)
    assert tree_digest(broken) == before


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    before = bad.read_bytes()
    out = tmp_path / "o"
    proc = run_cli("quantize", str(bad), "-o", str(out))
    _assert_clean_failure(proc, 2, "GGUF", out)
    assert bad.read_bytes() == before


def test_non_decoder_model_is_unsupported(tmp_path):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    out = tmp_path / "o"
    proc = run_cli("quantize", str(bert), "-o", str(out))
    _assert_clean_failure(proc, 4, "bert", out)


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("quantize", "--method", "nope"), 2, "unknown method 'nope'"),  # a typo: bad input, as in a recipe
    (("quantize", "--method", "wanda"), 2, "unknown method 'wanda' for quantize"),
    (("quantize", "--method", "quarot"), 4, "not available"),
    (("prune", "--method", "wanda++", "--set", "wanda++.alpha=-1"), 2, "alpha must be"),
    (("extend-context", "--target-length", "128"), 2, "must exceed the original context"),
    (("extend-context", "--target-length", "512", "--set", "longrope2.eval_length=256"), 2,
     "eval_length 256 must exceed the original context"),
    (("extend-context", "--target-length", "512", "--set", "longrope2.eval_length=[]"), 2,
     "eval_length must name at least one length"),
    (("quantize-kv",), 4, "not available"),
    (("sparsify-attn",), 4, "not available"),
    (("quantize", "--bits", "11"), 2, "bits must be between 2 and 8"),
    # a flag and a --set of the same key that disagree (the --set used to win silently)
    (("quantize", "--method", "spqr", "--bits", "3", "--set", "spqr.bits=4"), 2,
     "--bits 3 and --set stages.0.bits=4 disagree"),
    (("quantize", "--method", "gptq", "--nsamples", "8", "--set", "calibration.nsamples=16"), 2,
     "--nsamples 8 and --set calibration.nsamples=16 disagree"),
    (("quantize", "--asymmetric", "--set", "rtn.symmetric=true"), 2, "--asymmetric and --set stages.0.symmetric=True"),
    (("extend-context", "--method", "yarn", "--target-length", "512", "--set", "yarn.beta_fast=1",
      "--set", "yarn.beta_slow=32"), 2, "need beta_fast > beta_slow > 0"),  # swapped: silently a worse model
    (("quantize", "--seed", str(10**23)), 2, "'seed' must be an integer in [0, 2**63)"),  # was an internal error
])
def test_methods_and_keys_are_checked_before_loading(tiny_llama, tmp_path, args, code, needle):
    out = tmp_path / "o"
    proc = run_cli(*args, str(tiny_llama), "-o", str(out))
    _assert_clean_failure(proc, code, needle, out)


def test_recipe_with_unknown_key_or_wrong_type(tiny_llama, tmp_path):
    for body, needle in [("  - method: rtn\n    bitz: 4\n", "unknown key 'bitz'"),
                         ("  - method: rtn\n    bits: four\n", "stages[0].bits: expected int"),
                         ("  - method: spqrr\n", "stages[0]: unknown method 'spqrr'"),
                         ("  - method: rtn\ncalibration: {nsamples: null}\n", "calibration.nsamples: expected int"),
                         ("  - method: rtn\ncalibration: {seqlen: 0}\n", "calibration.seqlen: must be at least 1")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"version: 1\nmodel: {tiny_llama}\nstages:\n{body}")
        out = tmp_path / "o"
        _assert_clean_failure(run_cli("run", str(recipe), "-o", str(out)), 2, needle, out)


def test_existing_output_is_refused_without_overwrite(tiny_llama, tmp_path):
    """An existing output needs --overwrite, and --overwrite replaces only an empty folder or an effllm
    output: a user's folder is never deleted."""
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("quantize", str(tiny_llama), "-o", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli("quantize", str(tiny_llama), "-o", str(out), "--overwrite")
    assert proc.returncode == 2 and "is not an effllm output" in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is fine
    assert run_cli("quantize", str(tiny_llama), "-o", str(out), "--overwrite").returncode == 0
    before = (out / "effllm_provenance.json").read_text()
    proc = run_cli("quantize", str(tiny_llama), "--bits", "8", "-o", str(out), "--overwrite")  # an effllm output
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "effllm_provenance.json").read_text() != before


@pytest.mark.parametrize("target", ["", "."])
def test_working_directory_is_never_the_output(tiny_llama, tmp_path, target):
    """``-o ""`` (an unset variable) or ``-o .`` is refused, with or without --overwrite."""
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        proc = run_cli("quantize", str(tiny_llama), "-o", target, *extra, cwd=tmp_path)
        _assert_clean_failure(proc, 2, "working directory")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_outputs_follow_the_umask(tmp_path):
    """The checkpoint is readable by others under umask 022 (the temporary directory is private)."""
    from effllm_tools.io.save import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755


def test_output_inside_input_is_refused(tiny_llama):
    proc = run_cli("quantize", str(tiny_llama), "-o", str(tiny_llama / "sub"))
    assert proc.returncode == 2 and "overlaps the input" in proc.stderr
    assert not (tiny_llama / "sub").exists()


def test_eval_text_too_short_and_seqlen_beyond_limit(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _assert_clean_failure(run_cli("eval-ppl", str(tiny_llama), "--dataset", str(short), "--seqlen", "64"), 2, "64")
    long = tmp_path / "long.txt"
    long.write_text("word " * 2000)
    _assert_clean_failure(run_cli("eval-ppl", str(tiny_llama), "--dataset", str(long), "--seqlen", "4096"), 2,
                          "exceeds the model's limit")


def test_missing_dataset_file(tiny_llama, tmp_path):
    proc = run_cli("eval-ppl", str(tiny_llama), "--dataset", str(tmp_path / "none.txt"), "--seqlen", "64")
    assert proc.returncode == 2 and "none.txt" in proc.stderr


def test_no_gpu_when_one_is_asked_for(tiny_llama, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o"
    _assert_clean_failure(run_cli("quantize", str(tiny_llama), "-o", str(out), "--device", "cuda"), 2, "no CUDA GPU", out)


def test_json_errors_are_json(tmp_path):
    proc = run_cli("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--json")
    assert proc.returncode == 2
    obj = json.loads(proc.stdout)
    assert obj["status"] == "error" and obj["exit_code"] == 2 and "no such file" in obj["error"]


def test_hub_id_without_network(tmp_path):
    out = tmp_path / "o"
    proc = run_cli("quantize", "some-org/some-model", "-o", str(out), env={"HF_HUB_OFFLINE": "1"})
    _assert_clean_failure(proc, 2, "some-org/some-model", out)


def test_hub_id_with_the_network_unreachable_is_quiet(tmp_path):
    """Without HF_HUB_OFFLINE and no network: one error line (the hub library's retry warnings were printed
    twice each, even with -q; the endpoint probe of io.load.hub_reachable now skips the retries)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB")}
    proc = subprocess.run([sys.executable, "-m", "effllm_cli.main", "eval-ppl", "some-org/some-model", "-q"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    _assert_clean_failure(proc, 2, "some-org/some-model")


def test_pickled_weights_are_never_loaded(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), legacy / "pytorch_model.bin")
    out = tmp_path / "o"
    _assert_clean_failure(run_cli("quantize", str(legacy), "-o", str(out)), 2, "no *.safetensors", out)


def test_forced_kernel_that_cannot_run_is_unsupported(tiny_llama, sample_text, tmp_path):
    """EFFLLM_KERNELS=triton off CUDA (no interpreter): the kernels' own error becomes exit 4, one line."""
    out = tmp_path / "q"
    assert run_cli("quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", str(tiny_llama),
                   "-o", str(out)).returncode == 0
    proc = run_cli("eval-ppl", str(out), "--dataset", str(sample_text), "--seqlen", "32", "--max-tokens", "64",
                   env={"EFFLLM_KERNELS": "triton", "TRITON_INTERPRET": "0"})
    _assert_clean_failure(proc, 4, "EFFLLM_KERNELS=triton")


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_llama, tmp_path_factory):
    """One `effllm quantize` output of the tiny model, shared read-only (copy it to damage it)."""
    q = tmp_path_factory.mktemp("rtn") / "q"
    assert run_cli("quantize", str(tiny_llama), "-o", str(q)).returncode == 0
    return q


def test_quantized_input_is_refused_by_weight_rewrites(tiny_llama, rtn_checkpoint, tmp_path):
    """Quantizing or pruning a checkpoint whose linears are already packed is bad input (exit 2, dry-run
    included), not a run that changes nothing; an ``ignore`` that matches every linear likewise."""
    q = rtn_checkpoint
    before = tree_digest(q)
    for args in (["quantize", str(q)], ["quantize", "--method", "gptq", str(q)], ["prune", "--sparsity", "0.5", str(q)],
                 ["quantize", "--dry-run", str(q)]):
        out = tmp_path / "again"
        _assert_clean_failure(run_cli(*args, "-o", str(out)), 2, "already quantized (rtn)", out)
    assert tree_digest(q) == before
    out = tmp_path / "none"
    proc = run_cli("quantize", str(tiny_llama), "--set", 'rtn.ignore=[".*"]', "-o", str(out))
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("effllm: error: rtn: no linear layer")
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("damage", ["config-half", "config-empty", "config-list", "provenance", "no-weights"])
def test_inspect_of_a_damaged_checkpoint(rtn_checkpoint, tmp_path, damage):
    """inspect: a damaged config or provenance file, or missing weights, is exit 2 naming the file."""
    q = tmp_path / "q"
    shutil.copytree(rtn_checkpoint, q)
    cfg, prov = q / "config.json", q / "effllm_provenance.json"
    if damage == "config-half":
        cfg.write_text(cfg.read_text()[: len(cfg.read_text()) // 2])
    elif damage == "config-empty":
        cfg.write_text("")
    elif damage == "config-list":
        cfg.write_text("[1, 2]")
    elif damage == "provenance":
        prov.write_text("{bad")
    else:
        (q / "model.safetensors").unlink()
    needle = {"provenance": "effllm_provenance.json", "no-weights": "no *.safetensors"}.get(damage, "config.json")
    for extra in ([], ["--json"]):
        proc = run_cli("inspect", str(q), *extra)
        assert proc.returncode == 2, proc.stderr
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("effllm: error: ") and needle in err[0], proc.stderr


def test_context_extension_never_shrinks_and_starts_from_plain_rope(tiny_llama, tmp_path):
    """Checked from the config before loading (dry-run too): a target below the model's window even
    with a smaller original_length (exit 2), and extending an already extended model (exit 4)."""
    out = tmp_path / "o"
    for extra in ([], ["--dry-run"]):
        proc = run_cli("extend-context", "--method", "pi", "--target-length", "128", "--set", "pi.original_length=64",
                       *extra, str(tiny_llama), "-o", str(out))
        _assert_clean_failure(proc, 2, "extending never shrinks it", out)
    ext = tmp_path / "ext"
    assert run_cli("extend-context", "--method", "pi", "--target-length", "512", str(tiny_llama), "-o", str(ext)).returncode == 0
    for extra in ([], ["--dry-run"]):
        proc = run_cli("extend-context", "--method", "ntk", "--target-length", "1024", *extra, str(ext), "-o", str(out))
        _assert_clean_failure(proc, 4, "already uses RoPE scaling", out)


def test_a_closed_stdout_pipe_is_not_an_error():
    """`effllm ... | head -0`: the reader went away after the work was done; exit 0, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "effllm_cli.main", "quantize", "--list-methods", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_logs_off_a_terminal_are_one_line_per_record(tiny_llama, tmp_path):
    """In a log file or a pipe a record is one plain line (rich's handler wraps at 80 columns and pads)."""
    proc = run_cli("quantize", str(tiny_llama), "-o", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(ln.startswith("INFO stage 0: rtn") for ln in lines), proc.stderr
    assert all(ln == ln.rstrip() for ln in lines), proc.stderr


@pytest.mark.parametrize("args,needle", [
    (("quantize", "--bits", "notanint", "demo", "-o", "x"), "Invalid value for '--bits'"),
    (("quantize", "--frobnicate", "demo", "-o", "x"), "No such option: --frobnicate"),
    (("eval-ppl",), "Missing argument 'model'"),
    (("nosuchverb",), "No such command 'nosuchverb'"),
])
def test_parser_errors_are_one_line_and_json(tmp_path, args, needle):
    """Errors the argument parser finds follow the same contract as every other error (README)."""
    _assert_clean_failure(run_cli(*args, cwd=tmp_path), 2, needle)
    proc = run_cli(*args, "--json", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("effllm: error: ")
    obj = json.loads(proc.stdout)
    assert obj["status"] == "error" and obj["exit_code"] == 2 and needle in obj["error"]


def test_chained_commands_keep_the_record_of_earlier_stages(rtn_checkpoint, tmp_path):
    """quantize, then extend-context on its output: the provenance keeps the rtn stage as history and
    inspect lists both methods."""
    q, e = rtn_checkpoint, tmp_path / "e"
    assert run_cli("extend-context", "--method", "pi", "--target-length", "512", str(q), "-o", str(e)).returncode == 0
    prov = json.loads((e / "effllm_provenance.json").read_text())
    assert [h["method"] for h in prov["history"]] == ["rtn"] and prov["history"][0]["output"] == str(q.resolve())
    assert "avg_bits" in prov["history"][0]["metrics"] and [st["method"] for st in prov["stages"]] == ["pi"]
    info = json.loads(run_cli("inspect", str(e), "--json").stdout)
    assert info["methods"] == ["rtn", "pi"]
    assert info["quantization"]["avg_bits"] == prov["history"][0]["metrics"]["avg_bits"]  # from the history


def test_inspect_reports_the_sparsity_of_an_earlier_command(tiny_llama, tmp_path):
    """prune, then quantize its output: inspect still reports what the pruning stage measured."""
    p, q = tmp_path / "p", tmp_path / "q"
    assert run_cli("prune", "--method", "magnitude", "--sparsity", "0.5", str(tiny_llama), "-o", str(p)).returncode == 0
    assert run_cli("quantize", "--bits", "8", str(p), "-o", str(q)).returncode == 0
    info = json.loads(run_cli("inspect", str(q), "--json").stdout)
    assert info["methods"] == ["magnitude", "rtn"]
    assert info["sparsity"]["method"] == "magnitude" and abs(info["sparsity"]["weight_sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("args", [("quantize", "--bits", "4", "--set", "rtn.bits=4"),
                                  ("prune", "--sparsity", "0.5", "--set", "wanda.sparsity=0.5"),  # a string and a float
                                  ("prune", "--sparsity", "2:4", "--set", 'wanda.sparsity="2:4"')])
def test_a_flag_and_an_agreeing_set_are_accepted(tiny_llama, tmp_path, args):
    proc = run_cli(*args, str(tiny_llama), "-o", str(tmp_path / "o"), "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_dry_run_checks_the_calibration_dataset(tiny_llama, tmp_path):
    out = tmp_path / "o"
    proc = run_cli("quantize", "--method", "gptq", "--dataset", str(tmp_path / "missing.txt"), str(tiny_llama),
                   "-o", str(out), "--dry-run")
    _assert_clean_failure(proc, 2, "missing.txt: no such file or folder, and not a named set", out)


def test_dataset_of_a_method_with_its_own_text_goes_to_the_stage(tiny_llama, tmp_path):
    """longrope / longrope2 read their needle documents from the stage's `dataset` key, not the calibration
    set: --dataset lands there (it was ignored), and --dry-run checks it."""
    out = tmp_path / "o"
    ok = run_cli("extend-context", "--method", "longrope2", "--target-length", "512", "--dataset", "austen-persuasion",
                 str(tiny_llama), "-o", str(out), "--dry-run", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["plan"]["stages"][0]["dataset"] == "austen-persuasion"
    bad = run_cli("extend-context", "--method", "longrope2", "--target-length", "512", "--dataset",
                  str(tmp_path / "none.txt"), str(tiny_llama), "-o", str(out), "--dry-run")
    _assert_clean_failure(bad, 2, "none.txt: no such file or folder", out)


def test_unwritable_output_folder_is_bad_input(tmp_path, monkeypatch):
    """A read-only or forbidden output parent is refused before any work (a root test user bypasses
    permission bits, so os.access is patched), and a write that fails later is exit 2, not a bug."""
    import errno

    from effllm_cli.output import Ui, run_guarded
    from effllm_tools.errors import BadInputError
    from effllm_tools.io.save import check_output_path

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(BadInputError, match="cannot write into"):
        check_output_path(tmp_path / "new" / "out", overwrite=False, inputs=[])

    def body():
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    assert run_guarded(Ui(quiet=True, command="quantize"), body) == 2


def test_dry_run_refuses_what_the_run_refuses(tiny_llama, tmp_path):
    """No model, no output path, two context extensions: the run stops on each, so --dry-run does too
    (it planned the working directory as the model, or said ok)."""
    cases = [("stages:\n  - method: rtn\n", [], "the recipe names no model"),
             (f"model: {tiny_llama}\nstages:\n  - method: rtn\n", [], "no output directory"),
             (f"model: {tiny_llama}\nstages:\n  - {{method: pi, target_length: 512}}\n"
              "  - {method: yarn, target_length: 1024}\n", ["-o", str(tmp_path / "o")], "two context extensions")]
    for body, extra, needle in cases:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("version: 1\n" + body)
        proc = run_cli("run", str(recipe), *extra, "--dry-run", cwd=tiny_llama)
        _assert_clean_failure(proc, 2, needle, tmp_path / "o")


def test_home_in_a_recipe_output_path_is_expanded(tiny_llama):
    from effllm_tools.recipe import parse_recipe

    recipe = parse_recipe({"version": 1, "model": str(tiny_llama), "stages": [{"method": "rtn"}],
                           "output": {"path": "~/effllm-out"}})
    assert recipe.output["path"] == os.path.join(os.path.expanduser("~"), "effllm-out")


def test_a_second_run_on_the_same_output_is_refused(tiny_llama, tmp_path):
    """While one run holds the output path (its lock), another on it is exit 2 at once: it used to
    delete the first run's resume state and make it fail (exit 1)."""
    from effllm_tools.io.save import output_lock

    out = tmp_path / "o"
    with output_lock(out):
        proc = run_cli("prune", "--method", "magnitude", "--sparsity", "0.3", str(tiny_llama), "-o", str(out))
        _assert_clean_failure(proc, 2, "another effllm run is writing it")  # (the lock file is this test's)
        assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir()]  # the lock file went with the lock
    assert run_cli("prune", "--method", "magnitude", "--sparsity", "0.3", str(tiny_llama), "-o", str(out)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize(("args", "needle"), [
    (("eval-ppl", "", "--seqlen", "64"), "empty MODEL argument"),  # a failed $(...) in a chain
    (("quantize", "", "-o", "never"), "empty MODEL argument"),
    (("inspect", ""), "empty PATH argument"),
    (("inspect", "no/such/dir"), "no/such/dir: no such file or directory"),
    (("eval-ppl", "nowhere", "--max-ppl", "inf"), "--max-ppl must be a finite number >= 0, got inf"),
    (("eval-passkey", "nowhere", "--depths", "0.5,1.5"), "every depth must lie in [0, 1], got 1.5"),
])
def test_empty_and_missing_paths_say_so(tmp_path, args, needle):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_inspect_reads_demo_and_refuses_a_gguf(tmp_path):
    from effllm_tools.io.demo import demo_gguf_path

    proc = run_cli("inspect", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_type"] == "llama"
    proc = run_cli("inspect", str(demo_gguf_path()))
    assert proc.returncode == 2 and "not a .gguf file" in proc.stderr, proc.stderr

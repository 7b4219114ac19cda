"""``effllm eval-ppl``: load, tokenize, window, evaluate, and record every setting that moves the number."""

from __future__ import annotations

import time
from typing import Any

import torch

from effllm_tools.errors import BadInputError
from effllm_tools.eval.ppl import evaluate_ppl
from effllm_tools.io.load import load_model
from effllm_tools.reporting import Reporter


def model_max_length(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def run_eval_ppl(model: str, *, dataset: str, field: str = "text", seqlen: int = 2048, max_tokens: int | None = None,
                 batch_size: int = 1, kld_base: str | None = None, device: str = "auto", dtype: str = "auto",
                 seed: int = 0, reporter: Reporter | None = None, allow_beyond_max: bool = False) -> dict[str, Any]:
    from effllm_tools.data.calibration import eval_windows, tokenize_text
    from effllm_tools.data.sources import load_text
    from effllm_tools.runner import resolve_device, seed_everything

    reporter = reporter or Reporter()
    if seqlen < 2:
        raise BadInputError(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    seed_everything(seed)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=None if dtype == "auto" else dtype)
    limit = model_max_length(loaded.model.config)
    if limit is not None and seqlen > limit and not allow_beyond_max:
        raise BadInputError(f"--seqlen {seqlen} exceeds the model's limit of {limit} tokens (max_position_embeddings); "
                            "pass --allow-beyond-max to measure it anyway")
    base = load_model(kld_base, device=device, dtype=None if dtype == "auto" else dtype) if kld_base else None
    t_load = time.perf_counter() - t0
    text = load_text(dataset, field=field)
    ids = tokenize_text(loaded.tokenizer, text.text)
    windows = eval_windows(ids, seqlen, max_tokens)
    t1 = time.perf_counter()
    res = evaluate_ppl(loaded.model, windows, batch_size=batch_size, device=device,
                       base_model=base.model if base else None, reporter=reporter)
    t_eval = time.perf_counter() - t1
    metrics: dict[str, Any] = {"ppl": res.ppl, "nll_sum": res.nll_sum}
    if res.kld is not None:
        metrics["kld"] = res.kld
    bos = getattr(loaded.tokenizer, "bos_token_id", None)
    settings = {
        "model": model,
        "dataset": dataset,
        "text_sha256": text.meta.get("sha256"),
        "protocol": "gptq",  # non-overlapping windows, remainder dropped, exp(mean NLL)
        "seqlen": seqlen,
        "max_tokens": max_tokens,
        "text_tokens": int(ids.numel()),
        "windows": res.windows,
        "predicted_tokens": res.predicted_tokens,
        "bos_prepended": bool(bos is not None and ids.numel() and int(ids[0]) == bos),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "device": device,
        "kld_base": kld_base,
        "torch_threads": torch.get_num_threads(),
        "allow_beyond_max": allow_beyond_max,
    }
    timings = {"load_s": t_load, "eval_s": t_eval, "tokens_per_s": res.windows * seqlen / max(t_eval, 1e-9)}
    return {"metrics": metrics, "settings": settings, "timings": timings}

"""eval-ppl on the real demo model agrees with an independent plain-transformers loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow


def test_agrees_with_plain_loop_to_four_digits_bf16():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm_tools.data.sources import load_text
    from effllm_tools.eval.run import run_eval_ppl
    from effllm_tools.io.demo import ensure_demo_checkpoint

    seqlen, max_tokens = 256, 1024
    res = run_eval_ppl("demo", dataset="austen-prideprejudice", seqlen=seqlen, max_tokens=max_tokens,
                       device="cpu", dtype="bfloat16")
    # The independent loop: only transformers and torch.
    path = str(ensure_demo_checkpoint())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor(tok(load_text("austen-prideprejudice").text)["input_ids"][:max_tokens])
    nll = 0.0
    with torch.inference_mode():
        for i in range(max_tokens // seqlen):
            w = ids[i * seqlen : (i + 1) * seqlen][None]
            nll += float(F.cross_entropy(model(w).logits[0, :-1].float(), w[0, 1:], reduction="sum"))
    plain = math.exp(nll / (max_tokens // seqlen * (seqlen - 1)))
    assert f"{res['metrics']['ppl']:.4g}" == f"{plain:.4g}"
    assert res["settings"]["windows"] == 4 and res["settings"]["predicted_tokens"] == 4 * 255
    assert res["settings"]["dtype"] == "bfloat16" and res["settings"]["bos_prepended"] is False

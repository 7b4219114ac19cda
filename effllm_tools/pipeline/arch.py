"""The architecture table: where each supported decoder-only family keeps its modules.

One :class:`ArchSpec` row per layout, not one file per model family (DESIGN.md, "Calibration
pipeline"). Paths are dotted attribute paths: model-level ones (``layers``, ``embed_tokens``,
``final_norm``, ``lm_head``, ``rotary_emb``) are relative to the ``*ForCausalLM`` model, layer-level
ones (projections, norms) are relative to one decoder layer.

Gemma3: the text model (``Gemma3ForCausalLM``, model type ``gemma3_text``) is supported. The
multimodal ``gemma3`` configs (``Gemma3ForConditionalGeneration``) are refused with an
:class:`UnsupportedError` that says to load the text model instead: calibrating the language model
of a multimodal checkpoint needs its vision tower kept intact and its own tests, which nobody wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from effllm_tools.errors import UnsupportedError

LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Where a decoder-only family keeps its modules.

    ``linear_groups`` lists, in execution order, the linears that read the same input (GPTQ's
    "true sequential" order: one Hessian serves a whole group). ``norm_feeds`` maps each norm inside
    a layer to the linears that read its output (what a rotation or a norm fusion folds into);
    an empty tuple means the norm's output goes to the residual stream instead (Gemma3 post-norms).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary_emb: str | None = "model.rotary_emb"
    attn_proj: tuple[str, ...] = LLAMA_ATTN  # q, k, v, o
    mlp_proj: tuple[str, ...] = LLAMA_MLP  # gate, up, down
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    pre_ffn_norm: str | None = None  # Gemma3: the norm before the MLP
    post_ffn_norm: str | None = None  # Gemma3: the norm after the MLP
    qk_norms: tuple[str, ...] = ()  # Qwen3 / Gemma3 per-head q_norm, k_norm
    tied_embeddings_default: bool = False  # used when the config does not say

    @property
    def linear_names(self) -> tuple[str, ...]:
        """All linears of a decoder layer, relative to the layer, in execution order."""
        return self.attn_proj + self.mlp_proj

    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears grouped by shared input, in execution order: (q, k, v), (o,), (gate, up), (down,)."""
        q, k, v, o = self.attn_proj
        gate, up, down = self.mlp_proj
        return ((q, k, v), (o,), (gate, up), (down,))

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """All norms inside a decoder layer, relative to the layer."""
        named = (self.input_norm, self.post_attn_norm, self.pre_ffn_norm, self.post_ffn_norm)
        return tuple(n for n in named if n is not None) + self.qk_norms

    @property
    def norm_feeds(self) -> dict[str, tuple[str, ...]]:
        """Norm -> the linears reading its output (``()``: it feeds the residual stream)."""
        q, k, v, _ = self.attn_proj
        gate, up, _ = self.mlp_proj
        if self.pre_ffn_norm is None:  # pre-norm layout (Llama, Qwen, Mistral)
            return {self.input_norm: (q, k, v), self.post_attn_norm: (gate, up)}
        feeds = {self.input_norm: (q, k, v), self.post_attn_norm: (), self.pre_ffn_norm: (gate, up)}
        if self.post_ffn_norm is not None:
            feeds[self.post_ffn_norm] = ()
        return feeds

    def tied_embeddings(self, config: Any) -> bool:
        """Whether ``lm_head`` shares its weight with the input embedding for this config."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return bool(getattr(text_config, "tie_word_embeddings", self.tied_embeddings_default))


QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

ARCH_TABLE: tuple[ArchSpec, ...] = (
    ArchSpec(name="llama", model_types=("llama",)),
    ArchSpec(name="mistral", model_types=("mistral",)),
    ArchSpec(name="qwen2", model_types=("qwen2",)),
    ArchSpec(name="qwen3", model_types=("qwen3",), qk_norms=QK_NORMS),
    ArchSpec(
        name="gemma3",
        model_types=("gemma3_text",),
        pre_ffn_norm="pre_feedforward_layernorm",
        post_ffn_norm="post_feedforward_layernorm",
        qk_norms=QK_NORMS,
        tied_embeddings_default=True,
    ),
)

_REFUSED: dict[str, str] = {
    "gemma3": "multimodal Gemma3 checkpoints are not supported by the calibration pipeline; "
    "load the language model alone with Gemma3ForCausalLM (model type 'gemma3_text')",
}


def supported_model_types() -> list[str]:
    """Model types the table covers, sorted."""
    return sorted(t for spec in ARCH_TABLE for t in spec.model_types)


def _describe(config_or_model: Any) -> tuple[str, Any, str]:
    """(model_type, config, class name for messages) of a model or a config."""
    if isinstance(config_or_model, nn.Module):
        config = getattr(config_or_model, "config", None)
        cls_name = type(config_or_model).__name__
    else:
        config = config_or_model
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        cls_name = archs[0]
    model_type = getattr(config, "model_type", None) or "unknown"
    return model_type, config, cls_name


def get_arch(config_or_model: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a transformers model or config.

    Raises:
        UnsupportedError: the model type is not in :data:`ARCH_TABLE` (exit 4).
    """
    model_type, _, cls_name = _describe(config_or_model)
    for spec in ARCH_TABLE:
        if model_type in spec.model_types:
            return spec
    if model_type in _REFUSED:
        raise UnsupportedError(f"model type '{model_type}' ({cls_name}): {_REFUSED[model_type]}")
    raise UnsupportedError(
        f"model type '{model_type}' ({cls_name}) is not a supported decoder-only architecture; "
        f"supported: {', '.join(supported_model_types())}"
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root``'s submodule at a dotted ``path``; UnsupportedError when the table is wrong for it."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedError(
            f"{type(root).__name__} has no module '{path}' where the architecture table expects one"
        ) from err


def decoder_layers(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    """The model's decoder layers (``model.layers`` for the supported families)."""
    layers = get_submodule(model, arch.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedError(f"'{arch.layers}' of {type(model).__name__} is not a ModuleList")
    return layers


def linear_modules(layer: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    """The layer's linears by name relative to the layer, in execution order.

    ``{"self_attn.q_proj": ..., "self_attn.k_proj": ..., ..., "mlp.down_proj": ...}``. A method
    may have swapped a linear for its own module; it is returned as is.
    """
    return {name: get_submodule(layer, name) for name in arch.linear_names}  # type: ignore[misc]

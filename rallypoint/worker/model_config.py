"""A decoder's shape and math, read from a Hugging Face ``config.json`` (Llama, Mistral, Qwen2, Qwen3,
Mixtral, Qwen3-MoE).

``ModelConfig`` is frozen and validated at load, and every error names the file and the key, so a
bad checkpoint is refused before a single tensor is read. Every key of ``config.json`` is either
read and checked, or on ``IGNORED_KEYS`` (keys known not to change what the model computes); any
other key is refused: a key we do not understand may change the logits, and falling back to a
default would serve other tokens than ``transformers`` does. A key that is missing takes the
default of transformers' config class for that family, as ``from_pretrained`` does.

Both spellings of the rotary parameters are read: transformers 5's ``rope_parameters`` dict and the
older top-level ``rope_theta`` plus ``rope_scaling``. ``check_parallel(tp, pp, ep)`` says whether the
model can be split that way (heads, KV heads, MLP width and vocabulary must divide by TP, a
mixture of experts' experts by EP; there must be at least one layer per PP stage).

Mixtral is Mistral's attention with a sparse mixture of experts in place of every MLP
(``num_local_experts`` SwiGLU experts, ``num_experts_per_tok`` of them per token), read into
``num_experts`` and ``num_experts_per_tok``; a dense model has ``num_experts == 0``. Qwen3-MoE is
Qwen3's attention with ``num_experts`` experts of ``moe_intermediate_size`` each; ``norm_topk_prob``
says whether the chosen experts' weights are renormalized to sum to 1 (Mixtral always does), and
layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` rhythm, keep a dense MLP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rallypoint.errors import CheckpointError

CONFIG_FILE = "config.json"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")  # a layer's MLP may be a sparse mixture of experts
ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"
HF_VERSION = "5.24.0"  # the transformers release whose config.json layout to_hf_dict writes
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Keys that do not change inference math: bookkeeping, training-only settings (dropout, init),
# token ids (the tokenizer and generation_config.json say which ids stop generation) and the
# generation defaults transformers pops off a model config.
IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
    "use_cache", "initializer_range", "attention_dropout", "pretraining_tp",
    "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "output_scores", "return_dict", "return_dict_in_generate",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward",
    "_attn_implementation", "attn_implementation", "_attn_implementation_autoset", "_experts_implementation",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "tokenizer_class", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # mixture-of-experts training: the router's auxiliary loss, and jitter noise transformers applies
    # to the router's input only in training mode
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
})

_COMMON_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
    "dtype", "torch_dtype", "bos_token_id", "eos_token_id",
})
_QWEN_KEYS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})


@dataclass(frozen=True)
class _Family:
    """What transformers' config class of one ``model_type`` reads, and its defaults."""

    architecture: str
    keys: frozenset[str]
    num_key_value_heads: int | None  # None: num_attention_heads
    head_dim: int | None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int
    sliding_window: int | None = None
    rope_theta: float = 10000.0     # transformers' ``default_theta`` of the config class
    rms_norm_eps: float = 1e-6


_FAMILY = {
    "llama": _Family("LlamaForCausalLM", _COMMON_KEYS | {"attention_bias", "mlp_bias"}, None, None, 2048),
    "mistral": _Family("MistralForCausalLM", _COMMON_KEYS | {"sliding_window"}, 8, None, 131072, 4096),
    "qwen2": _Family("Qwen2ForCausalLM", _COMMON_KEYS | _QWEN_KEYS | {"use_mrope"}, 32, None, 32768, 4096),
    "qwen3": _Family("Qwen3ForCausalLM", _COMMON_KEYS | _QWEN_KEYS | {"attention_bias"}, 32, 128, 32768, 4096),
    "mixtral": _Family("MixtralForCausalLM", _COMMON_KEYS | {"sliding_window", "num_local_experts", "num_experts_per_tok"},
                       8, None, 131072, None, 1e6, 1e-5),
    "qwen3_moe": _Family("Qwen3MoeForCausalLM", _COMMON_KEYS | {"attention_bias", "use_sliding_window", "sliding_window",
                                                                "decoder_sparse_step", "moe_intermediate_size",
                                                                "num_experts", "num_local_experts", "num_experts_per_tok",
                                                                "norm_topk_prob", "mlp_only_layers"},
                         4, None, 32768, 4096),
}
_QWEN3_MOE = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)  # Qwen3MoeConfig's defaults
_MIXTRAL_EXPERTS, _MIXTRAL_TOP_K = 8, 2  # MixtralConfig's defaults

# rope_parameters keys each rope type reads (besides rope_type / type / rope_theta / partial_rotary_factor)
_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters: base ``theta`` and the frequency scaling of ``type``.

    ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+) divides the low
    frequencies by ``factor`` and blends the middle band between ``low_freq_factor`` and
    ``high_freq_factor`` wavelengths of ``original_max_position_embeddings``.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_parameters`` dict as transformers 5 writes it."""
        d: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.type}
        if self.type != "default":
            d["factor"] = self.factor
        if self.type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return dict(sorted(d.items()))


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a HF decoder config that change what the model computes.

    Attributes:
        model_type: one of ``FAMILIES``.
        head_dim: ``hidden_size // num_attention_heads`` unless given.
        rope: rotary embedding parameters.
        qkv_bias: q/k/v projections have biases (Qwen2; Llama and Qwen3 with ``attention_bias``).
        o_bias: the attention output projection has a bias (Llama and Qwen3 with ``attention_bias``).
        qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
        sliding_window: how many keys (the query's own included) a sliding layer attends to.
        layer_types: ``full_attention`` or ``sliding_attention`` per layer (Qwen2/Qwen3); None:
            every layer is sliding when ``sliding_window`` is set, else full (``attention_types``
            resolves it).
        num_experts: experts of each layer's sparse mixture of experts (Mixtral's ``num_local_experts``);
            0 for a dense model (one MLP per layer).
        num_experts_per_tok: experts each token is routed to (softmax over every expert, the top
            ``num_experts_per_tok`` kept; renormalized to sum to 1 when ``norm_topk_prob``).
        moe_intermediate_size: an expert's width (Qwen3-MoE); 0: ``intermediate_size`` (Mixtral).
        norm_topk_prob: renormalize the chosen experts' weights (Mixtral: always; Qwen3-MoE: its key).
        dense_layers: layers that keep a dense MLP in a mixture-of-experts model (Qwen3-MoE's
            ``mlp_only_layers`` and the layers off its ``decoder_sparse_step``).
        torch_dtype: the dtype the weights are stored in (``float32``, ``float16``, ``bfloat16``).
        eos_token_ids: ``eos_token_id`` (HF allows a list).
        source: the file this config was read from ("" when built in code).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    model_type: str = "llama"
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.source or "<ModelConfig>"
        if self.model_type not in FAMILIES:
            raise CheckpointError(f"{where}: model_type {self.model_type!r} is not supported "
                                  f"(supported: {', '.join(FAMILIES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int(getattr(self, key), key, where)
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise CheckpointError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                                      f"num_attention_heads {self.num_attention_heads} (and no head_dim given)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise CheckpointError(f"{where}: head_dim must be an even integer >= 2, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads {self.num_key_value_heads}")
        if not self.rms_norm_eps > 0:
            raise CheckpointError(f"{where}: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.torch_dtype not in _DTYPES:
            raise CheckpointError(f"{where}: dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")
        self._check_rope(where)
        self._check_family(where)
        if self.sliding_window is not None:
            _check_positive_int(self.sliding_window, "sliding_window", where)
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if len(types) != self.num_hidden_layers or not set(types) <= {FULL, SLIDING}:
                raise CheckpointError(f"{where}: layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                                      f"{self.num_hidden_layers} layers, got {list(types)}")
            if SLIDING in types and self.sliding_window is None:
                raise CheckpointError(f"{where}: layer_types has {SLIDING!r} layers but no sliding_window is set")
            uniform = types == self._uniform_types()
            if self.model_type in ("llama", "mistral") and not uniform:
                raise CheckpointError(f"{where}: {self.model_type} has no per-layer attention types")
            object.__setattr__(self, "layer_types", None if uniform else types)  # one spelling of each layout
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.eos_token_ids):
            raise CheckpointError(f"{where}: eos_token_id must be integers, got {list(self.eos_token_ids)}")

    def _check_rope(self, where: str) -> None:
        r = self.rope
        if r.type not in ROPE_TYPES:
            raise CheckpointError(f"{where}: rope_parameters.rope_type {r.type!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
        if not r.theta > 0:
            raise CheckpointError(f"{where}: rope_parameters.rope_theta must be > 0, got {r.theta!r}")
        if r.type != "default" and not r.factor > 0:
            raise CheckpointError(f"{where}: rope_parameters.factor must be > 0, got {r.factor!r}")
        if r.type == "llama3":
            if not r.high_freq_factor > r.low_freq_factor > 0:
                raise CheckpointError(f"{where}: rope_parameters needs high_freq_factor > low_freq_factor > 0, got "
                                      f"{r.high_freq_factor!r} and {r.low_freq_factor!r}")
            _check_positive_int(r.original_max_position_embeddings,
                                "rope_parameters.original_max_position_embeddings", where)

    def _check_family(self, where: str) -> None:
        """The combinations each family's config can express (so ``to_hf_dict`` can write them)."""
        t = self.model_type
        if t == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise CheckpointError(f"{where}: qwen2 has q/k/v biases and no o_proj bias "
                                  f"(got qkv_bias={self.qkv_bias}, o_bias={self.o_bias})")
        if t == "mistral" and (self.qkv_bias or self.o_bias):
            raise CheckpointError(f"{where}: mistral has no attention biases")
        if t in ("llama", "qwen3", "qwen3_moe") and self.qkv_bias != self.o_bias:
            raise CheckpointError(f"{where}: {t}'s attention_bias sets q/k/v and o_proj biases together")
        if self.qk_norm != (t in ("qwen3", "qwen3_moe")):
            raise CheckpointError(f"{where}: q/k norms are part of qwen3 and qwen3_moe, and only of them "
                                  f"(model_type {t!r})")
        if t == "qwen3_moe" and self.sliding_window is not None:
            raise CheckpointError(f"{where}: use_sliding_window=true is not supported for qwen3_moe")
        if t != "qwen3_moe" and (self.moe_intermediate_size or not self.norm_topk_prob or self.dense_layers):
            raise CheckpointError(f"{where}: moe_intermediate_size, norm_topk_prob and dense layers are "
                                  f"qwen3_moe's (model_type {t!r})")
        if any(not 0 <= i < self.num_hidden_layers for i in self.dense_layers):
            raise CheckpointError(f"{where}: mlp_only_layers {list(self.dense_layers)} name layers outside "
                                  f"0..{self.num_hidden_layers - 1}")
        if t == "llama" and self.sliding_window is not None:
            raise CheckpointError(f"{where}: llama has no sliding-window attention")
        if t == "mixtral" and (self.qkv_bias or self.o_bias):
            raise CheckpointError(f"{where}: mixtral has no attention biases")
        if (self.num_experts != 0) != (t in MOE_FAMILIES):
            raise CheckpointError(f"{where}: a mixture of experts is part of {', '.join(MOE_FAMILIES)}, and every "
                                  f"such layer has one (model_type {t!r}, num_experts {self.num_experts!r})")
        if self.num_experts:
            _check_positive_int(self.num_experts, "num_local_experts", where)
            _check_positive_int(self.num_experts_per_tok, "num_experts_per_tok", where)
            if self.num_experts_per_tok > self.num_experts:
                raise CheckpointError(f"{where}: num_experts_per_tok {self.num_experts_per_tok} > num_local_experts "
                                      f"{self.num_experts}")

    # -- reading and writing -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> ModelConfig:
        """Build from a parsed ``config.json``; ``source`` names the file in errors.

        Raises:
            CheckpointError: an unsupported ``model_type``, a key that is not understood, a missing
                required key, or a value that is invalid or that we do not implement.
        """
        where = source or "<dict>"
        mt = d.get("model_type")
        if mt not in _FAMILY:
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(FAMILIES)})")
        fam = _FAMILY[mt]
        unknown = sorted(set(d) - fam.keys - IGNORED_KEYS)
        if unknown:
            more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
            raise CheckpointError(f"{where}: key {unknown[0]!r}{more} is not understood for model_type {mt!r}; "
                                  "it may change what the model computes, so the checkpoint is refused")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise CheckpointError(f"{where}: required key {key!r} is missing")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if _bool(d, "mlp_bias", False, where):
            raise CheckpointError(f"{where}: mlp_bias=true is not supported")
        if _bool(d, "use_mrope", False, where):
            raise CheckpointError(f"{where}: use_mrope=true is not supported")
        if "partial_rotary_factor" in d and d["partial_rotary_factor"] != 1:
            raise CheckpointError(f"{where}: partial_rotary_factor {d['partial_rotary_factor']!r} is not "
                                  "supported (only 1: RoPE over the whole head)")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads")
        kv_heads = kv_heads if kv_heads is not None else (fam.num_key_value_heads or heads)
        head_dim = d["head_dim"] if d.get("head_dim") is not None else (fam.head_dim or 0)
        max_pos = d.get("max_position_embeddings", fam.max_position_embeddings)
        attention_bias = _bool(d, "attention_bias", False, where)
        window, layer_types = _attention_layout(d, fam, mt, where)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        moe = mt in MOE_FAMILIES
        experts, top_k = (d.get("num_local_experts", _MIXTRAL_EXPERTS), d.get("num_experts_per_tok", _MIXTRAL_TOP_K)) \
            if mt == "mixtral" else (_qwen3_moe_experts(d, where),
                                     d.get("num_experts_per_tok", _QWEN3_MOE["num_experts_per_tok"])) if moe else (0, 0)
        qwen_moe = _qwen3_moe(d, where) if mt == "qwen3_moe" else {}
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
                model_type=mt, head_dim=head_dim, rms_norm_eps=_float(d, "rms_norm_eps", fam.rms_norm_eps, where),
                rope=_rope(d, max_pos, fam.rope_theta, where), max_position_embeddings=max_pos,
                tie_word_embeddings=_bool(d, "tie_word_embeddings", False, where),
                qkv_bias=attention_bias or mt == "qwen2", o_bias=attention_bias, qk_norm=mt in ("qwen3", "qwen3_moe"),
                sliding_window=window, layer_types=layer_types, torch_dtype=dtype,
                num_experts=experts, num_experts_per_tok=top_k, **qwen_moe,
                bos_token_id=_token_ids(d, "bos_token_id", where)[0] if d.get("bos_token_id") is not None else None,
                eos_token_ids=_token_ids(d, "eos_token_id", where), source=source)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``path/config.json`` (or ``path`` itself when it is a file).

        Raises:
            CheckpointError: the file is missing, is not JSON, or a key is missing, unknown or invalid.
        """
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            d = json.loads(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{file}: no such file (a checkpoint directory needs {CONFIG_FILE})") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read it as JSON: {exc}") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        return cls.from_dict(d, str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content with the keys transformers 5 writes for this family."""
        fam = _FAMILY[self.model_type]
        eos = list(self.eos_token_ids)
        d: dict[str, Any] = dict(
            architectures=[fam.architecture], attention_dropout=0.0, bos_token_id=self.bos_token_id,
            dtype=self.torch_dtype, eos_token_id=eos[0] if len(eos) == 1 else (eos or None), hidden_act="silu",
            hidden_size=self.hidden_size, initializer_range=0.02, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, model_type=self.model_type,
            num_attention_heads=self.num_attention_heads, num_hidden_layers=self.num_hidden_layers,
            num_key_value_heads=self.num_key_value_heads, pad_token_id=None, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope.to_hf(), tie_word_embeddings=self.tie_word_embeddings,
            transformers_version=HF_VERSION, use_cache=True, vocab_size=self.vocab_size)
        if self.model_type not in ("qwen2", "qwen3_moe") or self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        if self.model_type == "llama":
            d.update(attention_bias=self.o_bias, mlp_bias=False, pretraining_tp=1)
        if self.model_type in ("mistral", "mixtral"):
            d["sliding_window"] = self.sliding_window
        if self.model_type == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
        if self.model_type in ("qwen2", "qwen3"):
            sliding = [i for i, t in enumerate(self.attention_types) if t == SLIDING]
            d.update(layer_types=list(self.attention_types), use_sliding_window=self.sliding_window is not None,
                     sliding_window=self.sliding_window,
                     max_window_layers=sliding[0] if sliding else self.num_hidden_layers)
        if self.model_type == "qwen3":
            d["attention_bias"] = self.o_bias
        if self.model_type == "qwen3_moe":
            d.update(attention_bias=self.o_bias, use_sliding_window=False, sliding_window=None,
                     num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.expert_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=list(self.dense_layers),
                     output_router_logits=False, router_aux_loss_coef=0.001)
        return dict(sorted(d.items()))

    # -- derived -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The stored weights' dtype as a torch dtype."""
        return _DTYPES[self.torch_dtype]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def expert_size(self) -> int:
        """An expert's width (Qwen3-MoE's ``moe_intermediate_size``, Mixtral's ``intermediate_size``)."""
        return self.moe_intermediate_size or self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a sparse mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def _uniform_types(self) -> tuple[str, ...]:
        return (SLIDING if self.sliding_window else FULL,) * self.num_hidden_layers

    @property
    def attention_types(self) -> tuple[str, ...]:
        """``full_attention`` or ``sliding_attention``, per layer."""
        return self.layer_types or self._uniform_types()

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full causal attention)."""
        return self.sliding_window if self.attention_types[layer] == SLIDING else None

    def num_params(self) -> int:
        """Parameter count of the whole model (the LM head counted once when tied; every expert counted)."""
        h, i = self.hidden_size, self.intermediate_size
        sparse = self.num_experts * (3 * h * self.expert_size + h)  # experts and router rows
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 2 * h
        layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlps = sum(sparse if self.is_sparse(n) else 3 * h * i for n in range(self.num_hidden_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + mlps + h + head

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise ``CheckpointError`` unless the model splits over ``tp`` x ``pp`` ranks, with its
        experts over ``ep`` ranks.

        TP splits attention heads, KV heads, the MLP width and the vocabulary (LM head) evenly;
        EP gives each rank the same number of whole experts (experts are never split by TP); PP
        gives every stage at least one layer.
        """
        where = self.source or "<ModelConfig>"
        if tp < 1 or pp < 1 or ep < 1:
            raise CheckpointError(f"{where}: tp, pp and ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
        split = ("num_attention_heads", "num_key_value_heads", "vocab_size")
        for key in split if self.num_experts and not self.dense_layers else (*split, "intermediate_size"):
            if getattr(self, key) % tp:
                raise CheckpointError(f"{where}: {key}={getattr(self, key)} is not divisible by tp={tp}")
        if self.num_experts % ep:
            raise CheckpointError(f"{where}: num_local_experts={self.num_experts} is not divisible by ep={ep}")
        if self.num_hidden_layers < pp:
            raise CheckpointError(f"{where}: num_hidden_layers={self.num_hidden_layers} < pp={pp} "
                                  "(every pipeline stage needs at least one layer)")


# -- parsing helpers ---------------------------------------------------------------------------

def _check_positive_int(value: Any, key: str, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")


def _bool(d: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _float(d: dict[str, Any], key: str, default: float, where: str) -> float:
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _token_ids(d: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    """An id, a list of ids or null, as a tuple."""
    value = d.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{where}: {key} must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def _qwen3_moe_experts(d: dict[str, Any], where: str) -> Any:
    """Qwen3-MoE's expert count: ``num_experts`` (the hub's spelling) or ``num_local_experts`` (what
    transformers 5.25 writes); both given must agree."""
    a, b = d.get("num_experts"), d.get("num_local_experts")
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"{where}: num_experts {a!r} disagrees with num_local_experts {b!r}")
    return a if a is not None else b if b is not None else _QWEN3_MOE["num_experts"]


def _qwen3_moe(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Qwen3-MoE's expert width, weight normalization and dense layers, as transformers reads them."""
    step = d.get("decoder_sparse_step", 1)
    _check_positive_int(step, "decoder_sparse_step", where)
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise CheckpointError(f"{where}: mlp_only_layers must be a list of layer indices, got {only!r}")
    dense = sorted(set(only) | {n for n in range(d["num_hidden_layers"]) if (n + 1) % step})
    width = d.get("moe_intermediate_size", _QWEN3_MOE["moe_intermediate_size"])
    _check_positive_int(width, "moe_intermediate_size", where)
    return dict(moe_intermediate_size=width, norm_topk_prob=_bool(d, "norm_topk_prob", False, where),
                dense_layers=tuple(dense))


def _rope(d: dict[str, Any], max_pos: int, default_theta: float, where: str) -> Rope:
    """``Rope`` from either spelling, resolved the way transformers 5 standardizes it.

    transformers reads ``rope_scaling`` in preference to ``rope_parameters`` and fills the dict's
    missing ``rope_theta`` from the top-level key; two disagreeing values are refused here rather
    than one of them silently winning.
    """
    scaling, params = d.get("rope_scaling"), d.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{where}: {key} must be an object or null, got {value!r}")
    if scaling and params and _rope_norm(scaling) != _rope_norm(params):
        raise CheckpointError(f"{where}: rope_scaling {scaling} and rope_parameters {params} disagree")
    key = "rope_scaling" if scaling else "rope_parameters"
    rp = dict(scaling or params or {})
    if "rope_theta" in rp and "rope_theta" in d and rp["rope_theta"] != d["rope_theta"]:
        raise CheckpointError(f"{where}: rope_theta {d['rope_theta']!r} disagrees with "
                              f"{key}.rope_theta {rp['rope_theta']!r}")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: {key}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if "type" in rp and "rope_type" in rp and rp["type"] != rp["rope_type"]:
        raise CheckpointError(f"{where}: {key}.type {rp['type']!r} disagrees with {key}.rope_type {rp['rope_type']!r}")
    unknown = sorted(set(rp) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"} - _ROPE_KEYS[kind])
    if unknown:
        raise CheckpointError(f"{where}: {key}.{unknown[0]} is not understood for rope_type {kind!r}")
    if rp.get("partial_rotary_factor", 1) != 1:
        raise CheckpointError(f"{where}: {key}.partial_rotary_factor {rp['partial_rotary_factor']!r} is not "
                              "supported (only 1)")
    missing = sorted(_ROPE_KEYS[kind] - {"original_max_position_embeddings"} - set(rp))
    if missing:
        raise CheckpointError(f"{where}: {key}.{missing[0]} is required for rope_type {kind!r}")
    theta = _float(rp, "rope_theta", _float(d, "rope_theta", default_theta, where), f"{where}: {key}")
    if kind == "default":
        return Rope(theta=theta)
    factor = _float(rp, "factor", 1.0, f"{where}: {key}")
    if kind == "linear":
        return Rope(theta=theta, type=kind, factor=factor)
    return Rope(theta=theta, type=kind, factor=factor,
                low_freq_factor=_float(rp, "low_freq_factor", 0.0, f"{where}: {key}"),
                high_freq_factor=_float(rp, "high_freq_factor", 0.0, f"{where}: {key}"),
                original_max_position_embeddings=rp.get("original_max_position_embeddings", max_pos))


def _rope_norm(rp: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rp.items() if k != "type"}
    out.setdefault("rope_type", rp.get("type", "default"))
    return out


def _attention_layout(d: dict[str, Any], fam: _Family, mt: str,
                      where: str) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` as transformers derives them for ``mt``.

    Mistral and Mixtral slide every layer when ``sliding_window`` is set. Qwen2/Qwen3 use the window only with
    ``use_sliding_window``, and then on the layers ``layer_types`` marks sliding (by default those
    from ``max_window_layers`` on).
    """
    if mt == "llama":
        return None, None
    window = d.get("sliding_window", fam.sliding_window)
    if mt in ("mistral", "mixtral"):
        return window, None
    use = _bool(d, "use_sliding_window", False, where)
    window = window if use else None
    if mt == "qwen3_moe":
        return window, None  # every layer alike (a window is refused in _check_family)
    first = d.get("max_window_layers", 28)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise CheckpointError(f"{where}: max_window_layers must be an integer >= 0, got {first!r}")
    types = d.get("layer_types")
    if types is None:
        types = [SLIDING if window is not None and i >= first else FULL for i in range(d["num_hidden_layers"])]
    if not isinstance(types, list):
        raise CheckpointError(f"{where}: layer_types must be a list, got {types!r}")
    return window, tuple(types)

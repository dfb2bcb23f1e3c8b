"""``ModelConfig``: every family's config.json as transformers 5.24 writes it, both Llama spellings,
transformers' defaults for missing keys, and refusals that name the key and the file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rallypoint.errors import CheckpointError
from rallypoint.worker.checkpoint import SIZES, arch_config
from rallypoint.worker.model_config import FAMILIES, ModelConfig, Rope

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
         "num_key_value_heads": 2, "vocab_size": 300}
COMMON = {**SHAPE, "attention_dropout": 0.0, "dtype": "float32", "hidden_act": "silu", "initializer_range": 0.02,
          "pad_token_id": None, "rms_norm_eps": 1e-06, "transformers_version": "5.24.0", "use_cache": True}
# config.json of small random models saved by transformers 5.24 (save_pretrained), key for key
HF_WRITES: dict[str, dict[str, Any]] = {
    "llama": {**COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
              "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "max_position_embeddings": 2048,
              "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": True,
              "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 64, "rope_theta": 500000.0,
                                  "rope_type": "llama3"}},
    "mistral": {**COMMON, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1,
                "eos_token_id": 2, "head_dim": 16, "max_position_embeddings": 131072, "sliding_window": 8,
                "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    "qwen2": {**COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": None,
              "eos_token_id": None, "layer_types": ["full_attention", "full_attention"],
              "max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": None,
              "tie_word_embeddings": False, "use_sliding_window": False,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    "qwen3": {**COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
              "bos_token_id": None, "eos_token_id": None, "head_dim": 32,
              "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 32768,
              "max_window_layers": 28, "sliding_window": None, "tie_word_embeddings": True,
              "use_sliding_window": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
    "mixtral": {**COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "bos_token_id": 1,
                "eos_token_id": 2, "head_dim": None, "max_position_embeddings": 131072, "num_experts_per_tok": 2,
                "num_local_experts": 4, "output_router_logits": False, "rms_norm_eps": 1e-05,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None,
                "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}},
    "qwen3_moe": {**COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
                  "bos_token_id": None, "decoder_sparse_step": 1, "eos_token_id": None, "max_position_embeddings": 32768,
                  "mlp_only_layers": [0], "moe_intermediate_size": 48, "norm_topk_prob": False,
                  "num_experts_per_tok": 2, "num_local_experts": 4, "output_router_logits": False,
                  "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
                  "use_sliding_window": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
}


def write(tmp_path: Path, d: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def refused(tmp_path: Path, d: dict[str, Any], *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        ModelConfig.from_dir(write(tmp_path, d))
    msg = str(info.value)
    assert str(tmp_path / "config.json") in msg and all(n in msg for n in needles), msg
    return msg


# -- what transformers writes ------------------------------------------------------------------

def test_each_family_as_transformers_writes_it() -> None:
    llama, mistral, qwen2, qwen3, mixtral, qwen3_moe = (ModelConfig.from_dict(HF_WRITES[f], f) for f in FAMILIES)
    assert llama.rope == Rope(500000.0, "llama3", 8.0, 1.0, 4.0, 64) and llama.tie_word_embeddings
    assert not llama.qkv_bias and llama.eos_token_ids == (2,) and llama.head_dim == 16
    assert [mistral.window(i) for i in range(2)] == [8, 8] and not mistral.tie_word_embeddings
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.window(1) is None and qwen2.eos_token_ids == ()
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.q_size == 128 and qwen3.tie_word_embeddings
    assert {c.rms_norm_eps for c in (llama, mistral, qwen2, qwen3)} == {1e-6}
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.head_dim, mixtral.window(0)) == (4, 2, 16, None)
    assert mixtral.rope == Rope(1e6) and not mixtral.qkv_bias and not mixtral.qk_norm
    assert not any(c.num_experts for c in (llama, mistral, qwen2, qwen3))
    assert (qwen3_moe.num_experts, qwen3_moe.num_experts_per_tok, qwen3_moe.expert_size) == (4, 2, 48)
    assert qwen3_moe.qk_norm and not qwen3_moe.norm_topk_prob and qwen3_moe.head_dim == 16
    assert [qwen3_moe.is_sparse(i) for i in range(2)] == [False, True]  # mlp_only_layers [0]
    assert mixtral.norm_topk_prob and [mixtral.is_sparse(i) for i in range(2)] == [True, True]


def test_qwen3_moe_keys_are_checked(tmp_path: Path) -> None:
    d = HF_WRITES["qwen3_moe"]
    assert ModelConfig.from_dict({**d, "num_experts": 4}).num_experts == 4  # the hub's spelling as well
    refused(tmp_path, {**d, "num_experts": 8}, "num_experts 8 disagrees with num_local_experts 4")
    refused(tmp_path, {**d, "use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=true")
    refused(tmp_path, {**d, "mlp_only_layers": [5]}, "mlp_only_layers [5]", "outside 0..1")
    refused(tmp_path, {**d, "decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer")
    refused(tmp_path, {**d, "norm_topk_prob": "yes"}, "norm_topk_prob must be true or false")
    every_other = ModelConfig.from_dict({**d, "mlp_only_layers": [], "decoder_sparse_step": 2})
    assert [every_other.is_sparse(i) for i in range(2)] == [False, True]


@pytest.mark.parametrize("arch", FAMILIES)
def test_to_hf_dict_writes_transformers_keys_and_reads_back(arch: str) -> None:
    config = arch_config(SIZES["tiny"], arch)
    d = config.to_hf_dict()
    assert set(d) == set(HF_WRITES[arch])
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == config


def test_both_llama_spellings_read_the_same() -> None:
    new = {**HF_WRITES["llama"], "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}}
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32")
    assert ModelConfig.from_dict(old) == ModelConfig.from_dict(new)
    assert ModelConfig.from_dict(old).rope == Rope(20000.0, "linear", 2.0)
    plain = {k: v for k, v in old.items() if k != "rope_scaling"}  # Llama 2: rope_theta only, no scaling
    assert ModelConfig.from_dict({**plain, "rope_scaling": None}).rope == Rope(20000.0)
    llama31 = {**plain, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}}  # no original_max: max_position_embeddings
    assert ModelConfig.from_dict(llama31).rope.original_max_position_embeddings == 2048


def test_qwen_sliding_layers_follow_max_window_layers() -> None:
    d = {**HF_WRITES["qwen2"], "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 16,
         "max_window_layers": 1}
    del d["layer_types"]
    c = ModelConfig.from_dict(d)
    assert [c.window(i) for i in range(4)] == [None, 16, 16, 16]
    assert ModelConfig.from_dict(c.to_hf_dict()) == c
    unused = ModelConfig.from_dict({**HF_WRITES["qwen2"], "sliding_window": 16})  # use_sliding_window false
    assert unused.sliding_window is None and unused.window(0) is None


def test_missing_keys_take_transformers_defaults() -> None:
    import transformers
    minimal = {"hidden_size": 1024, "intermediate_size": 64, "num_attention_heads": 32, "num_hidden_layers": 2,
               "vocab_size": 64}
    for family in FAMILIES:
        ours = ModelConfig.from_dict({"model_type": family, **minimal})
        hf = transformers.AutoConfig.for_model(family, **minimal)
        hf_windows = [hf.sliding_window if t == "sliding_attention" or family == "mistral" else None
                      for t in (getattr(hf, "layer_types", None) or ["full_attention"] * 2)]
        assert (ours.num_key_value_heads, ours.head_dim, ours.rms_norm_eps, ours.max_position_embeddings,
                ours.tie_word_embeddings, ours.rope.to_hf(), [ours.window(i) for i in range(2)]) == (
            hf.num_key_value_heads, getattr(hf, "head_dim", None) or 32, hf.rms_norm_eps, hf.max_position_embeddings,
            hf.tie_word_embeddings, hf.rope_parameters, hf_windows), family
        assert (ours.num_experts, ours.num_experts_per_tok) == (
            getattr(hf, "num_local_experts", 0), getattr(hf, "num_experts_per_tok", 0)), family


# -- refusals ----------------------------------------------------------------------------------

def test_unknown_key_refused_naming_key_and_file(tmp_path: Path) -> None:
    refused(tmp_path, {**HF_WRITES["llama"], "attn_logit_softcapping": 30.0}, "'attn_logit_softcapping'",
            "not understood for model_type 'llama'")
    refused(tmp_path, {**HF_WRITES["llama"], "sliding_window": 4096}, "'sliding_window'")  # llama has none
    refused(tmp_path, {**HF_WRITES["mistral"], "layer_types": ["full_attention"] * 2}, "'layer_types'")
    refused(tmp_path, {**HF_WRITES["qwen2"], "quantization_config": {"quant_method": "fp8"}}, "'quantization_config'")


def test_moe_keys_refused_where_not_understood(tmp_path: Path) -> None:
    """Another MoE family's keys change the routing or the experts: never read into Mixtral's math."""
    for key, value in [("moe_intermediate_size", 32), ("num_experts", 4), ("norm_topk_prob", False),
                       ("shared_expert_intermediate_size", 64), ("decoder_sparse_step", 2), ("mlp_only_layers", [0]),
                       ("n_shared_experts", 1), ("routed_scaling_factor", 2.5), ("scoring_func", "sigmoid")]:
        refused(tmp_path, {**HF_WRITES["mixtral"], key: value}, repr(key), "not understood for model_type 'mixtral'")
    refused(tmp_path, {**HF_WRITES["mistral"], "num_local_experts": 8}, "'num_local_experts'", "'mistral'")
    refused(tmp_path, {**HF_WRITES["llama"], "num_experts_per_tok": 2}, "'num_experts_per_tok'")
    refused(tmp_path, {**HF_WRITES["mixtral"], "num_experts_per_tok": 5}, "num_experts_per_tok 5 > num_local_experts 4")
    refused(tmp_path, {**HF_WRITES["mixtral"], "num_local_experts": 0}, "num_experts 0")
    refused(tmp_path, {**HF_WRITES["mixtral"], "num_experts_per_tok": "2"}, "num_experts_per_tok must be a positive")
    refused(tmp_path, {**HF_WRITES["mixtral"], "attention_bias": True}, "'attention_bias'")
    with pytest.raises(CheckpointError, match="mixture of experts is part of mixtral"):
        replace(SIZES["tiny"], num_experts=8, num_experts_per_tok=2)  # a llama with experts


def test_model_type_and_math_values_refused(tmp_path: Path) -> None:
    refused(tmp_path, {**HF_WRITES["llama"], "model_type": "gemma"}, "model_type 'gemma' is not supported")
    refused(tmp_path, {k: v for k, v in HF_WRITES["llama"].items() if k != "model_type"}, "model_type None")
    refused(tmp_path, {**HF_WRITES["llama"], "hidden_act": "gelu"}, "hidden_act 'gelu'")
    refused(tmp_path, {**HF_WRITES["llama"], "mlp_bias": True}, "mlp_bias")
    refused(tmp_path, {**HF_WRITES["llama"], "partial_rotary_factor": 0.5}, "partial_rotary_factor")
    refused(tmp_path, {**HF_WRITES["qwen2"], "use_mrope": True}, "use_mrope")
    refused(tmp_path, {**HF_WRITES["qwen3"], "layer_types": ["full_attention", "chunked_attention"]}, "layer_types")
    refused(tmp_path, {**HF_WRITES["qwen3"], "layer_types": ["full_attention", "sliding_attention"]},
            "layer_types", "no sliding_window")
    refused(tmp_path, {**HF_WRITES["qwen3"], "attention_bias": "yes"}, "attention_bias must be true or false")


def test_rope_refusals_name_the_key(tmp_path: Path) -> None:
    base = HF_WRITES["llama"]
    refused(tmp_path, {**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type 'yarn' is not supported")
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    refused(tmp_path, {**old, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling.rope_type 'dynamic' is not supported")
    refused(tmp_path, {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}},
            "rope_parameters.beta_fast is not understood for rope_type 'linear'")
    refused(tmp_path, {**base, "rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor is required")
    refused(tmp_path, {**base, "rope_theta": 1.0}, "rope_theta 1.0 disagrees with rope_parameters.rope_theta")
    refused(tmp_path, {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor")


def test_shape_errors_and_parallel_splits(tmp_path: Path) -> None:
    d = {k: v for k, v in HF_WRITES["llama"].items() if k != "hidden_size"}
    refused(tmp_path, d, "required key 'hidden_size' is missing")
    refused(tmp_path, {**HF_WRITES["llama"], "num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple")
    with pytest.raises(CheckpointError, match="no such file"):
        ModelConfig.from_dir(tmp_path / "nowhere")
    c = SIZES["tiny"]
    with pytest.raises(CheckpointError, match="num_key_value_heads=4 is not divisible by tp=8"):
        c.check_parallel(8, 1)
    with pytest.raises(CheckpointError, match="num_hidden_layers=4 < pp=5"):
        c.check_parallel(1, 5)
    with pytest.raises(CheckpointError, match="qwen2 has q/k/v biases"):
        replace(c, model_type="qwen2")
    moe = arch_config(c, "moe")  # experts split whole over EP, never over TP: their width need not divide
    moe.check_parallel(4, 1, 8)
    replace(moe, intermediate_size=190).check_parallel(4, 1, 4)
    with pytest.raises(CheckpointError, match="num_local_experts=8 is not divisible by ep=3"):
        moe.check_parallel(1, 1, 3)
    with pytest.raises(CheckpointError, match="intermediate_size=190 is not divisible by tp=4"):
        replace(c, intermediate_size=190).check_parallel(4, 1)

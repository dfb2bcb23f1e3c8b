"""A Llama model's shape, read from a Hugging Face ``config.json``.

``LlamaConfig`` is frozen and validated at load: every error names the file and the key, so a bad
checkpoint is refused before a single tensor is read. ``check_parallel(tp, pp)`` says whether the
model can be split that way (heads, KV heads, MLP width and vocabulary must divide by TP; there
must be at least one layer per PP stage).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rallypoint.errors import CheckpointError

CONFIG_FILE = "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a HF ``LlamaForCausalLM`` config that the decoder needs.

    Attributes:
        head_dim: ``hidden_size // num_attention_heads`` unless the file gives it.
        rope_scaling: None, or a ``{"rope_type": "llama3", ...}`` dict (Llama 3.1/3.2).
        torch_dtype: the dtype the weights are stored in (``float32``, ``float16``, ``bfloat16``).
        source: the file this config was read from ("" when built in code).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int = 0
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.source or "<LlamaConfig>"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise CheckpointError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                                      f"num_attention_heads {self.num_attention_heads} (and no head_dim given)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim < 2 or self.head_dim % 2:
            raise CheckpointError(f"{where}: head_dim must be an even integer >= 2, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads {self.num_key_value_heads}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise CheckpointError(f"{where}: rms_norm_eps and rope_theta must be > 0, got "
                                  f"{self.rms_norm_eps!r} and {self.rope_theta!r}")
        if self.torch_dtype not in _DTYPES:
            raise CheckpointError(f"{where}: torch_dtype {self.torch_dtype!r} is not one of {sorted(_DTYPES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported (only llama3)")

    # -- reading and writing -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> "LlamaConfig":
        """Build from a parsed ``config.json``; ``source`` names the file in errors."""
        where = source or "<dict>"
        arch = d.get("model_type")
        if arch is not None and arch not in ("llama", "mistral"):
            raise CheckpointError(f"{where}: model_type {arch!r} is not a Llama-family model")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise CheckpointError(f"{where}: {key}=true is not supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise CheckpointError(f"{where}: required key {key!r} is missing")
        dtype = d.get("torch_dtype", d.get("dtype", "float32"))
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(d.get("rope_theta", 10000.0)),
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                head_dim=d.get("head_dim") or 0, rope_scaling=d.get("rope_scaling"), torch_dtype=dtype,
                bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(d.get("eos_token_id")),
                source=source)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "LlamaConfig":
        """Read ``path/config.json`` (or ``path`` itself when it is a file).

        Raises:
            CheckpointError: the file is missing, is not JSON, or a key is missing or invalid.
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
        """The ``config.json`` content, with every standard ``LlamaForCausalLM`` key."""
        d = {k: v for k, v in asdict(self).items() if k != "source"}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, mlp_bias=False, initializer_range=0.02,
                 pretraining_tp=1, use_cache=True, transformers_version="4.46.0")
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

    def num_params(self) -> int:
        """Parameter count of the whole model (the LM head counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ``CheckpointError`` unless the model splits over ``tp`` x ``pp`` ranks.

        TP splits attention heads, KV heads, the MLP width and the vocabulary (LM head) evenly;
        PP gives every stage at least one layer.
        """
        where = self.source or "<LlamaConfig>"
        if tp < 1 or pp < 1:
            raise CheckpointError(f"{where}: tp and pp must be >= 1, got tp={tp} pp={pp}")
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
            if getattr(self, key) % tp:
                raise CheckpointError(f"{where}: {key}={getattr(self, key)} is not divisible by tp={tp}")
        if self.num_hidden_layers < pp:
            raise CheckpointError(f"{where}: num_hidden_layers={self.num_hidden_layers} < pp={pp} "
                                  "(every pipeline stage needs at least one layer)")


def _first_id(value: Any) -> int | None:
    """HF allows a list of EOS ids; we keep the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value

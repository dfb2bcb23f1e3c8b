"""Load one rank's shard of a HF checkpoint (Llama, Mistral, Qwen2, Qwen3, Mixtral), reading only the rows or
columns it owns, and of a mixture of experts only the experts its EP rank holds.

``load_stage`` builds the ``StageModel`` on the ``meta`` device (no full-size init), reads each of
its parameters with ``safe_open(...).get_slice(name)[rows or cols]`` from the file the index names,
and assigns them (``load_state_dict(assign=True)``). Load time and memory scale with the shard.

Every failure is a ``CheckpointError`` naming the tensor and the file: a missing file, a missing
tensor, a truncated or corrupt file, a shape that does not match ``config.json``, a non-float dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rallypoint.errors import CheckpointError
from rallypoint.worker.checkpoint import INDEX_FILE, WEIGHTS_FILE, tensor_shapes
from rallypoint.worker.model import SparseMoE, StageModel, TPComm, split_dim
from rallypoint.worker.model_config import ModelConfig

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


class CheckpointReader:
    """Resolves HF tensor names to files (through the index when sharded) and reads slices.

    Use as a context manager: the files it opened are closed on exit.
    """

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        self.index: dict[str, str] | None = None
        self._open: dict[Path, Any] = {}
        self._stack = ExitStack()
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                self.index = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a HF safetensors index ({type(exc).__name__}: {exc})") from None
        elif not (self.dir / WEIGHTS_FILE).exists():
            raise CheckpointError(f"{self.dir}: no weights: neither {WEIGHTS_FILE} nor {INDEX_FILE} is there")

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def file_for(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        if self.index is None:
            return self.dir / WEIGHTS_FILE
        if name not in self.index:
            raise CheckpointError(f"tensor {name!r} is missing: {self.dir / INDEX_FILE} has no entry for it")
        return self.dir / self.index[name]

    def _handle(self, name: str, file: Path) -> Any:
        if file not in self._open:
            if not file.exists():
                raise CheckpointError(f"tensor {name!r}: file {file} is missing")
            try:
                self._open[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types on a bad header/size
                raise CheckpointError(f"tensor {name!r}: file {file} is truncated or corrupt: {exc}") from None
        return self._open[file]

    def read(self, name: str, shape: tuple[int, ...], dim: int | None = None,
             tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
        """Read tensor ``name``'s part ``tp_rank`` of ``tp_size`` along ``dim`` (None: all of it).

        Args:
            name: the HF tensor name.
            shape: the full shape ``config.json`` implies; the file's must equal it.
            dim: 0 to split rows (a bias: its entries), 1 to split columns, None for the whole tensor.
            tp_rank: which part.
            tp_size: how many parts.

        Raises:
            CheckpointError: missing file or tensor, corrupt file, wrong shape or non-float dtype.
        """
        file = self.file_for(name)
        f = self._handle(name, file)
        if name not in f.keys():  # noqa: SIM118 (safetensors' handle has keys(), not __contains__)
            raise CheckpointError(f"tensor {name!r} is missing from {file}")
        sl = f.get_slice(name)
        got, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {file} has shape {list(got)}, config.json implies {list(shape)}")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {file} has dtype {dtype}, expected a float type")
        try:
            if dim is None:
                return sl[:]
            part = shape[dim] // tp_size
            rows = slice(tp_rank * part, (tp_rank + 1) * part)
            return sl[rows] if dim == 0 else sl[:, rows]
        except Exception as exc:
            raise CheckpointError(f"tensor {name!r} in {file} cannot be read (corrupt file?): {exc}") from None


def load_stage(ckpt_dir: str | Path, config: ModelConfig | None = None, tp_rank: int = 0, tp_size: int = 1,
               layers: range | None = None, first: bool = True, last: bool = True,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               comm: TPComm | None = None, ep_rank: int | None = None, ep_size: int | None = None,
               experts: Sequence[int] | None = None) -> StageModel:
    """Build this rank's ``StageModel`` and fill it with its slices of the checkpoint.

    Args:
        ckpt_dir: a HF checkpoint directory (``config.json`` + safetensors, sharded or not).
        config: the model's config (read from ``ckpt_dir`` when None).
        tp_rank: this rank's index in its TP group.
        tp_size: the TP group size.
        layers: global indices of the stage's layers (all when None).
        first: load the embedding.
        last: load the final norm and LM head.
        device: where the weights go.
        dtype: the compute dtype; weights are read in the checkpoint's dtype, then cast (default:
            the checkpoint's ``torch_dtype``).
        comm: the TP collectives (needed when ``tp_size > 1``), with the EP all-to-all for a mixture
            of experts spread over more than one rank.
        ep_rank: this rank's index in the EP group (a mixture of experts reads only its experts).
        ep_size: the EP group size (default: experts spread over the TP group, ``ep_rank = tp_rank``).
        experts: the experts to read when they are spread over every replica (``protocol.experts``;
            the model's ``set_expert_owners`` then says which it serves).

    Raises:
        CheckpointError: the config does not split over ``tp_size`` (experts over ``ep_size``), a layer
            index is out of range,
            or a tensor cannot be read (the message names the tensor and the file).
    """
    config = config or ModelConfig.from_dir(ckpt_dir)
    config.check_parallel(tp_size, 1, (ep_size or tp_size) if experts is None else 1)
    layers = range(config.num_hidden_layers) if layers is None else layers
    if len(layers) and (min(layers) < 0 or max(layers) >= config.num_hidden_layers):
        raise CheckpointError(f"{ckpt_dir}: layers {layers} outside 0..{config.num_hidden_layers - 1}")
    dtype = dtype or config.dtype
    with torch.device("meta"):
        model = StageModel(config, tp_rank, tp_size, layers, first, last, comm, ep_rank, ep_size, experts)
    shapes = tensor_shapes(config)  # a tied LM head reads model.embed_tokens.weight (in every config)
    state = {}
    with CheckpointReader(ckpt_dir) as reader:
        for pname, hf in model.hf_names().items():
            t = reader.read(hf, shapes[hf], split_dim(pname), tp_rank, tp_size)
            state[pname] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.requires_grad_(False).eval().fuse()


def hold_experts(model: StageModel, ckpt_dir: str | Path, experts: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> list[int]:
    """Make ``model`` hold exactly ``experts`` in every mixture of experts: read the ones it lacks
    from the checkpoint, free the ones no longer wanted, keep the rest as they are. Returns the
    experts read (what moving an expert to this rank costs).

    Raises:
        CheckpointError: an expert's tensor cannot be read (the model is left as it was).
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    if not blocks:
        return []
    want, have = set(experts), set(blocks[0][1].held)
    added = sorted(want - have)
    shapes = tensor_shapes(model.config)
    loaded: list[tuple[SparseMoE, int, torch.nn.Module]] = []
    with CheckpointReader(ckpt_dir) as reader:  # read everything first: a bad tensor changes nothing
        for name, moe in blocks:
            for e in added:
                with torch.device("meta"):
                    module = moe.new_expert()
                state = {}
                for pname, _ in module.named_parameters():
                    hf = f"model.{name}.experts.{e}.{pname}"
                    state[pname] = reader.read(hf, shapes[hf]).to(device=device, dtype=dtype or model.config.dtype)
                module.load_state_dict(state, assign=True, strict=True)
                loaded.append((moe, e, module.requires_grad_(False).eval()))
    for moe, e, module in loaded:
        moe.experts[str(e)] = module
    for _, moe in blocks:
        moe.experts = torch.nn.ModuleDict({str(e): moe.experts[str(e)] for e in sorted(want)})  # index order
    return added

"""A Llama-family decoder in plain PyTorch (gpt-fast style), built directly at one rank's shard size.

One class covers Llama, Mistral, Qwen2, Qwen3 and Mixtral (``ModelConfig.model_type``): they differ
only in q/k/v (and o) biases, per-head q/k RMSNorm before RoPE (Qwen3), sliding-window attention
(Mistral, Mixtral, Qwen2/3 layers marked sliding), and Mixtral's sparse mixture of experts in
place of the MLP (``SparseMoE``).

One ``StageModel`` is one pipeline stage of one tensor-parallel rank: the layers in ``layers`` (global
indices), plus the embedding on the first stage and the final norm + LM head on the last.

Tensor parallelism (Megatron layout):

- column-parallel (output rows split, ``SPLIT_DIM`` 0): ``q/k/v_proj`` (their biases split with
  their rows), ``gate/up_proj``, ``lm_head``;
- row-parallel (input columns split, ``SPLIT_DIM`` 1): ``o_proj``, ``down_proj``, each followed by a
  TP all-reduce of its partial sums; a row-parallel bias is added once, after the all-reduce;
- replicated: ``embed_tokens`` (whole table on every first-stage rank: the simplest choice, and a
  byte-level vocabulary is small), every RMSNorm (``q_norm``/``k_norm`` act per head, so every rank
  applies the same ``head_dim`` weights to its own heads);
- the LM head's vocabulary slices are all-gathered along the last dim, so every last-stage rank
  ends with the full logits (and computes the same greedy token).

Expert parallelism (a mixture of experts' layers): each of the ``ep_size`` ranks of the EP group
holds ``num_experts / ep_size`` whole experts (never split by TP) and a copy of the router. A
token goes to the ranks holding its chosen experts and its expert outputs come back, an
all-to-all each way after one of the row counts (see ``SparseMoE``). The ranks of a TP group see
the same tokens, so each sends only its share of them and the results are all-gathered over TP.

With ``tp_size == 1`` and ``ep_size == 1`` no communication happens, so the same class is the
single-process float32 reference. Names of parameters are HF's without the ``model.`` prefix
(``layers.3.mlp.up_proj.weight``, ``layers.3.block_sparse_moe.experts.5.w1.weight``), so a
checkpoint tensor maps to a parameter by a string edit. Attention uses the HF "rotate_half" RoPE
convention, so real HF Llama checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rallypoint.worker.model_config import ModelConfig

# How each weight is split over TP ranks: 0 = rows (column-parallel), 1 = columns (row-parallel),
# None = replicated. Keyed by the parameter name's last two parts.
SPLIT_DIM: dict[str, int | None] = {
    "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "o_proj.weight": 1,
    "q_proj.bias": 0, "k_proj.bias": 0, "v_proj.bias": 0, "o_proj.bias": None,
    "gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1, "lm_head.weight": 0,
    "embed_tokens.weight": None, "input_layernorm.weight": None, "q_norm.weight": None, "k_norm.weight": None,
    "post_attention_layernorm.weight": None, "norm.weight": None,
    # Mixtral's block_sparse_moe: the router is replicated, an expert lives whole on its EP rank
    "gate.weight": None, "w1.weight": None, "w2.weight": None, "w3.weight": None,
}


class TPComm(Protocol):
    """The two TP collectives the model needs (``rallypoint.comm.collectives.Comm`` has them)."""

    def all_reduce(self, t: Tensor) -> Tensor: ...

    def all_gather(self, t: Tensor, dim: int = -1) -> Tensor: ...


class ModelComm(TPComm, Protocol):
    """The TP collectives plus the EP all-to-all a mixture of experts needs (``Comm`` has it on ``ep``)."""

    def all_to_all(self, t: Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> Tensor: ...


def split_dim(name: str) -> int | None:
    """TP split dimension of parameter ``name`` (see ``SPLIT_DIM``); an expert is never split (a
    Qwen3-MoE expert's ``gate_proj`` is whole on its EP rank, a dense MLP's is split)."""
    return None if ".experts." in name else SPLIT_DIM[".".join(name.split(".")[-2:])]


class Linear(nn.Linear):
    """``nn.Linear`` (no bias unless asked) that skips its random init on ``meta`` (where weights get assigned).

    Initialising on meta costs nothing but makes torch import its compiler stack (~3 s per process).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RowLinear(Linear):
    """A row-parallel ``Linear``: ``forward`` gives this rank's partial sums, without the bias.

    The bias belongs to the sum, not to each part, so ``finish`` adds it after the TP all-reduce.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def finish(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias


class Embedding(nn.Embedding):
    """``nn.Embedding`` that skips its random init on ``meta``."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (HF ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, S, D]; normalised in float32 like HF (one fused kernel), scaled in the input dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float32), scaled as ``config.rope.type`` says."""
    d, rope = config.head_dim, config.rope
    inv = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if rope.type == "default":
        return inv
    if rope.type == "linear":
        return inv / rope.factor
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(is_mid, mid, scaled)


def rotate_half(x: Tensor) -> Tensor:
    """HF's RoPE pairing: dimension ``i`` rotates with ``i + Dh/2``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys by their positions' angles."""
    # x: [B, H, S, Dh]; cos, sin: [B or 1, 1, S, Dh]
    return x * cos + rotate_half(x) * sin


class KVCache:
    """One layer's keys and values for ``max_seq`` positions (a plain holder, not a module)."""

    def __init__(self, batch: int, heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, heads, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, T, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, T, Dh]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None,
               kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` at their positions; return the first ``kv_len`` positions (default all)
        of the rows in use.

        ``rows`` (``[B]``) are the cache rows the ``B`` inputs use (default: the first ``B``: then
        nothing is gathered, the result is a view, and a decode step is a fixed set of kernels
        whatever the positions, which a CUDA graph can replay).
        """
        # input_pos: [S] or [B, S]; k, v: [B, Hkv, S, Dh] -> [B, Hkv, T, Dh]
        b, _, s, dh = k.shape
        t = self.k.shape[2] if kv_len is None else kv_len
        if rows is None:
            if input_pos.dim() == 1:  # one position list for the batch
                self.k[:b].index_copy_(2, input_pos, k)
                self.v[:b].index_copy_(2, input_pos, v)
            else:  # a position per row
                at = input_pos[:, None, :, None].expand(b, k.shape[1], s, dh)          # [B, Hkv, S, Dh]
                self.k[:b].scatter_(2, at, k)
                self.v[:b].scatter_(2, at, v)
            return self.k[:b, :, :t], self.v[:b, :, :t]
        pos = input_pos.expand(b, -1)                                                   # [B, S]
        self.k[rows[:, None], :, pos] = k.transpose(1, 2)                               # [B, S, Hkv, Dh]
        self.v[rows[:, None], :, pos] = v.transpose(1, 2)
        return self.k[rows, :, :t], self.v[rows, :, :t]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    """Grouped-query attention over this rank's ``heads`` query and ``kv_heads`` KV heads.

    ``window`` (None: full causal) lets a query see only the ``window`` latest positions, itself
    included, as transformers' sliding-window mask does; the KV cache still keeps every position.
    """

    def __init__(self, config: ModelConfig, tp_size: int, layer: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.heads = config.num_attention_heads // tp_size
        self.kv_heads = config.num_key_value_heads // tp_size
        self.window = config.window(layer)
        d, q, kv = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = Linear(d, q, config.qkv_bias)
        self.k_proj = Linear(d, kv, config.qkv_bias)
        self.v_proj = Linear(d, kv, config.qkv_bias)
        self.o_proj = RowLinear(q, d, config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.kv_cache: KVCache | None = None
        self.qkv: tuple[Tensor, Tensor | None] | None = None  # (weight, bias) of q, k, v in one: fuse()

    def fuse(self) -> None:
        """Compute q, k and v with one matmul: their weights (and biases) become views of one tensor."""
        self.qkv = _fuse(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor,
                rows: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        # x: [B, S, D]; input_pos: [S] or [B, S]; mask: ``Masks.get(self.window, rep)``
        # -> partial sums [B, S, D] (the caller all-reduces them)
        b, s, _ = x.shape
        h, hkv, dh = self.heads, self.kv_heads, self.head_dim
        if self.qkv is not None and not self.qk_norm:
            qkv = F.linear(x, *self.qkv).view(b, s, h + 2 * hkv, dh).transpose(1, 2)    # [B, H+2Hkv, S, Dh]
            qk = apply_rope(qkv[:, :h + hkv], cos, sin)                                  # q and k rotated together
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv:]
        else:
            if self.qkv is not None:
                q, k, v = F.linear(x, *self.qkv).split([h * dh, hkv * dh, hkv * dh], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k = q.view(b, s, h, dh), k.view(b, s, hkv, dh)                            # [B, S, H or Hkv, Dh]
            v = v.view(b, s, hkv, dh).transpose(1, 2)                                    # [B, Hkv, S, Dh]
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)                                   # per head, over Dh
            q, k = q.transpose(1, 2), k.transpose(1, 2)                                 # [B, H or Hkv, S, Dh]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows, kv_len)                # [B, Hkv, T, Dh]
        # Grouped-query attention without copying K/V per query head: the `rep` query heads that
        # share a KV head are laid along the sequence axis, so each KV head is read once.
        rep = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, rep * s, self.head_dim)                        # [B, Hkv, rep*S, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                   # [B, Hkv, rep*S, Dh]
                                                                                      # mask: [B or 1, 1, rep*S, T]
        y = y.reshape(b, self.heads, s, self.head_dim)                                # [B, H, S, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU over this rank's ``intermediate_size / tp`` slice (``width`` instead of
    ``intermediate_size``: a Qwen3-MoE expert, whole on its rank, is this with ``tp_size`` 1)."""

    def __init__(self, config: ModelConfig, tp_size: int, width: int | None = None) -> None:
        super().__init__()
        d, i = config.hidden_size, (width or config.intermediate_size) // tp_size
        self.gate_proj = Linear(d, i)
        self.up_proj = Linear(d, i)
        self.down_proj = RowLinear(i, d)
        self.gate_up: tuple[Tensor, Tensor | None] | None = None  # fuse()

    def fuse(self) -> None:
        """Compute gate and up with one matmul (their weights become views of one tensor)."""
        self.gate_up = _fuse(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, S, D] -> [B, S, I/tp] -> partial sums [B, S, D]
        if self.gate_up is not None:
            gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Mixtral's and Qwen3-MoE's routing (transformers' ``MixtralTopKRouter``,
    ``Qwen3MoeTopKRouter``): softmax over every expert in float32, keep the ``top_k`` most probable,
    renormalize their probabilities to sum to 1 when ``normalize`` (Qwen3-MoE's ``norm_topk_prob``).

    Returns ``(weights [N, top_k] float32, experts [N, top_k] int64)``, most probable first.
    """
    # logits: [N, E]
    weights, experts = logits.float().softmax(dim=-1).topk(top_k, dim=-1)            # [N, k], [N, k]
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), experts


class Expert(nn.Module):
    """One Mixtral expert: SwiGLU with HF's names (``w1`` gate, ``w3`` up, ``w2`` down), whole on one rank."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1 = Linear(hidden, inner)
        self.w2 = Linear(inner, hidden)
        self.w3 = Linear(hidden, inner)

    def forward(self, x: Tensor) -> Tensor:
        # x: [M, D] -> [M, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral's ``block_sparse_moe`` (Qwen3-MoE's sparse ``mlp``) with its experts spread over the EP group.

    By default EP rank ``r`` of ``ep_size`` holds and serves experts ``r * L .. (r + 1) * L - 1``
    (``L = num_experts / ep_size``). Spread over every replica (``protocol.experts``) a rank
    holds the experts in ``held`` and serves those ``set_owners`` gives it. Experts are named by
    their global index as in the checkpoint (``experts.5.w1``), so a rank reads only its own. A
    token's hidden state is sent to the rank serving each expert chosen for it and the expert
    outputs come back to it (``dispatch``: an all-to-all of the counts, then one each way), where
    they are weighted and summed in the order of the experts' indices, whoever served them: the
    same sums, bit for bit, after a shrink moved an expert to its copy.

    The ranks of a TP group hold the same tokens (the attention's all-reduce replicated them), so
    TP rank ``t`` routes only rows ``t * P .. (t + 1) * P - 1`` (``P = ceil(N / tp_size)``) and the
    results are all-gathered over TP: no expert computes a token twice.
    """

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0,
                 ep_size: int = 1, held: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.gate = Linear(config.hidden_size, config.num_experts)
        self._config = config
        if held is None:
            local = config.num_experts // ep_size
            held = range(ep_rank * local, (ep_rank + 1) * local)
            owner = [e // local for e in range(config.num_experts)]
        else:  # set_owners says who serves what before the first forward
            owner = [ep_rank] * config.num_experts if ep_size == 1 else [-1] * config.num_experts
        self.experts = nn.ModuleDict({str(e): self.new_expert() for e in held})
        self.set_owners(ep_rank, ep_size, owner, check=False)

    def new_expert(self) -> nn.Module:
        """One expert of this model's kind (uninitialised on ``meta``: its weights get assigned)."""
        c = self._config
        return MLP(c, 1, c.expert_size) if c.model_type == "qwen3_moe" else Expert(c.hidden_size, c.expert_size)

    @property
    def held(self) -> list[int]:
        """The experts in this rank's memory, ascending."""
        return sorted(int(e) for e in self.experts)

    def set_owners(self, ep_rank: int, ep_size: int, owner: Sequence[int], check: bool = True) -> None:
        """Serve as EP rank ``ep_rank`` of ``ep_size``, ``owner[e]`` being the rank that serves expert ``e``.

        Raises:
            ValueError: ``owner`` does not name a rank for every expert, or gives this rank an
                expert it does not hold.
        """
        if check:
            if len(owner) != self.num_experts or not all(0 <= r < ep_size for r in owner):
                raise ValueError(f"owners {list(owner)} do not name one of {ep_size} EP ranks for each of "
                                 f"{self.num_experts} experts")
            missing = [e for e, r in enumerate(owner) if r == ep_rank and str(e) not in self.experts]
            if missing:
                raise ValueError(f"EP rank {ep_rank} is to serve experts {missing} it does not hold")
        self.ep_rank, self.ep_size, self.owner = ep_rank, ep_size, list(owner)
        order = sorted(range(self.num_experts), key=lambda e: (owner[e], e))         # by serving rank, then index
        self.served = [sum(1 for r in owner if r == k) for k in range(ep_size)]       # experts each rank serves
        self.serving = [e for e in order if owner[e] == ep_rank]
        pos = [0] * self.num_experts
        for i, e in enumerate(order):
            pos[e] = i
        self._pos = None if order == list(range(self.num_experts)) else torch.tensor(pos)

    def forward(self, x: Tensor, comm: ModelComm | None) -> Tensor:
        # x: [B, S, D] (the same on every TP rank) -> [B, S, D]
        b, s, d = x.shape
        x = x.reshape(b * s, d)
        if self.tp_size == 1:
            return self.mix(x, comm).view(b, s, d)
        assert comm is not None  # StageModel.forward checked it
        share = -(-x.shape[0] // self.tp_size)                                        # P = ceil(N / tp)
        y = self.mix(x[self.tp_rank * share:(self.tp_rank + 1) * share], comm)         # [<= P, D]
        y = F.pad(y, (0, 0, 0, share - y.shape[0]))                                   # [P, D]
        return comm.all_gather(y, dim=0)[:b * s].view(b, s, d)                        # [tp * P, D] -> [N, D]

    def mix(self, x: Tensor, comm: ModelComm | None) -> Tensor:
        """The weighted sum of each token's chosen experts. x: [N, D] -> [N, D] (N may be 0: a
        replica with nothing to compute still serves its experts to the others)."""
        weights, experts = route(self.gate(x), self.top_k, self.normalize)           # [N, k], [N, k]
        chosen = experts.flatten()                                                    # [N*k] expert per (token, slot)
        if self._pos is not None and self._pos.device != chosen.device:
            self._pos = self._pos.to(chosen.device)
        key = chosen if self._pos is None else self._pos[chosen]                      # place in serving order
        order = key.argsort(stable=True)                                              # pairs grouped by rank, expert
        counts = torch.bincount(key, minlength=self.num_experts)                      # [E] pairs per expert
        out = self.dispatch(x[order // self.top_k], counts, comm)                     # [N*k, D] in `order`
        if self._pos is not None:  # sum each token's experts in index order, as the default layout does
            by_pair = torch.empty_like(out)
            by_pair[order] = out
            order = chosen.argsort(stable=True)
            out = by_pair[order]
        token = order // self.top_k                                                   # [N*k] token of each pair
        w = weights.flatten()[order, None]                                            # [N*k, 1] float32
        return torch.zeros_like(x).index_add_(0, token, (out * w).to(x.dtype))       # as transformers sums them

    def dispatch(self, rows: Tensor, counts: Tensor, comm: ModelComm | None) -> Tensor:
        """Run each row through its expert, wherever that expert is served; rows come back in order.

        ``rows`` ``[M, D]`` are grouped by serving rank then expert, ``counts`` ``[E]`` rows per
        expert in that order: one all-to-all of the counts tells each rank what it receives, one
        sends the rows, one brings the outputs back.
        """
        if self.ep_size == 1:
            return self.run_experts(rows, counts.tolist())
        assert comm is not None  # StageModel.forward checked it
        ep, mine = self.ep_size, self.served[self.ep_rank]
        got = comm.all_to_all(counts, self.served, [mine] * ep).view(ep, mine)       # [src, my expert] rows
        per = counts.tolist()
        at = [sum(self.served[:k]) for k in range(ep + 1)]
        send, recv = [sum(per[at[k]:at[k + 1]]) for k in range(ep)], got.sum(1).tolist()  # rows to / from each rank
        theirs = comm.all_to_all(rows, send, recv)                                    # by source, then expert
        local = torch.arange(mine, device=rows.device).repeat(ep).repeat_interleave(got.flatten())
        by_expert = local.argsort(stable=True)                                        # regroup by my expert
        out = torch.empty_like(theirs)
        out[by_expert] = self.run_experts(theirs[by_expert], got.sum(0).tolist())
        return comm.all_to_all(out, recv, send)                                       # back, in `rows`' order

    def run_experts(self, rows: Tensor, counts: list[int]) -> Tensor:
        """The experts this rank serves over ``rows`` grouped by expert (``counts[j]`` rows for its j-th)."""
        if not self.serving:
            return rows
        parts = rows.split(counts)
        return torch.cat([self.experts[str(e)](part) if len(part) else part for e, part in zip(self.serving, parts)])


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (or sparse mixture of experts), each added to the residual
    after its TP all-reduce (the mixture of experts combines its own outputs)."""

    def __init__(self, config: ModelConfig, tp_size: int, layer: int, tp_rank: int = 0, ep_rank: int = 0,
                 ep_size: int = 1, experts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp_size, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sparse = config.is_sparse(layer)
        self.mlp: MLP | SparseMoE
        if self.sparse and config.model_type == "mixtral":  # HF's name for Mixtral's block
            self.block_sparse_moe = SparseMoE(config, tp_rank, tp_size, ep_rank, ep_size, experts)
        elif self.sparse:  # Qwen3-MoE keeps the name mlp
            self.mlp = SparseMoE(config, tp_rank, tp_size, ep_rank, ep_size, experts)
        else:
            self.mlp = MLP(config, tp_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor,
                reduce: Callable[[Tensor], Tensor], rows: Tensor | None = None, kv_len: int | None = None,
                comm: ModelComm | None = None) -> Tensor:
        # x: [B, S, D] -> [B, S, D]
        attn = self.self_attn
        h = x + attn.o_proj.finish(reduce(attn(self.input_layernorm(x), cos, sin, input_pos, mask, rows, kv_len)))
        if self.sparse:
            moe = cast(SparseMoE, getattr(self, "block_sparse_moe", None) or self.mlp)
            return h + moe(self.post_attention_layernorm(h), comm)
        mlp = cast(MLP, self.mlp)
        return h + mlp.down_proj.finish(reduce(mlp(self.post_attention_layernorm(h))))


def _fuse(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for several linears of the same input, which keep views of it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[at:at + n]
        if bias is not None:
            m.bias.data = bias[at:at + n]
        at += n
    return weight, bias


class Masks:
    """The attention masks of one forward, built once for all its layers: causal, and causal within
    each sliding window the layers use. ``[B or 1, 1, S, T]``, additive (0 may attend, -inf may
    not) in the attention's dtype, as the attention kernels take them."""

    def __init__(self, qpos: Tensor, key_pos: Tensor, dtype: torch.dtype) -> None:
        # qpos: [B or 1, S]; key_pos: [B or 1, T] -> broadcast [B or 1, S, T]
        self.qpos, self.key_pos, self.dtype = qpos[:, :, None], key_pos[:, None, :], dtype
        self.causal = (self.key_pos <= self.qpos)[:, None]
        self._made: dict[tuple[int | None, int], Tensor] = {}

    def get(self, window: int | None, rep: int = 1) -> Tensor:
        """The mask of layers with this window, its query rows repeated ``rep`` times (grouped
        query heads laid along the sequence axis)."""
        if window is not None and window >= self.causal.shape[-1]:
            window = None  # the window reaches past every key
        key = (window, rep)
        if key not in self._made:
            m = self.causal if window is None else self.causal & (self.key_pos > self.qpos - window)[:, None]
            m = torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, float("-inf"))
            self._made[key] = m.repeat(1, 1, rep, 1) if rep > 1 else m
        return self._made[key]


class StageModel(nn.Module):
    """One pipeline stage of one TP rank, at shard size.

    Args:
        config: the model's shape.
        tp_rank: this rank's index in its TP group (only used to describe the shard).
        tp_size: TP group size; every split dimension is divided by it.
        layers: the global indices of this stage's decoder layers.
        first: this stage owns the embedding (takes token ids).
        last: this stage owns the final norm and LM head (returns logits).
        comm: the TP collectives, and for a mixture of experts the EP all-to-all; ``forward`` needs
            it when ``tp_size > 1`` or ``ep_size > 1`` (it may be set later).
        ep_rank, ep_size: this rank's place in the EP group that holds a mixture of experts' experts
            (default: the TP group's, experts spread over the TP ranks); ignored by a dense model.
        experts: the experts this rank holds when they are spread over every replica
            (``protocol.experts``); ``set_expert_owners`` then says which it serves.
    """

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, layers: range | None = None,
                 first: bool = True, last: bool = True, comm: TPComm | None = None,
                 ep_rank: int | None = None, ep_size: int | None = None,
                 experts: Sequence[int] | None = None) -> None:
        super().__init__()
        ep_rank, ep_size = (tp_rank, tp_size) if ep_size is None else (ep_rank or 0, ep_size)
        if not config.num_experts:
            ep_rank, ep_size = 0, 1
        config.check_parallel(tp_size, 1, ep_size if experts is None else 1)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank} is outside ep_size {ep_size}")
        self.config, self.tp_rank, self.tp_size, self.ep_rank, self.ep_size = config, tp_rank, tp_size, ep_rank, ep_size
        self.layer_ids = range(config.num_hidden_layers) if layers is None else layers
        self.first, self.last, self.comm = first, last, comm
        if first:
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, tp_size, i, tp_rank, ep_rank, ep_size, experts)
                                     for i in self.layer_ids})
        if last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = Linear(config.hidden_size, config.vocab_size // tp_size)
        self._rope_table: tuple[Tensor, Tensor] | None = None
        self._compiled: list[Callable[..., Tensor]] | None = None  # compile_decode()
        self._compiled_rows = 0

    def decoder_layers(self) -> Iterable[DecoderLayer]:
        """This stage's decoder layers in order (``self.layers``' values, typed as what they are)."""
        return cast("Iterable[DecoderLayer]", self.layers.values())

    def moe_blocks(self) -> list[SparseMoE]:
        """This stage's mixtures of experts, in layer order (none in a dense model)."""
        return [cast(SparseMoE, getattr(layer, "block_sparse_moe", None) or layer.mlp)
                for layer in self.decoder_layers() if layer.sparse]

    def set_expert_owners(self, ep_rank: int, ep_size: int, owner: Sequence[int]) -> None:
        """Serve as EP rank ``ep_rank`` of ``ep_size``, expert ``e`` being served by rank ``owner[e]``
        (every layer alike). Raises ``ValueError`` if this rank would serve an expert it does not hold."""
        for moe in self.moe_blocks():
            moe.set_owners(ep_rank, ep_size, owner)
        self.ep_rank, self.ep_size = ep_rank, ep_size

    def idle_moe_pass(self) -> None:
        """Take part in every mixture of experts' all-to-alls with no tokens of this rank's own,
        serving its experts to the others: what a replica with nothing to compute does while
        the replicas it shares experts with run a step (they cannot go on without it)."""
        moe_comm = cast("ModelComm | None", self.comm)
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        empty = torch.empty(1, 0, self.config.hidden_size, dtype=dtype, device=device)
        for moe in self.moe_blocks():
            moe(empty, moe_comm)

    def _reduce(self, t: Tensor) -> Tensor:
        if self.tp_size == 1:
            return t
        assert self.comm is not None  # forward checked it
        return self.comm.all_reduce(t)

    def _rope(self, input_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # input_pos: [S] or [B, S] -> cos, sin: [B or 1, 1, S, Dh], looked up in a table of every
        # position (computed once, in float32 as before, then cast): no trig per step
        table = self._rope_table
        if table is None or table[0].device != input_pos.device or table[0].dtype != dtype:
            n = self.config.max_position_embeddings
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * rope_inv_freq(self.config)  # [P, Dh/2]
            emb = torch.cat((freqs, freqs), dim=-1)                                   # [P, Dh]
            table = self._rope_table = (emb.cos().to(input_pos.device, dtype), emb.sin().to(input_pos.device, dtype))
        pos = input_pos if input_pos.dim() == 2 else input_pos[None]                 # [B or 1, S]
        return table[0][pos][:, None], table[1][pos][:, None]

    def forward(self, x: Tensor, input_pos: Tensor, rows: Tensor | None = None, kv_len: int | None = None,
                last: Tensor | None = None) -> Tensor:
        """Run this stage.

        Args:
            x: token ids ``[B, S]`` (int64) on the first stage, hidden states ``[B, S, D]`` elsewhere.
            input_pos: absolute positions of the inputs: ``[S]`` shared by the batch, or ``[B, S]``
                per row (continuous batching: rows at different lengths).
            rows: ``[B]`` KV-cache rows the inputs use (default: rows ``0..B-1``); ignored without a cache.
            kv_len: attend over the cache's first ``kv_len`` positions only (default: all of them);
                every query position must be below it.
            last: ``[B]`` index, within ``S``, of the one position per row whose logits are wanted
                (a prefill needs only its prompt's last); default: every position.

        Returns:
            Hidden states ``[B, S, D]``, or on the last stage float32 logits ``[B, S, V]`` (``[B, 1, V]``
            with ``last``).
        """
        if (self.tp_size > 1 or self.ep_size > 1) and self.comm is None:
            raise RuntimeError(f"TP rank {self.tp_rank}/{self.tp_size}, EP rank {self.ep_rank}/{self.ep_size}: "
                               "forward needs a comm (set stage.comm)")
        moe_comm = cast("ModelComm | None", self.comm)  # a mixture of experts' comm has all_to_all too
        h = self.embed_tokens(x) if self.first else x                               # [B, S, D]
        cos, sin = self._rope(input_pos, h.dtype)
        masks = self._masks(input_pos, h.shape[1], kv_len, h.dtype)
        compiled = self._compiled if h.shape[1] == 1 and rows is None and h.shape[0] <= self._compiled_rows else None
        for i, layer in enumerate(self.decoder_layers()):
            attn = layer.self_attn
            mask = masks.get(attn.window, attn.heads // attn.kv_heads)
            if compiled:
                h = compiled[i](h, cos, sin, input_pos, mask, self._reduce, rows, kv_len)
            else:
                h = layer(h, cos, sin, input_pos, mask, self._reduce, rows, kv_len, moe_comm)
        if not self.last:
            return h
        if last is not None:
            h = h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))          # [B, 1, D]
        logits = self.lm_head(self.norm(h))                                          # [B, S or 1, V/tp]
        if self.tp_size > 1:
            assert self.comm is not None  # checked above
            logits = self.comm.all_gather(logits, dim=-1)                            # [B, S, V]
        return logits.float()

    def fuse(self) -> StageModel:
        """Fuse each layer's q/k/v and gate/up projections into one matmul each (fewer kernels per
        step; the parameters stay, as views). Call once the weights are loaded."""
        for layer in self.decoder_layers():
            layer.self_attn.fuse()
            if not layer.sparse:
                cast(MLP, layer.mlp).fuse()
        return self

    def compile_decode(self, max_rows: int = 1 << 30, backend: str = "inductor") -> StageModel:
        """Run decode steps (one position per row, cache rows ``0..B-1``) through ``torch.compile``d
        layers: the norms, RoPE, cache writes, SwiGLU and residual adds of a layer become a few fused
        kernels instead of ~25 small ones, which is most of a CUDA-graph step's time on a small model.

        Every layer has the same code and, as module inputs, the same shapes, so one compilation
        serves them all (two with batch 1, which torch specializes); prefill stays eager. Compiling
        happens at the first decode forward (tens of seconds cold, seconds from torch's on-disk
        cache), so callers do it before serving: ``DecodeGraphs`` captures through it.

        Only decode steps of at most ``max_rows`` rows take the compiled layers: on an H200 (1 B
        model, torch 2.11) they replay 20 % faster up to 16 rows and up to 2.3x slower at 256,
        where the kernels inductor writes for dynamic shapes lose to the eager ones.
        """
        if self.config.num_experts:
            raise ValueError("a mixture of experts decodes eagerly: its routing sizes every step's work on the host")
        self._compiled_rows = max_rows
        self._compiled = [torch.compile(layer, backend=backend, dynamic=True, fullgraph=True)
                          for layer in self.decoder_layers()]
        return self

    def _masks(self, input_pos: Tensor, s: int, kv_len: int | None, dtype: torch.dtype) -> Masks:
        qpos = input_pos if input_pos.dim() == 2 else input_pos[None]                 # [B or 1, S]
        cache = next((layer.self_attn.kv_cache for layer in self.decoder_layers()), None)
        if cache is None:
            return Masks(qpos, qpos, dtype)                                           # T = S: within the input
        t = cache.k.shape[2] if kv_len is None else kv_len
        return Masks(qpos, torch.arange(t, device=input_pos.device)[None], dtype)      # [1, T]

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Give every layer a zeroed KV cache ``[max_batch, kv_heads/tp, max_seq, head_dim]``."""
        if max_seq > self.config.max_position_embeddings:
            raise ValueError(f"max_seq {max_seq} > max_position_embeddings {self.config.max_position_embeddings}")
        ref = next(self.parameters())
        for layer in self.decoder_layers():
            attn = layer.self_attn
            attn.kv_cache = KVCache(max_batch, attn.kv_heads, max_seq, attn.head_dim,
                                    dtype or ref.dtype, torch.device(device) if device else ref.device)

    def reset_cache(self) -> None:
        """Zero every layer's KV cache (kept allocated)."""
        for layer in self.decoder_layers():
            if layer.self_attn.kv_cache is not None:
                layer.self_attn.kv_cache.reset()

    def drop_cache(self) -> None:
        """Free every layer's KV cache; ``forward`` then attends only within its input."""
        for layer in self.decoder_layers():
            layer.self_attn.kv_cache = None

    def hf_names(self) -> dict[str, str]:
        """This stage's parameter names mapped to the HF checkpoint tensor names."""
        out = {}
        for name, _ in self.named_parameters():
            if name == "lm_head.weight":
                out[name] = "model.embed_tokens.weight" if self.config.tie_word_embeddings else name
            else:
                out[name] = "model." + name
        return out

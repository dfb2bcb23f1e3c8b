"""Pipeline-parallel forward over the PP group: each stage receives, runs its layers, sends on.

Every TP rank of stage ``p`` talks to the rank with the same TP index in stage ``p ± 1`` (its PP
group), so the hidden states travel in ``tp`` parallel lanes. The last stage's TP ranks all hold
the full (all-gathered) logits; ``share_tokens`` sends the tokens they pick back to the first
stage, which needs them as the next decode step's input.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rallypoint.worker.model import StageModel


class StageComm(Protocol):
    def send_dict(self, tensors: dict[str, Tensor], dst: int, group: str = "pp") -> None: ...

    def recv_dict(self, src: int, group: str = "pp") -> dict[str, Tensor]: ...


class StageGroups(Protocol):
    """What the pipeline needs of a ``GroupSet`` (read-only, as its properties are)."""

    @property
    def pp_size(self) -> int: ...
    @property
    def is_first_stage(self) -> bool: ...
    @property
    def is_last_stage(self) -> bool: ...
    @property
    def pp_next(self) -> int | None: ...
    @property
    def pp_prev(self) -> int | None: ...


@torch.no_grad()
def pipeline_forward(stage: StageModel, comm: StageComm, groups: StageGroups, x: Tensor | None,
                     input_pos: Tensor | None, rows: Tensor | None = None) -> Tensor | None:
    """Run one forward pass of the whole pipeline; call it on every rank.

    Args:
        stage: this rank's stage.
        comm: the collectives (``send_dict``/``recv_dict`` on the ``pp`` group).
        groups: this rank's groups.
        x: token ids ``[B, S]`` on the first stage; ignored elsewhere (may be None).
        input_pos: positions ``[S]`` or ``[B, S]`` on the first stage; later stages receive them
            with the hidden states.
        rows: KV-cache rows ``[B]`` on the first stage (None: rows ``0..B-1``); travels like ``input_pos``.

    Returns:
        Float32 logits ``[B, S, V]`` on the last stage, None on the others.
    """
    if groups.is_first_stage:
        if x is None or input_pos is None:
            raise ValueError("the first stage needs the token ids and their positions")
        h = stage(x, input_pos, rows)                                             # [B, S, D] or logits
    else:
        assert groups.pp_prev is not None  # every stage but the first has a previous one
        got = comm.recv_dict(src=groups.pp_prev, group="pp")
        input_pos, rows = got["pos"], got.get("rows")                             # [S] or [B, S]; [B]
        h = stage(got["h"], input_pos, rows)                                      # [B, S, D] or logits
    if groups.is_last_stage:
        return h
    assert groups.pp_next is not None  # every stage but the last has a next one
    comm.send_dict({"h": h, "pos": input_pos, **({"rows": rows} if rows is not None else {})},
                   dst=groups.pp_next, group="pp")
    return None


def share_tokens(comm: StageComm, groups: StageGroups, tokens: Tensor | None) -> Tensor | None:
    """Send the last stage's chosen ``tokens`` ``[B]`` to the first stage.

    Call it on every rank after ``pipeline_forward``: the last stage passes its tokens, the others
    None. Returns the tokens on the first and last stages, None on the middle ones.
    """
    if groups.pp_size == 1:
        return tokens
    if groups.is_last_stage:
        if tokens is None:
            raise ValueError("the last stage must pass the tokens it picked")
        comm.send_dict({"tokens": tokens}, dst=0, group="pp")
        return tokens
    if groups.is_first_stage:
        return comm.recv_dict(src=groups.pp_size - 1, group="pp")["tokens"]
    return None

"""Run a parallelized model's groups concurrently: rank r computes branch r of every group.

A parallelized model (from :func:`cqil.parallelize` or :func:`cqil.load_export`) is *sharded* over the
N ranks of a ``torch.distributed`` process group: in every group of P branches, rank r < P keeps only
branch r (its attention heads, its MLP and the keys and values of its own heads); ranks r >= P hold
nothing of that group and add zeros to its sums. Everything else (embeddings, ungrouped layers,
single-layer groups, final norm, LM head) is replicated and computed by every rank, so every rank
ends a forward with the same logits and greedy decoding runs in lockstep without broadcasting
tokens. A group needs P <= N.

What a group exchanges follows the math of a group (docs/design.md), for branch j on rank j::

    a_j = A_j(N_j(x))
    u_j = x + a_j + sum_{k != j} G[j,k] a_k
    y   = x + sum_k a_k + sum_k m_k,    m_j = M_j(N'_j(u_j))

* ``lp`` with every gate at 1 (fixed gates, or learned ones still at 1): every MLP reads
  u = x + sum_k a_k, so one all-reduce after the attentions and one after the MLPs;
* ``lp`` with other gate values: an all-gather of the attention outputs (each rank mixes them
  with its own row of G), then one all-reduce after the MLPs;
* ``none``: u_j = x + a_j is local, so a single all-reduce of a_j + m_j per group;
* ``cqil`` with distance d: rank k sends a_k to the d ranks after it, which is all the gates read,
  then one all-reduce of a_j + m_j.

The collectives go through a :class:`~cqil.serving.comm.Communicator` (:mod:`cqil.serving.comm`:
``torch.distributed``, or shared memory between CPU ranks on one host), which gives every rank the
same sums, bit for bit, so the replicated layers after a group compute the same thing on every rank.
On one host the replicated weights are also mapped from one shared copy (:func:`share_weights`).

Sharding freezes the gates at their current values: this runtime is for inference.

    torchrun --nproc_per_node 2 -m cqil.serving.serve --model EXPORT_DIR --prompt "..." --max-new-tokens 32
"""

from __future__ import annotations

import torch
from torch import nn

from cqil._compat import cache_kwargs, capture_hidden_states, output_cache
from cqil.rewrite.group import (
    BranchGroup,
    MergedGroup,
    ParallelGroup,
    bypass_mask,
    sum_branches,
    take_cache,
)
from cqil.serving.comm import (
    DEFAULT_TIMEOUT,
    TRANSPORTS,
    Communicator,
    SharedMemoryCommunicator,
    init_distributed,
    make_communicator,
    share_weights,
    shared_memory_usable,
)

# The collectives live in cqil.serving.comm; these names stay importable from here (the documented API).
__all__ = [
    "DEFAULT_TIMEOUT",
    "TRANSPORTS",
    "Communicator",
    "GroupShard",
    "SharedMemoryCommunicator",
    "check_world_size",
    "generate_greedy",
    "init_distributed",
    "make_communicator",
    "share_weights",
    "shard_model",
]


# ---------------------------------------------------------------------------------------------- shard


def check_world_size(model: nn.Module, world_size: int) -> None:
    """Raise ``ValueError`` if a group of ``model`` has more branches than there are ranks."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    for group in _groups(model):
        if group.degree > world_size:
            raise ValueError(
                f"group {list(group.original_indices)} has {group.degree} branches but there are only "
                f"{world_size} ranks; run with at least {group.degree} ranks (one per branch)"
            )


def _groups(model: nn.Module) -> list[ParallelGroup]:
    if getattr(model.config, "cqil", None) is None:
        raise ValueError("model is not parallelized (config.cqil is missing): call cqil.parallelize first")
    if (model.config.cqil or {}).get("folded"):
        raise ValueError(
            "this export is folded (every group one plain wide layer), so its branches are no longer "
            "apart; export it without fold=True to run its groups concurrently"
        )
    if any(isinstance(layer, GroupShard) for layer in model.model.layers):
        raise ValueError("model is already sharded")
    return [layer for layer in model.model.layers if isinstance(layer, ParallelGroup)]


@torch.no_grad()
def shard_model(model: nn.Module, comm: Communicator, *, share_replicated: bool | None = None) -> nn.Module:
    """Keep, in place, only this rank's branch of every group of ``model``; return ``model``.

    Groups of more than one branch become :class:`GroupShard` modules; single-layer groups are plain
    layers and stay replicated like the ungrouped ones. The model then runs its forward and
    ``generate`` as before, on every rank at once, with the same results as the whole model.

    ``share_replicated`` (default: with the shared-memory transport, i.e. CPU ranks on one host) maps
    the replicated weights, everything outside the groups, from one copy in shared memory
    (:func:`share_weights`).
    """
    _groups(model)
    check_world_size(model, comm.world_size)
    layers = model.model.layers
    for idx, layer in enumerate(layers):
        if isinstance(layer, ParallelGroup) and layer.degree > 1:
            layers[idx] = GroupShard(layer, comm)
    capture_hidden_states(model.model, [m for m in layers if isinstance(m, GroupShard)])
    if share_replicated is None:
        share_replicated = comm.transport == "shm"
    elif share_replicated and comm.transport != "shm" and not shared_memory_usable(comm.group):
        raise ValueError("share_replicated needs every rank on this host with CPU tensors")
    if share_replicated:
        own = {id(p) for layer in layers if isinstance(layer, GroupShard) for p in layer.parameters()}
        share_weights([p for p in model.parameters() if id(p) not in own], comm)
    return model


def _branch_of_merged(group: MergedGroup, j: int, first: bool) -> MergedGroup:
    """A one-branch :class:`MergedGroup` with branch ``j``'s rows and columns of ``group``.

    ``down_proj``'s bias is the sum of the branches' biases (only that sum is ever used), so it goes
    to the ``first`` branch's shard alone.
    """
    hd, inter = group.head_dim, group.intermediate_size
    qw, kvw = group.num_heads * hd, group.num_kv_heads * hd
    bias = {
        "qkv": group.qkv_proj.bias is not None,
        "o": group.o_bias is not None,
        "mlp": group.gate_up_proj.bias is not None,
        "qk_norm": group.q_norm is not None,
    }
    weight = group.qkv_proj.weight
    local = MergedGroup(
        group.config,
        group.layer_idx,
        (group.original_indices[j],),
        bypass="none",
        bypass_distance=1,
        gates="fixed",
        gate_shape="scalar",
        sliding_window=group.sliding_window,
        dtype=weight.dtype,
        device=weight.device,
        bias=bias,
    )

    def qkv_rows(t: torch.Tensor) -> torch.Tensor:
        q, k, v = t.split([group.q_width, group.kv_width, group.kv_width])
        return torch.cat([q[j * qw : (j + 1) * qw], k[j * kvw : (j + 1) * kvw], v[j * kvw : (j + 1) * kvw]])

    local.qkv_proj.weight.copy_(qkv_rows(weight))
    local.o_proj.weight.copy_(group.o_proj.weight[:, j * qw : (j + 1) * qw])
    local.gate_up_proj.weight.copy_(group.gate_up_proj.weight[2 * j * inter : 2 * (j + 1) * inter])
    local.down_proj.weight.copy_(group.down_proj.weight[:, j * inter : (j + 1) * inter])
    if bias["qkv"]:
        local.qkv_proj.bias.copy_(qkv_rows(group.qkv_proj.bias))
    if bias["o"]:
        local.o_bias.copy_(group.o_bias[j : j + 1])
    if bias["mlp"]:
        local.gate_up_proj.bias.copy_(group.gate_up_proj.bias[2 * j * inter : 2 * (j + 1) * inter])
        local.down_proj.bias.copy_(group.down_proj.bias if first else torch.zeros_like(group.down_proj.bias))
    if bias["qk_norm"]:
        local.q_norm.copy_(group.q_norm[j : j + 1])
        local.k_norm.copy_(group.k_norm[j : j + 1])
    return local.train(group.training)


def _branch_of_branches(group: BranchGroup, j: int) -> BranchGroup:
    """A one-branch :class:`BranchGroup` around branch ``j``'s own decoder layer (no copy)."""
    local = BranchGroup(
        [group.branches[j]],
        group.config,
        group.layer_idx,
        (group.original_indices[j],),
        bypass="none",
        bypass_distance=1,
        gates="fixed",
        gate_shape="scalar",
        sliding_window=group.sliding_window,
    )
    return local.train(group.training)


class GroupShard(nn.Module):
    """This rank's share of one :class:`~cqil.rewrite.group.ParallelGroup`: its branch and the group's exchanges.

    ``local`` is a one-branch group of the same form holding branch ``rank`` (``None`` on a rank at or
    beyond the group's degree, which adds zeros to the sums). Called like a decoder layer. The KV cache
    entry at the group's layer index holds this branch's key/value heads only.
    """

    def __init__(self, group: ParallelGroup, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.layer_idx = group.layer_idx
        self.original_indices = group.original_indices
        self.degree = group.degree
        self.bypass = group.bypass
        self.bypass_distance = group.bypass_distance
        self.head_dim = group.head_dim
        self.rank = comm.rank
        self.branch = comm.rank if comm.rank < group.degree else None
        if self.branch is None:
            self.local = None
        elif isinstance(group, MergedGroup):
            self.local = _branch_of_merged(group, self.branch, first=self.branch == 0)
        else:
            self.local = _branch_of_branches(group, self.branch)

        g = group.gate_matrix()
        g = None if g is None else g.detach().clone()
        if group.bypass == "lp":
            self.exchange_kind = "shared" if group.shared_mlp_input or bool((g == 1).all()) else "gathered"
        else:
            self.exchange_kind = group.bypass  # "none" or "cqil"
        # What this rank's mixing reads: its row of G (gathered), or its sources' gates (cqil).
        row = g[self.branch] if g is not None and self.branch is not None else None
        self.sources: list[int] = []
        self.destinations: list[int] = []
        if self.exchange_kind == "cqil":
            # The mode's connections, not the gate values: a learned gate that reached 0 still costs a send.
            mask = bypass_mask("cqil", group.degree, group.bypass_distance)
            if self.branch is not None:
                self.sources = [k for k in range(group.degree) if mask[self.branch, k]]
                self.destinations = [j for j in range(group.degree) if mask[j, self.branch]]
        self.register_buffer("gate_row", row, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"layers={list(self.original_indices)}, layer_idx={self.layer_idx}, branch={self.branch}, "
            f"exchange={self.exchange_kind}"
        )

    def _attend(self, x, attention_mask, cache, position_embeddings, **kwargs) -> torch.Tensor:
        """a_j of this rank's branch (B, T, D), with its keys and values in the cache."""
        local = self.local
        attn = local._attention(x, attention_mask, cache, position_embeddings, self.layer_idx, **kwargs)
        return local._attention_out(attn, summed=True)

    def _idle(self, x: torch.Tensor, cache) -> torch.Tensor:
        """A rank without a branch of this group: keep the cache's length in step, contribute zeros."""
        if cache is not None:
            # No heads, but the sequence length the masks and positions read from the cache grows.
            empty = x.new_empty(x.shape[0], 0, x.shape[1], self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x, comm, local = hidden_states, self.comm, self.local
        cache = take_cache(kwargs, cache)  # either keyword, as in ParallelGroup.forward
        if local is None:
            a = self._idle(x, cache)
        else:
            a = self._attend(x, attention_mask, cache, position_embeddings, **kwargs)

        if self.exchange_kind == "shared":
            u = x + comm.all_reduce_(a)
            m = local._mlp(u, shared=True) if local is not None else torch.zeros_like(x)
            return u + comm.all_reduce_(m)

        if self.exchange_kind == "gathered":
            parts = comm.all_gather(a)[: self.degree]
            if local is None:
                return x + sum_branches(parts) + comm.all_reduce_(torch.zeros_like(x))
            g = self.gate_row.to(a.dtype)
            mixed = (
                torch.einsum("k,k...->...", g, parts)
                if g.dim() == 1
                else torch.einsum("kd,k...d->...d", g, parts)
            )
            m = local._mlp(x + mixed, shared=True)
            return x + sum_branches(parts) + comm.all_reduce_(m)

        if self.exchange_kind == "cqil":
            received = comm.exchange(a, self.sources, self.destinations)
            if local is None:
                return x + comm.all_reduce_(a)
            u = x + a
            for k, a_k in received.items():
                u = u + self.gate_row[k].to(a.dtype) * a_k
            return x + comm.all_reduce_(a + local._mlp(u, shared=True))

        # none: every branch is an independent layer
        if local is None:
            return x + comm.all_reduce_(a)
        return x + comm.all_reduce_(a + local._mlp(x + a, shared=True))


# ---------------------------------------------------------------------------------------------- decode


@torch.inference_mode()
def generate_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding with the KV cache: ``input_ids`` followed by up to ``max_new_tokens`` tokens.

    Works on a whole model and on a sharded one alike (every rank calls it with the same inputs and
    gets the same tokens). A sequence that has produced an end token is padded with the first end
    token; decoding stops when every sequence has ended.
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos_t = torch.tensor(eos, device=input_ids.device) if eos else None
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    tokens = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        if eos_t is not None:
            token = torch.where(done, eos_t[0], token)
            done = done | torch.isin(token, eos_t)
        tokens.append(token[:, None])
        if step + 1 == max_new_tokens or (eos_t is not None and bool(done.all())):
            break
        if attention_mask is not None:
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1
            )
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            use_cache=True,
            **cache_kwargs(output_cache(out)),
        )
    return torch.cat(tokens, dim=1)

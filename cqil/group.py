"""The parallel group: P consecutive decoder layers that read the same input.

For a group of original layers 1..P with input x (see DESIGN.md, "The math of one group"):

    a_j = A_j(N_j(x))                              every branch reads the same x
    u_j = x + a_j + sum_{k != j} G[j,k] * a_k      bypass: gated attention outputs of the other branches
    m_j = M_j(N'_j(u_j))
    y   = x + sum_j a_j + sum_j m_j

Two forms compute exactly this:

* :class:`BranchGroup` keeps each original layer's modules and runs them branch by branch;
* :class:`MergedGroup` fuses the P attentions into one attention of P*H query and P*Hkv
  key/value heads (branch-major, so grouped-query attention still maps query head i to kv head
  i // (H/Hkv)) and the P MLPs into one wide MLP, with every branch's norm weight folded into
  the columns of its projections. When every MLP reads the same input (fixed G = 1, Layer
  Parallelism) the MLPs run as one wide MLP; otherwise as one batched matmul over branches.

Both forms keep the keys and values of all branches under the group's one layer index, so the
KV cache of a group holds P*Hkv heads, in the same order in both forms.

This module depends on transformers' attention dispatch only, not on any model's modeling file,
so that an exported model can run it as remote code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

BYPASS_MODES = ("lp", "none", "cqil")
GATE_KINDS = ("learned", "fixed")
GATE_SHAPES = ("scalar", "channel")
FORMS = ("merged", "branches")


def bypass_mask(bypass: str, degree: int, distance: int = 1) -> torch.Tensor:
    """Which off-diagonal entries G[j,k] a bypass mode connects (bool, P x P).

    ``lp``: every other branch; ``cqil``: the ``distance`` branches before j; ``none``: no branch.
    The mode fixes the connections; learned gates only learn their strength, so what branches
    must exchange at run time stays what the mode says.
    """
    j = torch.arange(degree)[:, None]
    k = torch.arange(degree)[None, :]
    if bypass == "lp":
        return j != k
    if bypass == "cqil":
        return (k < j) & (j - k <= distance)
    if bypass == "none":
        return torch.zeros(degree, degree, dtype=torch.bool)
    raise ValueError(f"bypass must be one of {BYPASS_MODES}, got {bypass!r}")


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight, with the same float32 upcast as the Llama family's RMSNorm."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """RoPE exactly as the Llama family applies it (cos/sin of shape (B, T, head_dim))."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The Llama family's eager attention (identical in Llama, Mistral, Qwen2 and Qwen3)."""
    n_rep = module.num_key_value_groups
    if n_rep > 1:
        b, h, t, d = key.shape
        key = key[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)
        value = value[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sum_branches(parts) -> torch.Tensor:
    """Sum over branches left to right (a fixed order, so one branch is returned exactly as is)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class ParallelGroup(GradientCheckpointingLayer):
    """One effective decoder layer made of ``degree`` original layers that read the same input.

    Subclasses provide the projections (:meth:`_qkv`, :meth:`_attention_out`, :meth:`_mlp`);
    this class holds the bypass gates and the attention/cache logic shared by both forms.
    Called like a transformers decoder layer; returns the new hidden states.
    """

    form: str

    def __init__(
        self,
        config,
        layer_idx: int,
        original_indices: tuple[int, ...],
        *,
        bypass: str,
        bypass_distance: int,
        gates: str,
        gate_shape: str,
        sliding_window: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.original_indices = tuple(original_indices)
        self.degree = len(self.original_indices)
        self.bypass = bypass
        self.bypass_distance = bypass_distance
        self.gate_kind = gates
        self.gate_shape = gate_shape
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = sliding_window
        self.eps = config.rms_norm_eps

        mask = bypass_mask(bypass, self.degree, bypass_distance)
        # A fixed all-ones G means every MLP reads the same u = x + sum_j a_j; the forms use that
        # to skip the per-branch mixing and, merged, to run one wide MLP.
        self.shared_mlp_input = bypass == "lp" and gates == "fixed"
        if not mask.any():
            self.gates = None
        else:
            shape = (self.degree, self.degree) + ((config.hidden_size,) if gate_shape == "channel" else ())
            init = mask.to(dtype).reshape(mask.shape + (1,) * (len(shape) - 2)).expand(shape).clone()
            init = init.to(device)
            if gates == "learned":
                self.gates = nn.Parameter(init)
            else:
                self.register_buffer("gates", init, persistent=True)
        self.register_buffer("gate_mask", mask.to(device), persistent=False)

    # ----------------------------------------------------------------- gates
    def gate_matrix(self) -> torch.Tensor | None:
        """G with the unconnected entries zeroed and the diagonal set to 1 (the branch's own a_j)."""
        if self.gates is None:
            return None
        mask = self.gate_mask.reshape(self.gate_mask.shape + (1,) * (self.gates.dim() - 2))
        eye = torch.eye(self.degree, dtype=self.gates.dtype, device=self.gates.device)
        eye = eye.reshape(eye.shape + (1,) * (self.gates.dim() - 2))
        return torch.where(mask, self.gates, eye)

    def _mlp_inputs(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """u_j = x + a_j + sum_{k != j} G[j,k] a_k for every branch: (P, B, T, D)."""
        g = self.gate_matrix()
        if g is None:
            return x + a
        if g.dim() == 2:
            mixed = torch.einsum("jk,k...->j...", g.to(a.dtype), a)
        else:
            mixed = torch.einsum("jkd,k...d->j...d", g.to(a.dtype), a)
        return x + mixed

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        q, k, v = self._qkv(x)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        attn, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )  # (B, T, P*H, head_dim)

        if self.shared_mlp_input:
            s = x + self._attention_out(attn, summed=True)
            return s + self._mlp(s, shared=True)
        a = self._attention_out(attn, summed=False)  # (P, B, T, D)
        s = x + sum_branches(a)
        return s + self._mlp(self._mlp_inputs(x, a), shared=False)

    def _qkv(self, x):  # -> q (B, P*H, T, hd), k and v (B, P*Hkv, T, hd)
        raise NotImplementedError

    def _attention_out(self, attn, *, summed: bool):  # -> (B, T, D) if summed else (P, B, T, D)
        raise NotImplementedError

    def _mlp(self, u, *, shared: bool):  # -> sum_j m_j, (B, T, D)
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"layers={list(self.original_indices)}, layer_idx={self.layer_idx}, bypass={self.bypass}"
            + (f"(d={self.bypass_distance})" if self.bypass == "cqil" else "")
            + f", gates={self.gate_kind}/{self.gate_shape}"
        )


class BranchGroup(ParallelGroup):
    """The per-branch form: the original layers' own modules, run one branch after another."""

    form = "branches"

    def __init__(self, layers: list[nn.Module], config, layer_idx: int, original_indices, **kw) -> None:
        ref = layers[0].self_attn.q_proj.weight
        super().__init__(config, layer_idx, original_indices, dtype=ref.dtype, device=ref.device, **kw)
        self.branches = nn.ModuleList(layers)

    def _qkv(self, x):
        shape = (*x.shape[:-1], -1, self.head_dim)
        qs, ks, vs = [], [], []
        for layer in self.branches:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            qs.append(q.transpose(1, 2))
            ks.append(k.transpose(1, 2))
            vs.append(attn.v_proj(h).view(shape).transpose(1, 2))
        return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)

    def _attention_out(self, attn, *, summed: bool):
        outs = []
        for j, layer in enumerate(self.branches):
            heads = attn[:, :, j * self.num_heads : (j + 1) * self.num_heads]
            outs.append(layer.self_attn.o_proj(heads.reshape(*attn.shape[:2], -1).contiguous()))
        return sum_branches(outs) if summed else torch.stack(outs)

    def _mlp(self, u, *, shared: bool):
        return sum_branches(
            [
                layer.mlp(layer.post_attention_layernorm(u if shared else u[j]))
                for j, layer in enumerate(self.branches)
            ]
        )


class MergedGroup(ParallelGroup):
    """The fused form: one wide attention and one wide (or branch-batched) MLP per group."""

    form = "merged"

    def __init__(self, config, layer_idx: int, original_indices, *, dtype, device, bias: dict, **kw) -> None:
        super().__init__(config, layer_idx, original_indices, dtype=dtype, device=device, **kw)
        p, d, hd = self.degree, config.hidden_size, self.head_dim
        inter = config.intermediate_size
        make = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(d, p * self.num_heads * hd, bias=bias["qkv"], **make)
        self.k_proj = nn.Linear(d, p * self.num_kv_heads * hd, bias=bias["qkv"], **make)
        self.v_proj = nn.Linear(d, p * self.num_kv_heads * hd, bias=bias["qkv"], **make)
        # o_proj's columns concatenate the branches, so one matmul sums them; the per-branch
        # biases stay apart because the bypass needs each branch's own a_j.
        self.o_proj = nn.Linear(p * self.num_heads * hd, d, bias=False, **make)
        self.o_bias = nn.Parameter(torch.zeros(p, d, **make)) if bias["o"] else None
        if bias["qk_norm"]:
            self.q_norm = nn.Parameter(torch.ones(p, hd, **make))
            self.k_norm = nn.Parameter(torch.ones(p, hd, **make))
        else:
            self.q_norm = self.k_norm = None
        self.gate_proj = nn.Linear(d, p * inter, bias=bias["mlp"], **make)
        self.up_proj = nn.Linear(d, p * inter, bias=bias["mlp"], **make)
        # Only sum_j m_j is ever used, so down_proj sums the branches and their biases at once.
        self.down_proj = nn.Linear(p * inter, d, bias=bias["mlp"], **make)
        self.act_fn = ACT2FN[config.hidden_act]

    @classmethod
    @torch.no_grad()
    def from_layers(
        cls, layers: list[nn.Module], config, layer_idx: int, original_indices, **kw
    ) -> MergedGroup:
        """Fuse original decoder layers, folding each branch's norm weights into its projections."""
        attn0, mlp0 = layers[0].self_attn, layers[0].mlp
        w = attn0.q_proj.weight
        bias = {
            "qkv": attn0.q_proj.bias is not None,
            "o": attn0.o_proj.bias is not None,
            "mlp": mlp0.gate_proj.bias is not None,
            "qk_norm": hasattr(attn0, "q_norm"),
        }
        group = cls(config, layer_idx, original_indices, dtype=w.dtype, device=w.device, bias=bias, **kw)

        def fold(linear: nn.Linear, norm_weight: torch.Tensor) -> torch.Tensor:
            return linear.weight * norm_weight[None, :].to(linear.weight.dtype)

        def cat_into(target: nn.Linear, weights, biases, dim: int = 0) -> None:
            target.weight.copy_(torch.cat(weights, dim=dim))
            if target.bias is not None:
                target.bias.copy_(torch.cat(biases) if dim == 0 else torch.stack(biases).sum(0))

        ln = [layer.input_layernorm.weight for layer in layers]
        post = [layer.post_attention_layernorm.weight for layer in layers]
        att = [layer.self_attn for layer in layers]
        mlp = [layer.mlp for layer in layers]
        for name in ("q_proj", "k_proj", "v_proj"):
            lins = [getattr(a, name) for a in att]
            cat_into(
                getattr(group, name),
                [fold(li, n) for li, n in zip(lins, ln, strict=True)],
                [li.bias for li in lins],
            )
        group.o_proj.weight.copy_(torch.cat([a.o_proj.weight for a in att], dim=1))
        if group.o_bias is not None:
            group.o_bias.copy_(torch.stack([a.o_proj.bias for a in att]))
        if group.q_norm is not None:
            group.q_norm.copy_(torch.stack([a.q_norm.weight for a in att]))
            group.k_norm.copy_(torch.stack([a.k_norm.weight for a in att]))
        for name in ("gate_proj", "up_proj"):
            lins = [getattr(m, name) for m in mlp]
            cat_into(
                getattr(group, name),
                [fold(li, n) for li, n in zip(lins, post, strict=True)],
                [li.bias for li in lins],
            )
        cat_into(group.down_proj, [m.down_proj.weight for m in mlp], [m.down_proj.bias for m in mlp], dim=1)
        return group

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: (B, T, P*heads, hd); each branch's heads use that branch's norm weight.
        b, t, n, hd = x.shape
        x = rms_normalize(x, self.eps).view(b, t, self.degree, n // self.degree, hd)
        return (weight[:, None, :] * x).view(b, t, n, hd)

    def _qkv(self, x):
        r = rms_normalize(x, self.eps)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = self.q_proj(r).view(shape), self.k_proj(r).view(shape), self.v_proj(r).view(shape)
        if self.q_norm is not None:
            q, k = self._head_norm(q, self.q_norm), self._head_norm(k, self.k_norm)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attention_out(self, attn, *, summed: bool):
        b, t = attn.shape[:2]
        if summed:
            out = self.o_proj(attn.reshape(b, t, -1))
            return out if self.o_bias is None else out + self.o_bias.sum(0)
        # Per-branch outputs: (P, B*T, H*hd) @ (P, H*hd, D)
        p = self.degree
        heads = attn.reshape(b * t, p, -1).transpose(0, 1)
        w = self.o_proj.weight.view(-1, p, heads.shape[-1]).permute(1, 2, 0)
        out = torch.bmm(heads, w).view(p, b, t, -1)
        return out if self.o_bias is None else out + self.o_bias[:, None, None, :]

    def _mlp(self, u, *, shared: bool):
        r = rms_normalize(u, self.eps)
        if shared:
            return self.down_proj(self.act_fn(self.gate_proj(r)) * self.up_proj(r))
        p, b, t, d = r.shape
        r = r.reshape(p, b * t, d)
        gate = self._branch_linear(r, self.gate_proj)
        up = self._branch_linear(r, self.up_proj)
        h = (self.act_fn(gate) * up).transpose(0, 1).reshape(b, t, -1)  # (B, T, P*I), branch-major
        return self.down_proj(h)

    def _branch_linear(self, r: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """Branch j's slice of a wide linear applied to branch j's input: (P, N, D) -> (P, N, out/P)."""
        w = linear.weight.view(self.degree, -1, linear.in_features).transpose(1, 2)
        if linear.bias is None:
            return torch.bmm(r, w)
        return torch.baddbmm(linear.bias.view(self.degree, 1, -1), r, w)

"""The parallel group: P consecutive decoder layers that read the same input.

For a group of original layers 1..P with input x (see docs/design.md, "The math of one group"):

    a_j = A_j(N_j(x))                              every branch reads the same x
    u_j = x + a_j + sum_{k != j} G[j,k] * a_k      bypass: gated attention outputs of the other branches
    m_j = M_j(N'_j(u_j))
    y   = x + sum_j a_j + sum_j m_j

Two forms compute exactly this:

* :class:`BranchGroup` keeps each original layer's modules and runs them branch by branch;
* :class:`MergedGroup` fuses the P attentions into one of P*H query and P*Hkv key/value heads
  (branch-major, so grouped-query attention still maps query head i to kv head i // (H/Hkv)) and
  the P MLPs into one wide MLP, every branch's norm weight folded into its projections. When every
  MLP reads the same input (fixed G = 1, Layer Parallelism) it is one wide layer; otherwise each
  branch runs on its slices of the fused weights.

Both forms keep the keys and values of all branches under the group's one layer index, so the
KV cache of a group holds P*Hkv heads, in the same order in both forms.

This module depends on transformers' attention dispatch only, not on any model's modeling file,
so that an exported model can run it as remote code; it is longer than 500 lines because that
remote code carries both forms as this one file.
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


def effective_layers(groups, num_layers: int) -> list[tuple[int, ...]]:
    """The original layer indices each effective layer runs, in order (one index for ungrouped layers)."""
    by_start = {g[0]: tuple(g) for g in groups}
    out, i = [], 0
    while i < num_layers:
        indices = by_start.get(i, (i,))
        out.append(indices)
        i += len(indices)
    return out


def set_layer_idx(layer: nn.Module, layer_idx: int) -> None:
    """Set ``layer_idx`` on every submodule that has one: the KV cache is indexed by effective layer."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = layer_idx


def take_cache(kwargs: dict, cache=None):
    """The KV cache a caller passed as ``cache=`` (transformers 5.24 on) or ``past_key_values=`` (before).

    Groups are called by the base model's own layer loop, whichever keyword the installed
    transformers uses; one that fell into ``**kwargs`` unseen would leave the cache empty.
    """
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if value is not None:
            if cache is not None and value is not cache:
                raise ValueError("two different KV caches were passed (cache and past_key_values)")
            cache = value
    return cache


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
        # Shaped to broadcast against the gates; the diagonal (a branch's own a_j) is always 1.
        extra = (1,) if gate_shape == "channel" else ()
        self.register_buffer("gate_mask", mask.reshape(mask.shape + extra).to(device), persistent=False)
        eye = torch.eye(self.degree, dtype=dtype, device=device).reshape(mask.shape + extra)
        self.register_buffer("gate_eye", eye, persistent=False)

    # ----------------------------------------------------------------- gates
    def gate_matrix(self) -> torch.Tensor | None:
        """G with the unconnected entries zeroed and the diagonal set to 1 (the branch's own a_j)."""
        if self.gates is None:
            return None
        return torch.where(self.gate_mask, self.gates, self.gate_eye)

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
    def _attention(self, x, attention_mask, cache, position_embeddings, layer_idx, **kwargs):
        """Every branch's attention output before o_proj, (B, T, P*H, head_dim); the keys and values
        go into ``cache`` under ``layer_idx``."""
        q, k, v = self._qkv(x)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
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
        )
        return attn

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
        x = hidden_states
        cache = take_cache(kwargs, cache)
        attn = self._attention(x, attention_mask, cache, position_embeddings, self.layer_idx, **kwargs)

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
    """The fused form: one wide attention and one wide (or per-branch) MLP per group.

    Weights (rows are output features, "branch-major" means branch 1's rows, then branch 2's, ...):

    - ``qkv_proj``: [q of all branches; k of all branches; v of all branches], each branch-major,
      with branch j's input-norm weight folded into its columns;
    - ``o_proj``: the branches' o_proj weights side by side (columns), so one matmul sums them;
      ``o_bias`` (P, D) keeps each branch's bias apart because the bypass needs every a_j;
    - ``q_norm``/``k_norm`` (P, head_dim): per-branch head norms (Qwen3);
    - ``gate_up_proj``: [gate_1; up_1; gate_2; up_2; ...], post-attention norms folded in, so a
      branch's gate and up rows are one contiguous block;
    - ``down_proj``: the branches' down_proj weights side by side and their biases summed
      (only sum_j m_j is ever used).

    Fusing q/k/v and gate/up makes one matmul where the original layers run three and two per
    branch: the merged form is never slower than the layers it replaces.
    """

    form = "merged"

    def __init__(self, config, layer_idx: int, original_indices, *, dtype, device, bias: dict, **kw) -> None:
        super().__init__(config, layer_idx, original_indices, dtype=dtype, device=device, **kw)
        p, d, hd = self.degree, config.hidden_size, self.head_dim
        self.intermediate_size = config.intermediate_size
        self.q_width, self.kv_width = p * self.num_heads * hd, p * self.num_kv_heads * hd
        make = dict(dtype=dtype, device=device)
        self.qkv_proj = nn.Linear(d, self.q_width + 2 * self.kv_width, bias=bias["qkv"], **make)
        self.o_proj = nn.Linear(self.q_width, d, bias=False, **make)
        self.o_bias = nn.Parameter(torch.zeros(p, d, **make)) if bias["o"] else None
        qk = bias["qk_norm"]
        self.q_norm = nn.Parameter(torch.ones(p, hd, **make)) if qk else None
        self.k_norm = nn.Parameter(torch.ones(p, hd, **make)) if qk else None
        self.gate_up_proj = nn.Linear(d, 2 * p * self.intermediate_size, bias=bias["mlp"], **make)
        self.down_proj = nn.Linear(p * self.intermediate_size, d, bias=bias["mlp"], **make)
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

        def folded(linear: nn.Linear, norm: nn.Module) -> torch.Tensor:
            return linear.weight * norm.weight[None, :].to(linear.weight.dtype)

        att = [(layer.self_attn, layer.input_layernorm) for layer in layers]
        mlp = [(layer.mlp, layer.post_attention_layernorm) for layer in layers]
        qkv = [getattr(a, name) for name in ("q_proj", "k_proj", "v_proj") for a, _ in att]
        norms = [n for _ in range(3) for _, n in att]
        group.qkv_proj.weight.copy_(torch.cat([folded(li, n) for li, n in zip(qkv, norms, strict=True)]))
        gate_up = [getattr(m, name) for m, _ in mlp for name in ("gate_proj", "up_proj")]
        norms = [n for _, n in mlp for _ in range(2)]
        group.gate_up_proj.weight.copy_(
            torch.cat([folded(li, n) for li, n in zip(gate_up, norms, strict=True)])
        )
        group.o_proj.weight.copy_(torch.cat([a.o_proj.weight for a, _ in att], dim=1))
        group.down_proj.weight.copy_(torch.cat([m.down_proj.weight for m, _ in mlp], dim=1))
        if bias["qkv"]:
            group.qkv_proj.bias.copy_(torch.cat([li.bias for li in qkv]))
        if bias["o"]:
            group.o_bias.copy_(torch.stack([a.o_proj.bias for a, _ in att]))
        if bias["mlp"]:
            group.gate_up_proj.bias.copy_(torch.cat([li.bias for li in gate_up]))
            group.down_proj.bias.copy_(torch.stack([m.down_proj.bias for m, _ in mlp]).sum(0))
        if bias["qk_norm"]:
            group.q_norm.copy_(torch.stack([a.q_norm.weight for a, _ in att]))
            group.k_norm.copy_(torch.stack([a.k_norm.weight for a, _ in att]))
        return group

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: (B, T, P*heads, hd); each branch's heads use that branch's norm weight.
        b, t, n, hd = x.shape
        x = rms_normalize(x, self.eps).view(b, t, self.degree, n // self.degree, hd)
        return (weight[:, None, :] * x).view(b, t, n, hd)

    def _qkv(self, x):
        qkv = self.qkv_proj(rms_normalize(x, self.eps))
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if self.q_norm is not None:
            q, k = self._head_norm(q, self.q_norm), self._head_norm(k, self.k_norm)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attention_out(self, attn, *, summed: bool):
        flat = attn.reshape(*attn.shape[:2], -1)
        if summed:
            out = self.o_proj(flat)
            return out if self.o_bias is None else out + self.o_bias.sum(0)
        width = self.q_width // self.degree
        if type(self.o_proj) is not nn.Linear:
            # An adapter (peft LoRA) wraps o_proj, and slices of its weight would leave it out: each
            # branch's heads go through the whole module with the other branches' columns at zero.
            mask = torch.eye(self.degree, dtype=flat.dtype, device=flat.device).repeat_interleave(width, 1)
            outs = self.o_proj(flat.unsqueeze(0) * mask[:, None, None, :])
            return outs if self.o_bias is None else outs + self.o_bias[:, None, None, :]
        # Branch j's heads times branch j's columns of o_proj; one plain matmul per branch runs
        # faster on CPUs than a batched matmul over strided weight views.
        outs = []
        for j in range(self.degree):
            cols = slice(j * width, (j + 1) * width)
            bias = None if self.o_bias is None else self.o_bias[j]
            outs.append(nn.functional.linear(flat[..., cols], self.o_proj.weight[:, cols], bias))
        return torch.stack(outs)

    def _mlp(self, u, *, shared: bool):
        r = rms_normalize(u, self.eps)
        inter = self.intermediate_size
        if shared:
            gate_up = self.gate_up_proj(r).view(*r.shape[:-1], self.degree, 2, inter)
            hidden = self.act_fn(gate_up[..., 0, :]) * gate_up[..., 1, :]
            return self.down_proj(hidden.flatten(-2))
        if type(self.gate_up_proj) is not nn.Linear or type(self.down_proj) is not nn.Linear:
            # Adapters wrap the projections (see _attention_out): every branch's input goes through
            # the whole gate_up module, each keeps its own rows, and one down_proj call sums them.
            p = self.degree
            gate_up = self.gate_up_proj(r).view(p, *r.shape[1:-1], p, 2, inter)
            own = torch.stack([gate_up[j, ..., j, :, :] for j in range(p)])
            hidden = self.act_fn(own[..., 0, :]) * own[..., 1, :]
            return self.down_proj(torch.cat(list(hidden), dim=-1))
        # Branch by branch: its gate/up rows on its own input, then its columns of down_proj,
        # accumulated (cheaper than concatenating the P hidden activations for one wide matmul).
        w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
        total = None
        for j in range(self.degree):
            rows = slice(2 * j * inter, 2 * (j + 1) * inter)
            gate, up = nn.functional.linear(r[j], w[rows], None if b is None else b[rows]).split(
                inter, dim=-1
            )
            cols = slice(j * inter, (j + 1) * inter)
            m = nn.functional.linear(self.act_fn(gate) * up, self.down_proj.weight[:, cols])
            total = m if total is None else total + m
        return total if self.down_proj.bias is None else total + self.down_proj.bias

    @torch.no_grad()
    def plain_layer_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of one standard decoder layer (P·H heads, P·I intermediate size) equal to this group.

        Valid when every MLP reads the same input (``lp`` with all gates at 1), which makes the
        group exactly one pre-norm layer; the norms become all-ones since their weights are folded.
        """
        g = self.gate_matrix()
        if self.bypass != "lp" or (g is not None and not bool((g == 1).all())):
            raise ValueError(
                f"group {list(self.original_indices)} is one plain layer only with lp bypass and gates at 1"
            )
        if self.q_norm is not None and not (
            (self.q_norm == self.q_norm[0]).all() and (self.k_norm == self.k_norm[0]).all()
        ):
            raise ValueError(
                f"group {list(self.original_indices)}: its branches' q/k norms differ, "
                "which one plain layer cannot express"
            )
        q, k, v = self.qkv_proj.weight.split([self.q_width, self.kv_width, self.kv_width])
        gate_up = self.gate_up_proj.weight.view(self.degree, 2, self.intermediate_size, -1)
        state = {
            "self_attn.q_proj.weight": q,
            "self_attn.k_proj.weight": k,
            "self_attn.v_proj.weight": v,
            "self_attn.o_proj.weight": self.o_proj.weight,
            "mlp.gate_proj.weight": gate_up[:, 0].flatten(0, 1),
            "mlp.up_proj.weight": gate_up[:, 1].flatten(0, 1),
            "mlp.down_proj.weight": self.down_proj.weight,
            "input_layernorm.weight": torch.ones_like(self.qkv_proj.weight[0]),
            "post_attention_layernorm.weight": torch.ones_like(self.qkv_proj.weight[0]),
        }
        if self.qkv_proj.bias is not None:
            qb, kb, vb = self.qkv_proj.bias.split([self.q_width, self.kv_width, self.kv_width])
            state |= {"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb}
        if self.o_bias is not None:
            state["self_attn.o_proj.bias"] = self.o_bias.sum(0)
        if self.gate_up_proj.bias is not None:
            gub = self.gate_up_proj.bias.view(self.degree, 2, -1)
            state |= {"mlp.gate_proj.bias": gub[:, 0].flatten(), "mlp.up_proj.bias": gub[:, 1].flatten()}
            state["mlp.down_proj.bias"] = self.down_proj.bias
        if self.q_norm is not None:
            state |= {"self_attn.q_norm.weight": self.q_norm[0], "self_attn.k_norm.weight": self.k_norm[0]}
        return {name: t.clone() for name, t in state.items()}

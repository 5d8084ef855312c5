"""The two layers a group becomes in vLLM.

:func:`wide_layer` is vLLM's own decoder layer of the base architecture over a per-layer config with
P times the heads and width (a group whose MLPs share their input); :class:`CqilGroup` computes any
other group from vLLM's fused layers. The package docstring has the tensor-parallel layout.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.mistral import MistralDecoderLayer
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer

from cqil.serving.vllm.config import attention_biases, bypass_mask, wide_layer_config
from cqil.serving.vllm.tensors import merged_tensors


def _segments(start: int, stop: int, width: int) -> list[tuple[int, int, int]]:
    """Split global rows [start, stop) at multiples of ``width``: (branch, local start, local stop)."""
    out, row = [], start
    while row < stop:
        branch = row // width
        end = min(stop, (branch + 1) * width)
        out.append((branch, row - start, end - start))
        row = end
    return out


def _check_tp(where: str, p: int, h: int, hkv: int, i: int) -> None:
    n = get_tensor_model_parallel_world_size()
    if (p * h) % n or (p * i) % n:
        raise ValueError(
            f"{where}: tensor_parallel_size {n} must divide its {p * h} query heads and its "
            f"{p * i} MLP rows (P={p} branches)"
        )
    kh = p * hkv
    if kh >= n and kh % n:
        raise ValueError(f"{where}: tensor_parallel_size {n} must divide its {kh} key/value heads")
    if kh < n and n % kh:
        raise ValueError(f"{where}: tensor_parallel_size {n} must be a multiple of its {kh} key/value heads")


def wide_layer(config, indices, *, vllm_config, prefix: str) -> nn.Module:
    """The group as vLLM's own decoder layer of the base architecture, P times as wide."""
    p = len(indices)
    where = f"group {list(indices)} ({prefix})"
    _check_tp(where, p, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    layer = decoder_layer(wide_layer_config(config, p), vllm_config, prefix)
    layer.cqil_indices = tuple(indices)  # read by the model's log line
    return layer


def decoder_layer(config, vllm_config, prefix: str) -> nn.Module:
    """vLLM's own decoder layer of the base architecture (a Qwen2 group's wide config asks for Llama's)."""
    model_type = config.model_type
    if model_type == "llama" or (model_type == "qwen2" and getattr(config, "qkv_bias", False)):
        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    if model_type == "mistral":
        return MistralDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    if model_type == "qwen2":
        layer_cls = Qwen2DecoderLayer
    elif model_type == "qwen3":
        layer_cls = Qwen3DecoderLayer
    else:
        raise ValueError(f"base model_type {model_type!r} is not supported")
    return layer_cls(
        config=config,
        cache_config=vllm_config.cache_config,
        quant_config=vllm_config.quant_config,
        prefix=prefix,
    )


class CqilGroup(nn.Module):
    """A group whose MLPs read different inputs, from vLLM's fused layers; see the package docstring.

    ``forward(positions, hidden, residual)`` follows vLLM's decoder layers: the group's input is
    ``hidden + residual`` (added inside the fused input norm) and it returns ``(delta, residual)``
    whose sum is its output. :meth:`load` takes the export's tensors in any form, whole; each rank
    keeps its shard.
    """

    def __init__(self, config, cqil: dict, indices, *, vllm_config, prefix: str):
        super().__init__()
        self.indices = tuple(indices)
        self.degree = p = len(self.indices)
        self.bypass = cqil["bypass"]
        self.gate_kind = cqil["gates"]
        self.gate_shape = cqil.get("gate_shape", "scalar")
        self.distance = int(cqil.get("bypass_distance", 1))
        self.config = config
        self.eps = config.rms_norm_eps
        d = config.hidden_size
        h, hkv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = hd = getattr(config, "head_dim", None) or d // h
        i = config.intermediate_size
        if config.hidden_act != "silu":
            raise ValueError(f"{prefix}: hidden_act {config.hidden_act!r} is not supported (silu only)")
        self.bias = bias = attention_biases(config)
        self.where = f"group {list(self.indices)} ({prefix})"
        _check_tp(self.where, p, h, hkv, i)
        self.tp_size = n = get_tensor_model_parallel_world_size()
        self.tp_rank = r = get_tensor_model_parallel_rank()

        # vLLM shards heads and rows contiguously (branch-major): this rank's query heads and MLP rows.
        q_heads = (r * p * h // n, (r + 1) * p * h // n)
        mlp_rows = (r * p * i // n, (r + 1) * p * i // n)
        # Whole branches on every rank: the concurrent layout (no rank computes part of a branch).
        self.branch_local = p % n == 0
        self.head_segments = _segments(*q_heads, h)  # (branch, local head start, stop)
        self.mlp_segments = _segments(*mlp_rows, i)  # (branch, local row start, stop)

        self.input_layernorm = RMSNorm(d, eps=self.eps, has_weight=False)
        self.qkv_proj = QKVParallelLinear(
            d, hd, p * h, p * hkv, bias=bias["qkv"], prefix=f"{prefix}.qkv_proj"
        )
        self.q_size = self.qkv_proj.num_heads * hd
        self.kv_size = self.qkv_proj.num_kv_heads * hd
        if bias["qk_norm"]:  # each local head's own branch's weight
            self.head_norm = RMSNorm(hd, eps=self.eps, has_weight=False)
            self.q_norm = nn.Parameter(torch.empty(self.qkv_proj.num_heads, hd), requires_grad=False)
            self.k_norm = nn.Parameter(torch.empty(self.qkv_proj.num_kv_heads, hd), requires_grad=False)
        else:
            self.q_norm = self.k_norm = None
        sliding_window = None
        layer_types = getattr(config, "layer_types", None)
        layer_idx = int(prefix.rsplit(".", 1)[-1])
        if layer_types and layer_types[layer_idx] == "sliding_attention":
            sliding_window = config.sliding_window
        self.rotary_emb = get_rope(
            hd,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            self.qkv_proj.num_heads,
            hd,
            hd**-0.5,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )
        # One o_proj per run of a branch's heads on this rank: the bypass needs every a_j apart.
        self.o_proj = nn.ModuleList(
            ReplicatedLinear((b - a) * hd, d, bias=False, prefix=f"{prefix}.o_proj.{k}")
            for k, (_, a, b) in enumerate(self.head_segments)
        )
        self.o_bias = nn.Parameter(torch.empty(p, d), requires_grad=False) if bias["o"] else None
        self.post_attention_layernorm = RMSNorm(d, eps=self.eps, has_weight=False)
        # One fused gate/up per run of a branch's MLP rows on this rank (each reads its u_j).
        self.gate_up_proj = nn.ModuleList(
            MergedColumnParallelLinear(
                d, [b - a] * 2, bias=bias["mlp"], disable_tp=True, prefix=f"{prefix}.gate_up_proj.{k}"
            )
            for k, (_, a, b) in enumerate(self.mlp_segments)
        )
        self.act_fn = SiluAndMul()
        # All branches' down projections side by side: one matmul sums the m_j. The group reduces
        # (and adds the bias) itself, since `none` reduces a + m in one all-reduce.
        self.down_proj = RowParallelLinear(
            p * i, d, bias=bias["mlp"], reduce_results=False, skip_bias_add=True, prefix=f"{prefix}.down_proj"
        )

        mask = bypass_mask(self.bypass, p, self.distance)
        self.sources = [[k for k in range(p) if mask[j, k]] for j in range(p)]
        if mask.any():
            shape = (p, p) + ((d,) if self.gate_shape == "channel" else ())
            self.gates = nn.Parameter(torch.empty(shape), requires_grad=False)
        else:
            self.gates = None
        # Every MLP reads x + sum_j a_j: lp with fixed gates, or learned ones all at 1 (see finalize).
        self.shared = self.bypass == "lp" and self.gate_kind == "fixed"

    def layout(self) -> str:
        """How this group runs under the current TP size, and which collectives it calls."""
        n = self.tp_size
        if n == 1:
            how = "one rank, no collectives"
        elif self.shared and self.branch_local:
            how = "all-reduce after attention, all-reduce after the MLPs"
        elif self.branch_local and self.gates is None:
            how = "one all-reduce of sum_j (a_j + m_j)"
        elif self.branch_local:
            how = "all-gather of the attention outputs, all-reduce after the MLPs"
        else:
            how = "fallback (heads straddle ranks): all-reduce of every branch's attention output, then of the MLPs"
        place = (
            f"{self.degree // n} branch(es) per rank" if self.branch_local else "branches split across ranks"
        )
        return f"{self.where}: bypass {self.bypass}, tp {n}, {place}; {how}"

    # ------------------------------------------------------------------ loading
    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy this rank's shards of the group's tensors (any form); returns the parameters' names."""
        m = merged_tensors(tensors, self.config, self.degree)
        p, h, hkv, hd = (
            self.degree,
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.head_dim,
        )
        i = self.config.intermediate_size
        loaded = []

        def put(name: str, param: nn.Parameter, value: torch.Tensor) -> None:
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"{self.where}: weight {name!r} gives {list(value.shape)} for this rank's "
                    f"{list(param.shape)}"
                )
            param.data.copy_(value)

        def need(name: str) -> torch.Tensor:
            if name not in m:
                raise ValueError(f"{self.where}: weight {name!r} is missing from the export")
            return m[name]

        for key in ("weight", "bias"):
            if getattr(self.qkv_proj, key, None) is None:
                continue
            q, k, v = need(f"qkv_proj.{key}").split([p * h * hd, p * hkv * hd, p * hkv * hd])
            param = getattr(self.qkv_proj, key)
            for shard, value in zip("qkv", (q, k, v), strict=True):
                self.qkv_proj.weight_loader(param, value, shard)
            loaded.append(f"qkv_proj.{key}")
        heads0 = self.qkv_proj.num_heads * self.tp_rank  # this rank's first query head
        o = need("o_proj.weight")
        for k, (_, a, b) in enumerate(self.head_segments):
            put("o_proj.weight", self.o_proj[k].weight, o[:, (heads0 + a) * hd : (heads0 + b) * hd])
            loaded.append(f"o_proj.{k}.weight")
        if self.o_bias is not None:
            put("o_bias", self.o_bias, need("o_bias"))
            loaded.append("o_bias")
        if self.q_norm is not None:
            q_norm = need("q_norm").repeat_interleave(h, dim=0)  # (P*H, hd): head g has branch g // H
            k_norm = need("k_norm").repeat_interleave(hkv, dim=0)
            kv0 = self._first_kv_head()
            put("q_norm", self.q_norm, q_norm[heads0 : heads0 + self.q_norm.shape[0]])
            put("k_norm", self.k_norm, k_norm[kv0 : kv0 + self.k_norm.shape[0]])
            loaded += ["q_norm", "k_norm"]
        gu = need("gate_up_proj.weight").reshape(p, 2, i, -1)  # [gate_1; up_1; gate_2; up_2; ...]
        gub = m["gate_up_proj.bias"].reshape(p, 2, i) if self.bias["mlp"] else None
        for k, (branch, a, b) in enumerate(self.mlp_segments):
            rows0 = self.tp_rank * self.down_proj.input_size_per_partition - branch * i
            lo, hi = rows0 + a, rows0 + b  # the segment's rows within its branch
            layer = self.gate_up_proj[k]
            put("gate_up_proj.weight", layer.weight, torch.cat([gu[branch, 0, lo:hi], gu[branch, 1, lo:hi]]))
            loaded.append(f"gate_up_proj.{k}.weight")
            if gub is not None:
                put(
                    "gate_up_proj.bias", layer.bias, torch.cat([gub[branch, 0, lo:hi], gub[branch, 1, lo:hi]])
                )
                loaded.append(f"gate_up_proj.{k}.bias")
        self.down_proj.weight_loader(self.down_proj.weight, need("down_proj.weight"))
        loaded.append("down_proj.weight")
        if self.down_proj.bias is not None:
            self.down_proj.weight_loader(self.down_proj.bias, need("down_proj.bias"))
            loaded.append("down_proj.bias")
        if self.gates is not None:
            put("gates", self.gates, need("gates"))
            loaded.append("gates")
            mix = torch.where(
                bypass_mask(self.bypass, p, self.distance).reshape((p, p) + (1,) * (self.gates.dim() - 2)),
                self.gates,
                1.0,
            )
            # Learned lp gates still all at 1 are fixed ones: every MLP reads x + sum_j a_j.
            self.shared = self.shared or (self.bypass == "lp" and bool((mix == 1).all()))
        return loaded

    def _first_kv_head(self) -> int:
        n, kh = self.tp_size, self.degree * self.config.num_key_value_heads
        return self.tp_rank * kh // n if kh >= n else self.tp_rank // (n // kh)

    # ------------------------------------------------------------------ forward
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(t) if self.tp_size > 1 else t

    def _mlp(self, inputs) -> torch.Tensor:
        """This rank's share of sum_j m_j (not reduced, no bias); ``inputs[branch]`` is norm(u_j)."""
        hidden = [
            self.act_fn(gate_up(inputs[branch])[0])
            for gate_up, (branch, _, _) in zip(self.gate_up_proj, self.mlp_segments, strict=True)
        ]
        return self.down_proj(hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1))[0]

    def _mixed(self, x: torch.Tensor, a: dict, j: int) -> torch.Tensor:
        """u_j = x + a_j + sum_k G[j,k] a_k over the k the bypass connects."""
        u = x + a[j]
        for k in self.sources[j]:
            u = u + self.gates[j, k] * a[k]
        return u

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, x = self.input_layernorm(hidden, residual)
        qkv, _ = self.qkv_proj(normed)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            t, hd = q.shape[0], self.head_dim
            q = (self.head_norm(q.reshape(t, -1, hd)) * self.q_norm).reshape(t, -1)
            k = (self.head_norm(k.reshape(t, -1, hd)) * self.k_norm).reshape(t, -1)
        q, k = self.rotary_emb(positions, q, k)
        attn = self.attn(q, k, v)
        hd = self.head_dim
        parts = [
            proj(attn[:, a * hd : b * hd])[0]
            for proj, (_, a, b) in zip(self.o_proj, self.head_segments, strict=True)
        ]
        bias = self.down_proj.bias

        if self.shared and self.branch_local:  # one wide layer's function: u = x + sum_j a_j
            s = self._all_reduce(sum(parts[1:], parts[0]))
            if self.o_bias is not None:
                s = s + self.o_bias.sum(0)
            normed_u, u = self.post_attention_layernorm(s, x)
            m = self._all_reduce(self._mlp({b: normed_u for b, _, _ in self.mlp_segments}))
            return (m if bias is None else m + bias), u

        if self.branch_local:  # this rank's a_j are complete
            a = {}
            for part, (branch, _, _) in zip(parts, self.head_segments, strict=True):
                a[branch] = part if self.o_bias is None else part + self.o_bias[branch]
            local = list(a)
            if self.gates is None:  # none: u_j = x + a_j is local; ONE all-reduce of sum_j (a_j + m_j)
                m = self._mlp({j: self.post_attention_layernorm(x + a[j]) for j in local})
                out = self._all_reduce(sum((a[j] for j in local[1:]), a[local[0]]) + m)
                return (out if bias is None else out + bias), x
            if self.tp_size > 1:  # every rank needs the a_k its gates read
                gathered = tensor_model_parallel_all_gather(torch.stack([a[j] for j in local]), dim=0)
                a = dict(enumerate(gathered.unbind(0)))
            m = self._all_reduce(
                self._mlp({j: self.post_attention_layernorm(self._mixed(x, a, j)) for j in local})
            )
            total = sum((a[j] for j in range(1, self.degree)), a[0]) + m
            return (total if bias is None else total + bias), x

        # Fallback: heads and MLP rows straddle branches; complete every a_j first (correct, not concurrent).
        a_all = x.new_zeros((self.degree, *x.shape))
        for part, (branch, _, _) in zip(parts, self.head_segments, strict=True):
            a_all[branch] += part
        a_all = self._all_reduce(a_all)
        if self.o_bias is not None:
            a_all = a_all + self.o_bias[:, None, :]
        a = dict(enumerate(a_all.unbind(0)))
        needed = {branch for branch, _, _ in self.mlp_segments}
        if self.shared:
            u = x + a_all.sum(0)
            inputs = dict.fromkeys(needed, self.post_attention_layernorm(u))
        elif self.gates is None:
            inputs = {j: self.post_attention_layernorm(x + a[j]) for j in needed}
        else:
            inputs = {j: self.post_attention_layernorm(self._mixed(x, a, j)) for j in needed}
        m = self._all_reduce(self._mlp(inputs))
        total = a_all.sum(0) + m
        return (total if bias is None else total + bias), x

"""Serve a cqil export with vLLM: ``CqilForCausalLM`` in vLLM's model interface, and its plugin.

This module imports torch, vLLM and the transformers vLLM depends on (nothing else from cqil, no
training dependencies), so it
runs in a virtual environment that has vLLM and a ``pip install --no-deps`` of cqil, whose entry
point ``vllm.general_plugins: cqil = cqil.serving.vllm:register`` makes every vLLM process call
:func:`register`. That registers the architecture ``CqilForCausalLM`` and the config class of
``model_type: cqil``, so that ``LLM(model=export_dir)`` and ``vllm serve export_dir`` load an export
without ``trust_remote_code`` (the export's own ``configuration_cqil.py`` needs a newer
transformers than vLLM pins).

The network, per effective layer (see cqil/group.py for the math of a group):

* an ungrouped layer is vLLM's own decoder layer of the base architecture (``LlamaDecoderLayer``,
  ``MistralDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``), numbered by its effective
  index, loaded from the export's plain keys;
* a group of P layers is :class:`CqilGroup`: one vLLM ``Attention`` with P*H query and P*Hkv
  key/value heads (branch-major, its own KV cache), the P MLPs side by side, norm weights folded
  into the projections (the export's merged form; the branches form and folded exports are
  converted to it while loading).

Tensor parallelism is the concurrent execution of the branches. Heads and MLP rows are split
contiguously, hence branch-major: with TP size N dividing P, each rank holds P/N whole branches
(N = P: one branch per rank) and computes them from the shared input. The collectives per group:

* ``lp`` whose gates are all 1 (fixed, or learned ones still at 1): one all-reduce of the attention
  outputs (u = x + sum_j a_j), one of the MLP outputs: exactly one plain wide layer;
* ``none``: a branch's MLP reads x + a_j, which its rank has: ONE all-reduce of sum_j (a_j + m_j);
* learned ``lp`` and ``cqil``: an all-gather of the per-branch attention outputs (each rank mixes
  those its gates read), then one all-reduce of the MLP outputs.

When N does not divide P (N > P, or P = 3 and N = 2) a rank's heads and MLP rows straddle branches:
the group then runs as ordinary tensor parallelism over the flattened heads (an all-reduce of every
branch's partial attention output, (P, T, D), then one of the MLP outputs) — correct, not
concurrent. N must divide P*H, P*I and P*Hkv (or be a multiple of P*Hkv), as vLLM requires for any
layer.

The module is longer than 500 lines because it is one vLLM model file, as vLLM's own model files
are: the group layer, the decoder stack, weight loading and registration are read together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig  # vLLM's own dependency

ARCHITECTURE = "CqilForCausalLM"
MODEL_TYPE = "cqil"
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# ------------------------------------------------------------------------------------------ plugin


def register() -> None:
    """vLLM general plugin: register the cqil architecture and config class (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "cqil.serving.vllm:CqilForCausalLM")
    register_config()


def register_config() -> None:
    """Make ``AutoConfig`` parse ``model_type: cqil`` with :class:`CqilVllmConfig` (no remote code)."""
    AutoConfig.register(MODEL_TYPE, CqilVllmConfig, exist_ok=True)


class CqilVllmConfig(PretrainedConfig):
    """The config of an export as vLLM reads it (the export's own ``CqilConfig`` needs a newer
    transformers than vLLM pins): ``text_config`` (the base architecture's config at the effective
    depth, which vLLM reads through ``get_text_config()``) and ``cqil`` (the plan and group options).
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    cqil: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            text.setdefault("model_type", "llama")
            self.text_config = CONFIG_MAPPING[text["model_type"]](**text)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["llama"]()
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__post_init__(**kwargs)


# ------------------------------------------------------------------------------------------ plan


def effective_layers(groups, num_layers: int) -> list[tuple[int, ...]]:
    """The original layer indices each effective layer runs (as cqil.group.effective_layers)."""
    by_start = {g[0]: tuple(g) for g in groups}
    out, i = [], 0
    while i < num_layers:
        indices = by_start.get(i, (i,))
        out.append(indices)
        i += len(indices)
    return out


def bypass_mask(bypass: str, degree: int, distance: int = 1) -> torch.Tensor:
    """Which G[j,k] a bypass mode connects (as cqil.group.bypass_mask)."""
    j = torch.arange(degree)[:, None]
    k = torch.arange(degree)[None, :]
    if bypass == "lp":
        return j != k
    if bypass == "cqil":
        return (k < j) & (j - k <= distance)
    if bypass == "none":
        return torch.zeros(degree, degree, dtype=torch.bool)
    raise ValueError(f"unknown bypass mode {bypass!r} (expected lp, none or cqil)")


def attention_biases(config) -> dict[str, bool]:
    """Which biases and head norms a base architecture's layers have (as transformers builds them)."""
    model_type = config.model_type
    if model_type == "qwen2":
        return {"qkv": True, "o": False, "mlp": False, "qk_norm": False}
    if model_type == "qwen3":
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv": bias, "o": bias, "mlp": False, "qk_norm": True}
    if model_type == "mistral":
        return {"qkv": False, "o": False, "mlp": False, "qk_norm": False}
    bias = bool(getattr(config, "attention_bias", False))
    return {"qkv": bias, "o": bias, "mlp": bool(getattr(config, "mlp_bias", False)), "qk_norm": False}


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight, upcast to float32 like the Llama family's RMSNorm."""
    dtype = x.dtype
    x = x.to(torch.float32)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _segments(start: int, stop: int, width: int) -> list[tuple[int, int, int]]:
    """Split global rows [start, stop) at multiples of ``width``: (branch, local start, local stop)."""
    out, row = [], start
    while row < stop:
        branch = row // width
        end = min(stop, (branch + 1) * width)
        out.append((branch, row - start, end - start))
        row = end
    return out


# ------------------------------------------------------------------------------------------ group


class CqilGroup(nn.Module):
    """One group of P branches (merged form), tensor-parallel branch-major; see the module docstring.

    ``forward(positions, x)`` takes the group's input x (the full residual stream) and returns y.
    Parameters hold this rank's shard; :meth:`load` takes the export's full (merged-form) tensors.
    """

    def __init__(self, config, cqil: dict, indices, *, vllm_config, prefix: str, folded: bool = False):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.rotary_embedding import get_rope

        self.indices = tuple(indices)
        self.degree = p = len(self.indices)
        self.bypass = "lp" if folded else cqil["bypass"]
        self.gate_kind = "fixed" if folded else cqil["gates"]
        self.gate_shape = cqil.get("gate_shape", "scalar")
        self.distance = int(cqil.get("bypass_distance", 1))
        self.eps = config.rms_norm_eps
        self.hidden = d = config.hidden_size
        self.num_heads = h = config.num_attention_heads
        self.num_kv_heads = hkv = config.num_key_value_heads
        self.head_dim = hd = getattr(config, "head_dim", None) or d // h
        self.inter = i = config.intermediate_size
        if config.hidden_act != "silu":
            raise ValueError(f"{prefix}: hidden_act {config.hidden_act!r} is not supported (silu only)")
        self.bias = attention_biases(config)
        self.tp_size = n = get_tensor_model_parallel_world_size()
        self.tp_rank = r = get_tensor_model_parallel_rank()
        where = f"group {list(self.indices)} ({prefix})"

        # This rank's query heads, key/value heads and MLP rows: contiguous, hence branch-major.
        qh, kh, rows = p * h, p * hkv, p * i
        if qh % n or rows % n:
            raise ValueError(
                f"{where}: tensor_parallel_size {n} must divide its {qh} query heads and its "
                f"{rows} MLP rows (P={p} branches)"
            )
        self.q_heads = (r * qh // n, (r + 1) * qh // n)
        if kh >= n:
            if kh % n:
                raise ValueError(f"{where}: tensor_parallel_size {n} must divide its {kh} key/value heads")
            self.kv_heads = (r * kh // n, (r + 1) * kh // n)
        else:
            if n % kh:
                raise ValueError(f"{where}: tensor_parallel_size {n} must be a multiple of its {kh} KV heads")
            head = r // (n // kh)
            self.kv_heads = (head, head + 1)
        self.mlp_rows = (r * rows // n, (r + 1) * rows // n)
        # Whole branches on every rank: the concurrent layout (no rank computes part of a branch).
        self.branch_local = p % n == 0
        self.local_branches = list(range(r * p // n, (r + 1) * p // n)) if self.branch_local else []
        self.head_segments = _segments(*self.q_heads, h)  # (branch, local head start, stop)
        self.mlp_segments = _segments(*self.mlp_rows, i)  # (branch, local row start, stop)

        nq, nkv, nrows = self.q_heads[1] - self.q_heads[0], self.kv_heads[1] - self.kv_heads[0], rows // n
        self.q_size, self.kv_size = nq * hd, nkv * hd

        def param(*shape):
            return nn.Parameter(torch.empty(*shape), requires_grad=False)

        self.qkv_weight = param(self.q_size + 2 * self.kv_size, d)
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if self.bias["qkv"] else None
        self.o_weight = param(d, self.q_size)
        self.o_bias = param(p, d) if self.bias["o"] else None
        if self.bias["qk_norm"]:
            self.q_norm = param(nq, hd)  # each local head's own branch's weight
            self.k_norm = param(nkv, hd)
        else:
            self.q_norm = self.k_norm = None
        self.gate_up_weight = param(2 * nrows, d)  # [gate rows; up rows] of this rank
        self.gate_up_bias = param(2 * nrows) if self.bias["mlp"] else None
        self.down_weight = param(d, nrows)
        self.down_bias = param(d) if self.bias["mlp"] else None
        mask = bypass_mask(self.bypass, p, self.distance)
        # A folded group is lp with every gate at 1: the export has no gates (nor needs any).
        self.has_gates = bool(mask.any()) and not folded
        gate_shape = (p, p) + ((d,) if self.gate_shape == "channel" else ())
        self.gates = param(*gate_shape) if self.has_gates else None
        self.register_buffer("gate_mask", mask, persistent=False)
        self.mix = None  # G with the diagonal at 1, set by finalize()
        self.shared = self.bypass == "lp" and self.gate_kind == "fixed"

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
            nq,
            hd,
            hd**-0.5,
            num_kv_heads=nkv,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )
        self._loaded: set[str] = set()
        self.where = where

    def layout(self) -> str:
        """How this group runs under the current TP size, and which collectives it calls."""
        n = self.tp_size
        if n == 1:
            how = "one rank, no collectives"
        elif self.shared:
            how = "one plain wide layer: all-reduce after attention, all-reduce after the MLPs"
        elif self.branch_local and self.mix is None:
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
    def load(self, name: str, tensor: torch.Tensor) -> str:
        """Copy this rank's shard of the export's merged-form tensor ``name``; returns the parameter's name."""
        p, h, hkv, hd, i = self.degree, self.num_heads, self.num_kv_heads, self.head_dim, self.inter
        q0, q1 = (x * hd for x in self.q_heads)
        k0, k1 = (x * hd for x in self.kv_heads)
        r0, r1 = self.mlp_rows
        if name in ("qkv_proj.weight", "qkv_proj.bias"):
            q, k, v = tensor.split([p * h * hd, p * hkv * hd, p * hkv * hd], dim=0)
            target, value = (
                (self.qkv_weight if name.endswith("weight") else self.qkv_bias),
                torch.cat([q[q0:q1], k[k0:k1], v[k0:k1]]),
            )
        elif name == "o_proj.weight":
            target, value = self.o_weight, tensor[:, q0:q1]
        elif name == "o_bias":
            target, value = self.o_bias, tensor
        elif name in ("q_norm", "k_norm"):
            heads, (a, b) = (h, self.q_heads) if name == "q_norm" else (hkv, self.kv_heads)
            per_head = tensor.repeat_interleave(heads, dim=0)  # (P*heads, hd): head g has branch g // heads
            target, value = getattr(self, name), per_head[a:b]
        elif name in ("gate_up_proj.weight", "gate_up_proj.bias"):
            gu = tensor.reshape(p, 2, i, *tensor.shape[1:])  # [gate_1; up_1; gate_2; up_2; ...]
            gate, up = gu[:, 0].flatten(0, 1), gu[:, 1].flatten(0, 1)
            target = self.gate_up_weight if name.endswith("weight") else self.gate_up_bias
            value = torch.cat([gate[r0:r1], up[r0:r1]])
        elif name == "down_proj.weight":
            target, value = self.down_weight, tensor[:, r0:r1]
        elif name == "down_proj.bias":
            target, value = self.down_bias, tensor
        elif name == "gates":
            target, value = self.gates, tensor
        else:
            raise ValueError(f"group {list(self.indices)}: unexpected weight {name!r}")
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"group {list(self.indices)}: weight {name!r} of shape {list(tensor.shape)} does not fit "
                f"{None if target is None else list(target.shape)} (this rank's shard)"
            )
        target.data.copy_(value)
        attr = {
            "qkv_proj.weight": "qkv_weight",
            "qkv_proj.bias": "qkv_bias",
            "o_proj.weight": "o_weight",
            "gate_up_proj.weight": "gate_up_weight",
            "gate_up_proj.bias": "gate_up_bias",
            "down_proj.weight": "down_weight",
            "down_proj.bias": "down_bias",
        }.get(name, name)
        self._loaded.add(attr)
        return attr

    def load_branches(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Fold the branches form (``branches.{j}.<decoder-layer keys>``, ``gates``) into the merged one."""
        p = self.degree

        def get(j, key):
            return tensors.get(f"branches.{j}.{key}")

        def folded(j, proj, norm):
            return get(j, proj) * get(j, norm)[None, :].to(get(j, proj).dtype)

        att = "input_layernorm.weight"
        mlp = "post_attention_layernorm.weight"
        merged = {
            "qkv_proj.weight": torch.cat(
                [folded(j, f"self_attn.{x}_proj.weight", att) for x in "qkv" for j in range(p)]
            ),
            "o_proj.weight": torch.cat([get(j, "self_attn.o_proj.weight") for j in range(p)], dim=1),
            "gate_up_proj.weight": torch.cat(
                [folded(j, f"mlp.{x}_proj.weight", mlp) for j in range(p) for x in ("gate", "up")]
            ),
            "down_proj.weight": torch.cat([get(j, "mlp.down_proj.weight") for j in range(p)], dim=1),
        }
        if self.bias["qkv"]:
            merged["qkv_proj.bias"] = torch.cat(
                [get(j, f"self_attn.{x}_proj.bias") for x in "qkv" for j in range(p)]
            )
        if self.bias["o"]:
            merged["o_bias"] = torch.stack([get(j, "self_attn.o_proj.bias") for j in range(p)])
        if self.bias["mlp"]:
            merged["gate_up_proj.bias"] = torch.cat(
                [get(j, f"mlp.{x}_proj.bias") for j in range(p) for x in ("gate", "up")]
            )
            merged["down_proj.bias"] = torch.stack([get(j, "mlp.down_proj.bias") for j in range(p)]).sum(0)
        if self.bias["qk_norm"]:
            merged["q_norm"] = torch.stack([get(j, "self_attn.q_norm.weight") for j in range(p)])
            merged["k_norm"] = torch.stack([get(j, "self_attn.k_norm.weight") for j in range(p)])
        if "gates" in tensors:
            merged["gates"] = tensors["gates"]
        return [self.load(name, t) for name, t in merged.items()]

    def load_folded(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Load a folded export's group: one plain wide decoder layer (lp, gates at 1)."""
        p, i = self.degree, self.inter
        wide = {f"branches.0.{k}": v for k, v in tensors.items()}
        ones = torch.ones(self.hidden, dtype=tensors["self_attn.q_proj.weight"].dtype)
        wide.setdefault("branches.0.input_layernorm.weight", ones)
        wide.setdefault("branches.0.post_attention_layernorm.weight", ones)

        def norm(key):
            return wide[f"branches.0.{key}"][None, :]

        att, post = norm("input_layernorm.weight"), norm("post_attention_layernorm.weight")
        merged = {
            "qkv_proj.weight": torch.cat(
                [wide[f"branches.0.self_attn.{x}_proj.weight"] * att for x in "qkv"]
            ),
            "o_proj.weight": wide["branches.0.self_attn.o_proj.weight"],
            "down_proj.weight": wide["branches.0.mlp.down_proj.weight"],
        }
        gate = (wide["branches.0.mlp.gate_proj.weight"] * post).view(p, i, -1)
        up = (wide["branches.0.mlp.up_proj.weight"] * post).view(p, i, -1)
        merged["gate_up_proj.weight"] = torch.stack([gate, up], dim=1).flatten(0, 2)
        if self.bias["qkv"]:
            merged["qkv_proj.bias"] = torch.cat([wide[f"branches.0.self_attn.{x}_proj.bias"] for x in "qkv"])
        if self.bias["o"]:
            o_bias = torch.zeros(p, self.hidden, dtype=ones.dtype)
            o_bias[0] = wide["branches.0.self_attn.o_proj.bias"]
            merged["o_bias"] = o_bias
        if self.bias["mlp"]:
            gb = wide["branches.0.mlp.gate_proj.bias"].view(p, i)
            ub = wide["branches.0.mlp.up_proj.bias"].view(p, i)
            merged["gate_up_proj.bias"] = torch.stack([gb, ub], dim=1).flatten()
            merged["down_proj.bias"] = wide["branches.0.mlp.down_proj.bias"]
        if self.bias["qk_norm"]:
            merged["q_norm"] = wide["branches.0.self_attn.q_norm.weight"][None].expand(p, -1)
            merged["k_norm"] = wide["branches.0.self_attn.k_norm.weight"][None].expand(p, -1)
        return [self.load(name, t) for name, t in merged.items()]

    @torch.no_grad()
    def finalize(self) -> None:
        """After loading: check completeness, build G (diagonal 1), detect lp gates that are all 1."""
        expected = {name for name, value in self.named_parameters(recurse=False) if value is not None}
        missing = expected - self._loaded
        if missing:
            raise ValueError(
                f"group {list(self.indices)}: weights missing from the export: {sorted(missing)}"
            )
        if self.gates is None:
            self.mix = None
            return
        mask = self.gate_mask.to(self.gates.device)
        eye = torch.eye(self.degree, dtype=self.gates.dtype, device=self.gates.device)
        if self.gates.dim() == 3:
            mask, eye = mask[..., None], eye[..., None]
        self.mix = torch.where(mask, self.gates, eye)
        # Every MLP reads x + sum_k a_k exactly when lp's G is all ones: one plain wide layer.
        self.shared = self.bypass == "lp" and bool((self.mix == 1).all())

    # ------------------------------------------------------------------ forward
    def _mlp_partial(self, inputs) -> torch.Tensor:
        """sum over this rank's MLP rows of m_j(u_j), not reduced; ``inputs(j)`` gives norm(u_j)."""
        nrows = self.down_weight.shape[1]
        gate_w, up_w = self.gate_up_weight[:nrows], self.gate_up_weight[nrows:]
        gb = ub = None
        if self.gate_up_bias is not None:
            gb, ub = self.gate_up_bias[:nrows], self.gate_up_bias[nrows:]
        total = None
        for branch, a, b in self.mlp_segments:
            x = inputs(branch)
            g = F.linear(x, gate_w[a:b], None if gb is None else gb[a:b])
            u = F.linear(x, up_w[a:b], None if ub is None else ub[a:b])
            m = F.linear(F.silu(g) * u, self.down_weight[:, a:b])
            total = m if total is None else total + m
        return total

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

        def all_reduce(t):
            return tensor_model_parallel_all_reduce(t) if self.tp_size > 1 else t

        qkv = F.linear(rms_normalize(x, self.eps), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            tokens, hd = q.shape[0], self.head_dim
            q = (rms_normalize(q.reshape(tokens, -1, hd), self.eps) * self.q_norm).reshape(tokens, -1)
            k = (rms_normalize(k.reshape(tokens, -1, hd), self.eps) * self.k_norm).reshape(tokens, -1)
        q, k = self.rotary_emb(positions, q, k)
        attn = self.attn(q, k, v)

        if self.shared:  # one plain wide layer: u = x + sum_j a_j feeds every MLP
            s = all_reduce(F.linear(attn, self.o_weight))
            if self.o_bias is not None:
                s = s + self.o_bias.sum(0)
            u = x + s
            r = rms_normalize(u, self.eps)
            m = all_reduce(self._mlp_partial(lambda j: r))
            y = u + m
            return y if self.down_bias is None else y + self.down_bias

        hd = self.head_dim

        def partial(branch, a, b):  # this rank's heads [a, b) of `branch` through their o_proj columns
            return F.linear(attn[:, a * hd : b * hd], self.o_weight[:, a * hd : b * hd])

        if self.branch_local:
            # Rank r holds whole branches: its a_j are complete here.
            a_local = []
            for branch, a, b in self.head_segments:
                out = partial(branch, a, b)
                a_local.append(out if self.o_bias is None else out + self.o_bias[branch])
            a_local = torch.stack(a_local)  # (local branches, T, D), in branch order
            first = self.local_branches[0]
            if self.mix is None:  # none: u_j = x + a_j is local; ONE all-reduce of sum_j (a_j + m_j)
                m = self._mlp_partial(lambda j: rms_normalize(x + a_local[j - first], self.eps))
                out = all_reduce(a_local.sum(0) + m)
                y = x + out
            else:  # gated: every rank needs the a_k its gates read
                a_all = tensor_model_parallel_all_gather(a_local, dim=0) if self.tp_size > 1 else a_local
                m = all_reduce(self._mlp_partial(lambda j: rms_normalize(self._mixed(x, a_all, j), self.eps)))
                y = x + a_all.sum(0) + m
            return y if self.down_bias is None else y + self.down_bias

        # Fallback: heads and MLP rows straddle branches; complete every a_j first (correct, not concurrent).
        a_all = x.new_zeros((self.degree, *x.shape))
        for branch, a, b in self.head_segments:
            a_all[branch] += partial(branch, a, b)
        a_all = all_reduce(a_all)
        if self.o_bias is not None:
            a_all = a_all + self.o_bias[:, None, :]
        if self.mix is None:
            m = self._mlp_partial(lambda j: rms_normalize(x + a_all[j], self.eps))
        else:
            m = self._mlp_partial(lambda j: rms_normalize(self._mixed(x, a_all, j), self.eps))
        y = x + a_all.sum(0) + all_reduce(m)
        return y if self.down_bias is None else y + self.down_bias

    def _mixed(self, x: torch.Tensor, a_all: torch.Tensor, j: int) -> torch.Tensor:
        """u_j = x + sum_k G[j,k] a_k (G[j,j] = 1)."""
        g = self.mix[j].to(a_all.dtype)
        if g.dim() == 1:
            return x + torch.einsum("k,ktd->td", g, a_all)
        return x + (g[:, None, :] * a_all).sum(0)


# ------------------------------------------------------------------------------------------ model


def _decoder_layer(config, vllm_config, prefix: str) -> nn.Module:
    """vLLM's own decoder layer of the base architecture."""
    model_type = config.model_type
    if model_type == "llama":
        from vllm.model_executor.models.llama import LlamaDecoderLayer

        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    if model_type == "mistral":
        from vllm.model_executor.models.mistral import MistralDecoderLayer

        return MistralDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    if model_type == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer as layer_cls
    elif model_type == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer as layer_cls
    else:
        raise ValueError(
            f"base model_type {model_type!r} is not supported (expected one of {BASE_MODEL_TYPES})"
        )
    return layer_cls(
        config=config,
        cache_config=vllm_config.cache_config,
        quant_config=vllm_config.quant_config,
        prefix=prefix,
    )


class CqilModel(nn.Module):
    """The decoder stack: embeddings, one module per effective layer, final norm."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.distributed import get_pp_group
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        if get_pp_group().world_size > 1:
            raise ValueError(
                "cqil exports do not support pipeline parallelism in vLLM (use tensor parallelism)"
            )
        hf_config = vllm_config.model_config.hf_config
        config = hf_config.get_text_config()
        cqil = dict(hf_config.cqil)
        if config.model_type not in BASE_MODEL_TYPES:
            raise ValueError(f"base model_type {config.model_type!r} is not supported ({BASE_MODEL_TYPES})")
        if config.model_type in ("qwen2", "qwen3"):
            from vllm.transformers_utils.config import set_default_rope_theta

            set_default_rope_theta(config, default_theta=1000000)
        self.config = config
        self.cqil = cqil
        plan = cqil["plan"]
        self.folded = bool(cqil.get("folded"))
        groups = {tuple(g) for g in plan["groups"]}
        self.effective = effective_layers(plan["groups"], plan["num_layers"])
        if len(self.effective) != config.num_hidden_layers:
            raise ValueError(
                f"the plan has {len(self.effective)} effective layers but text_config.num_hidden_layers "
                f"is {config.num_hidden_layers}"
            )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        layers = []
        for idx, indices in enumerate(self.effective):
            layer_prefix = f"{prefix}.layers.{idx}"
            if indices in groups:
                layers.append(
                    CqilGroup(
                        config,
                        cqil,
                        indices,
                        vllm_config=vllm_config,
                        prefix=layer_prefix,
                        folded=self.folded,
                    )
                )
            else:
                layers.append(_decoder_layer(config, vllm_config, layer_prefix))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            if isinstance(layer, CqilGroup):
                x = hidden if residual is None else hidden + residual
                hidden, residual = layer(positions, x), None
            else:
                hidden, residual = layer(positions, hidden, residual)
        if residual is None:
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


_STACKED = [
    # (parameter, checkpoint name, shard id), as vLLM's Llama/Qwen loaders
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


class CqilForCausalLM(nn.Module):
    """A cqil export (``architectures: ["CqilForCausalLM"]``) in vLLM's model interface."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self.model = CqilModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        config = self.model.config
        self.config = vllm_config.model_config.hf_config
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=_join(prefix, "lm_head"))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded: set[str] = set()
        layers = self.model.layers
        pending: dict[int, dict[str, torch.Tensor]] = {}  # branches-form / folded groups, folded at the end
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tied and name.startswith("lm_head."):
                continue
            if name.startswith("model.layers."):
                idx_str, rest = name.removeprefix("model.layers.").split(".", 1)
                idx = int(idx_str)
                group = layers[idx]
                if isinstance(group, CqilGroup):
                    if rest.startswith("branches.") or self.model.folded:
                        pending.setdefault(idx, {})[rest] = tensor
                    else:
                        attr = group.load(rest, tensor)
                        loaded.add(f"model.layers.{idx}.{attr}")
                    continue
            for param_name, weight_name, shard in _STACKED:
                if weight_name in name:
                    target = name.replace(weight_name, param_name)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in the export")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        for idx, tensors in pending.items():
            group = layers[idx]
            # (In the branches form the gates sit outside the branches and were loaded above.)
            attrs = group.load_folded(tensors) if self.model.folded else group.load_branches(tensors)
            loaded.update(f"model.layers.{idx}.{a}" for a in attrs)
        from vllm.logger import init_logger

        logger = init_logger("vllm.model_executor.models.cqil")  # under vLLM's configured logger
        for layer in layers:
            if isinstance(layer, CqilGroup):
                layer.finalize()
                if layer.tp_rank == 0:
                    logger.info("cqil %s", layer.layout())
        return loaded


def _join(prefix: str, name: str) -> str:
    return name if not prefix else f"{prefix}.{name}"

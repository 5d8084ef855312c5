"""A group's tensors in an export, in the layouts the vLLM layers load.

An export holds a group in one of three forms (cqil.export.load): *merged* (``qkv_proj``,
``o_proj``, ``o_bias``, ``q_norm``/``k_norm``, ``gate_up_proj``, ``down_proj``, ``gates``, norm
weights folded into the projections), *branches* (``branches.{j}.<decoder-layer keys>``, ``gates``)
or *folded* (plain decoder-layer keys). :func:`merged_tensors` turns each into the merged form (what
:class:`~cqil.serving.vllm.group.CqilGroup` loads) and :func:`plain_tensors` into one decoder layer's
keys (what :func:`~cqil.serving.vllm.group.wide_layer` loads).
"""

from __future__ import annotations

import torch

from cqil.serving.vllm.config import attention_biases


def merged_tensors(tensors: dict[str, torch.Tensor], config, degree: int) -> dict[str, torch.Tensor]:
    """The group's tensors in the merged form, whichever form the export holds."""
    if any(name.startswith("branches.") for name in tensors):
        return _merged_from_branches(tensors, config, degree)
    if "self_attn.q_proj.weight" in tensors:
        return _merged_from_plain(tensors, config, degree)
    return dict(tensors)


def _merged_from_branches(tensors, config, p: int) -> dict[str, torch.Tensor]:
    bias = attention_biases(config)

    def get(j, key):
        return tensors[f"branches.{j}.{key}"]

    def folded(j, proj, norm):
        return get(j, proj) * get(j, norm)[None, :].to(get(j, proj).dtype)

    att, post = "input_layernorm.weight", "post_attention_layernorm.weight"
    merged = {
        "qkv_proj.weight": torch.cat(
            [folded(j, f"self_attn.{x}_proj.weight", att) for x in "qkv" for j in range(p)]
        ),
        "o_proj.weight": torch.cat([get(j, "self_attn.o_proj.weight") for j in range(p)], dim=1),
        "gate_up_proj.weight": torch.cat(
            [folded(j, f"mlp.{x}_proj.weight", post) for j in range(p) for x in ("gate", "up")]
        ),
        "down_proj.weight": torch.cat([get(j, "mlp.down_proj.weight") for j in range(p)], dim=1),
    }
    if bias["qkv"]:
        merged["qkv_proj.bias"] = torch.cat(
            [get(j, f"self_attn.{x}_proj.bias") for x in "qkv" for j in range(p)]
        )
    if bias["o"]:
        merged["o_bias"] = torch.stack([get(j, "self_attn.o_proj.bias") for j in range(p)])
    if bias["mlp"]:
        merged["gate_up_proj.bias"] = torch.cat(
            [get(j, f"mlp.{x}_proj.bias") for j in range(p) for x in ("gate", "up")]
        )
        merged["down_proj.bias"] = torch.stack([get(j, "mlp.down_proj.bias") for j in range(p)]).sum(0)
    if bias["qk_norm"]:
        merged["q_norm"] = torch.stack([get(j, "self_attn.q_norm.weight") for j in range(p)])
        merged["k_norm"] = torch.stack([get(j, "self_attn.k_norm.weight") for j in range(p)])
    if "gates" in tensors:
        merged["gates"] = tensors["gates"]
    return merged


def _merged_from_plain(tensors, config, p: int) -> dict[str, torch.Tensor]:
    """A folded export's group (one wide decoder layer, lp with gates at 1) in the merged form."""
    bias, i, d = attention_biases(config), config.intermediate_size, config.hidden_size
    dtype = tensors["self_attn.q_proj.weight"].dtype
    ones = torch.ones(d, dtype=dtype)
    att = tensors.get("input_layernorm.weight", ones)[None, :]
    post = tensors.get("post_attention_layernorm.weight", ones)[None, :]
    gate = (tensors["mlp.gate_proj.weight"] * post).view(p, i, -1)
    up = (tensors["mlp.up_proj.weight"] * post).view(p, i, -1)
    merged = {
        "qkv_proj.weight": torch.cat([tensors[f"self_attn.{x}_proj.weight"] * att for x in "qkv"]),
        "o_proj.weight": tensors["self_attn.o_proj.weight"],
        "gate_up_proj.weight": torch.stack([gate, up], dim=1).flatten(0, 2),
        "down_proj.weight": tensors["mlp.down_proj.weight"],
    }
    if bias["qkv"]:
        merged["qkv_proj.bias"] = torch.cat([tensors[f"self_attn.{x}_proj.bias"] for x in "qkv"])
    if bias["o"]:
        o_bias = torch.zeros(p, d, dtype=dtype)
        o_bias[0] = tensors["self_attn.o_proj.bias"]  # only the sum of the branches' biases is used
        merged["o_bias"] = o_bias
    if bias["mlp"]:
        gb, ub = tensors["mlp.gate_proj.bias"].view(p, i), tensors["mlp.up_proj.bias"].view(p, i)
        merged["gate_up_proj.bias"] = torch.stack([gb, ub], dim=1).flatten()
        merged["down_proj.bias"] = tensors["mlp.down_proj.bias"]
    if bias["qk_norm"]:
        merged["q_norm"] = tensors["self_attn.q_norm.weight"][None].expand(p, -1)
        merged["k_norm"] = tensors["self_attn.k_norm.weight"][None].expand(p, -1)
    return merged


def plain_tensors(tensors: dict[str, torch.Tensor], config, degree: int) -> dict[str, torch.Tensor]:
    """One decoder layer's keys (``self_attn.q_proj.weight``, ...) for a group whose MLPs share
    their input, from any form; the norms are all ones (their weights are folded in)."""
    if "self_attn.q_proj.weight" in tensors:  # folded already
        return dict(tensors)
    m = merged_tensors(tensors, config, degree)
    p, h, hkv = degree, config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // h
    i = config.intermediate_size
    q, k, v = m["qkv_proj.weight"].split([p * h * hd, p * hkv * hd, p * hkv * hd])
    gate_up = m["gate_up_proj.weight"].view(p, 2, i, -1)
    ones = torch.ones(config.hidden_size, dtype=q.dtype)
    plain = {
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": m["o_proj.weight"],
        "mlp.gate_proj.weight": gate_up[:, 0].flatten(0, 1),
        "mlp.up_proj.weight": gate_up[:, 1].flatten(0, 1),
        "mlp.down_proj.weight": m["down_proj.weight"],
        "input_layernorm.weight": ones,
        "post_attention_layernorm.weight": ones,
    }
    if "qkv_proj.bias" in m:
        qb, kb, vb = m["qkv_proj.bias"].split([p * h * hd, p * hkv * hd, p * hkv * hd])
        plain |= {"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb}
    if "o_bias" in m:
        plain["self_attn.o_proj.bias"] = m["o_bias"].sum(0)
    if "gate_up_proj.bias" in m:
        gub = m["gate_up_proj.bias"].view(p, 2, i)
        plain |= {"mlp.gate_proj.bias": gub[:, 0].flatten(), "mlp.up_proj.bias": gub[:, 1].flatten()}
        plain["mlp.down_proj.bias"] = m["down_proj.bias"]
    if "q_norm" in m:
        q_norm, k_norm = m["q_norm"], m["k_norm"]
        if not ((q_norm == q_norm[0]).all() and (k_norm == k_norm[0]).all()):
            raise ValueError("its branches' q/k head norms differ, which one decoder layer cannot express")
        plain |= {"self_attn.q_norm.weight": q_norm[0], "self_attn.k_norm.weight": k_norm[0]}
    return plain

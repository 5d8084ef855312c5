"""``CqilForCausalLM``: the decoder stack of a cqil export in vLLM's model interface, and its loading."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.transformers_utils.config import set_default_rope_theta

from cqil.serving.vllm.config import BASE_MODEL_TYPES, effective_layers, is_wide_layer
from cqil.serving.vllm.group import CqilGroup, decoder_layer, wide_layer
from cqil.serving.vllm.tensors import plain_tensors

logger = init_logger("vllm.model_executor.models.cqil")  # under vLLM's configured logger

_STACKED = [
    # (parameter, checkpoint name, shard id), as vLLM's Llama/Qwen loaders
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class CqilModel(nn.Module):
    """The decoder stack: embeddings, one vLLM layer per effective layer, final norm."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
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
            set_default_rope_theta(config, default_theta=1000000)
        self.config = config
        self.cqil = cqil
        plan = cqil["plan"]
        groups = {tuple(g) for g in plan["groups"]}
        self.effective = effective_layers(plan["groups"], plan["num_layers"])
        if len(self.effective) != config.num_hidden_layers:
            raise ValueError(
                f"the plan has {len(self.effective)} effective layers but text_config.num_hidden_layers "
                f"is {config.num_hidden_layers}"
            )
        wide = is_wide_layer(config, cqil)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        layers, self.groups = [], {}
        for idx, indices in enumerate(self.effective):
            layer_prefix = f"{prefix}.layers.{idx}"
            if indices not in groups:
                layers.append(decoder_layer(config, vllm_config, layer_prefix))
                continue
            self.groups[idx] = indices
            if wide:
                layers.append(wide_layer(config, indices, vllm_config=vllm_config, prefix=layer_prefix))
            else:
                layers.append(CqilGroup(config, cqil, indices, vllm_config=vllm_config, prefix=layer_prefix))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def layout(self, idx: int) -> str:
        """How group ``idx`` runs, for the load-time log line."""
        layer = self.layers[idx]
        if isinstance(layer, CqilGroup):
            return layer.layout()
        return (
            f"group {list(self.groups[idx])} (layers.{idx}): one vLLM decoder layer with "
            f"{len(self.groups[idx])}x heads and intermediate size"
        )


class CqilForCausalLM(nn.Module):
    """A cqil export (``architectures: ["CqilForCausalLM"]``) in vLLM's model interface."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
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
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        groups: dict[int, dict[str, torch.Tensor]] = {}  # a group's tensors, loaded once all are read
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tied and name.startswith("lm_head.")):
                continue
            if name.startswith("model.layers."):
                idx, rest = name.removeprefix("model.layers.").split(".", 1)
                if int(idx) in self.model.groups:
                    groups.setdefault(int(idx), {})[rest] = tensor
                    continue
            self._load_plain(name, tensor, params, loaded)
        config = self.model.config
        for idx, tensors in groups.items():
            layer, indices = self.model.layers[idx], self.model.groups[idx]
            if isinstance(layer, CqilGroup):
                loaded.update(f"model.layers.{idx}.{attr}" for attr in layer.load(tensors))
                continue
            try:  # fixed lp gates are 1 by definition: the decoder layer has none
                plain = plain_tensors(
                    {k: t for k, t in tensors.items() if k != "gates"}, config, len(indices)
                )
            except (KeyError, ValueError) as e:
                raise ValueError(f"group {list(indices)} (model.layers.{idx}): {e}") from e
            for rest, tensor in plain.items():
                self._load_plain(f"model.layers.{idx}.{rest}", tensor, params, loaded)
        for idx in self.model.groups:
            if get_tensor_model_parallel_rank() == 0:
                logger.info("cqil %s", self.model.layout(idx))
        return loaded

    @staticmethod
    def _load_plain(name: str, tensor: torch.Tensor, params: dict, loaded: set[str]) -> None:
        for param_name, weight_name, shard in _STACKED:
            if weight_name in name:
                target = name.replace(weight_name, param_name)
                if target not in params:
                    raise ValueError(f"unexpected weight {name!r} in the export")
                params[target].weight_loader(params[target], tensor, shard)
                loaded.add(target)
                return
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in the export")
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)


def _join(prefix: str, name: str) -> str:
    return name if not prefix else f"{prefix}.{name}"

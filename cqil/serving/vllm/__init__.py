"""Serve a cqil export with vLLM: ``CqilForCausalLM`` in vLLM's model interface, and its plugin.

The package imports torch, vLLM and the transformers vLLM depends on (nothing else from cqil, no
training dependencies), so it runs in a virtual environment that has vLLM and a ``pip install
--no-deps`` of cqil, whose entry point ``vllm.general_plugins: cqil = cqil.serving.vllm:register``
makes every vLLM process call :func:`register`. That registers the architecture ``CqilForCausalLM``
and the config class of ``model_type: cqil``, so that ``LLM(model=export_dir)`` and ``vllm serve
export_dir`` load an export without ``trust_remote_code`` (the export's own ``configuration_cqil.py``
needs a newer transformers than vLLM pins).

Every effective layer is built from vLLM's own layers (docs/design.md has the math of a group):

* an ungrouped layer is vLLM's decoder layer of the base architecture (``LlamaDecoderLayer``,
  ``MistralDecoderLayer``, ``Qwen2DecoderLayer``, ``Qwen3DecoderLayer``);
* a group whose MLPs all read the same input (bypass ``lp`` with fixed gates, or a folded export)
  *is* one decoder layer with P·H query heads, P·Hkv key/value heads, intermediate size P·I and unit
  norm weights (the branches' norm weights folded into the projections), so it is built as that
  same vLLM decoder layer over a per-layer copy of the config (:func:`group.wide_layer`);
* any other group (bypass ``none``, ``cqil``, learned ``lp`` gates; Qwen3 branches whose head norms
  differ) is :class:`group.CqilGroup`: vLLM's ``QKVParallelLinear`` over the P·H heads, its
  ``Attention`` (one KV cache of P·Hkv heads), one linear per branch for the branch's attention
  output, its ``RMSNorm``, one fused ``MergedColumnParallelLinear`` gate/up per branch with
  ``SiluAndMul``, and one ``RowParallelLinear`` down projection that sums the branches' MLPs.

The model is compiled as vLLM compiles its own (``@support_torch_compile``; on CPU, vLLM traces it
once with dynamo and compiles it with inductor unless ``enforce_eager``; on CUDA it also captures
CUDA graphs).

Tensor parallelism is the concurrent execution of the branches. vLLM splits heads and MLP rows
contiguously, hence branch-major: with TP size N dividing P, each rank holds P/N whole branches
(N = P: one branch per rank) and computes them from the shared input. The collectives per group:

* one decoder layer (``lp``, fixed gates, or folded): vLLM's two all-reduces, one after the
  attention (u = x + sum_j a_j), one after the MLPs;
* ``none``: a branch's MLP reads x + a_j, which its rank has: ONE all-reduce of sum_j (a_j + m_j);
* learned ``lp`` and ``cqil``: an all-gather of the per-branch attention outputs (each rank mixes
  those its gates read), then one all-reduce of the MLP outputs.

When N does not divide P (N > P, or P = 3 and N = 2) a rank's heads and MLP rows straddle branches:
a :class:`group.CqilGroup` then completes every branch's attention output with an all-reduce of the
(P, T, D) partial outputs before its MLPs (correct, not concurrent). N must divide P*H, P*I and
P*Hkv (or be a multiple of P*Hkv), as vLLM requires for any layer.

Modules: :mod:`.config` (the config vLLM reads, the plan and which layer each group becomes),
:mod:`.group` (the two group layers), :mod:`.tensors` (the export's group tensors in the layouts
they load), :mod:`.model` (the decoder stack, the causal LM and its weight loading).
"""

from __future__ import annotations

from cqil.serving.vllm.config import ARCHITECTURE, MODEL_TYPE, register_config

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "register", "register_config"]


def register() -> None:
    """vLLM general plugin: register the cqil architecture and config class (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # By name, so that vLLM imports the model module only in the processes that build a model.
        ModelRegistry.register_model(ARCHITECTURE, "cqil.serving.vllm.model:CqilForCausalLM")
    register_config()

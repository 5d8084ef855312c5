"""Write a model as a GGUF file for llama.cpp (and Ollama), groups folded into wide layers.

llama.cpp's ``deci`` architecture is the Llama graph with per-layer head counts and feed-forward
lengths (``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
``deci.feed_forward_length`` are arrays with one entry per layer). An ``lp`` group with every gate
at 1 is exactly one plain pre-norm layer with P x heads, P x key/value heads and P x intermediate
size, its norms folded into the projections (:meth:`cqil.rewrite.group.MergedGroup.plain_layer_state_dict`),
so a parallelized model is a ``deci`` model with no padding and no extra operator. The stock HF to
GGUF converter writes one head count for all layers, so this module writes the file itself with
the ``gguf`` package, the way that converter writes a Llama model:

* q and k rows permuted for llama.cpp's RoPE on consecutive pairs (:func:`permute_qk`);
* llama3 / linear RoPE scaling as a ``rope_freqs`` tensor of per-frequency divisors;
* a GPT-2-style BPE tokenizer as ``tokenizer.ggml.*`` (tokens, types, merges, special ids, chat
  template, via ``gguf.SpecialVocab``);
* ``output.weight`` only for untied embeddings; q/k/v, o and MLP biases when the model has them.

What ``deci`` cannot express is refused with one :class:`cqil.errors.ModelError` listing every reason: groups whose
MLPs do not all read the same input (bypass ``none``/``cqil``, or learned gates away from 1), per-head
q/k norms (Qwen3), sliding-window attention shorter than the context, RoPE types other than
default/linear/llama3, activations other than SiLU, and tokenizers other than byte-level BPE.

It imports torch, numpy, gguf, transformers and :mod:`cqil.rewrite.group` only. The module is
longer than 500 lines because one file format's tensor map, refusal checks and tokenizer metadata read best
together; the tokenizer part is the first to move out if it grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqil.errors import ModelError, OutputDirError
from cqil.rewrite.group import BranchGroup, ParallelGroup
from cqil.rewrite.surgery import merged_lp_group

ARCH = "deci"
GGUF_DTYPES = ("f32", "f16", "q8_0")
ROPE_TYPES = ("default", "linear", "llama3")
FOLD_HINT = (
    "set parallelize.bypass: lp and parallelize.gates: fixed in the recipe (every gate stays at 1) "
    "and recover the model again"
)

# llama.cpp's convert_hf_to_gguf.py names a BPE pre-tokenizer by the sha256 of the token ids of this
# text; a few common ones (the others get a fallback, with a warning).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作"
    "1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


# ------------------------------------------------------------------------------------------ public API


def write_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    modelfile: bool = False,
    context_length: int | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` (original, parallelized in either form, or loaded from an export) as a GGUF.

    Args:
        model: a Llama / Mistral / Qwen2 causal LM, rewritten by :func:`cqil.parallelize` or not, or a
            :class:`~cqil.modeling.CqilForCausalLM` (e.g. from :func:`cqil.export.load_export`).
        tokenizer: the model's Hugging Face tokenizer (a byte-level BPE tokenizer).
        path: the ``.gguf`` file to write; an existing file is refused unless ``overwrite``.
        dtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` for the matrices; norms, biases and other 1-D
            tensors stay F32. Under ``q8_0`` a matrix whose rows are not a multiple of 32 is F16.
        modelfile: also write an Ollama ``Modelfile`` next to the file.
        context_length: the context length to declare (default: ``max_position_embeddings``); a
            model with sliding-window attention is accepted when this is at most its window.
        name: ``general.name`` (default: the model's ``name_or_path``).

    The file is written under a temporary name in the same folder and renamed at the end, so a
    failure leaves nothing behind. Raises ``ValueError`` (before writing anything) when the model
    cannot be expressed, with every reason and the recipe settings that make a model foldable.
    """
    if dtype not in GGUF_DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputDirError(f"{path} exists; pass overwrite=True to replace it")
    spec = _model_spec(model, tokenizer, context_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(spec, model, tokenizer, tmp, dtype, name)
        _place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    if modelfile:
        write_modelfile(path, tokenizer, overwrite=overwrite)
    return path


def export_gguf(
    export_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    dtype: str = "f32",
    **kwargs,
) -> Path:
    """Write the model of an export folder (or any local Hugging Face model folder) as a GGUF.

    ``path`` defaults to ``<export_dir>/model.gguf``; other keywords as for :func:`write_gguf`.
    """
    from transformers import AutoTokenizer

    folder = Path(export_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "cqil":
        from cqil.export.load import load_export

        model = load_export(folder)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{folder} has no tokenizer; a GGUF needs one (tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return write_gguf(
        model, tokenizer, folder / "model.gguf" if path is None else path, dtype=dtype, **kwargs
    )


def check_gguf(model, tokenizer, *, context_length: int | None = None) -> None:
    """Raise the ``ValueError`` :func:`write_gguf` would raise for ``model``, writing nothing."""
    _model_spec(model, tokenizer, context_length, tensors=False)


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (or its bias) for llama.cpp's RoPE.

    Hugging Face's Llama rotates the two halves of each head (``rotate_half``); llama.cpp's Llama
    graph rotates consecutive pairs. Within every head, row ``i`` of the first half and row ``i`` of
    the second become rows ``2i`` and ``2i+1`` (``LlamaModel.permute`` in convert_hf_to_gguf.py).
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_modelfile(gguf_path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write an Ollama ``Modelfile`` next to ``gguf_path`` (``FROM ./<file>``).

    A ChatML chat template (``<|im_start|>``/``<|im_end|>``, SmolLM2's and Qwen2's) is written as
    Ollama's equivalent ``TEMPLATE`` and stop token; any other template is left out (Ollama then
    reads ``tokenizer.chat_template`` from the GGUF where it recognises it).
    """
    gguf_path = Path(gguf_path)
    out = gguf_path.with_name("Modelfile")
    if out.exists() and not overwrite:
        raise OutputDirError(f"{out} exists; pass overwrite=True to replace it")
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    lines = [f"FROM ./{gguf_path.name}", ""]
    if isinstance(template, str) and "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [
            'TEMPLATE """{{ if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{ if .Prompt }}<|im_start|>user",
            "{{ .Prompt }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '{{ .Response }}<|im_end|>"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    else:
        lines.append(
            "# TEMPLATE omitted: the model's chat template is not ChatML; it is in the GGUF "
            "(tokenizer.chat_template) for engines that read it"
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _place(tmp, out, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------ the model


class _Spec:
    """What goes into the file: the text config, per-layer tensors and widths, the global tensors."""

    def __init__(self):
        self.config: Any = None
        self.cqil: dict | None = None
        self.layers: list[dict[str, torch.Tensor]] = []
        self.n_head: list[int] = []
        self.n_head_kv: list[int] = []
        self.n_ff: list[int] = []
        self.head_dim = 0
        self.context_length = 0
        self.rope_factors: torch.Tensor | None = None
        self.rope_theta = 10000.0
        self.tied = True


def _text_config(model):
    config = model.config
    if getattr(config, "model_type", None) == "cqil":
        return config.text_config, dict(config.cqil)
    cqil = getattr(config, "cqil", None)
    return config, dict(cqil) if cqil else None


def _model_spec(model, tokenizer, context_length, *, tensors: bool = True) -> _Spec:
    spec = _Spec()
    config, cqil = _text_config(model)
    spec.config, spec.cqil = config, cqil
    reasons: list[str] = []
    fold_reasons: list[str] = []

    model_type = getattr(config, "model_type", None)
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        reasons.append(f"model type {model_type!r} is not one of llama, mistral, qwen2")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        reasons.append(f"hidden_act {act!r}: llama.cpp's deci graph uses SiLU")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        reasons.append("partial rotary embeddings: deci rotates the whole head")
    spec.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hd = spec.head_dim

    # RoPE: llama.cpp divides each frequency by rope_freqs[i]; the factors are the ratio of the
    # default inverse frequencies to the scaled ones transformers computes for this config.
    rope = dict(getattr(config, "rope_parameters", None) or {})
    spec.rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        reasons.append(f"RoPE type {rope_type!r}: only {', '.join(ROPE_TYPES)} are written")
    elif rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        if float(attention_factor) != 1.0:
            reasons.append(f"RoPE {rope_type!r} with attention factor {attention_factor}: not expressible")
        base = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        spec.rope_factors = (base.double() / inv.double()).float()

    spec.context_length = int(context_length or config.max_position_embeddings)

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no model.layers: not a Llama-family causal LM")
    for idx, layer in enumerate(layers):
        where = f"layer {idx}"
        if isinstance(layer, ParallelGroup):
            where = f"group {list(layer.original_indices)} (layer {idx})"
            window = layer.sliding_window
            if layer.degree == 1 and isinstance(layer, BranchGroup):
                plain = layer.branches[0]
            else:
                plain = None
                if layer.bypass != "lp":
                    fold_reasons.append(
                        f"{where} has bypass {layer.bypass!r}: its MLPs read different inputs, "
                        "which one plain layer cannot compute"
                    )
                else:
                    g = layer.gate_matrix()
                    if g is not None and not bool((g == 1).all()):
                        fold_reasons.append(
                            f"{where} has learned gates away from 1 (min {g.min().item():.4g}, "
                            f"max {g.max().item():.4g})"
                        )
            has_qk_norm = (
                hasattr(plain.self_attn, "q_norm")
                if plain is not None
                else (
                    getattr(layer, "q_norm", None) is not None
                    or any(hasattr(b.self_attn, "q_norm") for b in getattr(layer, "branches", []))
                )
            )
        elif hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
            plain, window = layer, _layer_window(layer, config, idx)
            has_qk_norm = hasattr(layer.self_attn, "q_norm")
        else:
            raise ModelError(
                f"layer {idx} is a {type(layer).__name__}, neither a decoder layer nor a cqil group "
                "(a model loaded with trust_remote_code has its own group classes; load an export "
                "with cqil.export.load_export)"
            )
        if has_qk_norm:
            reasons.append(
                f"{where}: per-head q/k norms (Qwen3), which llama.cpp's deci graph does not have; "
                "no recipe setting changes this"
            )
        if window is not None and window < spec.context_length:
            reasons.append(
                f"{where}: sliding-window attention (window {window} < context {spec.context_length}), "
                f"which deci does not have; pass context_length <= {window} to declare a shorter context"
            )
        if reasons or fold_reasons:
            continue
        if plain is not None:
            state = {k: v for k, v in plain.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
        else:
            group = merged_lp_group(layer)
            state = group.plain_layer_state_dict()
        spec.n_head.append(state["self_attn.q_proj.weight"].shape[0] // hd)
        spec.n_head_kv.append(state["self_attn.k_proj.weight"].shape[0] // hd)
        spec.n_ff.append(state["mlp.gate_proj.weight"].shape[0])
        spec.layers.append(state if tensors else {})

    if fold_reasons:
        reasons += fold_reasons
        reasons.append(f"to make every group one plain layer: {FOLD_HINT}")
    reasons += _tokenizer_problems(tokenizer)
    if reasons:
        raise ModelError(
            "cannot write this model as a llama.cpp GGUF (architecture deci):\n  - " + "\n  - ".join(reasons)
        )

    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    spec.tied = head is embed or head.data_ptr() == embed.data_ptr()
    return spec


def _layer_window(layer, config, idx) -> int | None:
    """The sliding window of a plain decoder layer (None: full attention)."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2/3 set it per layer
        return attn.sliding_window
    types = getattr(config, "layer_types", None)
    if types and idx < len(types) and types[idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)  # Mistral: one window for every layer


def _tokenizer_problems(tokenizer) -> list[str]:
    if tokenizer is None:
        return ["no tokenizer: a GGUF carries its tokenizer; pass the model's"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [f"{type(tokenizer).__name__} is not a fast tokenizer (tokenizer.json)"]
    data = json.loads(backend.to_str())
    model, decoder = data.get("model", {}), data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        return [
            f"tokenizer: only byte-level BPE (GPT-2 style) tokenizers are written; this one is "
            f"{model.get('type')} with decoder {decoder.get('type')}"
        ]
    return []


# ------------------------------------------------------------------------------------------ writing


def _write(spec: _Spec, model, tokenizer, tmp: Path, dtype: str, name: str | None) -> None:
    import gguf

    config = spec.config
    writer = gguf.GGUFWriter(tmp, ARCH)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer.add_name(
        name or Path(str(getattr(model, "name_or_path", "") or "cqil-model")).name or "cqil-model"
    )
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(spec.n_ff))
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(file_type)
    if dtype != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if spec.cqil:
        plan = {k: spec.cqil.get(k) for k in ("plan", "bypass", "gates", "num_hidden_layers_original")}
        writer.add_string("cqil.plan", json.dumps(plan))
    _add_tokenizer(writer, tokenizer, config)

    def add(name: str, tensor: torch.Tensor) -> None:
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        if array.ndim == 1 or dtype == "f32":
            writer.add_tensor(name, array)
        elif dtype == "f16" or array.shape[-1] % 32:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    add("token_embd.weight", model.get_input_embeddings().weight)
    add("output_norm.weight", model.model.norm.weight)
    if not spec.tied:
        add("output.weight", model.get_output_embeddings().weight)
    if spec.rope_factors is not None:
        add("rope_freqs.weight", spec.rope_factors)
    for i, state in enumerate(spec.layers):
        heads = {"q": spec.n_head[i], "k": spec.n_head_kv[i]}
        for kind in ("weight", "bias"):
            for proj, gname in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                t = state.get(f"self_attn.{proj}_proj.{kind}")
                if t is not None:
                    add(f"blk.{i}.{gname}.{kind}", permute_qk(t, heads[proj]) if proj in heads else t)
            for proj, gname in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
                t = state.get(f"mlp.{proj}_proj.{kind}")
                if t is not None:
                    add(f"blk.{i}.{gname}.{kind}", t)
        add(f"blk.{i}.attn_norm.weight", state["input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", state["post_attention_layernorm.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, tokenizer, config) -> None:
    """Tokenizer metadata as convert_hf_to_gguf.py writes it for a GPT-2-style BPE vocabulary."""
    import gguf

    vocab_size = config.vocab_size
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(vocab.values())} but vocab_size is {vocab_size}")
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            if special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special token ids, add_bos/eos and the chat template, from the files the tokenizer and
    # the config save, read by the gguf package's own helper (as the converter does).
    with tempfile.TemporaryDirectory(prefix="cqil-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        ids = {f"{t}_token_id": getattr(config, f"{t}_token_id", None) for t in ("bos", "eos", "pad", "unk")}
        Path(tmp, "config.json").write_text(json.dumps({k: v for k, v in ids.items() if isinstance(v, int)}))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, as convert_hf_to_gguf.py determines it."""
    ids = tokenizer.encode(_CHKTXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[digest]
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    fallback = "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"
    warnings.warn(
        f"the tokenizer's pre-tokenizer is not one cqil recognises (hash {digest[:12]}); wrote "
        f"tokenizer.ggml.pre={fallback!r}: llama.cpp may split raw text differently (token ids are unaffected)",
        stacklevel=3,
    )
    return fallback


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``; without ``overwrite`` an existing ``path`` is never replaced."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists, atomically
    except FileExistsError:
        raise OutputDirError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise OutputDirError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)

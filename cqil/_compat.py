"""Every place where cqil reaches a private or renamed API of transformers, peft, DeepSpeed or torch.

Libraries rename things between minor releases (transformers 5.24 passes the KV cache to decoder
layers as ``cache=`` where 5.23 said ``past_key_values=``); a call that misses such a rename fails
silently, by falling into ``**kwargs``. So each touchpoint lives here, is looked up once, and fails
loudly with the library's version when it is not found — never a silent fallback.

This module is shipped inside every export (as ``cqil_compat.py``, next to ``modeling_cqil.py``),
so it imports nothing from cqil and only torch and transformers at module level; peft and DeepSpeed
are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")


class IncompatibleLibrary(RuntimeError):
    """A private or renamed API that cqil relies on was not found in the installed library."""


def _version(library: str) -> str:
    try:
        from importlib.metadata import version

        return version(library)
    except Exception:  # pragma: no cover - metadata missing in an unusual install
        return "unknown"


def _missing(library: str, what: str, hint: str = "") -> IncompatibleLibrary:
    return IncompatibleLibrary(
        f"{library} {_version(library)}: {what} was not found; this cqil release supports the versions "
        f"its pyproject.toml names{(' (' + hint + ')') if hint else ''}"
    )


# -------------------------------------------------------------------------------------------- the KV cache
@functools.cache
def cache_argument() -> str:
    """The keyword under which transformers passes the KV cache to models, decoder layers and masks.

    Read from the field name of transformers' own ``BaseModelOutputWithPast`` (``cache`` from 5.24,
    ``past_key_values`` before), which renamed together with the keyword.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    for name in CACHE_NAMES:
        if name in fields:
            return name
    raise _missing(
        "transformers", f"a KV cache field ({' or '.join(CACHE_NAMES)}) in BaseModelOutputWithPast"
    )


def cache_kwargs(cache) -> dict:
    """``{<the cache keyword>: cache}``, to pass a cache on to a transformers model or mask function."""
    return {cache_argument(): cache}


def output_cache(outputs):
    """The KV cache of a model output, under whichever field name the installed transformers uses."""
    return getattr(outputs, cache_argument())


def causal_lm_output(**fields):
    """A ``CausalLMOutputWithPast`` with ``cache`` filed under the installed transformers' field name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = fields.pop("cache", None)
    return CausalLMOutputWithPast(**fields, **cache_kwargs(cache))


# --------------------------------------------------------------------------------------- decoder loop
def causal_masks(config, inputs_embeds, position_ids, attention_types: Iterable[str]) -> dict:
    """The attention masks transformers' own decoder loop would build, by attention type, with no cache.

    ``attention_types`` are entries of ``config.layer_types`` (``full_attention``,
    ``sliding_attention``); any other type is an error naming it.
    """
    try:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    except ImportError as e:
        raise _missing("transformers", "masking_utils.create_causal_mask") from e
    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    kw = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids)
    kw |= cache_kwargs(None)
    masks = {}
    for kind in attention_types:
        if kind not in makers:
            raise ValueError(f"attention type {kind!r} is not supported (only {sorted(makers)})")
        masks[kind] = makers[kind](**kw)
    return masks


def rotary_embeddings(base_model: nn.Module, hidden_states, position_ids):
    """(cos, sin) of the base model's rotary embedding, as its own forward computes them."""
    rotary = getattr(base_model, "rotary_emb", None)
    if rotary is None:
        raise _missing("transformers", f"{type(base_model).__name__}.rotary_emb")
    return rotary(hidden_states, position_ids)


def capture_hidden_states(decoder: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Make ``output_hidden_states=True`` record the outputs of ``layers`` (modules of cqil's own).

    transformers records hidden states with forward hooks on modules of the model's own decoder-layer
    class (``_can_record_outputs``); cqil's groups are not of that class, so they get the same hook.
    ``decoder`` is the base model (``model.model`` of a ``*ForCausalLM``).
    """
    try:
        from transformers.utils.output_capturing import (
            install_output_capuring_hook,
            maybe_install_capturing_hooks,
        )
    except ImportError as e:
        raise _missing("transformers", "utils.output_capturing.install_output_capuring_hook") from e
    maybe_install_capturing_hooks(decoder)
    for layer in layers:
        install_output_capuring_hook(layer, "hidden_states", 0)


# ------------------------------------------------------------------------------------------- DeepSpeed
@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build models as plain modules even inside a DeepSpeed ZeRO-3 run.

    Under ZeRO-3 transformers builds every model inside ``deepspeed.zero.Init``, whose partitioning
    is a collective: a model built on the main process alone would wait forever for the other ranks.
    transformers decides from a module-level weak reference to the DeepSpeed config; it is cleared
    for the duration and restored after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    name = "_hf_deepspeed_config_weak_ref"
    if not hasattr(hf_deepspeed, name):
        raise _missing("transformers", f"integrations.deepspeed.{name}")
    saved = getattr(hf_deepspeed, name)
    setattr(hf_deepspeed, name, None)
    try:
        yield
    finally:
        setattr(hf_deepspeed, name, saved)


def unset_zero3_init() -> None:
    """Stop transformers from loading later models into ``deepspeed.zero.Init`` (the whole run)."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError as e:
        raise _missing("transformers", "integrations.unset_hf_deepspeed_config") from e
    unset_hf_deepspeed_config()


# ----------------------------------------------------------------------------------------------- torch
def set_last_lr(scheduler, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` return ``lrs``, the rates just set on its optimizer's groups.

    A torch LR scheduler records the rates it reports only inside ``step()``, and a first ``step()``
    before any ``optimizer.step()`` warns that the schedule skips a value. A schedule moved to step n
    by hand (``last_epoch`` and each group's ``"lr"``: a resume with a fresh optimizer) would report
    the rates it was built with, so the record (``_last_lr``) is written directly.
    """
    if not hasattr(scheduler, "_last_lr"):
        raise _missing("torch", f"{type(scheduler).__name__}._last_lr")
    scheduler._last_lr = list(lrs)


# ------------------------------------------------------------------------------------------------ peft
@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Switch every LoRA adapter in ``model`` off without touching ``requires_grad``.

    peft's public ``disable_adapter()`` / ``enable_adapters(False)`` also freeze the adapter weights,
    which must not change inside a DDP forward; the flag they set (``_disable_adapters`` on each
    tuner layer) is what the LoRA layers' forward reads, so it is flipped directly.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise _missing("peft", "tuners.tuners_utils.BaseTunerLayer") from e
    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in tuners:
        if not hasattr(m, "_disable_adapters"):
            raise _missing("peft", f"{type(m).__name__}._disable_adapters")
    saved = [m._disable_adapters for m in tuners]
    for m in tuners:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, value in zip(tuners, saved, strict=True):
            m._disable_adapters = value

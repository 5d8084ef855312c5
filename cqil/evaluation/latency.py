"""Latency of causal LMs measured the way engines run them, several models side by side.

Phases (batch 1):

``prefill_<n>``
    one forward of ``n`` prompt tokens building the KV cache, last-position logits only (as
    ``generate`` does); at 512 and 2,048 tokens by default, capped by the model's context.
``decode_eager``
    greedy decoding, one forward per token over transformers' ``DynamicCache``: the ``generate()``
    loop, after an untimed prompt.
``decode_graph`` (CUDA only)
    one decode step over a ``StaticCache`` captured once per model as a CUDA graph and replayed per
    token: how vLLM, TensorRT-LLM and SGLang decode. Without the graph a GPU spends most of a small
    model's decode step launching kernels from Python, which hides what the depth saves.

Every phase of every model is timed in each repetition, the models alternating (in order, then
reversed) after one warmup round, so drift in machine load hits all alike. The speedup of a model is
the baseline's median time over the model's median time, and its tokens/s are tokens over the same
median: the two always agree. The share of the ideal gain is ``(speedup - 1) / (ideal - 1)`` with the
ideal ``L / L_eff``.

The timing path takes any callables (:func:`interleave`, :func:`summarize`), so the arithmetic is
tested with a fake clock, and the in-memory and the exported model go through the same
:func:`measure_latency`.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cqil._compat import cache_kwargs, output_cache

MODES = ("eager", "graph")
PREFILL_LENS = (512, 2048)
MODE_LABELS = {"eager": "eager (generate() loop)", "graph": "CUDA graph over a StaticCache"}
# Decode steps run before a CUDA graph is captured (kernels chosen, allocator warm); the cache is
# rewound after them.
_CAPTURE_WARMUP = 2

Clock = Callable[[], float]
# A job is prepared untimed (a prompt prefilled, a cache rewound) and returns what is timed.
Job = Callable[[], Callable[[], object]]


def device_name(device: torch.device) -> str:
    """A human name of ``device``: the GPU model, or the CPU with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} thread(s)"


def available_modes(device: torch.device) -> tuple[str, ...]:
    """The decode modes ``device`` can run: a CUDA graph needs CUDA."""
    return MODES if torch.device(device).type == "cuda" else ("eager",)


def prefill_lengths(model, lengths: Sequence[int] = PREFILL_LENS) -> list[int]:
    """``lengths`` capped by the model's context (``max_position_embeddings``), without repeats."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    capped = [min(n, context) if context else n for n in lengths]
    return list(dict.fromkeys(capped))


def share_of_ideal(speedup: float | None, ideal: float | None) -> float | None:
    """The share of the ideal gain a speedup reached, ``(speedup - 1) / (ideal - 1)``; None without
    a gain to reach (ideal <= 1) or a speedup."""
    if speedup is None or ideal is None or ideal <= 1:
        return None
    return (speedup - 1) / (ideal - 1)


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Seconds of a callable on ``device``: the device is synchronised before and after, so queued
    GPU work is counted where it was launched. ``clock`` is injectable for tests."""

    def __init__(self, device: torch.device | str = "cpu", clock: Clock = time.perf_counter) -> None:
        self.device = torch.device(device)
        self.clock = clock

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        self._sync()
        start = self.clock()
        fn()
        self._sync()
        return self.clock() - start


def interleave(
    jobs: Mapping[str, Mapping[str, Job]],
    *,
    reps: int,
    timer: Timer | Callable[[Callable[[], object]], float],
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of every ``jobs[name][phase]``, ``reps`` times each, the names alternating in every
    repetition (in order, then reversed) after ``warmup`` untimed rounds. Each job is prepared
    untimed and the callable it returns is timed."""
    names = list(jobs)
    for _ in range(warmup):
        for name in names:
            for job in jobs[name].values():
                job()()
    times = {name: {phase: [] for phase in jobs[name]} for name in names}
    for rep in tqdm(range(reps), desc="latency", unit="rep", disable=not progress):
        for name in names if rep % 2 == 0 else names[::-1]:
            for phase, job in jobs[name].items():
                times[name][phase].append(timer(job()))
    return times


def summarize(
    times: Mapping[str, Mapping[str, Sequence[float]]],
    tokens: Mapping[str, int],
    *,
    baseline: str,
    ideal: float | None = None,
) -> dict:
    """Medians, tokens/s and speedups of :func:`interleave`'s ``times`` (seconds); ``tokens[phase]`` is
    the tokens one timed run of the phase handles.

    Returns ``{"models": {name: {phase: {"ms", "tokens", "tokens_per_s"[, "ms_per_token"]}}},
    "speedup": {name: {phase: x}}[, "share_of_ideal": {name: {phase: s}}]}`` for every name but the
    baseline in ``speedup``. Speedup and tokens/s come from the same unrounded medians, so a model's
    tokens/s over the baseline's equals its speedup.
    """
    medians = {
        name: {phase: statistics.median(ts) for phase, ts in phases.items()} for name, phases in times.items()
    }
    models = {}
    for name, phases in medians.items():
        models[name] = {}
        for phase, seconds in phases.items():
            numbers = {"ms": round(seconds * 1e3, 4), "tokens": tokens[phase]}
            numbers["tokens_per_s"] = round(tokens[phase] / seconds, 3) if seconds > 0 else None
            if phase.startswith("decode"):
                numbers["ms_per_token"] = round(seconds * 1e3 / tokens[phase], 4)
            models[name][phase] = numbers
    base = medians[baseline]
    speedup = {
        name: {
            phase: round(base[phase] / s, 4) if s > 0 else None
            for phase, s in phases.items()
            if phase in base
        }
        for name, phases in medians.items()
        if name != baseline
    }
    out: dict = {"models": models, "speedup": speedup}
    if ideal is not None:
        out["share_of_ideal"] = {
            name: {phase: _round(share_of_ideal(x, ideal)) for phase, x in phases.items()}
            for name, phases in speedup.items()
        }
    return out


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# ---------------------------------------------------------------------------------------------- the jobs


def prefill_job(model, ids: torch.Tensor) -> Job:
    """One forward of ``ids`` building a fresh KV cache, last-position logits only."""

    def run():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return lambda: run


def eager_decode_job(model, prompt: torch.Tensor, new_tokens: int) -> Job:
    """``new_tokens`` greedy steps over a ``DynamicCache``, after an untimed prefill of ``prompt``."""

    def prepare():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        state = {"out": out, "token": out.logits[:, -1:].argmax(-1)}

        def run():
            out, token = state["out"], state["token"]
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **cache_kwargs(output_cache(out)))
                token = out.logits[:, -1:].argmax(-1)
            return token

        return run

    return prepare


class StaticDecode:
    """Greedy decoding over a ``StaticCache``: one step captured as a CUDA graph (``graph=True``, CUDA
    only) and replayed per token, or the same step run eagerly (``graph=False``; on a CPU it checks
    the static path).

    The graph is captured once, at construction. Each :meth:`prepare` resets the cache in place and
    prefills the prompt again (untimed), so every run decodes the same ``steps`` tokens into the same
    cache slots. The cache's length is a device tensor that each step advances in place (transformers
    5.17 and later), which is what lets one captured step serve every position; ``Cache.reset`` zeroes
    it in place, keeping the addresses the graph reads.
    """

    def __init__(self, model, prompt: torch.Tensor, steps: int, *, graph: bool | None = None) -> None:
        from transformers import StaticCache

        self.model, self.prompt, self.steps = model, prompt, steps
        self.graph_mode = prompt.device.type == "cuda" if graph is None else graph
        if self.graph_mode and prompt.device.type != "cuda":
            raise ValueError("a CUDA graph needs a CUDA device")
        length = prompt.shape[1] + max(steps, _CAPTURE_WARMUP)
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.token = self._prefill().clone()  # the step's input, overwritten in place by its output
        self.graph = None
        if self.graph_mode:
            self._capture(prompt.device)

    def _prefill(self) -> torch.Tensor:
        """The prompt into the (reset) cache; returns its greedy next token."""
        out = self.model(input_ids=self.prompt, use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache))
        return out.logits[:, -1:].argmax(-1)

    def _step(self) -> None:
        logits = self.model(input_ids=self.token, use_cache=True, **cache_kwargs(self.cache)).logits
        self.token.copy_(logits[:, -1:].argmax(-1))

    def _capture(self, device: torch.device) -> None:
        # Warm up on a side stream, as torch.cuda.graph requires; capturing runs nothing, and every
        # run starts from a reset cache.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(_CAPTURE_WARMUP):
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def prepare(self) -> Callable[[], torch.Tensor]:
        """Reset the cache and prefill the prompt; returns the run of ``steps`` tokens (it returns the
        last token)."""
        self.cache.reset()
        self.token.copy_(self._prefill())
        step = self.graph.replay if self.graph is not None else self._step

        def run():
            for _ in range(self.steps):
                step()
            return self.token

        return run

    def tokens(self) -> list[int]:
        """The prompt's greedy next token and the ``steps`` tokens one run decodes after it (batch 1)."""
        self.cache.reset()
        self.token.copy_(self._prefill())
        out = [int(self.token[0, 0])]
        step = self.graph.replay if self.graph is not None else self._step
        for _ in range(self.steps):
            step()
            out.append(int(self.token[0, 0]))
        return out


def eager_tokens(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """The greedy tokens of :func:`eager_decode_job`'s loop, first the prompt's next token (batch 1)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [int(token[0, 0])]
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **cache_kwargs(output_cache(out)))
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token[0, 0]))
    return tokens


# ---------------------------------------------------------------------------------------------- measure


def measure_latency(
    models: Mapping[str, torch.nn.Module],
    *,
    prefill_len: int | None = None,
    prompt_len: int = 32,
    new_tokens: int = 64,
    reps: int = 3,
    baseline: str | None = None,
    progress: bool = True,
    prefill_lens: Sequence[int] | None = None,
    modes: Sequence[str] | None = None,
    ideal: float | None = None,
    clock: Clock = time.perf_counter,
) -> dict:
    """Prefill and greedy-decode speed of ``models`` (batch 1, all on one device), side by side.

    ``prefill_lens`` (default 512 and 2,048, or ``prefill_len`` alone when only it is given) are capped
    by the first model's context; ``modes`` are decode modes (default: all the device runs, see
    :func:`available_modes`); ``ideal`` is L / L_eff, for the share of the ideal gain. Returns the
    device and the settings; ``models``: per model ``phases`` (:func:`summarize`) and, for the first
    prefill length and the ``decode_mode`` (``graph`` where measured, else ``eager``), the flat
    ``prefill_ms``, ``prefill_tokens_per_s``, ``decode_ms_per_token``, ``decode_tokens_per_s``;
    ``speedup``: per model but ``baseline`` (default the first) each phase, and ``prefill`` and
    ``decode`` for the same two; ``share_of_ideal`` likewise when ``ideal`` is given.
    """
    names = list(models)
    baseline = baseline or names[0]
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    if prefill_lens is None:
        prefill_lens = (prefill_len,) if prefill_len is not None else PREFILL_LENS
    lengths = prefill_lengths(first, prefill_lens)
    modes = list(modes or available_modes(device))
    unknown = [m for m in modes if m not in available_modes(device)]
    if unknown:
        raise ValueError(
            f"decode mode(s) {unknown} cannot run on {device}; available: {available_modes(device)}"
        )
    vocab = first.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (1, max(lengths + [prompt_len])), generator=generator).to(device)
    prompt = ids[:, :prompt_len]
    training = {name: m.training for name, m in models.items()}
    tokens = {f"prefill_{n}": n for n in lengths} | {f"decode_{mode}": new_tokens for mode in modes}
    try:
        with torch.inference_mode():
            jobs = {}
            for name, model in models.items():
                model.eval()
                jobs[name] = {f"prefill_{n}": prefill_job(model, ids[:, :n]) for n in lengths}
                if "eager" in modes:
                    jobs[name]["decode_eager"] = eager_decode_job(model, prompt, new_tokens)
                if "graph" in modes:  # captured once per model, replayed in every repetition
                    jobs[name]["decode_graph"] = StaticDecode(model, prompt, new_tokens, graph=True).prepare
            times = interleave(jobs, reps=reps, timer=Timer(device, clock), progress=progress)
            del jobs  # the graphs and their static caches
    finally:
        for name, model in models.items():
            model.train(training[name])
    summary = summarize(times, tokens, baseline=baseline, ideal=ideal)
    decode_mode = "graph" if "graph" in modes else modes[0] if modes else None
    prefill, decode = f"prefill_{lengths[0]}", f"decode_{decode_mode}"
    out = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(next(first.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prefill_len": lengths[0],
        "prefill_lens": lengths,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "reps": reps,
        "baseline": baseline,
        "modes": modes,
        "decode_mode": decode_mode,
        "models": {},
    }
    for name, phases in summary["models"].items():
        flat = {
            "prefill_ms": phases[prefill]["ms"],
            "prefill_tokens_per_s": phases[prefill]["tokens_per_s"],
        }
        if decode in phases:
            flat |= {
                "decode_ms_per_token": phases[decode]["ms_per_token"],
                "decode_tokens_per_s": phases[decode]["tokens_per_s"],
            }
        out["models"][name] = flat | {"phases": phases}
    out["speedup"] = {
        name: {"prefill": x.get(prefill), "decode": x.get(decode), **x}
        for name, x in summary["speedup"].items()
    }
    if ideal is not None:
        out["ideal"] = round(ideal, 4)
        out["share_of_ideal"] = {
            name: {"prefill": x.get(prefill), "decode": x.get(decode), **x}
            for name, x in summary["share_of_ideal"].items()
        }
    return out


# The single-phase timers of earlier releases, kept for scripts that time one phase by hand.
def time_prefill(model, ids: torch.Tensor) -> float:
    """Seconds of one forward of ``ids`` (batch 1) building the KV cache, last-position logits only."""
    return Timer(ids.device)(prefill_job(model, ids)())


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of ``new_tokens`` greedy steps with the KV cache after an untimed prefill of ``prompt``."""
    return Timer(prompt.device)(eager_decode_job(model, prompt, new_tokens)())

"""Latency of a parallelized model run concurrently on 2 ranks, against the original model run 3 ways.

Five variants, timed in one run, interleaved, on the same prompt:

  (a) original     the original sequential model, one process, one thread;
  (b) concurrent   the parallelized model sharded by cqil.serving.concurrent over 2 ranks, one thread each
                   (rank r computes branch r of every group; everything else is replicated);
  (c) threads      the original model, one process, 2 threads;
  (d) tensor       the original model, tensor-parallel over 2 ranks, one thread each: Megatron-style
                   slices of every layer's key/value heads (with their query heads) and MLP columns,
                   o_proj and down_proj all-reduced; embeddings and LM head replicated, as in (b);
  (e) hybrid       (b) with every layer outside the groups tensor-parallel as in (d): Layer
                   Parallelism's own setting, what the groups add on top of tensor parallelism.

On one CPU host, (b), (d) and (e) keep one copy of their replicated weights in shared memory (see
cqil.serving.concurrent.share_weights): with a private copy per rank, two ranks streaming the same layers
contend for the memory bus and cache and decode no faster than one.

Phases: prefill (one forward of 1 x --prefill-len tokens with the KV cache, last-position logits, as
``generate`` does) and decode (--new-tokens greedy steps of one token with the KV cache after an
untimed --prompt-len prompt). Every repetition runs the variants in a rotated order, after one warmup
round; speedups are medians of per-repetition ratios. On a shared machine, a repetition during which
other processes used more than --max-foreign-load CPU cores (read from /proc) is discarded, and the
run waits for a quiet moment before repeating it. (b) and (d) use the same collectives
(--transport: shared memory on one CPU host by default, or torch.distributed's gloo).

The ideal is Amdahl's limit from (a)'s own per-part times, measured with timers around every decoder
layer in extra, untimed passes: embeddings, the ungrouped layers, the final norm and the LM head stay
sequential, and each group's layers take 1/P of their time. ``efficiency`` = speedup / ideal.
L/L_eff is printed beside it: it ignores everything outside the layers and overstates what any
runtime can reach.

The weights are the pretrained ones (``--model tiny``: random); gates keep their initial values (the
timing does not depend on them). The sharded models' logits are checked against the whole
parallelized model's, and (d)'s against (a)'s, before timing.

    python bench/concurrent_groups.py --pairs 2        # SmolLM2-135M, plan 14-18:2 (also --pairs 4, 6)
    python bench/concurrent_groups.py --tiny           # seconds, for CI

Runtime on 2 CPU cores, SmolLM2-135M, 5 repetitions: about 4 minutes on a quiet machine. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import build_tiny
from torch import nn

import cqil
from cqil._compat import cache_kwargs, output_cache
from cqil.pretrained import load_model
from cqil.serving.comm import Communicator, make_communicator, share_weights
from cqil.serving.concurrent import GroupShard, shard_model

# Central layers, where consecutive layers' inputs are most alike: the plans a recovery would pick.
PLANS = {
    "smollm2-135m": {2: "14-18:2", 4: "11-19:2", 6: "9-21:2"},
    "tiny": {1: "3-5:2", 2: "2-6:2", 3: "1-7:2"},
}
VARIANTS = ("original", "concurrent", "threads", "tensor", "hybrid")
WORLD_SIZE = 2


# ---------------------------------------------------------------------------------------------- (d)


class RowParallelLinear(nn.Module):
    """A linear layer holding some input columns; the partial outputs are summed over the ranks."""

    def __init__(self, linear: nn.Linear, cols: slice, comm: Communicator, keep_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight[:, cols].detach().clone(), requires_grad=False)
        bias = linear.bias if keep_bias else None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_(nn.functional.linear(x, self.weight, self.bias))


def _rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    out = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None)
    out.to(linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out.requires_grad_(False)


def tensor_parallel_split(config, world_size: int) -> tuple[list[int], list[int]]:
    """Key/value heads and MLP columns per rank.

    Key/value heads (each with its query heads) are dealt out as evenly as they go; the MLP columns
    then even out the weights each rank holds, so that no rank waits for a heavier one in decode.
    """
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hkv, rep = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    d, inter = config.hidden_size, config.intermediate_size
    if hkv < world_size:
        raise ValueError(f"{hkv} key/value heads cannot be split over {world_size} ranks")
    heads = [hkv // world_size + (r < hkv % world_size) for r in range(world_size)]
    attention = [n * hd * d * (2 * rep + 2) for n in heads]  # q and o: rep*n heads; k and v: n heads
    target = (sum(attention) + 3 * d * inter) / world_size
    cols = [max(0, round((target - a) / (3 * d))) for a in attention[:-1]]
    cols.append(inter - sum(cols))
    if min(cols) < 1:
        raise ValueError(f"cannot balance {inter} MLP columns over {world_size} ranks: {cols}")
    return heads, cols


@torch.no_grad()
def shard_tensor_parallel(model: nn.Module, comm: Communicator) -> nn.Module:
    """Tensor-parallel decoder layers, in place: this rank's slices of every plain decoder layer.

    Group shards (:class:`~cqil.serving.concurrent.GroupShard`) are left as they are, so a sharded parallelized
    model becomes the hybrid (e): groups concurrent, every other layer tensor-parallel.
    """
    config = model.config
    heads, cols = tensor_parallel_split(config, comm.world_size)
    r = comm.rank
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rep = config.num_attention_heads // config.num_key_value_heads
    kv = slice(sum(heads[:r]) * hd, sum(heads[: r + 1]) * hd)
    q = slice(kv.start * rep, kv.stop * rep)
    mlp = slice(sum(cols[:r]), sum(cols[: r + 1]))
    private = set()  # what differs between ranks: slices and group shards
    for layer in model.model.layers:
        if isinstance(layer, GroupShard):
            private |= {id(p) for p in layer.parameters()}
            continue
        attn = layer.self_attn
        attn.q_proj, attn.k_proj, attn.v_proj = (
            _rows(attn.q_proj, q),
            _rows(attn.k_proj, kv),
            _rows(attn.v_proj, kv),
        )
        attn.o_proj = RowParallelLinear(attn.o_proj, q, comm, keep_bias=r == 0)
        layer.mlp.gate_proj, layer.mlp.up_proj = (
            _rows(layer.mlp.gate_proj, mlp),
            _rows(layer.mlp.up_proj, mlp),
        )
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, mlp, comm, keep_bias=r == 0)
        private |= {
            id(p) for module in (attn, layer.mlp) for n, p in module.named_parameters() if "proj" in n
        }
    if comm.transport == "shm":  # one copy of the replicated weights, as shard_model keeps for (b)
        share_weights([p for p in model.parameters() if id(p) not in private], comm)
    return model


# ---------------------------------------------------------------------------------------------- timing


def time_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - start) * 1e3


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **cache_kwargs(output_cache(out)))
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) * 1e3


class Profiler:
    """Where a forward's time goes: inside the grouped layers, the other layers, the collectives.

    Timers wrap every decoder layer of ``layers`` (``grouped`` maps the index of each layer in a group
    to the group's degree P) and, when given, the collectives of ``comm``; they exist only while
    :meth:`measure` runs. ``saving`` sums each grouped layer's time times (1 - 1/P): what running
    its group's P branches at once would save at best.
    """

    COLLECTIVES = ("all_reduce_", "all_gather", "exchange")

    def __init__(
        self, layers: nn.ModuleList, grouped: dict[int, int], comm: Communicator | None = None
    ) -> None:
        self.layers, self.grouped, self.comm = layers, grouped, comm
        self.ms: dict[str, float] = defaultdict(float)
        self._start = 0.0

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, i: int) -> None:
        took = (time.perf_counter() - self._start) * 1e3
        if i in self.grouped:
            self.ms["grouped"] += took
            self.ms["saving"] += took * (1 - 1 / self.grouped[i])
        else:
            self.ms["ungrouped"] += took

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.ms["collectives"] += (time.perf_counter() - start) * 1e3
            return out

        return timed

    def measure(self, fn) -> dict[str, float]:
        """Run ``fn()`` (which returns its total ms) with the timers on; ms per part, and the total."""
        self.ms.clear()
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._enter))
            handles.append(layer.register_forward_hook(lambda *_, i=i: self._leave(i)))
        if self.comm is not None:
            for name in self.COLLECTIVES:
                setattr(self.comm, name, self._timed(getattr(self.comm, name)))
        try:
            total = fn()
        finally:
            for handle in handles:
                handle.remove()
            if self.comm is not None:
                for name in self.COLLECTIVES:
                    delattr(self.comm, name)  # back to the class's methods
        parts = {"grouped": 0.0, "ungrouped": 0.0, "saving": 0.0} | dict(self.ms)
        parts["outside_layers"] = total - parts["grouped"] - parts["ungrouped"]
        parts["total"] = total
        return parts


class ForeignLoad:
    """CPU time that processes other than the ranks used meanwhile, in cores (Linux /proc; else 0).

    On a shared machine a repetition during which someone else's job ran measures that job too.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.enabled = os.path.isfile("/proc/stat")
        self._start = (0, 0.0)

    def _sample(self) -> tuple[int, float]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        for pid in self.pids:  # the ranks' own time (utime + stime, all threads)
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            busy -= int(stat[11]) + int(stat[12])
        return busy, time.monotonic()

    def start(self) -> None:
        if self.enabled:
            self._start = self._sample()

    def stop(self) -> float:
        if not self.enabled:
            return 0.0
        busy, now = self._sample()
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy - self._start[0]) / ticks / (now - self._start[1]))

    def wait_for_quiet(self, max_cores: float, max_wait_s: float, window_s: float = 5.0) -> float:
        """Sleep until a ``window_s`` window sees at most ``max_cores`` of other load (or time is up)."""
        start = time.monotonic()
        while self.enabled and time.monotonic() - start < max_wait_s:
            self.start()
            time.sleep(window_s)
            if self.stop() <= max_cores:
                break
        return time.monotonic() - start


def amdahl_ideal(parts: dict[str, float]) -> float:
    """Amdahl's limit: each group's layers take 1/P of their time, everything else stays as it is."""
    return parts["total"] / (parts["total"] - parts["saving"])


def log(rank: int, *parts) -> None:
    if rank == 0:
        print(*parts, flush=True)


def run_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    comm = make_communicator(args.transport)

    if args.model == "tiny":
        original, weights = build_tiny(), "random"
    else:
        original, _ = load_model(args.model, dtype="float32", device="cpu")
        weights = "pretrained"
    original.eval()
    plan = cqil.GroupPlan.parse(args.groups, original.config.num_hidden_layers)
    parallel = cqil.parallelize(copy.deepcopy(original), plan, bypass=args.bypass, form=args.form).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(original.config.vocab_size, (1, args.prefill_len), generator=generator)
    prompt = ids[:, : args.prompt_len]
    with torch.no_grad():
        whole = parallel(input_ids=prompt).logits
    hybrid = copy.deepcopy(parallel)
    shard_model(parallel, comm)
    # The hybrid shares its replicated weights once its other layers are sliced.
    hybrid = shard_tensor_parallel(shard_model(hybrid, comm, share_replicated=False), comm)
    tensor = shard_tensor_parallel(copy.deepcopy(original), comm).eval()
    with torch.inference_mode():
        check = {
            "concurrent_vs_whole": (parallel(input_ids=prompt).logits - whole).abs().max().item(),
            "hybrid_vs_whole": (hybrid(input_ids=prompt).logits - whole).abs().max().item(),
            "tensor_vs_original": (tensor(input_ids=prompt).logits - original(input_ids=prompt).logits)
            .abs()
            .max()
            .item(),
        }
    for name, diff in check.items():
        if diff > 1e-3:
            raise RuntimeError(f"{name}: logits differ by {diff:.2e}; the benchmark would time a wrong model")

    heads, cols = tensor_parallel_split(original.config, WORLD_SIZE)
    log(
        rank,
        f"model {args.model} ({weights} weights)  plan {args.groups}  layers {plan.num_layers} -> "
        f"{plan.num_layers_after}  transport {comm.transport}  form {args.form}  bypass {args.bypass}\n"
        f"tensor-parallel split: kv heads {heads}, MLP columns {cols}\n"
        f"max |logit difference|: concurrent vs whole {check['concurrent_vs_whole']:.2e}, "
        f"hybrid vs whole {check['hybrid_vs_whole']:.2e}, "
        f"tensor vs original {check['tensor_vs_original']:.2e}",
    )

    models = {
        "original": original,
        "concurrent": parallel,
        "threads": original,
        "tensor": tensor,
        "hybrid": hybrid,
    }
    ranks = {"original": 1, "concurrent": 2, "threads": 1, "tensor": 2, "hybrid": 2}
    shard_layers = {i: s.degree for i, s in enumerate(parallel.model.layers) if isinstance(s, GroupShard)}
    profilers = {
        "original": Profiler(original.model.layers, {i: len(g) for g in plan.groups for i in g}),
        "concurrent": Profiler(parallel.model.layers, shard_layers, comm),
    }

    def run(variant: str, phase: str, profiled: bool = False):
        """Time one variant on rank 0; rank 1 takes part in the 2-rank ones and waits otherwise."""
        dist.barrier()
        took = float("nan")
        if ranks[variant] == 2 or rank == 0:
            torch.set_num_threads(2 if variant == "threads" else 1)
            model = models[variant]
            if phase == "prefill":
                fn = lambda: time_prefill(model, ids)  # noqa: E731
            else:
                fn = lambda: time_decode(model, prompt, args.new_tokens)  # noqa: E731
            took = profilers[variant].measure(fn) if profiled and rank == 0 else fn()
            torch.set_num_threads(1)
        dist.barrier()
        return took

    pids = [torch.empty(1, dtype=torch.int64) for _ in range(WORLD_SIZE)]
    dist.all_gather(pids, torch.tensor([os.getpid()]))
    foreign = ForeignLoad([int(p) for p in pids])
    times = {v: {"prefill": [], "decode": []} for v in VARIANTS}
    parts = {v: {"prefill": [], "decode": []} for v in profilers}
    discarded = 0
    with torch.inference_mode():
        for variant in VARIANTS:  # warmup: allocator, kernels, caches
            for phase in ("prefill", "decode"):
                run(variant, phase)
        rep = 0
        while rep < args.reps:
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            took = {v: {} for v in VARIANTS}
            profiled = {v: {} for v in profilers}
            foreign.start()
            for phase in ("prefill", "decode"):
                for variant in order:
                    took[variant][phase] = run(variant, phase)
                for variant in profilers:  # untimed passes with the timers on
                    profiled[variant][phase] = run(variant, phase, profiled=True)
            # Rank 0 judges the machine's other load; both ranks follow its verdict.
            cores = torch.tensor([foreign.stop()], dtype=torch.float64)
            dist.broadcast(cores, src=0)
            line = "  ".join(
                f"{v}: prefill {took[v]['prefill']:8.1f} ms, "
                f"decode {took[v]['decode'] / args.new_tokens:6.2f} ms/token"
                for v in VARIANTS
            )
            if cores.item() > args.max_foreign_load and discarded < args.max_discards:
                discarded += 1
                log(rank, f"rep {rep + 1} discarded: other processes used {cores.item():.2f} cores  ({line})")
                if rank == 0:
                    waited = foreign.wait_for_quiet(args.max_foreign_load, args.max_wait_s)
                    log(rank, f"waited {waited:.0f} s for the machine to be quiet")
                dist.barrier()
                continue
            for v in VARIANTS:
                for phase in ("prefill", "decode"):
                    times[v][phase].append(took[v][phase])
            for v in profilers:
                for phase in ("prefill", "decode"):
                    parts[v][phase].append(profiled[v][phase])
            rep += 1
            log(rank, f"rep {rep}/{args.reps}  other load {cores.item():.2f} cores  {line}")

    if rank == 0:
        summary = summarize(args, plan, times, parts, check, weights, comm.transport)
        print(json.dumps(summary | {"discarded_reps": discarded}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def summarize(args, plan, times, parts, check, weights: str, transport: str) -> dict:
    def median_ratio(num: str, den: str, phase: str) -> float:
        pairs = zip(times[num][phase], times[den][phase], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 4)

    speedup, ideal, efficiency, breakdown = {}, {}, {}, {}
    for phase in ("prefill", "decode"):
        per = args.new_tokens if phase == "decode" else 1
        ideal[phase] = round(statistics.median(amdahl_ideal(p) for p in parts["original"][phase]), 4)
        speedup[phase] = median_ratio("original", "concurrent", phase)
        efficiency[phase] = round(speedup[phase] / ideal[phase], 4)
        breakdown[phase] = {
            variant: {
                part: round(statistics.median(p.get(part, 0.0) for p in runs[phase]) / per, 3)
                for part in ("total", "outside_layers", "ungrouped", "grouped", "collectives")
                if variant == "concurrent" or part != "collectives"
            }
            for variant, runs in parts.items()
        }
    return {
        "model": args.model,
        "weights": weights,
        "plan": args.groups,
        "pairs": len(plan.groups),
        "speedup_b_over_a": speedup,
        "ideal": ideal,
        "efficiency": efficiency,
        "L_over_L_eff": round(plan.ideal_speedup, 4),
        "speedup_b_over_c": {p: median_ratio("threads", "concurrent", p) for p in ("prefill", "decode")},
        "speedup_b_over_d": {p: median_ratio("tensor", "concurrent", p) for p in ("prefill", "decode")},
        # (e): what the groups add on top of tensor parallelism (Layer Parallelism's own setting).
        "speedup_e_over_a": {p: median_ratio("original", "hybrid", p) for p in ("prefill", "decode")},
        "speedup_e_over_c": {p: median_ratio("threads", "hybrid", p) for p in ("prefill", "decode")},
        "speedup_e_over_d": {p: median_ratio("tensor", "hybrid", p) for p in ("prefill", "decode")},
        "speedup_c_over_a": {p: median_ratio("original", "threads", p) for p in ("prefill", "decode")},
        "speedup_d_over_a": {p: median_ratio("original", "tensor", p) for p in ("prefill", "decode")},
        "prefill_ms": {v: round(statistics.median(times[v]["prefill"]), 2) for v in VARIANTS},
        "decode_ms_per_token": {
            v: round(statistics.median(times[v]["decode"]) / args.new_tokens, 3) for v in VARIANTS
        },
        # Profiled passes (rank 0; decode per token): where (a)'s and (b)'s time goes.
        "parts_ms": breakdown,
        "variants": {"a": "original", "b": "concurrent", "c": "threads", "d": "tensor", "e": "hybrid"},
        "transport": transport,
        "form": args.form,
        "bypass": args.bypass,
        "max_abs_logit_diff": {k: float(f"{v:.3g}") for k, v in check.items()},
        "prefill_len": args.prefill_len,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    parser.add_argument(
        "--pairs", type=int, default=2, help="number of parallel pairs (picks a central plan)"
    )
    parser.add_argument("--groups", help="plan spec instead of --pairs, e.g. '14-18:2'")
    parser.add_argument("--tiny", action="store_true", help="tiny random model, short inputs, 1 repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32, help="untimed prompt before decoding")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--transport", default="auto", choices=["auto", "torch", "shm"])
    parser.add_argument("--form", default="merged", choices=["merged", "branches"])
    parser.add_argument("--bypass", default="lp", choices=["lp", "none", "cqil"])
    parser.add_argument(
        "--max-foreign-load",
        type=float,
        default=0.1,
        help="discard a repetition during which other processes used more CPU cores than this on average",
    )
    parser.add_argument("--max-discards", type=int, default=10, help="then keep what comes")
    parser.add_argument(
        "--max-wait-s", type=float, default=300, help="after a discarded repetition, wait this long at most"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.reps, args.prefill_len, args.prompt_len, args.new_tokens = "tiny", 1, 64, 8, 8
        args.max_discards = 0
    if args.groups is None:
        plans = PLANS.get(args.model, {})
        if args.pairs not in plans:
            parser.error(f"no plan with {args.pairs} pairs for {args.model!r}; pass --groups")
        args.groups = plans[args.pairs]
    if args.prompt_len > args.prefill_len:
        parser.error("--prompt-len must not exceed --prefill-len")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mp.spawn(run_rank, args=(args, free_port()), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()

"""Layer-input similarity on calibration text, and group plans suggested from it.

Layers whose inputs are nearly the same vector can read one shared input with little change
to the network: that is the premise of running them as a parallel group (CQIL, Layer
Parallelism). :func:`layer_input_similarity` measures how close the decoder layers' inputs
are; :func:`suggest_plan` picks the contiguous range whose groups are the closest;
:func:`analyze` does both on a calibration set and measures what the suggested plans cost
in perplexity before any recovery training.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cqil.errors import PlanError
from cqil.evaluation.metrics import perplexity
from cqil.files import check_out_dir, write_atomic
from cqil.recovery.data import calibration_tokens
from cqil.rewrite.coalescing import coalesced_layer
from cqil.rewrite.group import BYPASS_MODES
from cqil.rewrite.plan import GroupPlan
from cqil.selection.meter import PlanMeter, measure_windows


def layer_input_similarity(
    model, tokens: torch.LongTensor, *, batch_size: int = 4, progress: bool = True
) -> dict:
    """Cosine similarities of the decoder layers' hidden states on ``tokens`` (N, T).

    Forward hooks on ``model.model.layers`` capture every layer's input (its first positional
    argument) and output. Returns, as float64 tensors averaged over all N * T token positions:

    - ``"matrix"`` (L, L): entry [i, j] is the mean cosine similarity between the inputs of
      layers i and j at the same token (symmetric, ones on the diagonal);
    - ``"io"`` (L,): entry i is the mean cosine similarity between layer i's input and output.

    plus ``"tokens"``, the number of positions averaged over.
    """
    layers = model.model.layers
    num_layers = len(layers)
    inputs: list[torch.Tensor | None] = [None] * num_layers
    outputs: list[torch.Tensor | None] = [None] * num_layers

    def save_input(i):
        def hook(module, args):
            inputs[i] = args[0]

        return hook

    def save_output(i):
        def hook(module, args, output):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_pre_hook(save_input(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(save_output(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    matrix = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    io_sim = torch.zeros(num_layers, dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(tokens), batch_size), desc="similarity", unit="batch", disable=not progress
            ):
                # The bare decoder stack: the LM head is not needed and is the widest matmul.
                model.model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
                x = F.normalize(torch.stack(inputs).flatten(1, 2).float(), dim=-1)  # (L, tokens, D)
                y = F.normalize(torch.stack(outputs).flatten(1, 2).float(), dim=-1)
                # Sum over tokens of the per-token cosines, for every pair of layers at once.
                matrix += torch.einsum("itd,jtd->ij", x, x).double().cpu()
                io_sim += (x * y).sum(dim=(1, 2)).double().cpu()
                count += x.shape[1]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"matrix": matrix / count, "io": io_sim / count, "tokens": count}


def rank_ranges(sim, *, num_groups: int, degree: int) -> list[dict]:
    """Score every contiguous range of ``num_groups * degree`` layers, best first.

    ``sim`` is the (L, L) input-similarity matrix (``layer_input_similarity(...)["matrix"]``).
    A range starting at layer s is cut into ``num_groups`` consecutive groups of ``degree``
    layers; its score is the mean, over its groups, of the mean similarity between the inputs
    of every pair of layers within the group. Ties go to the earlier range. Each entry is
    ``{"start", "end", "score"}`` with ``end`` exclusive.
    """
    sim = torch.as_tensor(sim, dtype=torch.float64)
    num_layers = sim.shape[0]
    _check_budget(num_groups, degree, num_layers)
    # Mean pairwise similarity of the group starting at each layer; pairs are i < j.
    pairs = torch.triu_indices(degree, degree, offset=1)
    group_scores = [sim[s + pairs[0], s + pairs[1]].mean().item() for s in range(num_layers - degree + 1)]
    width = num_groups * degree
    ranking = [
        {
            "start": s,
            "end": s + width,
            "score": sum(group_scores[s + k * degree] for k in range(num_groups)) / num_groups,
        }
        for s in range(num_layers - width + 1)
    ]
    return sorted(ranking, key=lambda r: -r["score"])


def suggest_plan(sim, *, num_groups: int, degree: int) -> GroupPlan:
    """The plan of ``num_groups`` groups of ``degree`` layers on the best range of :func:`rank_ranges`."""
    best = rank_ranges(sim, num_groups=num_groups, degree=degree)[0]
    return GroupPlan.parse(_range_spec(best, degree), len(sim))


def rank_groups(
    model, tokens: torch.LongTensor, sim, *, degree: int, bypass: str = "lp", batch_size: int = 4
) -> list[dict]:
    """Every group of ``degree`` consecutive layers ranked two ways: by input similarity and measured.

    ``sim`` is the (L, L) input-similarity matrix. Each group is also run as a one-group plan on
    ``tokens`` (:func:`cqil.selection.meter.measure_windows`: calibration KL from the original model and
    perplexity). Returns one entry per group, by first layer: ``{"layers", "similarity",
    "similarity_rank", "kl", "ppl", "measured_rank"}`` (rank 1 is the best: most similar inputs,
    lowest KL). Where the ranks disagree, similarity is a poor guide.
    """
    measured, _ = measure_windows(model, tokens, degree=degree, bypass=bypass, batch_size=batch_size)
    return _rank_entries(measured, sim, degree)


def _rank_entries(measured: list[dict], sim, degree: int) -> list[dict]:
    """:func:`rank_groups`' entries from the measured windows (``{"layers", "kl", "ppl", ...}``)."""
    sim = torch.as_tensor(sim, dtype=torch.float64)
    pairs = torch.triu_indices(degree, degree, offset=1)
    entries = []
    for m in measured:
        s = m["layers"][0]
        score = sim[s + pairs[0], s + pairs[1]].mean().item()
        entries.append({"layers": m["layers"], "similarity": score, "kl": m["kl"], "ppl": m["ppl"]})
    for key, name, sign in (("similarity", "similarity_rank", -1), ("kl", "measured_rank", 1)):
        order = sorted(range(len(entries)), key=lambda i: (sign * entries[i][key], i))
        for rank, i in enumerate(order, start=1):
            entries[i][name] = rank
    return entries


def format_group_ranking(result: dict, top: int = 10) -> str:
    """The ``top`` groups by measured KL next to their similarity rank, as a plain-text table."""
    groups = sorted(result.get("groups", []), key=lambda g: g["measured_rank"])[:top]
    header = ["measured", "group", "KL", "ppl", "similarity", "sim rank"]
    rows = [
        [
            str(g["measured_rank"]),
            f"{g['layers'][0]}-{g['layers'][-1]}",
            f"{g['kl']:.4f}",
            f"{g['ppl']:.2f}",
            f"{g['similarity']:.4f}",
            str(g["similarity_rank"]),
        ]
        for g in groups
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])


def analyze(
    model,
    tokenizer,
    data_paths,
    *,
    num_groups: int | Sequence[int],
    degree: int,
    out_dir,
    seq_len: int = 256,
    num_sequences: int = 32,
    batch_size: int = 4,
    bypass_modes: Sequence[str] = ("lp", "none", "cqil"),
    coalesced: bool = True,
    measured: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Measure layer-input similarity, suggest plans and their perplexity before recovery.

    For each count in ``num_groups`` (an int or a list), the best range of :func:`rank_ranges`
    becomes a plan, measured under each bypass mode (perplexity on the calibration tokens and KL
    from the original, next to the original model's perplexity) in place: the model's layer list
    is swapped for the plan's groups, views over the original layers with gates at the mode's G,
    and put back; a plan runs only from its first group on (:class:`~cqil.selection.meter.PlanMeter`),
    and the model is never copied. Writes
    ``similarity.json`` (the returned dict) and ``similarity.png`` (the heatmap with each
    suggested plan's groups outlined) into ``out_dir``. ``model`` itself is left unchanged.
    With ``coalesced``, each plan is also measured as a depth-coalesced model (one averaged
    layer per group, as :func:`cqil.rewrite.coalescing.coalesce` builds it; only the grouped
    layers' weights are copied), the alternative that parallel groups are compared against. With
    ``measured`` (off by default: one measurement per window), every group of ``degree`` consecutive layers is
    also measured on its own (``lp`` bypass: calibration KL from the original and perplexity,
    :func:`rank_groups`), so the similarity ranking and the measured ranking sit side by side
    in ``result["groups"]`` and in a last panel of the PNG. Every window shares the original's
    prefix with the plans, computed once per batch.
    """
    counts = [num_groups] if isinstance(num_groups, int) else list(num_groups)
    num_layers = len(model.model.layers)
    # Check every argument before the (slow) measurement, not after it.
    for count in counts:
        _check_budget(count, degree, num_layers)
    unknown = [mode for mode in bypass_modes if mode not in BYPASS_MODES]
    if unknown:
        raise PlanError(f"unknown bypass modes {unknown}; expected some of {list(BYPASS_MODES)}")

    out_dir = check_out_dir(out_dir, overwrite)  # a non-empty folder only when told to
    out_dir.mkdir(parents=True, exist_ok=True)

    data_paths = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    tokens = calibration_tokens(tokenizer, data_paths, seq_len=seq_len, num_sequences=num_sequences)
    sim = layer_input_similarity(model, tokens, batch_size=batch_size, progress=progress)

    plans = [_plan_entry(sim["matrix"], count, degree) for count in counts]
    modes = list(bypass_modes) + (["coalesce"] if coalesced else [])
    meter = PlanMeter(model, tokens, batch_size=batch_size, progress=progress)
    meter.variants |= {mode: meter.bypass_variant(mode) for mode in bypass_modes}
    meter.variants["coalesce"] = lambda indices: coalesced_layer(meter.layers, indices, model.config)
    jobs, where = [], []
    for entry in plans:
        groups = GroupPlan.from_dict(entry["plan"]).groups
        meter.check_types(groups)
        for mode in modes:
            jobs.append((groups, (), mode))
            where.append((entry, mode))
    windows = meter.windows(degree) if measured else []
    jobs += [((w,), ()) for w in windows]  # the ranking: lp, the meter's default
    what = f"{len(plans)} plan{'s' * (len(plans) > 1)} x {len(modes)} modes" + (
        f" + {len(windows)} groups" if windows else ""
    )
    scores = meter.measure(jobs, desc=f"measuring {what}") if jobs else []
    tokens_count = meter.original["tokens"] if jobs else None
    for (entry, mode), score in zip(where, scores, strict=False):
        entry["perplexity"][mode] = {"ppl": score["ppl"], "nll": score["nll"], "tokens": tokens_count}
        entry["perplexity"][mode]["kl"] = score["kl"]
    # The original's perplexity comes with the plans' measurement (it runs once per batch anyway).
    original = meter.original if jobs else perplexity(model, tokens, batch_size=batch_size, progress=progress)
    window_scores = scores[len(where) :]
    groups = (
        _rank_entries(
            [{"layers": list(w), **s} for w, s in zip(windows, window_scores, strict=True)],
            sim["matrix"],
            degree,
        )
        if measured
        else []
    )

    result = {
        "model": model.config.name_or_path or model.config.model_type,
        "num_layers": num_layers,
        "degree": degree,
        "calibration": {
            "data": [str(p) for p in data_paths],
            "seq_len": tokens.shape[1],
            "num_sequences": tokens.shape[0],
        },
        "original": original,
        "plans": plans,
        "matrix": [[round(v, 6) for v in row] for row in sim["matrix"].tolist()],
        "io_similarity": [round(v, 6) for v in sim["io"].tolist()],
    }
    if measured:
        result["groups"] = groups
    write_atomic(out_dir / "similarity.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out_dir / "similarity.png", _heatmap_png(sim["matrix"], plans, degree, groups))
    return result


def _check_budget(num_groups: int, degree: int, num_layers: int) -> None:
    if degree < 2:
        raise PlanError(f"degree must be at least 2 (layers per group), got {degree}")
    if num_groups < 1:
        raise PlanError(f"the number of groups must be at least 1, got {num_groups}")
    if num_groups * degree > num_layers:
        raise PlanError(
            f"{num_groups} groups of {degree} layers need {num_groups * degree} layers "
            f"but the model has {num_layers}"
        )


def _plan_entry(matrix: torch.Tensor, num_groups: int, degree: int) -> dict:
    ranking = rank_ranges(matrix, num_groups=num_groups, degree=degree)
    spec = _range_spec(ranking[0], degree)
    plan = GroupPlan.parse(spec, len(matrix))
    return {
        "num_groups": num_groups,
        "spec": spec,
        "plan": plan.to_dict(),
        "score": ranking[0]["score"],
        "num_layers_after": plan.num_layers_after,
        "ideal_speedup": plan.ideal_speedup,
        "perplexity": {},
        "ranking": ranking,
    }


def _range_spec(entry: dict, degree: int) -> str:
    return f"{entry['start']}-{entry['end']}:{degree}"


def _heatmap_png(matrix: torch.Tensor, plans: list[dict], degree: int, groups: list[dict] = ()) -> bytes:
    """One heatmap panel per suggested plan, its groups outlined, then (with ``groups``, see
    :func:`rank_groups`) each group's input similarity beside its measured KL; returns PNG bytes."""
    # The object-oriented API renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    num_layers = matrix.shape[0]
    step = -(-num_layers // 16)  # at most 16 tick labels, so that they stay legible
    ticks = list(range(0, num_layers, step))
    panels = len(plans) + (1 if groups else 0)
    fig = Figure(figsize=(4.6 * panels + 1.2, 4.8), layout="constrained")
    every = fig.subplots(1, panels, squeeze=False)[0]
    axes = every[: len(plans)]
    if groups:
        _ranking_panel(every[-1], groups, degree)
    for ax, entry in zip(axes, plans, strict=True):
        image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=float(matrix.min()), vmax=1.0)
        for group in entry["plan"]["groups"]:
            ax.add_patch(
                Rectangle(
                    (group[0] - 0.5, group[0] - 0.5), degree, degree, fill=False, edgecolor="red", lw=1.5
                )
            )
        ppl = ", ".join(f"{m} {r['ppl']:.4g}" for m, r in entry["perplexity"].items())
        first, last = entry["plan"]["groups"][0][0], entry["plan"]["groups"][-1][-1]
        ax.set_title(
            f"{entry['num_groups']} groups of {degree}: layers {first}-{last} ({entry['spec']})\n"
            f"score {entry['score']:.3f}; ppl {ppl}",
            fontsize=9,
        )
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("layer (input)")
        ax.set_ylabel("layer (input)")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean cosine similarity of layer inputs")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _ranking_panel(ax, groups: list[dict], degree: int) -> None:
    """Similarity (line, left axis) and measured KL (bars, right axis, log) per group's first layer."""
    starts = [g["layers"][0] for g in groups]
    ax.plot(
        starts, [g["similarity"] for g in groups], "-o", ms=3, color="tab:green", label="input similarity"
    )
    ax.set_xlabel(f"first layer of the group of {degree}")
    ax.set_ylabel("mean cosine similarity of the group's inputs", color="tab:green")
    twin = ax.twinx()
    twin.bar(
        starts, [max(g["kl"], 1e-6) for g in groups], color="tab:purple", alpha=0.35, label="measured KL"
    )
    twin.set_yscale("log")
    twin.set_ylabel("calibration KL from the original (lower is better)", color="tab:purple")
    ax.set_zorder(twin.get_zorder() + 1)  # the similarity line in front of the bars
    ax.patch.set_visible(False)
    best = [g for g in groups if g["measured_rank"] <= 3]
    for g in best:
        twin.annotate(
            f"#{g['measured_rank']}", (g["layers"][0], g["kl"]), ha="center", va="bottom", fontsize=7
        )
    ax.set_title("similarity vs measured cost of each group", fontsize=9)

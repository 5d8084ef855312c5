"""The recovery trainer: train only the merged layers and gates of a parallelized model.

One run, top to bottom (:func:`run`): load the model, keep a frozen copy of the original layers of
the grouped region (the teacher's only weights of its own), measure held-out perplexity of the
original, parallelize, measure again, train under accelerate (DDP or DeepSpeed ZeRO), checkpoint
and resume exactly, measure the recovered model, and hand it to the export step.

The teacher is not a second model (DESIGN.md, "Teacher without a second model"): it is the same
network with the original sequential layers in place of each group. :class:`RecoveryModel` runs the
layers before the first group once for both, then the student's effective layers with gradients
and the teacher's path (original layers inside groups, the shared modules elsewhere) under
``no_grad``, and returns the weighted losses. Under ZeRO-3 the teacher copy is a frozen part of the
engine's module: partitioned like every weight, gathered by DeepSpeed's hooks in forward, and never
given to the optimizer, which only ever sees :func:`cqil.trainable_parameters` (or LoRA adapters).

``parallelize.mode: coalesce`` swaps the transform and nothing else: the student is
:func:`cqil.coalesce` of the original (one standard layer of averaged weights per group, a shallower
model of the original architecture), its trainable parameters are exactly the coalesced layers at the
groups' positions, and the teacher, losses, data, evaluation and checkpoints are those of a parallel
run on the same plan, so the two runs compare like for like. The untrained coalesced model's
perplexity is stored under the key ``"parallelized"`` (the "before training" slot of every report;
``eval.json`` says ``"mode": "coalesce"``), and the export is a plain Hugging Face folder.

This module is longer than 500 lines because it still holds the whole trainer (model wrapper,
loop, checkpoints, evaluation and export of a run); a split into those parts is planned.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cqil._compat import (
    adapters_disabled,
    causal_masks,
    rotary_embeddings,
    unset_zero3_init,
    zero3_init_disabled,
)
from cqil.errors import OutputDirError
from cqil.files import staged_folder, write_atomic
from cqil.recovery.data import heldout_blocks, in_heldout, iter_records, pack_tokens
from cqil.recovery.data_checks import check_data
from cqil.recovery.losses import head_losses, hidden_loss, kd_loss, lm_loss
from cqil.recovery.recipe import Recipe, RecipeError, recipe_to_dict
from cqil.recovery.stream import TokenStream
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallel_groups, parallelize, trainable_parameters

EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: a checkpoint was written; resubmit to continue (EX_TEMPFAIL)
EXIT_NONFINITE = 3  # the loss became NaN or infinite; the last good checkpoint is kept
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, losses: dict) -> None:
        self.step = step
        super().__init__(f"non-finite loss at step {step}: {losses}; stopped, last good checkpoint kept")


class Preempted(RuntimeError):
    """A SIGTERM / SIGUSR1 arrived; a checkpoint was written and the run should exit."""


# ---------------------------------------------------------------------------------------- model
class RecoveryModel(nn.Module):
    """The transformed student plus the teacher's own layers; ``forward(input_ids)`` returns the losses.

    The student is the original model with one effective layer per group of ``plan``: parallelized
    (:func:`cqil.parallelize`) or coalesced (:func:`cqil.coalesce`); every other layer and module is the
    original's, unchanged. ``plan`` maps the student's effective layers to original layer indices;
    without it, the plan recorded in the student's config (``cqil`` or ``cqil_coalesced``) is used.
    ``teacher_layers`` maps an original layer index to a frozen copy of that original layer, for
    every layer inside a group (made before the transform). Everything else the teacher runs is the
    student's own, frozen, modules.

    ``forward`` returns ``"loss"`` (the weighted sum, the one to backpropagate) and each weighted term.
    With a frozen plain LM head the KD and LM terms come from :func:`cqil.recovery.losses.head_losses`, which never
    holds the batch's logits; they are then values only, without a gradient of their own.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher_layers: dict[int, nn.Module] | None,
        *,
        plan: GroupPlan | None = None,
        lm: float = 0.0,
        kd: float = 1.0,
        kd_temperature: float = 1.0,
        hidden: float = 0.0,
    ) -> None:
        super().__init__()
        plan = plan if plan is not None else recorded_plan(student)
        depth = len(student.model.layers)
        if plan.num_layers_after != depth:
            raise ValueError(
                f"the student has {depth} layers but the plan {plan} over {plan.num_layers} layers "
                f"leaves {plan.num_layers_after}"
            )
        self.student = student
        self.weights = {"lm": float(lm), "kd": float(kd), "hidden": float(hidden)}
        self.kd_temperature = float(kd_temperature)
        self.needs_teacher = kd > 0 or hidden > 0
        if self.needs_teacher and not teacher_layers:
            raise ValueError("kd / hidden losses need the teacher's copies of the grouped layers")
        missing = sorted({i for g in plan.groups for i in g} - set(teacher_layers or {}))
        if self.needs_teacher and missing:
            raise ValueError(f"the teacher has no copy of the grouped layers {missing}")
        self.teacher_layers = nn.ModuleDict({str(i): layer for i, layer in (teacher_layers or {}).items()})
        for p in self.teacher_layers.parameters():
            p.requires_grad_(False)
        self.effective = plan.effective_layers()
        positions = set(group_positions(plan))
        if not positions:
            raise ValueError(f"the plan {plan} has no group")
        self.is_group = [e in positions for e in range(len(self.effective))]
        self.first_group = self.is_group.index(True)
        config = student.config
        self._student_types = list(getattr(config, "layer_types", None) or [])
        # Both transforms refuse groups that mix attention types, so an original layer has its
        # effective layer's type.
        self._teacher_types = (
            [self._student_types[e] for e, idx in enumerate(self.effective) for _ in idx]
            if self._student_types
            else []
        )
        self._default_type = (
            "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        )
        # With LoRA on layers outside the groups, the prefix differs between student and teacher.
        self.adapters_outside_groups = False
        # The KD / LM losses straight from the final hidden states, a chunk of tokens at a time
        # (cqil.recovery.losses.head_losses); False computes them from the whole batch's logits, the reference.
        self.fused_head_losses = True
        # Tokens per chunk of the fused losses: bounds the (tokens, vocab) float32 buffers alive at once.
        self.loss_chunk_tokens = 128

    # -------------------------------------------------------------- pieces
    def _masks(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> dict:
        types = set(self._student_types) | set(self._teacher_types) | {self._default_type}
        return causal_masks(self.student.config, embeds, position_ids, sorted(types))

    def _student_type(self, e: int) -> str:
        return self._student_types[e] if self._student_types else self._default_type

    def _teacher_type(self, i: int) -> str:
        return self._teacher_types[i] if self._teacher_types else self._default_type

    def _run(self, layer: nn.Module, h: torch.Tensor, mask, ctx: dict) -> torch.Tensor:
        out = layer(h, attention_mask=mask, use_cache=False, **ctx)
        return out[0] if isinstance(out, tuple) else out

    def _head_is_fusable(self) -> bool:
        """Whether the losses can read the LM head's weight directly (:func:`cqil.recovery.losses.head_losses`).

        Only a frozen plain ``nn.Linear`` with no hooks: DeepSpeed ZeRO-3 and accelerate's offload
        gather or move the weight in hooks around the module's own forward, and a trained head needs
        its weight gradient, which the fused losses do not compute.
        """
        head = self.student.lm_head
        params = [p for p in (head.weight, head.bias) if p is not None]
        return (
            type(head) is nn.Linear
            and not any(p.requires_grad or hasattr(p, "ds_id") for p in params)
            and not head._forward_hooks
            and not head._forward_pre_hooks
            and not hasattr(head, "_hf_hook")
        )

    # -------------------------------------------------------------- forward
    def forward(self, input_ids: torch.LongTensor, *, return_logits: bool = False) -> dict:
        inner = self.student.model
        layers = inner.layers
        embeds = inner.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self._masks(embeds, position_ids)
        ctx = {
            "position_embeddings": rotary_embeddings(inner, embeds, position_ids),
            "position_ids": position_ids,
        }

        # The layers before the first group are the same for student and teacher: run them once.
        prefix_grad = torch.is_grad_enabled() and any(
            p.requires_grad for e in range(self.first_group) for p in layers[e].parameters()
        )
        with torch.set_grad_enabled(prefix_grad):
            h = embeds
            for e in range(self.first_group):
                h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
        shared = h

        student_states = []
        for e in range(self.first_group, len(self.effective)):
            h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
            if self.is_group[e]:
                student_states.append(h)
        h = inner.norm(h)

        teacher_h = None
        teacher_states: list[torch.Tensor] = []
        if self.needs_teacher:
            teacher_h, teacher_states = self.teacher_forward(embeds, shared, masks, ctx)
        out: dict[str, torch.Tensor] = {}
        w = self.weights
        logits = teacher_logits = None
        wants_logits = bool(w["kd"] or w["lm"])
        if wants_logits and self.fused_head_losses and not return_logits and self._head_is_fusable():
            # The logits of both models never exist for the whole batch at once (most of a step's memory
            # beside the weights and optimizer state otherwise; see cqil.recovery.losses.head_losses).
            fused = head_losses(
                h,
                teacher_h,
                self.student.lm_head,
                input_ids,
                kd=w["kd"],
                lm=w["lm"],
                kd_temperature=self.kd_temperature,
                chunk_tokens=self.loss_chunk_tokens,
            )
            loss = fused.pop("loss")
            out |= fused
        else:
            loss = 0.0
            if wants_logits or return_logits:
                logits = self.student.lm_head(h)
            if w["kd"]:
                with torch.no_grad():
                    teacher_logits = self.student.lm_head(teacher_h)
                out["kd"] = kd_loss(logits, teacher_logits, self.kd_temperature)
                loss = loss + w["kd"] * out["kd"]
            if w["lm"]:
                out["lm"] = lm_loss(logits, input_ids)
                loss = loss + w["lm"] * out["lm"]
        if w["hidden"]:
            out["hidden"] = hidden_loss(student_states, teacher_states)
            loss = loss + w["hidden"] * out["hidden"]
        out["loss"] = loss
        if return_logits:
            if teacher_logits is None and teacher_h is not None:
                with torch.no_grad():
                    teacher_logits = self.student.lm_head(teacher_h)
            out["logits"], out["teacher_logits"] = logits, teacher_logits
        return out

    @torch.no_grad()
    def teacher_forward(self, embeds, shared, masks, ctx):
        """The original model's path from the shared prefix on: (final normed hidden states, states at
        group outputs)."""
        layers = self.student.model.layers
        with adapters_disabled(self.student):
            h = shared.detach()
            if self.adapters_outside_groups:  # the prefix carries adapters: the teacher runs its own
                h = embeds.detach()
                for e in range(self.first_group):
                    h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
            states = []
            for e in range(self.first_group, len(self.effective)):
                if not self.is_group[e]:
                    h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
                    continue
                for i in self.effective[e]:
                    h = self._run(self.teacher_layers[str(i)], h, masks[self._teacher_type(i)], ctx)
                states.append(h)
            return self.student.model.norm(h), states


# ---------------------------------------------------------------------------------------- helpers
def recorded_plan(model: nn.Module) -> GroupPlan:
    """The plan a model was transformed with, from its config: ``cqil`` (parallelize) or ``cqil_coalesced``."""
    from cqil.rewrite.coalescing import COALESCED_KEY

    for key in ("cqil", COALESCED_KEY):
        record = getattr(model.config, key, None)
        if record:
            return GroupPlan.from_dict(record["plan"])
    raise ValueError(
        "the student must be parallelized (cqil.parallelize) or coalesced (cqil.coalesce) first, "
        "or its plan given"
    )


def group_positions(plan: GroupPlan) -> list[int]:
    """The effective-layer indices that hold a group of ``plan`` (the layers a recovery trains)."""
    grouped = set(plan.groups)
    return [e for e, idx in enumerate(plan.effective_layers()) if idx in grouped]


def layer_parameters(model: nn.Module, positions) -> dict[str, nn.Parameter]:
    """Every parameter of the decoder layers at effective indices ``positions``, by name."""
    out: dict[str, nn.Parameter] = {}
    for e in positions:
        for name, param in model.model.layers[e].named_parameters():
            out[f"model.layers.{e}.{name}"] = param
    return out


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine/linear decay to min_lr_ratio."""
    t = recipe.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One SHA-256 over named tensors' bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def apply_lora(model: nn.Module, lora, *, target: str, layers=None) -> list[str]:
    """Inject LoRA adapters (peft) on the linear layers of the groups (``target="groups"``) or of
    every decoder layer (``"all"``); returns the adapted module names. ``layers`` names the groups'
    effective indices (needed for a coalesced model); by default, the parallel groups of ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    prefix = "model.layers."
    if layers is None:
        groups = {id(g) for g in parallel_groups(model)}
        layers = [e for e, layer in enumerate(model.model.layers) if id(layer) in groups]
    layers = set(layers)
    names = []
    for e, layer in enumerate(model.model.layers):
        if target == "groups" and e not in layers:
            continue
        names += [f"{prefix}{e}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
    inject_adapter_in_model(config, model)
    return names


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _numpy_state(saved: dict | None = None):
    """NumPy's global RNG state as plain types that ``torch.load(weights_only=True)`` reads, or back."""
    if saved is None:
        name, key, pos, has_gauss, gauss = np.random.get_state()
        return {
            "name": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    key = saved["key"].numpy().astype(np.uint32)
    return (saved["name"], key, saved["pos"], saved["has_gauss"], saved["gauss"])


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, key + ".")
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


# ---------------------------------------------------------------------------------------- trainer
class RecoveryTrainer:
    """setup() -> train() -> finish() -> cleanup(); see :func:`run`."""

    def __init__(self, recipe: Recipe, *, source: str = "<recipe>") -> None:
        self.recipe, self.source = recipe, source
        self.output_dir = Path(recipe.output_dir)
        self.step = 0
        self.tokens_seen = 0
        self.results: dict = {}
        self._stop_signal: int | None = None
        self._old_handlers: dict = {}
        self.plan_search: dict | None = None  # groups: auto: where the plan search's report is
        self._metrics = None  # logs/metrics.jsonl, open while training on the main process

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        r, t = self.recipe, self.recipe.train
        # First: a preemption signal during the (long) model loading must not kill the run unsaved;
        # it is acted on after the first step, which checkpoints and exits with EXIT_PREEMPTED.
        self._install_signal_handlers()
        # On CPU, DeepSpeed needs gloo named explicitly (else it asserts on train_batch_size);
        # a single process has no process group to configure.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        handlers = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
        trackers = [x for x in t.trackers]
        self.accelerator = acc = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum_steps,
            log_with=trackers or None,
            project_dir=str(self.output_dir / "logs"),
            kwargs_handlers=handlers,
        )
        set_seed(t.seed)
        self.log(f"cqil: {acc.num_processes} process(es), {acc.distributed_type}, output {self.output_dir}")

        check_data(r.data, self.source)  # bad paths, shards or mixture: one error before the weights load
        model, self.tokenizer = self._load_model()
        n_layers = model.config.num_hidden_layers
        groups = r.parallelize.groups
        if groups == "auto":
            groups = self._search_plan(model)
        try:
            self.plan = GroupPlan.parse(groups, n_layers)
        except ValueError as e:
            raise RecipeError(self.source, "parallelize.groups", str(e)) from None
        if not self.plan.groups or self.plan.is_identity():
            raise RecipeError(
                self.source, "parallelize.groups", "the plan has no group of two or more layers"
            )

        self.eval_tokens, self.eval_sources = heldout_blocks(
            self.tokenizer,
            r.data.train,
            r.data.eval,
            seq_len=t.seq_len,
            num_sequences=r.eval.num_sequences,
            heldout_fraction=r.data.eval_fraction,
            source_field=r.data.source_field,
            text_field=r.data.text_field,
            hub_split=r.data.hub_split,
        )
        if r.eval.tasks:  # an unknown task fails now, not after training
            from cqil.evaluation.metrics import UnknownTaskError, check_tasks, task_manager

            try:
                self.task_manager = task_manager(r.eval.task_paths)
                check_tasks(r.eval.tasks, self.task_manager)
            except (UnknownTaskError, FileNotFoundError) as e:
                key = "eval.task_paths" if isinstance(e, FileNotFoundError) else "eval.tasks"
                raise RecipeError(self.source, key, str(e)) from None
        resuming = bool(list_checkpoints(self.output_dir))
        if r.eval.before and not resuming:
            self.results["original"] = self._perplexity(model, "original")
            self._lm_eval(model, "original")
            if r.eval.report:
                from cqil.selection.similarity import layer_input_similarity

                sim = layer_input_similarity(model, self.eval_tokens[:8], progress=False)
                self.results["similarity"] = [[round(x, 5) for x in row] for row in sim["matrix"].tolist()]

        # The teacher's own weights: the grouped region's original layers, copied before the transform.
        loss, p = t.loss, r.parallelize
        teacher = None
        if p.mode == "coalesce":
            from cqil.rewrite.coalescing import coalesce

            student = coalesce(model, self.plan)
            if loss.kd or loss.hidden:
                # coalesce copies every weight it keeps and leaves `model` as it was: the original
                # layers themselves are the teacher's copy; the rest of `model` is dropped here.
                teacher = {i: model.model.layers[i] for g in self.plan.groups for i in g}
            model = student
        else:
            if loss.kd or loss.hidden:
                teacher = {i: copy.deepcopy(model.model.layers[i]) for g in self.plan.groups for i in g}
            parallelize(
                model,
                self.plan,
                bypass=p.bypass,
                bypass_distance=p.bypass_distance,
                gates=p.gates,
                gate_shape=p.gate_shape,
                form=p.form,
            )
        if r.eval.before and not resuming:
            # One key for "before training" in both modes, so their reports line up.
            self.results["parallelized"] = self._perplexity(model, self.before_label)
            self._lm_eval(model, "parallelized")

        self.trainable = self._select_trainable(model)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = RecoveryModel(
            model,
            teacher,
            plan=self.plan,
            lm=loss.lm,
            kd=loss.kd,
            kd_temperature=loss.kd_temperature,
            hidden=loss.hidden,
        )
        self.model.adapters_outside_groups = t.lora is not None and t.lora.target == "all"
        self.model.train()
        self.frozen_digest = state_digest(self._frozen_state())
        n_train = sum(p.numel() for p in self.trainable.values())
        n_all = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"cqil: plan {self.plan} ({len(self.plan.groups)} groups, {p.mode}); "
            f"training {n_train:,} of {n_all:,} weights"
        )

        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(r))
        self._configure_deepspeed()
        self.engine, self.prepared_optimizer = acc.prepare(self.model, self.optimizer)

        self.stream = TokenStream(
            self.tokenizer,
            r.data.train,
            seq_len=t.seq_len,
            rank=acc.process_index,
            world_size=acc.num_processes,
            mixture=r.data.mixture,
            seed=t.seed,
            split=None if r.data.eval else "train",
            heldout_fraction=r.data.eval_fraction,
            source_field=r.data.source_field,
            text_field=r.data.text_field,
            hub_split=r.data.hub_split,
        )
        if trackers:
            acc.init_trackers("cqil", config=_flatten(recipe_to_dict(r)))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            from cqil.recovery.recipe import dump_recipe

            (self.output_dir / "recipe.yaml").write_text(dump_recipe(r))
        before = self.output_dir / "eval_before.json"
        if resuming and before.is_file():  # measured by the first attempt of this run
            self.results |= json.loads(before.read_text())
        elif acc.is_main_process and self.results:
            before.write_text(json.dumps(self.results, indent=1))
        if resuming:
            self.resume(list_checkpoints(self.output_dir)[-1])

    def _search_plan(self, model: nn.Module) -> list[list[int]]:
        """``groups: auto``: the main process searches the plan on calibration text of the train split
        (never the held-out documents) and records it under ``output_dir/plan/``; every process then
        reads the groups from ``plan/plans.json``. A resumed run reuses the recorded plan."""
        from cqil.selection.search import BudgetError, search_plan, write_report

        acc, r, p = self.accelerator, self.recipe, self.recipe.parallelize
        s = p.search
        folder = self.output_dir / "plan"
        report = folder / "plans.json"
        reused = report.is_file()
        if not reused and list_checkpoints(self.output_dir):
            raise RecipeError(
                self.source,
                "parallelize.groups",
                f"{self.output_dir} has checkpoints but no recorded plan ({report}); a new search could "
                "choose other groups than the ones they were trained with",
            )
        failure: Exception | None = None
        if acc.is_main_process and not reused:
            try:
                tokens = self._calibration_tokens(s.num_sequences)
                self.log(
                    f"cqil: plan search (degree {s.degree}, "
                    + ", ".join(f"{k} {getattr(s, k)}" for k in s.BUDGETS if getattr(s, k) is not None)
                    + f") on {tokens.shape[0]} sequences of {tokens.shape[1]} tokens"
                )
                # Measured on the accelerator, then back where it was loaded: what follows (the teacher
                # copy, the surgery, accelerate.prepare) runs as it does with explicit groups.
                home = next(model.parameters()).device
                model.to(acc.device)
                result = search_plan(
                    model,
                    tokens,
                    degree=s.degree,
                    bypass=p.bypass,
                    bypass_distance=p.bypass_distance,
                    target_depth=s.target_depth,
                    speedup=s.speedup,
                    max_ppl_increase=s.max_ppl_increase,
                    beam_width=s.beam_width,
                    pool_size=s.pool_size,
                    batch_size=s.batch_size,
                    seed=r.train.seed,
                    progress=True,
                )
                model.to(home)
                write_report(result, folder, overwrite=True)
                self.log(result.format_table())
            except BudgetError as e:
                failure = RecipeError(self.source, f"parallelize.search.{e.budget}", e.reason)
            except Exception as e:  # raised after the barrier, so that no other rank waits forever
                failure = e
        acc.wait_for_everyone()
        if failure is not None:
            raise failure
        if not report.is_file():
            raise RuntimeError(f"the plan search of the main process wrote no {report}; see its log")
        data = json.loads(report.read_text())
        if reused:
            self.log(f"cqil: reusing the recorded plan {report}")
        self.plan_search = {
            "dir": "plan",
            "plans_json": "plan/plans.json",
            "table": "plan/table.txt",
            "budget": data.get("budget"),
            "reused": reused,
        }
        return data["plan"]["groups"]

    def _calibration_tokens(self, num_sequences: int) -> torch.Tensor:
        """The first packed sequences of the train split (without the hash-held-out documents when
        data.eval is absent): the text the plan search measures plans on."""
        r = self.recipe
        d = r.data
        records = iter_records(
            d.train, source_field=d.source_field, text_field=d.text_field, hub_split=d.hub_split
        )
        texts = (t for t, _ in records if d.eval or not in_heldout(t, d.eval_fraction))
        tokens = pack_tokens(self.tokenizer, texts, seq_len=r.train.seq_len, max_sequences=num_sequences)
        if tokens.shape[0] == 0:
            raise RecipeError(
                self.source,
                "data.train",
                f"not enough training text for one sequence of {r.train.seq_len} tokens",
            )
        if tokens.shape[0] < num_sequences:
            self.log(
                f"cqil: only {tokens.shape[0]} of {num_sequences} calibration sequences "
                "(parallelize.search.num_sequences) in the train split"
            )
        return tokens

    def _load_model(self):
        from cqil.pretrained import load_model

        m = self.recipe.model
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:
            # The teacher copy and the surgery need whole weights: under ZeRO-3, transformers would
            # otherwise load into deepspeed.zero.Init and partition them on load. Each rank holds
            # the model in CPU memory until accelerate.prepare partitions it.
            unset_zero3_init()
        try:
            return load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
        finally:
            if plugin is not None:
                plugin.set_deepspeed_weakref()

    @property
    def before_label(self) -> str:
        """What the "parallelized" (before training) entry of the results measured."""
        return "coalesced" if self.recipe.parallelize.mode == "coalesce" else "parallelized"

    def _select_trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """requires_grad on the groups' parameters (or their LoRA adapters) and nothing else.

        Parallel mode: the parallel groups and their learned gates. Coalesce mode: the coalesced
        layers at the groups' positions (a coalesced layer has no gates)."""
        t = self.recipe.train
        coalesced = self.recipe.parallelize.mode == "coalesce"
        for p in model.parameters():
            p.requires_grad_(False)
        positions = group_positions(self.plan)
        if t.lora is None:
            chosen = layer_parameters(model, positions) if coalesced else trainable_parameters(model)
        else:
            apply_lora(model, t.lora, target=t.lora.target, layers=positions)
            gates = set() if coalesced else {n for n in trainable_parameters(model) if n.endswith(".gates")}
            chosen = {n: p for n, p in model.named_parameters() if "lora_" in n or n in gates}
        for p in chosen.values():
            p.requires_grad_(True)
        return {f"student.{n}": p for n, p in chosen.items()}

    def _frozen_state(self) -> dict[str, torch.Tensor]:
        trainable = {id(p) for p in self.trainable.values()}
        return {n: p for n, p in self.model.named_parameters() if id(p) not in trainable}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.recipe.train
        decay = [p for n, p in self.trainable.items() if p.dim() >= 2 and not n.endswith(".gates")]
        no_decay = [p for n, p in self.trainable.items() if not (p.dim() >= 2 and not n.endswith(".gates"))]
        groups = [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        betas = tuple(t.adam_betas)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}
        ).get("device", "none") not in ("none", None):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # optimizer states on the CPU need its kernel

            return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, foreach=False)

    def _configure_deepspeed(self) -> None:
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        t = self.recipe.train
        # No DataLoader goes through accelerate, so DeepSpeed cannot infer the batch size ("auto").
        cfg = plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        cfg["gradient_accumulation_steps"] = t.grad_accum_steps
        cfg["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * self.accelerator.num_processes
        cfg["gradient_clipping"] = t.max_grad_norm
        cfg.setdefault("steps_per_print", 10**9)

    @property
    def is_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    # -------------------------------------------------------------- evaluation
    def _perplexity(self, model: nn.Module, label: str) -> dict:
        from cqil.evaluation.metrics import perplexity

        t0 = time.time()
        result = perplexity(
            model,
            self.eval_tokens,
            sources=self.eval_sources,
            batch_size=self.recipe.eval.batch_size,
            progress=False,
        )
        result["seconds"] = round(time.time() - t0, 1)
        sources = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in result["by_source"].items())
        self.log(
            f"cqil: held-out perplexity, {label}: {result['ppl']:.3f} ({result['tokens']} tokens; {sources})"
        )
        return result

    def _lm_eval(self, model: nn.Module, stage: str) -> None:
        """lm-eval-harness tasks of the recipe on ``model`` (main process; the others go on)."""
        e = self.recipe.eval
        if not e.tasks or not self.accelerator.is_main_process:
            return
        from cqil.evaluation.metrics import lm_eval_tasks

        t0 = time.time()
        results = lm_eval_tasks(
            model,
            self.tokenizer,
            e.tasks,
            limit=e.task_limit,
            num_fewshot=e.num_fewshot,
            batch_size=e.task_batch_size,
            manager=self.task_manager,
        )
        self.results.setdefault("lm_eval", {})[stage] = results
        summary = "; ".join(
            f"{t} " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items()) for t, ms in results.items()
        )
        self.log(f"cqil: lm-eval, {stage} ({time.time() - t0:.0f} s): {summary}")

    # -------------------------------------------------------------- train
    def train(self) -> None:
        _r, t, acc = self.recipe, self.recipe.train, self.accelerator
        device = acc.device
        tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum_steps * acc.num_processes
        bar = None
        if acc.is_main_process and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        start, start_step = time.time(), self.step
        window_time, window_tokens = time.time(), 0
        metrics = None
        if acc.is_main_process:
            (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
            # Closed by cleanup(), whichever way the loop ends; flushed after every line.
            metrics = self._metrics = open(self.output_dir / "logs" / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        sums: dict[str, float] = {}
        while self.step < t.max_steps:
            step_losses: dict[str, torch.Tensor] = {}
            for _ in range(t.grad_accum_steps):
                batch = self.stream.next_batch(t.micro_batch_size).to(device)
                with acc.accumulate(self.engine):
                    out = self.engine(batch)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and t.max_grad_norm > 0 and not self.is_deepspeed:
                        acc.clip_grad_norm_(list(self.trainable.values()), t.max_grad_norm)
                    self.prepared_optimizer.step()
                    self.prepared_optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / t.grad_accum_steps
            self.scheduler.step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step

            names = sorted(step_losses)
            reduced = acc.reduce(torch.stack([step_losses[k] for k in names]), reduction="mean")
            values = dict(zip(names, reduced.tolist(), strict=True))
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(self.step, values)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if metrics is not None:  # every step, for the report's loss curves
                lr = self.scheduler.get_last_lr()[0]
                metrics.write(
                    json.dumps({"step": self.step, **values, "lr": lr, "tokens": self.tokens_seen}) + "\n"
                )
                metrics.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")

            if self.step % t.log_every_steps == 0 or self.step == t.max_steps:
                n = t.log_every_steps if self.step % t.log_every_steps == 0 else self.step % t.log_every_steps
                means = {k: s / n for k, s in sums.items()}
                sums = {}
                now = time.time()
                tok_s = window_tokens / max(now - window_time, 1e-9)
                window_time, window_tokens = now, 0
                elapsed = now - start
                eta = elapsed / max(self.step - start_step, 1) * (t.max_steps - self.step)
                lr = self.scheduler.get_last_lr()[0]
                parts = " ".join(f"{k} {means[k]:.4f}" for k in ["loss"] + [k for k in means if k != "loss"])
                line = (
                    f"step {self.step:>{len(str(t.max_steps))}}/{t.max_steps} | {parts} | lr {lr:.2e} | "
                    f"{tok_s:,.0f} tok/s | peak mem {peak_memory_gb():.2f} GB | "
                    f"{_fmt_time(elapsed)} elapsed, ETA {_fmt_time(eta)}"
                )
                self.log(line, bar=bar)
                acc.log(
                    {f"train/{k}": v for k, v in means.items()} | {"train/lr": lr, "train/tok_s": tok_s},
                    step=self.step,
                )

            if t.save_every_steps and self.step % t.save_every_steps == 0 and self.step < t.max_steps:
                self.save_checkpoint()
            if self._signalled():
                self.save_checkpoint()
                raise Preempted(f"signal {self._stop_signal}: checkpoint written at step {self.step}")
        if bar is not None:
            bar.close()
        if (
            not list_checkpoints(self.output_dir)
            or list_checkpoints(self.output_dir)[-1].name != self._ckpt_name()
        ):
            self.save_checkpoint()

    # -------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _signalled(self) -> bool:
        # Every rank must agree, or one would wait forever in the checkpoint's collectives.
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0 and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return flag.item() > 0

    # -------------------------------------------------------------- checkpoints
    def _ckpt_name(self, step: int | None = None) -> str:
        return f"step-{self.step if step is None else step:06d}"

    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/step-NNNNNN/`` (via a temporary name)."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / self._ckpt_name()
        tmp = root / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.is_deepspeed:
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
        elif acc.is_main_process:
            from safetensors.torch import save_file

            save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        rank_state = {
            "stream": self.stream.state_dict(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(rank_state, tmp / f"rank-{acc.process_index:03d}.pt")
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": acc.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.recipe.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"cqil: checkpoint {final}")
        acc.wait_for_everyone()
        return final

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous().clone() for n, p in self.trainable.items()}

    def resume(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues bit-exactly."""
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != acc.num_processes:
            raise RuntimeError(
                f"{path} was written by {state['world_size']} processes; resume with the same number, "
                f"not {acc.num_processes}"
            )
        if self.is_deepspeed:
            self.engine.load_checkpoint(
                str(path), tag="deepspeed", load_module_strict=False, load_lr_scheduler_states=False
            )
        else:
            from safetensors.torch import load_file

            saved = load_file(str(path / "trainable.safetensors"))
            missing = set(self.trainable) ^ set(saved)
            if missing:
                raise RuntimeError(
                    f"{path}: trainable weights do not match this recipe: {sorted(missing)[:5]}"
                )
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rank_state = torch.load(path / f"rank-{acc.process_index:03d}.pt", weights_only=True)
        self.stream.load_state_dict(rank_state["stream"])
        random.setstate(rank_state["python"])
        np.random.set_state(_numpy_state(rank_state["numpy"]))
        torch.set_rng_state(rank_state["torch"])
        if rank_state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["cuda"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.log(f"cqil: resumed from {path} at step {self.step}")

    # -------------------------------------------------------------- end of run
    def finish(self, export_fn: Callable | None = None) -> dict:
        """Check the frozen weights, evaluate the recovered model and export it. Returns the results."""
        acc = self.accelerator
        self.model.eval()
        # Under ZeRO-3 every rank enters the gathered contexts; only the main process writes. The
        # evaluation runs outside them: ZeRO-3's forward hooks release what a forward gathered.
        with self._gathered():
            after = state_digest(self._frozen_state())
            trainable = self._trainable_state()
        if after != self.frozen_digest:
            raise RuntimeError("frozen weights changed during training (they must stay bit-identical)")
        self.results["recovered"] = self._perplexity(self.model.student, "recovered")
        with self._gathered():
            self.results |= {
                "steps": self.step,
                "tokens_seen": self.tokens_seen,
                "frozen_digest": after,
                "trainable_digest": state_digest(trainable),
                "plan": self.plan.to_dict(),
                "mode": self.recipe.parallelize.mode,  # coalesce: "parallelized" holds the coalesced model
            }
            if self.plan_search is not None:  # groups: auto; the search's report is under plan/
                self.results["plan_search"] = self.plan_search
            if acc.is_main_process:
                (self.output_dir / "eval.json").write_text(json.dumps(self.results, indent=1))
                (export_fn or export_recovered)(self, trainable)
                labels = {"original": "original", "parallelized": self.before_label, "recovered": "recovered"}
                self.log(
                    "cqil: held-out perplexity "
                    + ", ".join(
                        f"{v} {self.results[k]['ppl']:.3f}" for k, v in labels.items() if k in self.results
                    )
                )
        acc.wait_for_everyone()
        if self.recipe.eval.report and acc.is_main_process:
            # The rest measures the exported model as users load it, on the main process alone: the
            # other processes are done and exit (no collective follows, so a long lm-eval run cannot
            # time one out). The optimizer state goes first, to make room for the two models.
            self.engine = self.prepared_optimizer = self.optimizer = None
            acc.free_memory()
            self.write_report()
        return self.results

    def write_report(self) -> Path:
        """lm-eval and latency on the export in ``output_dir/model``, then ``output_dir/report/``."""
        from cqil.evaluation.report import (
            by_source,
            gap_closed,
            headline,
            plan_summary,
            read_history,
            write_report,
        )

        r, results = self.recipe, self.results
        model_dir = self.output_dir / "model"
        report = {
            "schema_version": 1,
            "base_model": r.model.name_or_path,
            "plan": plan_summary(self.plan, vars(r.parallelize), mode=r.parallelize.mode),
            "perplexity": {
                k: {n: results[k][n] for n in ("ppl", "nll", "tokens")}
                for k in ("original", "parallelized", "recovered")
                if k in results
            },
            "perplexity_by_source": by_source(results),
            "steps": results.get("steps"),
            "tokens_trained": results.get("tokens_seen"),
            "eval_dataset": ", ".join(
                r.data.eval or [f"{r.data.eval_fraction:.2%} hash split of data.train"]
            ),
            "datasets": list(r.data.train),
            "recipe": recipe_to_dict(r),
        }
        report["gap_closed"] = gap_closed(report["perplexity"])
        if self.plan_search is not None:  # groups: auto: every plan the search measured
            searched = json.loads((self.output_dir / self.plan_search["plans_json"]).read_text())
            keys = ("groups", "depth", "speedup", "ppl")
            report["plan_search"] = [{k: c[k] for k in keys} for c in searched["candidates"]]
        lm_eval = dict(results.get("lm_eval") or {})
        exported = (model_dir / "config.json").is_file()
        if exported and (r.eval.tasks or r.eval.latency):
            recovered = self._load_exported(model_dir)
            if r.eval.tasks:
                self._lm_eval(recovered, "recovered")
                lm_eval["recovered"] = results["lm_eval"]["recovered"]
            if r.eval.latency:
                report["latency"] = self._latency(recovered)
            del recovered
        if lm_eval:
            e = r.eval
            report["lm_eval"] = lm_eval
            report["lm_eval_settings"] = {
                "tasks": e.tasks,
                "limit": e.task_limit,
                "num_fewshot": e.num_fewshot,
            }
        metrics = self.output_dir / "logs" / "metrics.jsonl"
        similarity = results.get("similarity")
        out = write_report(
            report,
            self.output_dir / "report",
            similarity=torch.tensor(similarity) if similarity else None,
            history=read_history(metrics) if metrics.is_file() else None,
            overwrite=True,  # output_dir belongs to this run
        )
        if exported and r.parallelize.mode == "parallel":
            from cqil.export.card import update_model_card

            update_model_card(model_dir, out / "report.json", recipe=recipe_to_dict(r))
        elif exported:
            _update_coalesced_card(self, out)
        self.log(f"cqil: report {out / 'report.md'}: {headline(report)}")
        return out

    def _load_exported(self, folder: Path) -> nn.Module:
        """The export as users load it, on this (the main) process alone, even under ZeRO-3."""
        from cqil.export.load import load_export

        device, dtype = self.accelerator.device, self.recipe.model.dtype
        with zero3_init_disabled():  # ZeRO-3's init would wait for the ranks that have exited
            if self.recipe.parallelize.mode == "coalesce":  # a plain checkpoint of the base architecture
                from transformers import AutoModelForCausalLM

                return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
            return load_export(folder, dtype=dtype, device=device)

    def _latency(self, recovered: nn.Module) -> dict:
        """Prefill and decode speed of the original (reloaded) and the recovered model, side by side."""
        from cqil.evaluation.metrics import measure_latency

        e = self.recipe.eval

        with zero3_init_disabled():
            original, _ = self._load_model()
        original.to(self.accelerator.device)
        latency = measure_latency(
            {"original": original, "recovered": recovered},
            prefill_len=e.latency_prefill_len,
            new_tokens=e.latency_new_tokens,
            reps=e.latency_reps,
            progress=False,
        )
        latency["ideal"] = round(self.plan.ideal_speedup, 4)
        speed = latency["speedup"]["recovered"]
        self.log(
            f"cqil: latency on {latency['device']}: prefill {speed['prefill']:.3f}x, decode "
            f"{speed['decode']:.3f}x the original (ideal L/L_eff {latency['ideal']:.3f}x)"
        )
        return latency

    @contextlib.contextmanager
    def _gathered(self):
        """Under ZeRO-3, gather the partitioned weights for a full-model read; elsewhere a no-op."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            yield

    def cleanup(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}
        if hasattr(self, "accelerator"):
            # Without this, about one multi-process run in six aborts at exit.
            self.accelerator.end_training()

    # -------------------------------------------------------------- logging
    def log(self, line: str, bar=None) -> None:
        """One line on the main process (through tqdm when a bar is showing)."""
        if hasattr(self, "accelerator") and not self.accelerator.is_main_process:
            return
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def merge_lora(model: nn.Module) -> None:
    """Fold injected LoRA adapters into their base linear layers and put the plain layers back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


def export_recovered(trainer: RecoveryTrainer, trainable: dict[str, torch.Tensor]) -> Path:
    """The default end of a run: the recovered model as a Hugging Face folder, ``output_dir/model/``.

    This is the export seam: :func:`run` takes ``export_fn(trainer, trainable_state)`` and calls it
    once, on the main process, after the final evaluation (inside the ZeRO-3 gather). In coalesce mode
    the model is a standard architecture and goes out as a plain folder (:func:`export_coalesced`).
    """
    from cqil.export.write import export_model

    student = trainer.model.student
    if trainer.recipe.train.lora is not None:
        merge_lora(student)  # the end of the run: the student is not trained any further
    if trainer.recipe.parallelize.mode == "coalesce":
        return export_coalesced(
            student,
            trainer.output_dir / "model",
            tokenizer=trainer.tokenizer,
            card=_coalesced_card(trainer),
        )
    results = trainer.results
    report = {
        "perplexity": {k: results[k] for k in ("original", "parallelized", "recovered") if k in results},
        "tokens_trained": results.get("tokens_seen"),
        "base_model": trainer.recipe.model.name_or_path,
    }
    return export_model(
        student,
        trainer.output_dir / "model",
        tokenizer=trainer.tokenizer,
        report=report,
        recipe=recipe_to_dict(trainer.recipe),
        overwrite=True,  # output_dir belongs to this run; a resumed run replaces its own export
    )


def export_coalesced(
    model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, card: str | None = None
) -> Path:
    """Save a coalesced model (a standard architecture) as a plain Hugging Face folder at ``out_dir``.

    ``save_pretrained`` (safetensors, no remote code: ``AutoModelForCausalLM.from_pretrained`` loads it
    with transformers alone), the tokenizer and a model card, written into a hidden sibling and renamed
    into place as :func:`cqil.export.write.export_model` does, replacing a previous folder only at the end.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # replaced whole: only its non-folder form is refused
        raise OutputDirError(f"{out} exists and is not a folder")
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def _coalesced_card(trainer: RecoveryTrainer) -> str:
    """A short model card for a recovered coalesced model: what was done and the three perplexities."""
    r, plan, results = trainer.recipe, trainer.plan, trainer.results
    rows = [
        ("original", "the original model"),
        ("parallelized", "coalesced, before training"),
        ("recovered", "coalesced, after recovery (this model)"),
    ]
    table = [f"| {what} | {results[k]['ppl']:.3f} |" for k, what in rows if k in results]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cqil, depth-coalescing]",
        "---",
        "",
        f"# {Path(trainer.output_dir).name}",
        "",
        f"`{r.model.name_or_path}` made shallower by depth coalescing (`cqil.coalesce`): each group of "
        f"the plan `{plan}` is one standard decoder layer whose weights started as the mean of the group's "
        f"layers ({plan.num_layers} -> {plan.num_layers_after} layers), then recovered for "
        f"{results.get('steps', 0)} steps ({results.get('tokens_seen', 0):,} tokens) with only those layers "
        "trained. It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(folder)`.",
    ]
    if table:
        n = results.get("recovered", {}).get("tokens")
        lines += ["", f"Held-out perplexity ({n} tokens):", "", "| model | perplexity |", "|---|---|", *table]
    return "\n".join(lines) + "\n"


def _update_coalesced_card(trainer: RecoveryTrainer, report_dir: Path) -> None:
    """The coalesced model's card with the report's tables and plots (copied to ``model/plots/``)."""
    from cqil.evaluation.report import headline, results_markdown

    model_dir = trainer.output_dir / "model"
    report = json.loads((report_dir / "report.json").read_text())
    (model_dir / "plots").mkdir(exist_ok=True)
    for name in report.get("plots", []):
        shutil.copyfile(report_dir / name, model_dir / "plots" / name)
    lines = [_coalesced_card(trainer), "## Results", "", f"**{headline(report)}.**", ""]
    lines += results_markdown(report, plot_dir="plots/")
    write_atomic(model_dir / "README.md", "\n".join(lines))


def run(recipe: Recipe, *, source: str = "<recipe>", export_fn: Callable | None = None) -> int:
    """Run a whole recovery from ``recipe``; returns the process exit code (0, EXIT_PREEMPTED or EXIT_NONFINITE)."""
    trainer = RecoveryTrainer(recipe, source=source)
    try:
        trainer.setup()
        trainer.train()
        trainer.finish(export_fn)
        return 0
    except Preempted as e:
        trainer.log(f"cqil: {e}; exiting with code {EXIT_PREEMPTED}")
        return EXIT_PREEMPTED
    except NonFiniteLossError as e:
        trainer.log(f"cqil: {e}")
        return EXIT_NONFINITE
    finally:
        trainer.cleanup()

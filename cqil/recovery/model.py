"""The recovery model: the transformed student and the teacher's own layers, returning the losses.

The teacher is not a second model (docs/design.md, "The teacher without a second model"): it is the
same network with the original sequential layers in place of each group. :class:`RecoveryModel` runs
the layers before the first group once for both, then the student's effective layers with gradients
and the teacher's path (original layers inside groups, the shared modules elsewhere) under
``no_grad``, and returns the weighted losses. Under ZeRO-3 the teacher copy is a frozen part of the
engine's module: partitioned like every weight, gathered by DeepSpeed's hooks in forward, and never
given to the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from cqil._compat import adapters_disabled, causal_masks, rotary_embeddings
from cqil.recovery.lora import apply_lora
from cqil.recovery.losses import head_losses, hidden_loss, kd_loss, lm_loss, local_loss
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import trainable_parameters


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
    ``local`` weighs :func:`cqil.recovery.losses.local_loss`: every group run on the *original* model's
    state at its input and matched to the original layers' output there, so that each group trains
    on its own exact target, independently of the others. ``forward(..., local_only=True)`` computes
    that term alone, which needs no pass of the student beyond its groups: the teacher's path up to the
    last group (no gradient) and one forward and backward of each group.
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
        local: float = 0.0,
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
        self.weights = {"lm": float(lm), "kd": float(kd), "hidden": float(hidden), "local": float(local)}
        self.kd_temperature = float(kd_temperature)
        self.needs_teacher = kd > 0 or hidden > 0 or local > 0
        if self.needs_teacher and not teacher_layers:
            raise ValueError("kd / hidden / local losses need the teacher's copies of the grouped layers")
        missing = sorted({i for g in plan.groups for i in g} - set(teacher_layers or {}))
        if self.needs_teacher and missing:
            raise ValueError(f"the teacher has no copy of the grouped layers {missing}")
        # A local phase (train.local_steps) may precede a loss that reads no teacher, such as plain LM.
        self.has_teacher = bool(teacher_layers) and not missing
        self.teacher_layers = nn.ModuleDict({str(i): layer for i, layer in (teacher_layers or {}).items()})
        for p in self.teacher_layers.parameters():
            p.requires_grad_(False)
        self.effective = plan.effective_layers()
        positions = set(group_positions(plan))
        if not positions:
            raise ValueError(f"the plan {plan} has no group")
        self.is_group = [e in positions for e in range(len(self.effective))]
        self.group_positions = sorted(positions)
        self.first_group, self.last_group = self.group_positions[0], self.group_positions[-1]
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
    def forward(
        self, input_ids: torch.LongTensor, *, return_logits: bool = False, local_only: bool = False
    ) -> dict:
        inner = self.student.model
        layers = inner.layers
        embeds, masks, ctx = self._inputs(input_ids)
        # The layers before the first group are the same for student and teacher: run them once.
        prefix_grad = torch.is_grad_enabled() and any(
            p.requires_grad for e in range(self.first_group) for p in layers[e].parameters()
        )
        with torch.set_grad_enabled(prefix_grad and not local_only):
            shared = h = self._prefix(embeds, masks, ctx)
        if local_only:
            if not self.has_teacher:
                raise ValueError("the local loss needs the teacher's copies of the grouped layers")
            _, targets, inputs = self.teacher_forward(embeds, shared, masks, ctx, until_last_group=True)
            loss = self._local_term(inputs, targets, masks, ctx)
            return {"local": loss.detach(), "loss": loss}

        student_states = []
        for e in range(self.first_group, len(self.effective)):
            h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
            if self.is_group[e]:
                student_states.append(h)
        h = inner.norm(h)

        teacher_h = None
        teacher_states: list[torch.Tensor] = []
        teacher_inputs: list[torch.Tensor] = []
        if self.needs_teacher:
            teacher_h, teacher_states, teacher_inputs = self.teacher_forward(embeds, shared, masks, ctx)
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
        if w["local"]:
            term = self._local_term(teacher_inputs, teacher_states, masks, ctx)
            out["local"] = term.detach()
            loss = loss + w["local"] * term
        out["loss"] = loss
        if return_logits:
            if teacher_logits is None and teacher_h is not None:
                with torch.no_grad():
                    teacher_logits = self.student.lm_head(teacher_h)
            out["logits"], out["teacher_logits"] = logits, teacher_logits
        return out

    @torch.no_grad()
    def original_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The original model's logits (the shared prefix, then the teacher's path), for evaluation."""
        embeds, masks, ctx = self._inputs(input_ids)
        h, _, _ = self.teacher_forward(embeds, self._prefix(embeds, masks, ctx), masks, ctx)
        return self.student.lm_head(h)

    def _inputs(self, input_ids: torch.LongTensor):
        """The embeddings, attention masks by layer type and rotary context of a batch."""
        inner = self.student.model
        embeds = inner.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        ctx = {
            "position_embeddings": rotary_embeddings(inner, embeds, position_ids),
            "position_ids": position_ids,
        }
        return embeds, self._masks(embeds, position_ids), ctx

    def _prefix(self, h: torch.Tensor, masks, ctx) -> torch.Tensor:
        """The layers before the first group."""
        layers = self.student.model.layers
        for e in range(self.first_group):
            h = self._run(layers[e], h, masks[self._student_type(e)], ctx)
        return h

    def _local_term(self, inputs, targets, masks, ctx) -> torch.Tensor:
        """:func:`local_loss` of every group run on the original model's state at its input."""
        layers = self.student.model.layers
        outputs = [
            self._run(layers[e], x, masks[self._student_type(e)], ctx)
            for e, x in zip(self.group_positions, inputs, strict=True)
        ]
        return local_loss(outputs, targets, inputs)

    @torch.no_grad()
    def teacher_forward(self, embeds, shared, masks, ctx, *, until_last_group: bool = False):
        """The original model's path from the shared prefix on: (final normed hidden states, states at
        group outputs, states at group inputs). ``until_last_group`` stops after the last group (the
        local loss needs nothing later) and returns ``None`` for the final states."""
        layers = self.student.model.layers
        with adapters_disabled(self.student):
            h = shared.detach()
            if self.adapters_outside_groups:  # the prefix carries adapters: the teacher runs its own
                h = self._prefix(embeds.detach(), masks, ctx)
            states, inputs = [], []
            for e in range(self.first_group, len(self.effective)):
                if until_last_group and e > self.last_group:
                    return None, states, inputs
                if not self.is_group[e]:
                    # A plain layer the run trains (train.layers_after_groups) has a frozen copy here.
                    (i,) = self.effective[e]
                    layer = self.teacher_layers[str(i)] if str(i) in self.teacher_layers else layers[e]
                    h = self._run(layer, h, masks[self._student_type(e)], ctx)
                    continue
                inputs.append(h)
                for i in self.effective[e]:
                    h = self._run(self.teacher_layers[str(i)], h, masks[self._teacher_type(i)], ctx)
                states.append(h)
            return self.student.model.norm(h), states, inputs


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


def select_trainable(model: nn.Module, plan: GroupPlan, recipe) -> dict[str, nn.Parameter]:
    """requires_grad on the groups' parameters (or their LoRA adapters), the layers that
    ``train.layers_after_groups`` names, and nothing else.

    Parallel mode: the parallel groups and their learned gates. Coalesce mode: the coalesced
    layers at the groups' positions (a coalesced layer has no gates)."""
    train = recipe.train
    coalesced = recipe.parallelize.mode == "coalesce"
    for p in model.parameters():
        p.requires_grad_(False)
    positions = group_positions(plan)
    if train.lora is None:
        chosen = layer_parameters(model, positions) if coalesced else trainable_parameters(model)
    else:
        apply_lora(model, train.lora, target=train.lora.target, layers=positions)
        gates = set() if coalesced else {n for n in trainable_parameters(model) if n.endswith(".gates")}
        chosen = {n: p for n, p in model.named_parameters() if "lora_" in n or n in gates}
    after = set(plan.layers_after(train.layers_after_groups))  # ungrouped: one original layer each
    chosen |= layer_parameters(model, [e for e, idx in enumerate(plan.effective_layers()) if idx[0] in after])
    for p in chosen.values():
        p.requires_grad_(True)
    return {f"student.{n}": p for n, p in chosen.items()}

"""The recovery trainer: train only the merged layers and gates of a parallelized model.

One run, top to bottom (:func:`run`): load the model, keep a frozen copy of the original layers of
the grouped region (the teacher's only weights of its own, :mod:`cqil.recovery.model`), measure
held-out perplexity of the original, parallelize, measure again, train under accelerate (DDP or
DeepSpeed ZeRO), checkpoint and resume exactly (:mod:`cqil.recovery.checkpoint`), measure the
recovered model, and hand it to the export step (:mod:`cqil.recovery.finish`).
:meth:`RecoveryTrainer.setup` is a sequence of named steps, each a method of its own.

``parallelize.mode: coalesce`` swaps the transform and nothing else: the student is
:func:`cqil.coalesce` of the original (one standard layer of averaged weights per group, a shallower
model of the original architecture), its trainable parameters are exactly the coalesced layers at the
groups' positions, and the teacher, losses, data, evaluation and checkpoints are those of a parallel
run on the same plan, so the two runs compare like for like. The untrained coalesced model's
perplexity is stored under the key ``"parallelized"`` (the "before training" slot of every report;
``eval.json`` says ``"mode": "coalesce"``), and the export is a plain Hugging Face folder.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cqil._compat import unset_zero3_init
from cqil.errors import RecipeError
from cqil.recovery import checkpoint, preflight, run_lock, sharded
from cqil.recovery.auto_plan import search_run_plan
from cqil.recovery.checkpoint import NonFiniteWeightsError, Preempted, list_checkpoints, state_digest
from cqil.recovery.finish import finish_run, write_run_report
from cqil.recovery.measure import prepare_eval, run_lm_eval, run_perplexity
from cqil.recovery.model import RecoveryModel, select_trainable
from cqil.recovery.optim import configure_deepspeed, fill_deepspeed_auto, lr_lambda, make_optimizer
from cqil.recovery.progress import flatten, step_line
from cqil.recovery.recipe import Recipe, dump_recipe, recipe_to_dict
from cqil.recovery.stream import TokenStream
from cqil.recovery.threads import training_threads
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallelize

EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: a checkpoint was written; resubmit to continue (EX_TEMPFAIL)
EXIT_NONFINITE = 3  # the loss became NaN or infinite; the last good checkpoint is kept


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, losses: dict, last_good: Path | None = None) -> None:
        self.step = step
        kept = f"last good checkpoint {last_good}" if last_good else "no checkpoint was written"
        super().__init__(f"non-finite loss at step {step}: {losses}; stopped, {kept}")


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
        self.resuming = False
        self.resume_from: Path | None = None  # the newest intact checkpoint of this run
        self.resume_changes: dict = {}  # train.resume=reset_optimizer: dotted key -> [old, new]
        self.start_max_abs = 0.0
        self.trackers: list[str] = []
        self.sharded = False  # ZeRO-3 with partitioned loading (cqil.recovery.sharded)
        self.export_student: nn.Module | None = None  # sharded: the main process's whole copy

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        """Every step before training, in order; each is a method of its own."""
        # First: a preemption signal during the (long) model loading must not kill the run unsaved;
        # it is acted on after the first step, which checkpoints and exits with EXIT_PREEMPTED.
        self._install_signal_handlers()
        self._setup_accelerator()
        self._setup_checks()  # before any weights load or anything in output_dir is written
        self._setup_run_folder()
        model = self._setup_model()
        self._setup_plan(model)
        self._setup_eval()
        self._evaluate_before(model, "original")
        model = self._setup_teacher_and_student(model)
        self._setup_optimizer()
        if self.sharded and not self.resuming:  # deferred: only the engine runs partitioned weights
            sharded.evaluate_before(self)
        self._setup_data()
        self._setup_output_dir()
        if self.resume_from is not None:
            self.resume(self.resume_from, reset_optimizer=bool(self.resume_changes))

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        train = self.recipe.train
        # On CPU, DeepSpeed needs gloo named explicitly (else it asserts on train_batch_size);
        # a single process has no process group to configure.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        handlers = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
        self.trackers = list(train.trackers)
        self.accelerator = acc = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.grad_accum_steps,
            log_with=self.trackers or None,
            project_dir=str(self.output_dir / "logs"),
            kwargs_handlers=handlers,
        )
        set_seed(train.seed)
        threads = ""
        if acc.device.type == "cpu":
            torch.set_num_threads(training_threads(train.cpu_threads))
            threads = f", {torch.get_num_threads()} CPU thread(s) each"
        self.log(
            f"cqil: {acc.num_processes} process(es){threads}, {acc.distributed_type}, output {self.output_dir}"
        )

    def _setup_checks(self) -> None:
        """Bad input fails here, in one line (:func:`cqil.recovery.preflight.check_run`); then the main
        process claims output_dir for the whole run, or refuses a live run's (:mod:`cqil.recovery.run_lock`)."""
        self.claim, _ = run_lock.claim_checked(
            self.output_dir, self.accelerator, lambda: preflight.check_run(self), log=self.log
        )
        self.accelerator.wait_for_everyone()  # all ranks have read output_dir before the marker is written

    def _setup_run_folder(self) -> None:
        """The marker first (a new run), the history of a changed recipe, stale temporaries removed."""
        preflight.claim_run_folder(self)

    def _setup_model(self) -> nn.Module:
        model, self.tokenizer = self._load_model()
        return model

    def _setup_plan(self, model: nn.Module) -> None:
        groups = self.recipe.parallelize.groups
        if groups == "auto":
            groups = search_run_plan(self, model)
        try:
            self.plan = GroupPlan.parse(groups, model.config.num_hidden_layers)
        except ValueError as e:
            raise RecipeError(self.source, "parallelize.groups", str(e)) from None
        if not self.plan.groups or self.plan.is_identity():
            raise RecipeError(
                self.source, "parallelize.groups", "the plan has no group of two or more layers"
            )

    def _setup_eval(self) -> None:
        """The held-out sequences, and the lm-eval tasks checked (:func:`cqil.recovery.measure.prepare_eval`)."""
        prepare_eval(self)

    def _evaluate_before(self, model: nn.Module, stage: str) -> None:
        """Perplexity (and lm-eval) of the original or the transformed model, on a run's first attempt."""
        settings = self.recipe.eval
        if not settings.before or self.resuming or self.sharded:
            return
        # One key for "before training" in both modes, so their reports line up.
        self.results[stage] = run_perplexity(
            self, model, "original" if stage == "original" else self.before_label
        )
        run_lm_eval(self, model, stage)
        if stage == "original" and settings.report:
            from cqil.selection.similarity import layer_input_similarity

            sim = layer_input_similarity(model, self.eval_tokens[:8], progress=False)
            self.results["similarity"] = [[round(x, 5) for x in row] for row in sim["matrix"].tolist()]

    def _setup_teacher_and_student(self, model: nn.Module) -> nn.Module:
        """The teacher's own weights (the grouped region's original layers, copied before the
        transform), the transformed student, what trains, and the :class:`RecoveryModel` of both."""
        train, par = self.recipe.train, self.recipe.parallelize
        loss = train.loss
        teacher = None
        if par.mode == "coalesce":
            from cqil.rewrite.coalescing import coalesce

            student = coalesce(model, self.plan)
            if self.needs_teacher:
                # coalesce copies every weight it keeps and leaves `model` as it was: the original
                # layers themselves are the teacher's copy; the rest of `model` is dropped here.
                teacher = {i: model.model.layers[i] for g in self.plan.groups for i in g}
            model = student
        else:
            surgery = parallelize
            if self.sharded:  # one layer or group of whole weights at a time
                config = sharded.ds_config(self)
                surgery = functools.partial(sharded.parallelize_partitioned, config=config)
                teacher = sharded.teacher_copies(model, self.plan, config) if self.needs_teacher else None
            elif self.needs_teacher:
                teacher = {i: copy.deepcopy(model.model.layers[i]) for g in self.plan.groups for i in g}
            surgery(
                model,
                self.plan,
                bypass=par.bypass,
                bypass_distance=par.bypass_distance,
                gates=par.gates,
                gate_shape=par.gate_shape,
                form=par.form,
            )
        self._evaluate_before(model, "parallelized")

        self.trainable = self._select_trainable(model)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = RecoveryModel(
            model,
            teacher,
            plan=self.plan,
            lm=loss.lm,
            kd=loss.kd,
            kd_temperature=loss.kd_temperature,
            hidden=loss.hidden,
            local=loss.local,
        )
        self.model.adapters_outside_groups = train.lora is not None and train.lora.target == "all"
        self.model.train()
        self.frozen_digest = self._digest_frozen()
        self.start_max_abs = checkpoint.max_abs(
            self.trainable.values()
        )  # the scale "exploded" is measured by
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable.values())
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        self.log(
            f"cqil: plan {self.plan} ({len(self.plan.groups)} groups, {par.mode}); "
            f"training {n_train:,} of {n_all:,} weights"
        )
        return model

    def _setup_optimizer(self) -> None:
        self.optimizer = make_optimizer(self)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.recipe))
        configure_deepspeed(self)
        self.engine, self.prepared_optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def _setup_data(self) -> None:
        recipe, acc = self.recipe, self.accelerator
        data = recipe.data
        self.stream = TokenStream(
            self.tokenizer,
            data.train,
            seq_len=recipe.train.seq_len,
            rank=acc.process_index,
            world_size=acc.num_processes,
            mixture=data.mixture,
            seed=recipe.train.seed,
            split=None if data.eval else "train",
            heldout_fraction=data.eval_fraction,
            source_field=data.source_field,
            text_field=data.text_field,
            hub_split=data.hub_split,
        )

    def _setup_output_dir(self) -> None:
        """recipe.yaml and the "before training" results (reused by a resumed run), trackers."""
        acc = self.accelerator
        if self.trackers:
            acc.init_trackers("cqil", config=flatten(recipe_to_dict(self.recipe)))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(dump_recipe(self.recipe))
        before = self.output_dir / "eval_before.json"
        if self.resuming and before.is_file():  # measured by the first attempt of this run
            self.results |= json.loads(before.read_text())
        elif acc.is_main_process and self.results:
            before.write_text(json.dumps(self.results, indent=1))

    def _load_model(self):
        from cqil.pretrained import load_model

        m = self.recipe.model
        plugin = self.accelerator.state.deepspeed_plugin
        fill_deepspeed_auto(self)
        whole_because = sharded.whole_model_reason(self)
        self.sharded = whole_because is None
        if self.sharded:
            return sharded.load(self)
        if plugin is not None and plugin.zero_stage == 3:
            self.log(f"cqil: ZeRO-3 with the whole model loaded on every rank: {whole_because}")
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
    def needs_teacher(self) -> bool:
        """Whether any loss of the run reads the original model (every one but plain LM)."""
        loss = self.recipe.train.loss
        return bool(loss.kd or loss.hidden or loss.local or self.recipe.train.local_steps)

    @property
    def before_label(self) -> str:
        """What the "parallelized" (before training) entry of the results measured."""
        return "coalesced" if self.recipe.parallelize.mode == "coalesce" else "parallelized"

    def _select_trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return select_trainable(model, self.plan, self.recipe)

    def _frozen_state(self) -> dict[str, torch.Tensor]:
        trainable = {id(p) for p in self.trainable.values()}
        return {n: p for n, p in self.model.named_parameters() if id(p) not in trainable}

    def _digest_frozen(self) -> str:
        """The digest of every frozen weight; partitioned ones (ZeRO-3) gathered one at a time."""
        frozen = self._frozen_state()
        partitioned = any(hasattr(p, "ds_id") for p in frozen.values())
        return (sharded.gathered_digest if partitioned else state_digest)(frozen)

    @property
    def is_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    # -------------------------------------------------------------- train
    def train(self) -> None:
        train, acc = self.recipe.train, self.accelerator
        device = acc.device
        tokens_per_step = train.seq_len * train.micro_batch_size * train.grad_accum_steps * acc.num_processes
        bar = None
        if acc.is_main_process and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=train.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        start, start_step = time.time(), self.step
        window_time, window_tokens = time.time(), 0
        metrics = None
        if acc.is_main_process:
            (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
            checkpoint.trim_metrics(self.output_dir / "logs" / "metrics.jsonl", self.step)
            # Closed by cleanup(), whichever way the loop ends; flushed after every line.
            metrics = self._metrics = open(self.output_dir / "logs" / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        while self.step < train.max_steps:
            step_losses: dict[str, torch.Tensor] = {}
            for _ in range(train.grad_accum_steps):
                batch = self.stream.next_batch(train.micro_batch_size).to(device)
                with acc.accumulate(self.engine):
                    out = self.engine(batch, local_only=self.step < train.local_steps)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and train.max_grad_norm > 0 and not self.is_deepspeed:
                        acc.clip_grad_norm_(list(self.trainable.values()), train.max_grad_norm)
                    self.prepared_optimizer.step()
                    self.prepared_optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / train.grad_accum_steps
            self.scheduler.step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step

            names = sorted(step_losses)
            reduced = acc.reduce(torch.stack([step_losses[k] for k in names]), reduction="mean")
            values = dict(zip(names, reduced.tolist(), strict=True))
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(self.step, values, (list_checkpoints(self.output_dir) or [None])[-1])
            for k, v in values.items():  # a key may be missing from part of a window (local_steps)
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if metrics is not None:  # every step, for the report's loss curves
                lr = self.scheduler.get_last_lr()[0]
                metrics.write(
                    json.dumps({"step": self.step, **values, "lr": lr, "tokens": self.tokens_seen}) + "\n"
                )
                metrics.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")

            if self.step % train.log_every_steps == 0 or self.step == train.max_steps:
                means = {k: s / counts[k] for k, s in sums.items()}
                sums, counts = {}, {}
                now = time.time()
                tok_s = window_tokens / max(now - window_time, 1e-9)
                window_time, window_tokens = now, 0
                elapsed = now - start
                eta = elapsed / max(self.step - start_step, 1) * (train.max_steps - self.step)
                lr = self.scheduler.get_last_lr()[0]
                self.log(step_line(self.step, train.max_steps, means, lr, tok_s, elapsed, eta), bar=bar)
                acc.log(
                    {f"train/{k}": v for k, v in means.items()} | {"train/lr": lr, "train/tok_s": tok_s},
                    step=self.step,
                )

            if (
                train.save_every_steps
                and self.step % train.save_every_steps == 0
                and self.step < train.max_steps
            ):
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
        return checkpoint.checkpoint_name(self.step if step is None else step)

    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/step-NNNNNN/`` (:func:`checkpoint.save_checkpoint`)."""
        return checkpoint.save_checkpoint(self)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous().clone() for n, p in self.trainable.items()}

    def resume(self, path: Path, *, reset_optimizer: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues bit-exactly."""
        checkpoint.resume(self, path, reset_optimizer=reset_optimizer)
        if reset_optimizer:
            self.results["resume"] = {
                "resume": "reset_optimizer",
                "step": self.step,
                "changed": self.resume_changes,
            }

    # -------------------------------------------------------------- end of run
    def finish(self, export_fn: Callable | None = None) -> dict:
        """Check the frozen weights, evaluate the recovered model and export it. Returns the results."""
        return finish_run(self, export_fn)

    def write_report(self) -> Path:
        """lm-eval and latency on the export in ``output_dir/model``, then ``output_dir/report/``."""
        return write_run_report(self)

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
        if getattr(self, "claim", None) is not None:  # last: output_dir is this run's to its very end
            self.claim.release()

    # -------------------------------------------------------------- logging
    def log(self, line: str, bar=None) -> None:
        """One line on the main process (through tqdm when a bar is showing)."""
        if hasattr(self, "accelerator") and not self.accelerator.is_main_process:
            return
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


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
    except (NonFiniteLossError, NonFiniteWeightsError) as e:
        trainer.log(f"cqil: {e}")
        return EXIT_NONFINITE
    finally:
        trainer.cleanup()

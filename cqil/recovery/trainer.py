"""The recovery trainer: train the merged layers and gates of a parallelized model (and, with
``train.layers_after_groups``, the layers right after them). One run, top to bottom (:func:`run`):
load the model, keep a frozen copy of the original layers the run changes (the teacher's only weights
of its own, :mod:`cqil.recovery.model`), measure held-out perplexity of the original, parallelize,
measure again, train under accelerate (DDP or DeepSpeed ZeRO), checkpoint and resume exactly
(:mod:`cqil.recovery.checkpoint`), measure the recovered model, and hand it to the export step
(:mod:`cqil.recovery.finish`).
:meth:`RecoveryTrainer.setup` is a sequence of named steps, each a method of its own. The trainer
composes the run's parts (preflight, measure, auto_plan, sharded, optim, checkpoint, finish): each
takes what it uses (the model, the accelerator, paths, a recipe section, a log) and returns what it
produced; none imports this module.

``parallelize.mode: coalesce`` swaps the transform and nothing else: the student is :func:`cqil.coalesce`
of the original (a shallower model of the original architecture), its trainable parameters are the
coalesced layers at the groups' positions, and the teacher, losses, data, evaluation and checkpoints
are those of a parallel run on the same plan, so the two runs compare like for like. The untrained
coalesced model's perplexity is stored under the key ``"parallelized"`` (the "before training" slot of
every report; ``eval.json`` says ``"mode": "coalesce"``); the export is a plain Hugging Face folder.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from cqil.errors import RecipeError
from cqil.recovery import checkpoint, measure, preflight, progress, run_lock, sharded, student
from cqil.recovery.auto_plan import search_run_plan
from cqil.recovery.checkpoint import (
    NonFiniteWeightsError,
    Preempted,
    TrainingState,
    frozen_weights,
    list_checkpoints,
    weights_digest,
)
from cqil.recovery.finish import ExportFn, finish_run, stop_if_signalled, write_run_report
from cqil.recovery.measure import before_label, prepare_eval, run_lm_eval, run_perplexity
from cqil.recovery.model import RecoveryModel, select_trainable
from cqil.recovery.optim import configure_deepspeed, fill_deepspeed_auto, make_optimizer, make_scheduler
from cqil.recovery.preemption import StopSignals
from cqil.recovery.progress import flatten
from cqil.recovery.recipe import Recipe, dump_recipe, recipe_to_dict
from cqil.recovery.state import RunState
from cqil.recovery.stream import TokenStream
from cqil.recovery.threads import training_threads
from cqil.rewrite.plan import GroupPlan

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
        self.state = RunState()  # step, tokens seen, the trainable weights' scale at the start
        self.results: dict = {}
        self.signals = StopSignals()  # SIGTERM / SIGUSR1: checkpoint and exit with EXIT_PREEMPTED
        self.plan_search: dict | None = None  # groups: auto: where the plan search's report is
        self._progress: progress.TrainingProgress | None = None  # open while training
        self.resuming = False
        self.reused_before: dict | None = None
        self.resume_from: Path | None = None  # the newest intact checkpoint of this run
        self.resume_changes: dict = {}  # train.resume=reset_optimizer: dotted key -> [old, new]
        self.trackers: list[str] = []
        self.sharded = False  # ZeRO-3 with partitioned loading (cqil.recovery.sharded)

    # -------------------------------------------------------------- setup
    def setup(self) -> None:
        """Every step before training, in order; each is a method of its own."""
        # First: a preemption signal during the (long) model loading must not kill the run unsaved;
        # it is acted on after the first step, which checkpoints and exits with EXIT_PREEMPTED.
        self.signals.install()
        self._setup_accelerator()
        self._setup_checks()  # before any weights load or anything in output_dir is written
        self._setup_run_folder()
        model = self._setup_model()
        self._setup_plan(model)
        self._setup_eval()
        self._evaluate_before(model, "original")
        model = self._setup_teacher_and_student(model)
        self._setup_optimizer()
        if self.sharded and self.reused_before is None:  # deferred: the engine runs partitioned weights
            mode = self.recipe.parallelize.mode
            self.results |= sharded.evaluate_before(
                self.model, self.heldout, self.recipe.eval, mode=mode, log=self.log
            )
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
        self.claim, self.checked = run_lock.claim_checked(
            self.output_dir,
            self.accelerator,
            lambda: preflight.check_run(
                self.recipe, self.source, self.output_dir, self.accelerator, self.log
            ),
            log=self.log,
        )
        self.model_config, self.fingerprint = self.checked.model_config, self.checked.fingerprint
        self.resume_from, self.resume_changes = self.checked.resume_from, self.checked.resume_changes
        self.resuming = self.checked.resuming
        self.accelerator.wait_for_everyone()  # all ranks have read output_dir before the marker is written

    def _setup_run_folder(self) -> None:
        """The marker first (a new run), the history of a changed recipe, stale temporaries removed."""
        preflight.claim_run_folder(self.output_dir, self.checked, self.accelerator, self.log)

    def _setup_model(self) -> nn.Module:
        model, self.tokenizer = self._load_model()
        return model

    def _setup_plan(self, model: nn.Module) -> None:
        groups = self.recipe.parallelize.groups
        if groups == "auto":
            groups, self.plan_search = search_run_plan(
                model,
                self.tokenizer,
                self.recipe,
                source=self.source,
                output_dir=self.output_dir,
                processes=self.accelerator,
                device=self.accelerator.device,
                log=self.log,
            )
        try:
            self.plan = GroupPlan.parse(groups, model.config.num_hidden_layers)
        except ValueError as e:
            raise RecipeError(self.source, "parallelize.groups", str(e)) from None
        preflight.check_plan(self.plan, self.recipe, self.source)  # a searched plan is checked only here

    def _setup_eval(self) -> None:
        """The held-out sequences, and the lm-eval tasks checked (:func:`cqil.recovery.measure.prepare_eval`)."""
        self.heldout = prepare_eval(self.recipe, self.source, self.tokenizer)
        # None: measured now (the models are still untrained), as when the first attempt's do not match.
        self.reused_before = (
            measure.read_before(self.output_dir, self.recipe, self.log) if self.resuming else None
        )

    @property
    def eval_tokens(self) -> torch.Tensor:
        return self.heldout.tokens

    def _evaluate_before(self, model: nn.Module, stage: str) -> None:
        """Perplexity (and lm-eval) of the original or the transformed model, unless reused (a resume)."""
        settings = self.recipe.eval
        if not settings.before or self.reused_before is not None or self.sharded:
            return
        # One key for "before training" in both modes, so their reports line up.
        label = "original" if stage == "original" else before_label(self.recipe.parallelize.mode)
        self.results[stage] = run_perplexity(
            model, self.heldout, batch_size=settings.batch_size, label=label, log=self.log
        )
        if self.accelerator.is_main_process:  # lm-eval runs on the main process; the others go on
            tasks = run_lm_eval(
                model,
                self.tokenizer,
                settings,
                task_manager=self.heldout.task_manager,
                stage=stage,
                log=self.log,
            )
            if tasks is not None:
                self.results.setdefault("lm_eval", {})[stage] = tasks
        if stage == "original" and settings.report:
            from cqil.selection.similarity import layer_input_similarity

            sim = layer_input_similarity(model, self.heldout.tokens[:8], progress=False)
            self.results["similarity"] = [[round(x, 5) for x in row] for row in sim["matrix"].tolist()]

    def _setup_teacher_and_student(self, model: nn.Module) -> nn.Module:
        """The teacher's own weights (the grouped region's original layers, copied before the
        transform), the transformed student, what trains, and the :class:`RecoveryModel` of both."""
        train, par = self.recipe.train, self.recipe.parallelize
        loss = train.loss
        keep, after = student.needs_teacher(train), self.plan.layers_after(train.layers_after_groups)
        model, teacher = student.transform(
            model, self.plan, par, keep_teacher=keep, partitioned=self.sharded, trained_after=after
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
        self.frozen_digest = weights_digest(self._frozen_state())
        self.state.start_max_abs = checkpoint.max_abs(self.trainable.values())
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable.values())
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        self.log(
            f"cqil: plan {self.plan} ({len(self.plan.groups)} groups, {par.mode}); "
            f"training {n_train:,} of {n_all:,} weights"
        )
        return model

    def _setup_optimizer(self) -> None:
        train, plugin = self.recipe.train, self.accelerator.state.deepspeed_plugin
        self.optimizer = make_optimizer(self.trainable, train, plugin.deepspeed_config if plugin else None)
        self.scheduler = make_scheduler(self.optimizer, train)
        configure_deepspeed(plugin, train, self.accelerator.num_processes, self.model.student)
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
            repeat_share=data.repeat_share,
        )

    def _setup_output_dir(self) -> None:
        """recipe.yaml and the "before training" results (reused by a resumed run), trackers."""
        acc = self.accelerator
        if self.trackers:
            acc.init_trackers("cqil", config=flatten(recipe_to_dict(self.recipe)))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(dump_recipe(self.recipe))
        if self.reused_before is not None:  # measured by the first attempt of this run
            self.results |= self.reused_before
        elif acc.is_main_process and self.results:
            measure.write_before(self.output_dir, self.results, self.recipe)

    def _load_model(self):
        m, plugin = self.recipe.model, self.accelerator.state.deepspeed_plugin
        fill_deepspeed_auto(plugin, self.model_config, self.log)
        whole_because = sharded.whole_model_reason(plugin, self.recipe)
        self.sharded = whole_because is None
        n = self.accelerator.num_processes
        return student.load(m, plugin, whole_because=whole_because, num_processes=n, log=self.log)

    def _select_trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return select_trainable(model, self.plan, self.recipe)

    def _frozen_state(self) -> dict[str, torch.Tensor]:
        return frozen_weights(self.model, self.trainable)

    @property
    def is_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    # -------------------------------------------------------------- train
    def train(self) -> None:
        train, acc, state = self.recipe.train, self.accelerator, self.state
        device = acc.device
        tokens_per_step = train.seq_len * train.micro_batch_size * train.grad_accum_steps * acc.num_processes
        metrics = self.output_dir / "logs" / "metrics.jsonl"
        if acc.is_main_process:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.trim_metrics(metrics, state.step)
        # Closed at the end of the loop, or by cleanup() when the loop raises.
        self._progress = report = progress.TrainingProgress(
            max_steps=train.max_steps,
            start_step=state.step,
            log_every_steps=train.log_every_steps,
            log=self.log,
            metrics_path=metrics if acc.is_main_process else None,
            bar=acc.is_main_process and sys.stderr.isatty(),
        )
        while state.step < train.max_steps:
            step_losses: dict[str, torch.Tensor] = {}
            for _ in range(train.grad_accum_steps):
                batch = self.stream.next_batch(train.micro_batch_size).to(device)
                with acc.accumulate(self.engine):
                    out = self.engine(batch, local_only=state.step < train.local_steps)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and train.max_grad_norm > 0 and not self.is_deepspeed:
                        acc.clip_grad_norm_(list(self.trainable.values()), train.max_grad_norm)
                    self.prepared_optimizer.step()
                    self.prepared_optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / train.grad_accum_steps
            self.scheduler.step()
            state.step += 1
            state.tokens_seen += tokens_per_step

            names = sorted(step_losses)
            reduced = acc.reduce(torch.stack([step_losses[k] for k in names]), reduction="mean")
            values = dict(zip(names, reduced.tolist(), strict=True))
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(
                    state.step, values, (list_checkpoints(self.output_dir) or [None])[-1]
                )
            lr = self.scheduler.get_last_lr()[0]
            window = report.step(
                state.step, values, lr=lr, tokens=tokens_per_step, tokens_seen=state.tokens_seen
            )
            if window is not None:
                acc.log(window, step=state.step)

            if (
                train.save_every_steps
                and state.step % train.save_every_steps == 0
                and state.step < train.max_steps
            ):
                self.save_checkpoint()
            if self.signals.agreed(lambda flag: acc.reduce(flag, reduction="sum"), acc.device):
                self.save_checkpoint()
                raise Preempted(f"signal {self.signals.received}: checkpoint written at step {state.step}")
        report.close()
        if (
            not list_checkpoints(self.output_dir)
            or list_checkpoints(self.output_dir)[-1].name != self._ckpt_name()
        ):
            self.save_checkpoint()

    # -------------------------------------------------------------- checkpoints
    def _ckpt_name(self, step: int | None = None) -> str:
        return checkpoint.checkpoint_name(self.state.step if step is None else step)

    def _training_state(self) -> TrainingState:
        engine = self.engine if self.is_deepspeed else None  # DeepSpeed saves and loads its own state
        return TrainingState(self.trainable, self.optimizer, self.scheduler, self.stream, engine)

    def save_checkpoint(self) -> Path:
        """Write the full training state to ``checkpoints/step-NNNNNN/`` (:func:`checkpoint.save_checkpoint`)."""
        return checkpoint.save_checkpoint(
            self.output_dir,
            self._training_state(),
            self.state,
            self.accelerator,
            fingerprint=self.fingerprint,
            keep=self.recipe.train.keep_checkpoints,
            log=self.log,
        )

    def resume(self, path: Path, *, reset_optimizer: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues bit-exactly."""
        self.state = checkpoint.resume(
            path,
            self._training_state(),
            self.state,
            self.accelerator,
            reset_optimizer=reset_optimizer,
            log=self.log,
        )
        if reset_optimizer:
            self.results["resume"] = {
                "resume": "reset_optimizer",
                "step": self.state.step,
                "changed": self.resume_changes,
            }

    # -------------------------------------------------------------- end of run
    def finish(self, export_fn: ExportFn | None = None) -> dict:
        """Check the frozen weights, evaluate the recovered model and export it
        (:func:`cqil.recovery.finish.finish_run`), then the report. Returns the results."""
        acc, plugin = self.accelerator, self.accelerator.state.deepspeed_plugin
        self.results = finish_run(
            self.model,
            self.trainable,
            acc,
            recipe=self.recipe,
            output_dir=self.output_dir,
            plan=self.plan,
            tokenizer=self.tokenizer,
            heldout=self.heldout,
            results=self.results,
            run=self.state,
            frozen_digest=self.frozen_digest,
            sharded_load=self.sharded,
            gather_whole=plugin is not None and plugin.zero_stage == 3 and not self.sharded,
            stop_signal=lambda: self.signals.received,
            log=self.log,
            plan_search=self.plan_search,
            export_fn=export_fn,
        )
        if self.recipe.eval.report and acc.is_main_process:
            # The rest measures the exported model as users load it, on the main process alone: the
            # other processes are done and exit (no collective follows, so a long lm-eval run cannot
            # time one out). The optimizer state goes first, to make room for the two models.
            self.engine = self.prepared_optimizer = self.optimizer = None
            acc.free_memory()
            stop_if_signalled(self.signals.received, "the export", self.state.step)
            self.write_report()
        return self.results

    def write_report(self) -> Path:
        """lm-eval and latency on the export in ``output_dir/model``, then ``output_dir/report/``."""
        out, tasks = write_run_report(
            self.output_dir,
            recipe=self.recipe,
            plan=self.plan,
            results=self.results,
            tokenizer=self.tokenizer,
            task_manager=self.heldout.task_manager,
            device=self.accelerator.device,
            log=self.log,
            plan_search=self.plan_search,
        )
        if tasks is not None:
            self.results.setdefault("lm_eval", {})["recovered"] = tasks
        return out

    def cleanup(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.signals.restore()
        if hasattr(self, "accelerator"):
            # Without this, about one multi-process run in six aborts at exit.
            self.accelerator.end_training()
        if getattr(self, "claim", None) is not None:  # last: output_dir is this run's to its very end
            self.claim.release()

    # -------------------------------------------------------------- logging
    def log(self, line: str, bar=None) -> None:
        """One line on the main process (:func:`cqil.recovery.progress.log`); every part logs through it."""
        main = not hasattr(self, "accelerator") or self.accelerator.is_main_process
        progress.log(line, main=main, bar=bar)


def run(recipe: Recipe, *, source: str = "<recipe>", export_fn: ExportFn | None = None) -> int:
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
    except KeyboardInterrupt:  # also how the claim's heartbeat stops a run whose folder was taken over
        run_lock.raise_if_lost(getattr(trainer, "claim", None))
        raise
    finally:
        trainer.cleanup()

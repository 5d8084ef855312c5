"""Each part of the recovery trainer on its own: built from what it takes (a tiny module or model, a
recipe section, paths, a log), never from a RecoveryTrainer. One process, CPU, seconds."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from cqil.errors import ModelNotFoundError, OutputDirError, RecipeError
from cqil.recovery import auto_plan, checkpoint, finish, measure, optim, preflight, progress, sharded, student
from cqil.recovery.checkpoint import NonFiniteWeightsError, Preempted, TrainingState
from cqil.recovery.model import RecoveryModel
from cqil.recovery.preemption import StopSignals
from cqil.recovery.recipe import recipe_from_dict
from cqil.recovery.state import RunState
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import trainable_parameters
from cqil.testing import make_model, make_tokenizer, write_corpus


@dataclass
class OneProcess:
    """A run of one process, as the parts see one (accelerate's Accelerator is another)."""

    is_main_process: bool = True
    process_index: int = 0
    num_processes: int = 1
    device: torch.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


class Lines(list):
    """A log that keeps its lines."""

    def __call__(self, line: str) -> None:
        self.append(line)


class Stream:
    """A data stream's position, as a checkpoint saves and restores it."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def recipe(tmp_path: Path, **sections):
    base = {
        "model": {"name_or_path": str(tmp_path / "model")},
        "parallelize": {"groups": "2-6:2"},
        "train": {"max_steps": 10, "seq_len": 16, "warmup_steps": 2, "lr": 1e-2, "trackers": []},
        "data": {"train": str(tmp_path / "train.jsonl.gz"), "eval_fraction": 0.2},
        "eval": {"num_sequences": 4, "batch_size": 2, "latency": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    return recipe_from_dict(base)


@pytest.fixture
def tiny(tmp_path):
    """A tiny model folder and corpus on disk: what a recipe names."""
    make_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    write_corpus(tmp_path / "train.jsonl.gz")
    return tmp_path


# ------------------------------------------------------------------------------------ checkpoint
def training_state(tmp_path: Path, seed: int = 0) -> TrainingState:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    trainable = dict(module.named_parameters())
    train = recipe(tmp_path).train
    optimizer = optim.make_optimizer(trainable, train)
    return TrainingState(trainable, optimizer, optim.make_scheduler(optimizer, train), Stream())


def take_steps(training: TrainingState, n: int) -> None:
    for _ in range(n):
        loss = sum((p**2).sum() for p in training.trainable.values())
        loss.backward()
        training.optimizer.step()
        training.optimizer.zero_grad()
        training.scheduler.step()
        training.stream.position += 1


def test_checkpoint_resume_is_bit_identical(tmp_path):
    log = Lines()
    a = training_state(tmp_path)
    take_steps(a, 3)
    path = checkpoint.save_checkpoint(
        tmp_path, a, RunState(3, 30, 1.5), OneProcess(), fingerprint={"k": 1}, keep=2, log=log
    )
    assert path.name == "step-000003" and checkpoint.damage(path) is None
    assert log == [f"cqil: checkpoint {path}"]
    draws_after_save = torch.rand(3)
    take_steps(a, 2)

    b = training_state(tmp_path, seed=1)  # other weights, a fresh optimizer and stream
    run = checkpoint.resume(path, b, RunState(), OneProcess(), log=log)
    assert run == RunState(3, 30, 1.5)
    assert torch.equal(torch.rand(3), draws_after_save)  # the RNG as it was when saved
    assert b.stream.position == 3 and b.scheduler.last_epoch == 3
    take_steps(b, 2)
    for name, param in a.trainable.items():
        assert torch.equal(param, b.trainable[name]), name
    assert checkpoint.state_digest(a.trainable) == checkpoint.state_digest(b.trainable)


def test_checkpoint_reset_optimizer_keeps_the_weights_and_moves_the_schedule(tmp_path):
    a = training_state(tmp_path)
    take_steps(a, 4)
    path = checkpoint.save_checkpoint(
        tmp_path, a, RunState(4), OneProcess(), fingerprint={}, keep=2, log=Lines()
    )
    b = training_state(tmp_path, seed=1)
    checkpoint.resume(path, b, RunState(), OneProcess(), reset_optimizer=True, log=Lines())
    assert checkpoint.state_digest(a.trainable) == checkpoint.state_digest(b.trainable)
    assert not b.optimizer.state  # fresh
    factor = optim.lr_lambda(recipe(tmp_path).train)(4)
    assert b.scheduler.get_last_lr() == pytest.approx([1e-2 * factor] * 2)


def test_checkpoint_falls_back_to_the_newest_intact_one_and_keeps_the_newest(tmp_path):
    training = training_state(tmp_path)
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(
            tmp_path, training, RunState(step), OneProcess(), fingerprint={}, keep=2, log=Lines()
        )
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    (tmp_path / "checkpoints" / "step-000006" / "scheduler.pt").write_bytes(b"torn")
    log = Lines()
    assert checkpoint.latest_intact(tmp_path, OneProcess(), log).name == "step-000004"
    assert "step-000006 is damaged (scheduler.pt does not match its checksum)" in log[0]
    (tmp_path / "checkpoints" / "step-000004" / "checksums.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="all 2 are damaged"):
        checkpoint.latest_intact(tmp_path, OneProcess(), Lines())


def test_checkpoint_refuses_exploded_weights(tmp_path):
    training = training_state(tmp_path)
    checkpoint.save_checkpoint(
        tmp_path, training, RunState(2), OneProcess(), fingerprint={}, keep=2, log=Lines()
    )
    with torch.no_grad():
        next(iter(training.trainable.values()))[0, 0] = 5e3
    with pytest.raises(NonFiniteWeightsError, match=r"exploded .* at step 3; .*step-000002"):
        checkpoint.save_checkpoint(
            tmp_path,
            training,
            RunState(3, start_max_abs=1.0),
            OneProcess(),
            fingerprint={},
            keep=2,
            log=Lines(),
        )
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000002"]


def test_frozen_weights_are_the_rest_of_the_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    trainable = {"1.weight": model[1].weight}
    assert set(checkpoint.frozen_weights(model, trainable)) == {"0.weight", "0.bias", "1.bias"}
    assert checkpoint.weights_digest(trainable) == checkpoint.state_digest(trainable)


# ------------------------------------------------------------------------------------ optim
def test_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    train = recipe(tmp_path, train={"min_lr_ratio": 0.1}).train
    factor = optim.lr_lambda(train)
    assert [factor(0), factor(1)] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.1)
    assert optim.lr_lambda(recipe(tmp_path, train={"schedule": "constant"}).train)(9) == 1.0


def test_optimizer_decays_matrices_but_never_gates(tmp_path):
    model = make_model("llama")
    from cqil.rewrite.surgery import parallelize

    parallelize(model, [[2, 3]], gates="learned")
    trainable = trainable_parameters(model)
    train = recipe(tmp_path, train={"weight_decay": 0.1}).train
    opt = optim.make_optimizer(trainable, train)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    gates = {id(p) for n, p in trainable.items() if n.endswith(".gates")}
    assert gates and gates <= {id(p) for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(trainable)


def test_deepspeed_batch_settings_come_from_the_train_section(tmp_path):
    @dataclass
    class Plugin:
        deepspeed_config: dict
        zero_stage: int = 2

    train = recipe(tmp_path, train={"micro_batch_size": 2, "grad_accum_steps": 3}).train
    optim.configure_deepspeed(None, train, 4, nn.Linear(1, 1))  # no DeepSpeed: nothing to do
    plugin = Plugin({})
    optim.configure_deepspeed(plugin, train, 4, nn.Linear(1, 1))
    assert plugin.deepspeed_config["train_batch_size"] == 24
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    log = Lines()
    optim.fill_deepspeed_auto(None, None, log)
    assert log == []


# ------------------------------------------------------------------------------------ preflight
def test_preflight_names_each_bad_input(tiny):
    out = tiny / "run"
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        preflight.check_run(
            recipe(tiny, model={"name_or_path": str(tiny / "missing")}), "r.yaml", out, OneProcess(), Lines()
        )
    with pytest.raises(RecipeError, match=r"parallelize\.groups"):
        preflight.check_run(
            recipe(tiny, parallelize={"groups": "2-12:2"}), "r.yaml", out, OneProcess(), Lines()
        )
    fp16 = recipe(tiny, train={"mixed_precision": "fp16"})
    with pytest.raises(RecipeError, match=r"train\.mixed_precision: fp16 needs a GPU"):
        preflight.check_run(fp16, "r.yaml", out, OneProcess(), Lines())
    missing = recipe(tiny, eval={"other_domain": [str(tiny / "nope.jsonl")]})
    with pytest.raises(RecipeError, match=r"eval\.other_domain: no JSONL or Parquet files"):
        preflight.check_run(missing, "r.yaml", out, OneProcess(), Lines())
    assert not out.exists()  # refused before anything is written
    out.write_text("a file")
    with pytest.raises(OutputDirError, match="is not a folder"):
        preflight.check_run(recipe(tiny), "r.yaml", out, OneProcess(), Lines())
    out.unlink()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a cqil run"):
        preflight.check_run(recipe(tiny), "r.yaml", out, OneProcess(), Lines())


def test_preflight_of_a_new_run_then_its_claim(tiny):
    out = tiny / "run"
    checked = preflight.check_run(recipe(tiny), "r.yaml", out, OneProcess(), Lines())
    assert checked.model_config.num_hidden_layers == 8 and checked.marker is None
    assert not checked.resuming and checked.fingerprint["train.max_steps"] == 10
    assert not out.exists()  # the checks write nothing
    preflight.claim_run_folder(out, checked, OneProcess(), Lines())
    again = preflight.check_run(recipe(tiny), "r.yaml", out, OneProcess(), Lines())
    assert again.marker["fingerprint"] == checked.fingerprint


# ------------------------------------------------------------------------------------ measure
def test_measure_perplexity_on_the_heldout_set(tiny):
    r = recipe(tiny)
    heldout = measure.prepare_eval(r, "r.yaml", make_tokenizer())
    assert heldout.tokens.shape[1] == 16 and len(heldout.sources) == heldout.tokens.shape[0]
    assert heldout.task_manager is None
    log = Lines()
    result = measure.run_perplexity(make_model("llama"), heldout, batch_size=2, label="original", log=log)
    assert result["ppl"] > 1 and set(result["by_source"]) == set(heldout.sources)
    assert log[0].startswith("cqil: held-out perplexity, original: ")
    assert (
        measure.run_lm_eval(make_model("llama"), None, r.eval, task_manager=None, stage="x", log=log) is None
    )
    assert (
        measure.before_label("coalesce") == "coalesced" and measure.before_label("parallel") == "parallelized"
    )


@pytest.mark.integration  # lm-eval indexes its whole task registry first (about a minute)
def test_measure_refuses_an_unknown_task_by_its_key(tiny):
    r = recipe(tiny, eval={"tasks": ["no_such_task"]})
    with pytest.raises(RecipeError, match=r"eval\.tasks"):
        measure.prepare_eval(r, "r.yaml", make_tokenizer())


# ------------------------------------------------------------------------------------ student, sharded
def test_student_transform_keeps_the_teacher_copies(tmp_path, input_ids):
    r = recipe(tmp_path)
    assert student.needs_teacher(r.train)
    assert not student.needs_teacher(
        recipe(tmp_path, train={"loss": {"kd": 0.0, "lm": 1.0, "hidden": 0.0}}).train
    )
    model = make_model("llama")
    with torch.no_grad():
        original = model(input_ids).logits
    plan = GroupPlan.parse(r.parallelize.groups, 8)
    parallel, teacher = student.transform(model, plan, r.parallelize, keep_teacher=True)
    assert parallel is model and sorted(teacher) == [2, 3, 4, 5]
    rm = RecoveryModel(parallel, teacher, plan=plan, kd=1.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            rm(input_ids, return_logits=True)["teacher_logits"], original, rtol=0, atol=1e-5
        )
    coalesced, none = student.transform(
        make_model("llama"),
        plan,
        recipe(tmp_path, parallelize={"mode": "coalesce"}).parallelize,
        keep_teacher=False,
    )
    assert none is None and len(coalesced.model.layers) == 6


def test_sharded_says_why_a_run_loads_the_whole_model(tmp_path):
    @dataclass
    class Plugin:
        zero_stage: int

    assert sharded.whole_model_reason(None, recipe(tmp_path)) == "not ZeRO-3"
    assert sharded.whole_model_reason(Plugin(2), recipe(tmp_path)) == "not ZeRO-3"
    assert sharded.whole_model_reason(Plugin(3), recipe(tmp_path)) is None
    coalesce = recipe(tmp_path, parallelize={"mode": "coalesce"})
    assert "coalesce" in sharded.whole_model_reason(Plugin(3), coalesce)
    auto = recipe(tmp_path, parallelize={"groups": "auto", "search": {"target_depth": 6}})
    assert "groups: auto" in sharded.whole_model_reason(Plugin(3), auto)
    model = nn.Linear(2, 2)
    with sharded.whole_model(model, gather=False):  # nothing to gather outside ZeRO-3
        pass


def test_sharded_evaluation_before_training_reads_the_original_through_the_teacher(tiny):
    r = recipe(tiny)
    heldout = measure.prepare_eval(r, "r.yaml", make_tokenizer())
    model = make_model("llama")
    expected = measure.run_perplexity(model, heldout, batch_size=2, label="original", log=Lines())
    plan = GroupPlan.parse(r.parallelize.groups, 8)
    parallel, teacher = student.transform(model, plan, r.parallelize, keep_teacher=True)
    rm = RecoveryModel(parallel, teacher, plan=plan, kd=1.0).eval()
    results = sharded.evaluate_before(rm, heldout, r.eval, mode="parallel", log=Lines())
    assert results["original"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert results["parallelized"]["ppl"] != pytest.approx(expected["ppl"], rel=1e-3)
    assert (
        sharded.evaluate_before(
            rm, heldout, recipe(tiny, eval={"before": False}).eval, mode="parallel", log=Lines()
        )
        == {}
    )


# ------------------------------------------------------------------------------------ auto_plan
def test_auto_plan_searches_once_and_reuses_the_record(tiny, monkeypatch):
    search = {
        "groups": "auto",
        "search": {"degree": 2, "target_depth": 7, "num_sequences": 2, "pool_size": 3},
    }
    r = recipe(tiny, parallelize=search)
    out = tiny / "run"
    kw = dict(
        source="r.yaml", output_dir=out, processes=OneProcess(), device=torch.device("cpu"), log=Lines()
    )
    groups, record = auto_plan.search_run_plan(make_model("llama"), make_tokenizer(), r, **kw)
    assert GroupPlan.parse(groups, 8).num_layers_after == 7
    assert record["plans_json"] == "plan/plans.json" and not record["reused"]
    assert (out / "plan" / "table.txt").is_file()

    import cqil.selection.search

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(cqil.selection.search, "search_plan", no_search)
    again, record = auto_plan.search_run_plan(make_model("llama"), make_tokenizer(), r, **kw)
    assert again == groups and record["reused"]


def test_auto_plan_refuses_checkpoints_without_a_recorded_plan(tiny):
    (tiny / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    r = recipe(tiny, parallelize={"groups": "auto", "search": {"target_depth": 7}})
    with pytest.raises(RecipeError, match="no recorded plan"):
        auto_plan.search_run_plan(
            make_model("llama"),
            make_tokenizer(),
            r,
            source="r.yaml",
            output_dir=tiny / "run",
            processes=OneProcess(),
            device=torch.device("cpu"),
            log=Lines(),
        )


# ------------------------------------------------------------------------------------ finish
def fake_perplexity(ppl: float):
    nll = math.log(ppl)
    return {"ppl": ppl, "nll": nll, "tokens": 64, "by_source": {"a": {"ppl": ppl, "nll": nll, "tokens": 64}}}


@pytest.fixture
def finished_parts(tiny):
    """A recovery model of a tiny parallelized llama, its trainable weights and held-out set."""
    r = recipe(tiny)
    plan = GroupPlan.parse(r.parallelize.groups, 8)
    parallel, teacher = student.transform(make_model("llama"), plan, r.parallelize, keep_teacher=True)
    rm = RecoveryModel(parallel, teacher, plan=plan, kd=1.0)
    trainable = {f"student.{n}": p for n, p in trainable_parameters(parallel).items()}
    Path(r.output_dir).mkdir()
    heldout = measure.HeldOut(torch.zeros(2, 16, dtype=torch.long), ["a", "a"])
    return r, plan, rm, trainable, heldout


def finish_kwargs(r, plan, rm, heldout, **changes):
    kw = dict(
        recipe=r,
        output_dir=Path(r.output_dir),
        plan=plan,
        tokenizer=make_tokenizer(),
        heldout=heldout,
        results={"original": fake_perplexity(10.0), "parallelized": fake_perplexity(20.0)},
        run=RunState(6, 384, 1.0),
        frozen_digest=checkpoint.weights_digest(checkpoint.frozen_weights(rm, dict())),
        sharded_load=False,
        gather_whole=False,
        stop_signal=lambda: None,
        log=Lines(),
    )
    return kw | changes


def test_finish_checks_evaluates_records_and_exports(finished_parts, monkeypatch):
    r, plan, rm, trainable, heldout = finished_parts
    monkeypatch.setattr(finish, "run_perplexity", lambda *a, **k: fake_perplexity(12.0))
    frozen = checkpoint.weights_digest(checkpoint.frozen_weights(rm, trainable))
    exported = []
    results = finish.finish_run(
        rm,
        trainable,
        OneProcess(),
        **finish_kwargs(r, plan, rm, heldout, frozen_digest=frozen),
        export_fn=lambda model, state: exported.append((model, set(state))),
    )
    assert results["recovered"]["ppl"] == 12.0 and results["steps"] == 6 and results["tokens_seen"] == 384
    assert results["trainable_digest"] == checkpoint.state_digest(checkpoint.trainable_state(trainable))
    assert json.loads((Path(r.output_dir) / "eval.json").read_text()) == results
    assert exported == [(rm.student, set(trainable))]

    with torch.no_grad():  # a frozen weight that moved is a bug, caught before anything is written
        rm.student.model.embed_tokens.weight[0, 0] += 1
    with pytest.raises(RuntimeError, match="frozen weights changed"):
        finish.finish_run(
            rm, trainable, OneProcess(), **finish_kwargs(r, plan, rm, heldout, frozen_digest=frozen)
        )


def test_finish_stops_on_a_signal_after_the_final_evaluation(finished_parts, monkeypatch):
    r, plan, rm, trainable, heldout = finished_parts
    monkeypatch.setattr(finish, "run_perplexity", lambda *a, **k: fake_perplexity(12.0))
    frozen = checkpoint.weights_digest(checkpoint.frozen_weights(rm, trainable))
    kw = finish_kwargs(r, plan, rm, heldout, frozen_digest=frozen, stop_signal=lambda: signal.SIGTERM)
    with pytest.raises(
        Preempted, match="during the final evaluation: the training is checkpointed at step 6"
    ):
        finish.finish_run(rm, trainable, OneProcess(), **kw)
    assert not (Path(r.output_dir) / "eval.json").exists()


def test_finish_export_and_report_from_fake_results(finished_parts, input_ids):
    from cqil.export.load import load_export

    r, plan, rm, trainable, _ = finished_parts
    results = {
        "original": fake_perplexity(10.0),
        "parallelized": fake_perplexity(20.0),
        "recovered": fake_perplexity(12.0),
        "steps": 6,
        "tokens_seen": 384,
    }
    out = Path(r.output_dir)
    log = Lines()
    folder = finish.export_recovered(
        rm.student, out / "model", recipe=r, plan=plan, tokenizer=make_tokenizer(), results=results, log=log
    )
    loaded = load_export(folder)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids).logits, rm.student(input_ids).logits, rtol=1e-5, atol=1e-5
        )
    report, tasks = finish.write_run_report(
        out,
        recipe=r,
        plan=plan,
        results=results,
        tokenizer=make_tokenizer(),
        task_manager=None,
        device=torch.device("cpu"),
        log=log,
    )
    assert tasks is None and report == out / "report"
    saved = json.loads((report / "report.json").read_text())
    assert saved["perplexity"]["recovered"]["ppl"] == 12.0 and saved["gap_closed"] == pytest.approx(0.8)
    assert log[-1].startswith(f"cqil: report {report / 'report.md'}")


def test_finish_writes_a_coalesced_model_as_a_plain_folder(tmp_path):
    r = recipe(tmp_path, parallelize={"mode": "coalesce"})
    plan = GroupPlan.parse(r.parallelize.groups, 8)
    coalesced, _ = student.transform(make_model("llama"), plan, r.parallelize, keep_teacher=False)
    results = {"original": fake_perplexity(10.0), "recovered": fake_perplexity(12.0), "steps": 2}
    folder = finish.export_recovered(
        coalesced,
        tmp_path / "run" / "model",
        recipe=r,
        plan=plan,
        tokenizer=None,
        results=results,
        log=Lines(),
    )
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "# run" in card and "| the original model | 10.000 |" in card


# ------------------------------------------------------------------------------------ progress, preemption
def test_progress_logs_one_line_per_window_and_every_step_to_metrics(tmp_path):
    log = Lines()
    metrics = tmp_path / "metrics.jsonl"
    report = progress.TrainingProgress(
        max_steps=5, start_step=0, log_every_steps=2, log=log, metrics_path=metrics
    )
    windows = [report.step(s, {"loss": float(s)}, lr=0.1, tokens=8, tokens_seen=8 * s) for s in range(1, 6)]
    report.close()
    assert [w is not None for w in windows] == [False, True, False, True, True]
    assert windows[1]["train/loss"] == 1.5 and windows[1]["train/lr"] == 0.1
    assert len(log) == 3 and log[0].startswith("step 2/5 | loss 1.5000 | lr 1.00e-01")
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5] and lines[-1]["tokens"] == 40


def test_log_prints_on_the_main_process_only(capsys):
    progress.log("cqil: seen")
    progress.log("cqil: unseen", main=False)
    assert capsys.readouterr().err == "cqil: seen\n"


def test_stop_signals_record_instead_of_ending_and_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    signals = StopSignals()
    signals.install()
    try:
        assert not signals.agreed(lambda flag: flag, "cpu")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1 and signals.agreed(lambda flag: flag, "cpu")
        other = StopSignals()  # another process's view: it received nothing, the sum says someone did
        assert other.agreed(lambda flag: flag + 1, "cpu") and other.received == signal.SIGTERM
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) is before

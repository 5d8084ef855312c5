"""cqil.recovery (trainer, model, checkpoints) on tiny local models, in one process: the shared-prefix teacher, what trains, the
optimizer state, exact resume, preemption and non-finite losses; the same in coalesce mode."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from cqil.evaluation.report import headline  # noqa: E402
from cqil.export.load import load_export
from cqil.recovery.checkpoint import list_checkpoints, state_digest
from cqil.recovery.lora import apply_lora
from cqil.recovery.model import RecoveryModel
from cqil.recovery.recipe import RecipeError, recipe_from_dict
from cqil.recovery.trainer import EXIT_NONFINITE, EXIT_PREEMPTED, RecoveryTrainer, run
from cqil.rewrite.coalescing import coalesce
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallelize, trainable_parameters
from cqil.testing import make_model, make_tokenizer, write_corpus, write_task

pytestmark = pytest.mark.integration


def reset_accelerate_state():
    """As between two processes: a run fixes accelerate's state (its mixed precision among it)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def teacher_copies(model, groups):
    return {i: copy.deepcopy(model.model.layers[i]) for g in groups for i in g}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("bypass", ["lp", "none"])
def test_teacher_is_the_original_model_and_student_the_parallelized_one(arch, bypass, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        original = model(input_ids).logits
    groups = [[2, 3], [5, 6, 7]]
    teacher = teacher_copies(model, groups)
    parallelize(model, groups, bypass=bypass)
    with torch.no_grad():
        student = model(input_ids).logits
    rm = RecoveryModel(model, teacher, kd=1.0, hidden=1.0, lm=1.0).eval()
    with torch.no_grad():
        out = rm(input_ids, return_logits=True)
    torch.testing.assert_close(out["teacher_logits"], original, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["logits"], student, rtol=0, atol=1e-5)
    assert not torch.allclose(student, original, atol=1e-3)  # the surgery did change the model
    assert set(out) == {"loss", "lm", "kd", "hidden", "logits", "teacher_logits"}
    assert out["kd"] > 0 and out["hidden"] > 0


def test_teacher_runs_without_gradients_and_only_groups_get_them(input_ids):
    model = make_model("llama")
    teacher = teacher_copies(model, [[2, 3]])
    parallelize(model, [[2, 3]])
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)
    rm = RecoveryModel(model, teacher, kd=1.0, hidden=0.5).train()
    rm(input_ids)["loss"].backward()
    grads = {n for n, p in rm.named_parameters() if p.grad is not None}
    assert grads == {f"student.{n}" for n in trainable_parameters(model)}
    assert all(not p.requires_grad for p in rm.teacher_layers.parameters())


def test_lora_teacher_is_the_model_with_adapters_off(input_ids):
    model = make_model("llama")
    with torch.no_grad():
        original = model(input_ids).logits
    teacher = teacher_copies(model, [[2, 3]])
    parallelize(model, [[2, 3]], bypass="none", gates="fixed")
    lora = recipe_from_dict(
        {"parallelize": {"groups": "2-4:2"}, "output_dir": "x", "train": {"lora": {"r": 4}}}
    )
    apply_lora(model, lora.train.lora, target="all")
    with torch.no_grad():  # adapters start as a no-op; make them count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    rm = RecoveryModel(model, teacher, kd=1.0)
    rm.adapters_outside_groups = True
    with torch.no_grad():
        out = rm(input_ids, return_logits=True)
    torch.testing.assert_close(out["teacher_logits"], original, rtol=0, atol=1e-5)
    assert out["kd"] > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_coalesced_student_with_the_original_teacher(arch, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        original = model(input_ids).logits
    groups = [[2, 3], [5, 6, 7]]
    student = coalesce(model, groups)  # leaves `model` as it was
    teacher = teacher_copies(model, groups)
    with torch.no_grad():
        expected = student(input_ids).logits
    plan = GroupPlan.parse(groups, 8)
    rm = RecoveryModel(student, teacher, plan=plan, kd=1.0, hidden=1.0, lm=1.0).eval()
    assert rm.is_group == [False, False, True, False, True]
    with torch.no_grad():
        out = rm(input_ids, return_logits=True)
    torch.testing.assert_close(out["teacher_logits"], original, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, original, atol=1e-3)
    assert out["kd"] > 0 and out["hidden"] > 0
    # Without a plan, the one coalesce recorded in the config; a plan of another depth is refused.
    assert RecoveryModel(student, teacher).effective == rm.effective
    with pytest.raises(ValueError, match="the student has 5 layers"):
        RecoveryModel(student, teacher, plan=GroupPlan.parse([[2, 3]], 8))
    with pytest.raises(ValueError, match="no copy of the grouped layers"):
        RecoveryModel(student, {2: teacher[2]}, plan=plan)
    with pytest.raises(ValueError, match="parallelized .* or coalesced"):
        RecoveryModel(make_model(arch), teacher)


# ------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_model("llama")
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    write_corpus(root / "train.jsonl.gz")
    write_task(root / "tasks")
    return root


def tiny_recipe(root: Path, out: Path, parallelize: dict | None = None, eval: dict | None = None, **train):
    t = dict(
        max_steps=6,
        seq_len=16,
        micro_batch_size=2,
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=1,
        log_every_steps=1,
        trackers=[],
        save_every_steps=3,
        loss={"kd": 1.0, "lm": 0.5, "hidden": 0.1},
    )
    t.update(train)
    return recipe_from_dict(
        {
            "model": {"name_or_path": str(root / "model")},
            "parallelize": {"groups": "2-6:2"} | (parallelize or {}),
            "train": t,
            "data": {"train": str(root / "train.jsonl.gz"), "eval_fraction": 0.2},
            "eval": {
                "num_sequences": 4,
                "latency_prefill_len": 32,
                "latency_new_tokens": 8,
                "latency_reps": 1,
            }
            | (eval or {}),
            "output_dir": str(out),
        }
    )


def test_run_trains_only_the_groups_and_recovers(tiny_model_dir, tmp_path):
    tasks = {"tasks": ["tiny_choice"], "task_paths": [str(tiny_model_dir / "tasks")]}
    trainer = RecoveryTrainer(tiny_recipe(tiny_model_dir, tmp_path / "run", eval=tasks))
    try:
        trainer.setup()
        student = trainer.model.student
        expected = {f"student.{n}" for n in trainable_parameters(student)}
        assert set(trainer.trainable) == expected
        assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == expected
        frozen_before = {n: p.clone() for n, p in trainer._frozen_state().items()}
        trainer.train()
        # Optimizer state exists for exactly the trainable parameters.
        ids = {id(p) for p in trainer.trainable.values()}
        assert {id(p) for p in trainer.optimizer.state} == ids
        assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(ids)
        for n, p in trainer._frozen_state().items():
            assert torch.equal(p, frozen_before[n]), n
        results = trainer.finish()
    finally:
        trainer.cleanup()
    assert results["recovered"]["ppl"] < results["parallelized"]["ppl"]
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["steps"] == 6 and {"original", "parallelized", "recovered"} <= set(saved)
    # The run ends with the recovered model exported: it loads and computes what was trained.
    exported = load_export(tmp_path / "run" / "model")
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003", "step-000006"]

    # The report: the three stages' perplexity as evaluated, lm-eval on each, latency, loss curves.
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    for stage in ("original", "parallelized", "recovered"):
        assert report["perplexity"][stage]["ppl"] == saved[stage]["ppl"]
        assert set(report["lm_eval"][stage]) == {"tiny_choice"}
    assert set(report["perplexity_by_source"]) == set(saved["recovered"]["by_source"])
    lost = saved["parallelized"]["ppl"] - saved["original"]["ppl"]
    won = saved["parallelized"]["ppl"] - saved["recovered"]["ppl"]
    assert report["gap_closed"] == (pytest.approx(won / lost) if lost > 0 else None)
    for source, by in saved["recovered"]["by_source"].items():  # and per source
        lost = (
            saved["parallelized"]["by_source"][source]["ppl"] - saved["original"]["by_source"][source]["ppl"]
        )
        won = saved["parallelized"]["by_source"][source]["ppl"] - by["ppl"]
        assert report["gap_closed_by_source"][source] == (pytest.approx(won / lost) if lost > 0 else None)
    assert report["latency"]["ideal"] == pytest.approx(8 / 6, rel=1e-3) and report["tokens_trained"] == 6 * 64
    assert report["plots"] == ["similarity.png", "losses.png", "perplexity.png", "quality_latency.png"]
    history = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] and {"kd", "lm", "hidden", "loss"} <= set(
        history[0]
    )
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert headline(report) in card and (tmp_path / "run" / "model" / "plots" / "losses.png").is_file()


def test_layers_after_groups_train_whole_while_the_teacher_keeps_the_originals(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").eval()
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", max_steps=3, layers_after_groups=1)
    trainer = RecoveryTrainer(recipe)
    ids = torch.randint(0, original.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        trainer.setup()
        student = trainer.model.student
        # Groups [2, 3] and [4, 5] of 8 layers: original layer 6 is the student's effective layer 4.
        after = {f"student.model.layers.4.{n}" for n, _ in student.model.layers[4].named_parameters()}
        groups = {f"student.{n}" for n in trainable_parameters(student)}
        assert set(trainer.trainable) == groups | after and not groups & after
        layer_before = copy.deepcopy(student.model.layers[4].state_dict())
        trainer.train()
        changed = [
            k for k, v in student.model.layers[4].state_dict().items() if not torch.equal(v, layer_before[k])
        ]
        assert changed, "the layer after the groups did not train"
        with torch.no_grad():  # the teacher runs its own frozen copy of layer 6, not the trained one
            torch.testing.assert_close(
                trainer.model.original_logits(ids), original(ids).logits, rtol=0, atol=1e-5
            )
        trainer.finish()
    finally:
        trainer.cleanup()
    exported = load_export(tmp_path / "run" / "model")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_after_groups_beyond_the_model_or_with_lora_name_the_key(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", layers_after_groups=3)
    with pytest.raises(RecipeError, match=r"train\.layers_after_groups: 3 layers after the last group"):
        run(recipe)
    with pytest.raises(RecipeError, match=r"train\.layers_after_groups: .*not defined with train\.lora"):
        tiny_recipe(tiny_model_dir, tmp_path / "run", layers_after_groups=1, lora={"r": 4})
    assert not (tmp_path / "run").exists()


def test_an_unknown_lm_eval_task_fails_before_training(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", eval={"tasks": ["tiny_choice", "hellaswagg"]})
    with pytest.raises(RecipeError, match=r"eval\.tasks: unknown lm-eval task 'tiny_choice'"):
        run(recipe)
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path / "run",
        eval={"tasks": ["hellaswagg"], "task_paths": [str(tiny_model_dir / "tasks")]},
    )
    with pytest.raises(RecipeError, match=r"eval\.tasks: unknown lm-eval task 'hellaswagg'"):
        run(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model").exists()


def test_a_run_that_lost_its_claim_ends_with_one_error_and_an_interrupt_stays_one(
    tiny_model_dir, tmp_path, monkeypatch
):
    from cqil.recovery.run_lock import ClaimLost

    def lose_the_claim(self):  # what the claim's heartbeat does when another run took the folder
        self.claim.lost = "run.lock now names pid 4242 on node-elsewhere"
        raise KeyboardInterrupt

    monkeypatch.setattr(RecoveryTrainer, "train", lose_the_claim)
    with pytest.raises(
        ClaimLost, match=r"run: this run lost its claim on the folder \(run.lock now names pid 4242"
    ):
        run(tiny_recipe(tiny_model_dir, tmp_path / "run"))

    def interrupted(self):  # Ctrl-C with the claim still held
        raise KeyboardInterrupt

    monkeypatch.setattr(RecoveryTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tiny_model_dir, tmp_path / "run2"))


def stop_after_first_checkpoint(recipe) -> None:
    """Train ``recipe`` until its first checkpoint is written, then stop as a killed run would."""
    trainer = RecoveryTrainer(recipe)
    trainer.setup()
    original_save = trainer.save_checkpoint

    def save_then_die():
        original_save()
        raise KeyboardInterrupt

    trainer.save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.cleanup()


def test_bf16_autocast_trains_on_a_cpu_and_keeps_float32_weights(tiny_model_dir, tmp_path):
    full, half = tmp_path / "fp32", tmp_path / "bf16"
    assert run(tiny_recipe(tiny_model_dir, full)) == 0
    reset_accelerate_state()
    assert run(tiny_recipe(tiny_model_dir, half, mixed_precision="bf16")) == 0
    a = json.loads((full / "eval.json").read_text())
    b = json.loads((half / "eval.json").read_text())
    assert a["original"]["ppl"] == b["original"]["ppl"]  # measured outside autocast
    # Autocast ran (the recovered model differs) and trained as well, to bf16's rounding.
    assert b["recovered"]["ppl"] != a["recovered"]["ppl"]
    assert b["recovered"]["ppl"] == pytest.approx(a["recovered"]["ppl"], rel=0.02)
    assert b["recovered"]["ppl"] < 0.9 * b["parallelized"]["ppl"]
    model = load_export(half / "model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_resume_is_bit_identical(tiny_model_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(tiny_recipe(tiny_model_dir, full)) == 0
    # An interrupted run: the same recipe, stopped right after the checkpoint at step 3.
    stop_after_first_checkpoint(tiny_recipe(tiny_model_dir, part))
    assert [p.name for p in list_checkpoints(part)] == ["step-000003"]
    assert run(tiny_recipe(tiny_model_dir, part)) == 0
    a = json.loads((full / "eval.json").read_text())
    b = json.loads((part / "eval.json").read_text())
    assert a["trainable_digest"] == b["trainable_digest"] and a["frozen_digest"] == b["frozen_digest"]
    assert a["recovered"]["ppl"] == b["recovered"]["ppl"]


def test_a_resume_reuses_what_was_measured_before_training_only_on_the_same_eval_settings(
    tiny_model_dir, tmp_path, capsys
):
    part, fresh = tmp_path / "part", tmp_path / "fresh"
    stop_after_first_checkpoint(tiny_recipe(tiny_model_dir, part, max_steps=9))
    first = json.loads((part / "eval_before.json").read_text())
    assert first["measured_on"]["seq_len"] == 16
    assert "held-out perplexity, original" in capsys.readouterr().err
    # The same settings: the second attempt (stopped at its first checkpoint, step 6) measures nothing again.
    stop_after_first_checkpoint(tiny_recipe(tiny_model_dir, part, max_steps=9))
    assert "held-out perplexity, original" not in capsys.readouterr().err
    # eval.* is outside the fingerprint: the third attempt goes on, on 32-token blocks for all three models.
    longer = {"seq_len": 32}
    assert run(tiny_recipe(tiny_model_dir, part, eval=longer, max_steps=9)) == 0
    assert "held-out perplexity, original" in capsys.readouterr().err
    assert run(tiny_recipe(tiny_model_dir, fresh, eval=longer, max_steps=9)) == 0
    resumed = json.loads((part / "eval.json").read_text())
    expected = json.loads((fresh / "eval.json").read_text())
    for stage in ("original", "parallelized", "recovered"):
        assert resumed[stage]["tokens"] == expected[stage]["tokens"] != first["original"]["tokens"]
        assert resumed[stage]["ppl"] == pytest.approx(expected[stage]["ppl"], rel=1e-5)
    assert json.loads((part / "eval_before.json").read_text())["measured_on"]["seq_len"] == 32


def test_sigterm_checkpoints_and_exits_with_its_code(tiny_model_dir, tmp_path, monkeypatch):
    from cqil.recovery.stream import TokenStream

    calls = {"n": 0}
    original = TokenStream.next_batch

    def next_batch(self, n):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, n)

    monkeypatch.setattr(TokenStream, "next_batch", next_batch)
    assert run(tiny_recipe(tiny_model_dir, tmp_path / "run", save_every_steps=0)) == EXIT_PREEMPTED
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_non_finite_loss_stops_and_names_the_step(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = RecoveryModel.forward

    def poisoned(self, input_ids, **kw):
        out = forward(self, input_ids, **kw)
        calls["n"] += 1
        if calls["n"] >= 9:  # step 5 (two micro-batches per step)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(RecoveryModel, "forward", poisoned)
    assert run(tiny_recipe(tiny_model_dir, tmp_path / "run")) == EXIT_NONFINITE
    assert "non-finite loss at step 5" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003"]


def test_lora_run_trains_only_adapters(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", lora={"r": 4, "target": "groups"}, max_steps=2)
    trainer = RecoveryTrainer(recipe)
    try:
        trainer.setup()
        names = set(trainer.trainable)
        assert names and all("lora_" in n or n.endswith(".gates") for n in names)
        assert all(".layers.2." in n or ".layers.3." in n for n in names if "lora_" in n)  # the two groups
        digest = state_digest(trainer._frozen_state())
        trainer.train()
        assert state_digest(trainer._frozen_state()) == digest
    finally:
        trainer.cleanup()


# ------------------------------------------------------------------------------------ coalesce mode
COALESCE = {"mode": "coalesce"}


def check_plain_export(folder: Path, student):
    """``folder`` is a plain transformers checkpoint (no remote code) computing ``student``'s logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert not [n for n in names if n.endswith((".py", ".bin", ".pt"))], names
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == [type(student).__name__]
    files = [folder / n for n in names if (folder / n).is_file()]
    assert len({f.stat().st_mode for f in files}) == 1  # one file mode, as export_model gives
    assert config["num_hidden_layers"] == 6 and config["cqil_coalesced"]["plan"]["groups"] == [[2, 3], [4, 5]]
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == make_tokenizer().get_vocab()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(student)
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)


def test_coalesce_run_trains_only_the_coalesced_layers_and_recovers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = RecoveryTrainer(tiny_recipe(tiny_model_dir, tmp_path / "run", COALESCE))
    try:
        trainer.setup()
        student = trainer.model.student
        assert len(student.model.layers) == 6 and student.config.cqil_coalesced is not None
        assert not hasattr(student.config, "cqil") or student.config.cqil is None
        # Exactly the coalesced layers (the groups' positions 2 and 3), every parameter of them.
        expected = {
            f"student.model.layers.{e}.{n}"
            for e in (2, 3)
            for n, _ in student.model.layers[e].named_parameters()
        }
        assert set(trainer.trainable) == expected
        assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == expected
        assert set(trainer.model.teacher_layers) == {"2", "3", "4", "5"}
        # The teacher is the original model.
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").eval()
        ids = trainer.eval_tokens
        with torch.no_grad():
            out = trainer.model(ids, return_logits=True)
            torch.testing.assert_close(out["teacher_logits"], original(ids).logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(out["logits"], student(ids).logits, rtol=0, atol=1e-5)
        frozen_before = {n: p.clone() for n, p in trainer._frozen_state().items()}
        trainable_before = {n: p.clone() for n, p in trainer.trainable.items()}
        trainer.train()
        assert {id(p) for p in trainer.optimizer.state} == {id(p) for p in trainer.trainable.values()}
        for n, p in trainer._frozen_state().items():
            assert torch.equal(p, frozen_before[n]), n
        assert all(
            not torch.equal(p, trainable_before[n]) for n, p in trainer.trainable.items() if p.dim() == 2
        )
        with torch.no_grad():
            loss_after = trainer.model(ids)["loss"]
        assert loss_after < out["loss"]  # the recovery loss went down (on the held-out sequences)
        results = trainer.finish()
    finally:
        trainer.cleanup()
    assert results["recovered"]["ppl"] < results["parallelized"]["ppl"]
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["mode"] == "coalesce" and {"original", "parallelized", "recovered"} <= set(saved)
    check_plain_export(tmp_path / "run" / "model", student)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003", "step-000006"]


def test_coalesce_run_with_lora_trains_only_adapters_and_exports_them_merged(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", COALESCE, lora={"r": 4, "target": "groups"}, max_steps=2
    )
    trainer = RecoveryTrainer(recipe)
    try:
        trainer.setup()
        names = set(trainer.trainable)
        assert names and all("lora_" in n for n in names)
        assert {n.split(".layers.")[1].split(".")[0] for n in names} == {"2", "3"}
        digest = state_digest(trainer._frozen_state())
        trainer.train()
        assert state_digest(trainer._frozen_state()) == digest
        trainer.finish()
    finally:
        trainer.cleanup()
    student = trainer.model.student
    assert not any("lora_" in n for n, _ in student.named_parameters())  # merged before the export
    check_plain_export(tmp_path / "run" / "model", student)


def test_auto_groups_search_the_plan_once_and_record_it(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "auto"
    auto = {"groups": "auto", "search": {"degree": 2, "target_depth": 7, "num_sequences": 2, "pool_size": 3}}
    recipe = tiny_recipe(tiny_model_dir, out, auto, max_steps=3)
    assert run(recipe) == 0
    report = json.loads((out / "plan" / "plans.json").read_text())
    assert (out / "plan" / "table.txt").is_file()
    assert report["budget"] == {"target_depth": 7} and report["settings"]["num_sequences"] == 2
    saved = json.loads((out / "eval.json").read_text())
    plan = GroupPlan.from_dict(saved["plan"])
    assert plan.num_layers_after == 7 and plan.groups == GroupPlan.from_dict(report["plan"]).groups
    assert saved["plan_search"]["plans_json"] == "plan/plans.json"
    assert saved["plan_search"]["budget"] == {"target_depth": 7} and not saved["plan_search"]["reused"]
    assert saved["steps"] == 3

    # A second run on the same folder (a longer run: train.max_steps changed, so the optimizer and
    # schedule restart from the new recipe) reuses the recorded plan.
    import cqil.selection.search

    def no_search(*args, **kwargs):
        raise AssertionError("the plan was searched again")

    monkeypatch.setattr(cqil.selection.search, "search_plan", no_search)
    assert run(tiny_recipe(tiny_model_dir, out, auto, max_steps=4, resume="reset_optimizer")) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["plan"] == saved["plan"] and again["plan_search"]["reused"] and again["steps"] == 4
    assert again["resume"] == {"resume": "reset_optimizer", "step": 3, "changed": {"train.max_steps": [3, 4]}}


def test_auto_groups_budget_error_names_the_budget(tiny_model_dir, tmp_path):
    from cqil.recovery.recipe import RecipeError

    auto = {"groups": "auto", "search": {"degree": 2, "target_depth": 3, "num_sequences": 2}}
    with pytest.raises(RecipeError, match="shallowest depth") as caught:
        run(tiny_recipe(tiny_model_dir, tmp_path / "bad", auto))
    assert caught.value.path == "parallelize.search.target_depth"
    assert not (tmp_path / "bad" / "plan" / "plans.json").exists()


def test_layers_after_a_searched_plan_are_checked_against_it(tiny_model_dir, tmp_path):
    # 8 layers; a searched pair leaves at most 6 after it: the same error as for a written plan.
    auto = {"groups": "auto", "search": {"degree": 2, "target_depth": 7, "num_sequences": 2, "pool_size": 3}}
    with pytest.raises(RecipeError, match="layers after the last group") as caught:
        run(tiny_recipe(tiny_model_dir, tmp_path / "bad", auto, layers_after_groups=7))
    assert caught.value.path == "train.layers_after_groups"
    assert not (tmp_path / "bad" / "checkpoints").exists() and not (tmp_path / "bad" / "model").exists()


def test_local_steps_train_the_groups_alone_then_the_recipes_loss(tiny_model_dir, tmp_path):
    """The first train.local_steps steps log the local loss alone, the rest the recipe's losses; a run
    interrupted inside the local phase resumes to the same weights."""
    train = {"max_steps": 6, "local_steps": 4, "loss": {"kd": 1.0, "lm": 0.5, "local": 0.0}}
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(tiny_recipe(tiny_model_dir, full, **train)) == 0
    steps = [json.loads(line) for line in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(set(s) - {"step", "lr", "tokens"}) for s in steps] == [["local", "loss"]] * 4 + [
        ["kd", "lm", "loss"]
    ] * 2
    assert all(s["loss"] == s["local"] > 0 for s in steps[:4])

    stop_after_first_checkpoint(tiny_recipe(tiny_model_dir, part, **train))
    assert run(tiny_recipe(tiny_model_dir, part, **train)) == 0
    a, b = (json.loads((d / "eval.json").read_text()) for d in (full, part))
    assert a["trainable_digest"] == b["trainable_digest"]

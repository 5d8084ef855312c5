"""Perplexity against the loss transformers computes itself; latency arithmetic; the standard error and
the chance level of an accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from cqil.evaluation.metrics import perplexity
from cqil.testing import VOCAB, make_model


def test_perplexity_matches_transformers_loss():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, batch_size=2, progress=False)
    with torch.no_grad():
        # With equal-length rows the mean of the per-row losses is the mean over all tokens.
        reference = model(input_ids=tokens, labels=tokens).loss.item()
    assert result["tokens"] == 5 * 8
    assert result["nll"] == pytest.approx(reference, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_perplexity_from_a_position_scores_only_the_later_tokens():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, tokens, progress=False, score_from=6)
    labels = tokens.clone()
    labels[:, :6] = -100  # transformers ignores these; position 6 is the first predicted
    with torch.no_grad():
        reference = model(input_ids=tokens, labels=labels).loss.item()
    assert result["tokens"] == 3 * 4
    assert result["nll"] == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ValueError, match="score_from"):
        perplexity(model, tokens, progress=False, score_from=10)


def test_perplexity_restores_training_mode():
    model = make_model("llama").train()
    perplexity(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert model.training


def test_perplexity_rejects_single_token_rows():
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(make_model("llama"), torch.zeros(3, 1, dtype=torch.long), progress=False)


# ---------------------------------------------------------------------------------------------- latency
class FakeClock:
    """A clock that only the models move: each forward of a model costs it a fixed number of seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def charge(self, model, seconds: float):
        def tick(*_):
            self.now += seconds

        model.register_forward_pre_hook(tick)
        return model


def test_latency_arithmetic_reads_a_known_slowdown_as_one_and_tokens_per_s_agree():
    from cqil.evaluation.latency import measure_latency

    clock = FakeClock()
    models = {
        "original": clock.charge(make_model("llama"), 1.0),
        "faster": clock.charge(make_model("llama"), 0.8),
        "slower": clock.charge(make_model("llama"), 1.25),
    }
    out = measure_latency(
        models,
        prefill_lens=(16, 48),
        prompt_len=8,
        new_tokens=4,
        reps=3,
        ideal=4 / 3,
        clock=clock,
        progress=False,
    )
    assert out["prefill_lens"] == [16, 48] and out["modes"] == ["eager"] and out["decode_mode"] == "eager"
    phases = ("prefill_16", "prefill_48", "decode_eager")
    for name, expected in (("faster", 1.25), ("slower", 0.8)):
        speedup = out["speedup"][name]
        assert speedup["prefill"] == speedup["prefill_16"] and speedup["decode"] == speedup["decode_eager"]
        for phase in phases:
            assert speedup[phase] == pytest.approx(expected)
            tps = out["models"][name]["phases"][phase]["tokens_per_s"]
            base = out["models"]["original"]["phases"][phase]["tokens_per_s"]
            assert tps / base == pytest.approx(speedup[phase], rel=1e-4)  # the same medians
        # (1.25 - 1) / (4/3 - 1) = 0.75 of the ideal gain; a slowdown is a negative share
        assert out["share_of_ideal"][name]["decode"] == pytest.approx((expected - 1) / (1 / 3), abs=1e-4)
    original = out["models"]["original"]
    assert original["prefill_ms"] == pytest.approx(1000.0) and original[
        "prefill_tokens_per_s"
    ] == pytest.approx(16)
    assert original["decode_ms_per_token"] == pytest.approx(1000.0) and original["decode_tokens_per_s"] == 1.0
    assert out["speedup"]["slower"]["decode"] < 1 < out["speedup"]["faster"]["decode"]


def test_speedup_is_the_ratio_of_the_medians_that_give_the_tokens_per_s():
    from cqil.evaluation.latency import summarize

    # A noisy repetition: the median of per-repetition ratios would say 1.333x, the medians 1.2x.
    times = {"original": {"prefill_8": [1.0, 1.2, 3.0]}, "model": {"prefill_8": [1.1, 0.9, 1.0]}}
    out = summarize(times, {"prefill_8": 8}, baseline="original", ideal=1.5)
    assert out["speedup"]["model"]["prefill_8"] == pytest.approx(1.2)
    assert out["models"]["model"]["prefill_8"]["tokens_per_s"] / out["models"]["original"]["prefill_8"][
        "tokens_per_s"
    ] == pytest.approx(1.2, rel=1e-3)
    assert out["share_of_ideal"]["model"]["prefill_8"] == pytest.approx(0.4)


def test_interleave_alternates_the_order_and_prepares_untimed():
    from cqil.evaluation.latency import interleave

    calls, clock = [], FakeClock()

    def job(name):
        def prepare():
            clock.now += 100.0  # untimed work: never counted
            return lambda: (calls.append(name), setattr(clock, "now", clock.now + 1.0))

        return prepare

    def timer(fn):
        start = clock()
        fn()
        return clock() - start

    times = interleave({"a": {"p": job("a")}, "b": {"p": job("b")}}, reps=3, timer=timer, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then a b, b a, a b
    assert times == {"a": {"p": [1.0] * 3}, "b": {"p": [1.0] * 3}}


def test_prefill_lengths_are_capped_by_the_context_and_cuda_graphs_need_cuda():
    from cqil.evaluation.latency import available_modes, measure_latency, prefill_lengths

    model = make_model("llama")  # a context of 256 tokens
    assert prefill_lengths(model) == [256]
    assert prefill_lengths(model, (16, 512, 2048)) == [16, 256]
    assert available_modes(torch.device("cpu")) == ("eager",)
    with pytest.raises(ValueError, match="graph"):
        measure_latency({"m": model}, prefill_lens=(8,), modes=["graph"], progress=False)


@pytest.mark.parametrize(("bypass", "gates"), [("lp", "fixed"), ("cqil", "learned"), ("none", "fixed")])
def test_static_cache_decode_gives_the_eager_tokens_run_after_run(bypass, gates, tmp_path):
    """The CUDA-graph path's decode step, run eagerly on the CPU: a StaticCache, rewound between runs."""
    import copy

    import cqil
    from cqil.evaluation.latency import StaticDecode, eager_tokens
    from cqil.export.load import load_export
    from cqil.export.write import export_model

    original = make_model("llama")
    model = cqil.parallelize(
        copy.deepcopy(original), cqil.GroupPlan.parse("2-6:2", 8), bypass=bypass, gates=gates
    )
    with torch.no_grad():
        for p in cqil.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    export_model(model, tmp_path / "model")
    exported = load_export(tmp_path / "model")
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for m in (original.eval(), model.eval(), exported.eval()):
            decode = StaticDecode(m, prompt, 6, graph=False)
            expected = eager_tokens(m, prompt, 6)
            assert decode.tokens() == expected
            decode.prepare()()  # a timed run in between: the next run starts from the prompt again
            assert decode.tokens() == expected
            assert int(decode.cache.get_seq_length()) == 8 + 6


# ---------------------------------------------------------------------------------------------- out of domain
def test_a_run_measures_every_document_of_its_other_domain_text_and_names_the_key_when_it_cannot(tmp_path):
    import json

    from cqil.errors import RecipeError
    from cqil.evaluation.metrics import document_blocks
    from cqil.recovery.measure import prepare_eval, run_perplexity
    from cqil.recovery.recipe import recipe_from_dict
    from cqil.testing import make_tokenizer, write_corpus

    corpus = write_corpus(tmp_path / "train.jsonl.gz", repeats=10)
    other = tmp_path / "other.jsonl"
    docs = [
        ("the river flows to the sea " * 3, "Rivers"),
        ("a b", "Rivers"),
        ("god made light " * 4, "Light"),
    ]
    other.write_text(
        "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in docs)
    )
    raw = {
        "parallelize": {"groups": "2-6:2"},
        "train": {"seq_len": 8},
        "data": {"train": str(corpus), "eval_fraction": 0.5},
        "eval": {"num_sequences": 4, "other_domain": str(other)},
        "output_dir": "out",
    }
    tokenizer, model = make_tokenizer(), make_model("llama")
    heldout = prepare_eval(recipe_from_dict(raw), "r.yaml", tokenizer)
    tokens, labels = document_blocks(tokenizer, other, seq_len=8)
    assert torch.equal(heldout.other_domain[0], tokens) and heldout.other_domain[1] == labels
    assert set(labels) == {"Rivers", "Light"} and heldout.other_domain_name == str(other)
    lines = []
    result = run_perplexity(model, heldout, batch_size=2, label="original", log=lines.append)
    expected = perplexity(model, tokens, sources=labels, progress=False)
    assert result["other_domain"]["nll"] == pytest.approx(expected["nll"], rel=1e-6)
    assert result["other_domain"]["dataset"] == str(other)
    assert result["nll"] == pytest.approx(perplexity(model, heldout.tokens, progress=False)["nll"], rel=1e-6)
    assert any(line.startswith("cqil: out-of-domain perplexity, original: ") for line in lines)
    # eval.seq_len: both sets in blocks of that length, whatever the run trains on.
    raw["eval"]["seq_len"] = 12
    longer = prepare_eval(recipe_from_dict(raw), "r.yaml", tokenizer)
    tokens, labels = document_blocks(tokenizer, other, seq_len=12)
    assert longer.tokens.shape[1] == 12 and heldout.tokens.shape[1] == 8
    assert torch.equal(longer.other_domain[0], tokens) and longer.other_domain[1] == labels
    del raw["eval"]["seq_len"]
    # A missing file, or text with no document of a whole block, is one error naming the key.
    for bad, message in ((tmp_path / "missing.jsonl", "no JSONL"), (tmp_path / "short.jsonl", "no document")):
        (tmp_path / "short.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
        raw["eval"]["other_domain"] = str(bad)
        with pytest.raises(RecipeError, match=rf"^r.yaml: eval.other_domain: .*{message}"):
            prepare_eval(recipe_from_dict(raw), "r.yaml", tokenizer)


def test_the_standard_error_of_an_accuracy_is_the_harness_own():
    from lm_eval.api.metrics import mean_stderr

    from cqil.evaluation.metrics import binary_stderr

    for ones, n in ((219, 500), (1, 2), (0, 25), (400, 400)):
        assert binary_stderr(ones / n, n) == pytest.approx(
            mean_stderr([1.0] * ones + [0.0] * (n - ones)), abs=1e-12
        )
    assert binary_stderr(0.438, 1000) == pytest.approx(
        0.0157, abs=1e-4
    )  # about 1.6 points at 1,000 questions


# ---------------------------------------------------------------------------------------------- chance
def _harness_output(kind: str, choices: list[int], *, metrics=("acc", "acc_norm"), **config) -> tuple:
    """A task's ``configs`` entry and logged samples, shaped as lm-eval's ``simple_evaluate`` returns
    them with ``log_samples=True`` (one log-likelihood request per choice of each example)."""
    entry = {"output_type": kind, "metric_list": [{"metric": m} for m in metrics], "process_results": None}
    samples = [
        {"doc_id": i, "target": 0, "arguments": [("context", f" choice {c}") for c in range(n)]}
        for i, n in enumerate(choices)
    ]
    return entry | config, samples


def test_chance_is_the_mean_over_the_examples_of_one_over_their_choices():
    from cqil.evaluation.metrics import chance_level

    assert chance_level(*_harness_output("multiple_choice", [4, 4, 4])) == pytest.approx(0.25)
    assert chance_level(*_harness_output("multiple_choice", [2, 4])) == pytest.approx((1 / 2 + 1 / 4) / 2)
    # acc_mutual_info adds an unconditional request per choice: 8 requests are 4 choices.
    config, samples = _harness_output("multiple_choice", [8, 8], metrics=("acc", "acc_mutual_info"))
    assert chance_level(config, samples) == pytest.approx(0.25)
    # Several gold answers (a list target): guessing hits one of them.
    config, samples = _harness_output("multiple_choice", [4])
    samples[0]["target"] = [0, 2]
    assert chance_level(config, samples) == pytest.approx(0.5)
    # The greedy continuation equal to the target is not reached by guessing.
    assert chance_level(*_harness_output("loglikelihood", [1, 1], metrics=("perplexity", "acc"))) == 0.0
    # Scored by the task's own function, or of another kind, or nothing run: unknown.
    assert chance_level(*_harness_output("multiple_choice", [4], process_results="<function>")) is None
    assert chance_level(*_harness_output("generate_until", [1], metrics=("exact_match",))) is None
    assert chance_level(*_harness_output("loglikelihood_rolling", [1])) is None
    assert chance_level(_harness_output("multiple_choice", [])[0], []) is None


def test_the_local_tasks_record_their_chance_from_the_harness_run():
    import json

    from lm_eval.tasks import TaskManager

    from cqil.evaluation.metrics import LOCAL_TASKS, lm_eval_tasks
    from cqil.testing import make_tokenizer

    # Only the local tasks: indexing the harness's own thousands of task files takes seconds.
    manager = TaskManager(include_path=[str(LOCAL_TASKS)], include_defaults=False)
    tasks = ["cqil_next_sentence", "cqil_next_line", "cqil_last_word"]
    results = lm_eval_tasks(
        make_model("llama"), make_tokenizer(), tasks, limit=3, batch_size=4, manager=manager
    )
    for name in ("cqil_next_sentence", "cqil_next_line"):
        docs = [json.loads(line) for line in (LOCAL_TASKS / f"{name}.jsonl").read_text().splitlines()[:3]]
        assert results[name]["samples"] == 3
        assert results[name]["chance"] == pytest.approx(sum(1 / len(d["choices"]) for d in docs) / 3)
        assert results[name]["chance"] == pytest.approx(0.25)  # 4-way
    assert results["cqil_last_word"]["chance"] == 0.0
    assert {"acc", "perplexity"} <= results["cqil_last_word"].keys()


def test_a_damaged_record_of_the_measurements_before_training_is_measured_again_and_named(tmp_path):
    from cqil.recovery import measure
    from cqil.recovery.recipe import recipe_from_dict

    recipe = recipe_from_dict({"parallelize": {"groups": "2-6:2"}, "output_dir": str(tmp_path)})
    lines: list[str] = []
    assert measure.read_before(tmp_path, recipe, lines.append) is None  # nothing measured yet
    measure.write_before(tmp_path, {"original": {"ppl": 3.5}}, recipe)
    assert measure.read_before(tmp_path, recipe, lines.append) == {"original": {"ppl": 3.5}}
    other = recipe_from_dict({"parallelize": {"groups": "2-6:2"}, "eval": {"seq_len": 64}, "output_dir": "o"})
    assert measure.read_before(tmp_path, other, lines.append) is None
    assert not lines  # a record of other settings is expected after a change, not damage
    path = tmp_path / measure.BEFORE
    for damaged in (b'{"original": {"ppl": 3.', b"\xff\xfe\x00", b"[1, 2]"):
        path.write_bytes(damaged)
        assert measure.read_before(tmp_path, recipe, lines.append) is None
        assert len(lines) == 1 and str(path) in lines.pop()
    path.write_text('{"original": {"ppl": 3.5}}')  # written by a cqil that recorded no settings
    assert measure.read_before(tmp_path, recipe, lines.append) is None and not lines

"""Evaluation beyond perplexity and the report: per-source perplexity, lm-eval on in-memory models,
latency, the report folder, ``cqil.evaluate`` / ``cqil evaluate`` and their bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cqil
from cqil.cli import main as cli_main
from cqil.evaluation.evaluate import evaluate
from cqil.evaluation.metrics import (
    LOCAL_TASKS,
    UnknownTaskError,
    lm_eval_tasks,
    measure_latency,
    perplexity,
    task_manager,
)
from cqil.evaluation.report import gap_closed, headline, read_history, render_markdown, write_report
from cqil.export.load import load_export
from cqil.export.write import export_model
from cqil.recovery.data import heldout_blocks
from cqil.testing import SENTENCES, SOURCES, VOCAB, make_model, make_tokenizer, write_corpus, write_task

PLAN = "2-6:2"


# ---------------------------------------------------------------------------------------------- perplexity
def test_per_source_perplexity_splits_the_same_tokens():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    sources = ["a", "b", "a", "c", "b", "a"]
    result = perplexity(model, tokens, sources=sources, batch_size=4, progress=False)
    assert list(result["by_source"]) == ["a", "b", "c"]
    for name, part in result["by_source"].items():
        rows = [i for i, s in enumerate(sources) if s == name]
        alone = perplexity(model, tokens[rows], batch_size=4, progress=False)
        assert part["tokens"] == alone["tokens"] == len(rows) * 8
        assert part["nll"] == pytest.approx(alone["nll"], rel=1e-6)
    weighted = sum(p["nll"] * p["tokens"] for p in result["by_source"].values()) / result["tokens"]
    assert weighted == pytest.approx(result["nll"], rel=1e-9)
    with pytest.raises(ValueError, match="5 source names for 6 sequences"):
        perplexity(model, tokens, sources=sources[:5], progress=False)


def test_heldout_blocks_draw_each_source_on_its_own(tmp_path):
    tokenizer = make_tokenizer()
    corpus = write_corpus(tmp_path / "eval.jsonl.gz", repeats=10)
    tokens, sources = heldout_blocks(
        tokenizer, [], [corpus], seq_len=8, num_sequences=6, heldout_fraction=0.5
    )
    assert sources == ["RedPajamaBook"] * 2 + ["RedPajamaWikipedia"] * 2 + ["RedPajamaGithub"] * 2
    vocab = {
        s: set(" ".join(t for t, src in zip(SENTENCES, SOURCES, strict=True) if src == s).split())
        for s in SOURCES
    }
    for row, source in zip(tokens, sources, strict=True):
        words = set(tokenizer.decode(row).replace("</s>", " ").split())
        assert words <= vocab[source], (source, words - vocab[source])  # one source per block


def test_heldout_blocks_keep_to_the_sources_a_run_trains_on(tmp_path):
    tokenizer = make_tokenizer()
    corpus = write_corpus(tmp_path / "eval.jsonl.gz", repeats=10)
    kw = dict(seq_len=8, num_sequences=6, heldout_fraction=0.5)
    tokens, sources = heldout_blocks(
        tokenizer, [], [corpus], **kw, only_sources=["RedPajamaGithub", "RedPajamaBook"]
    )
    assert sources == ["RedPajamaBook"] * 3 + ["RedPajamaGithub"] * 3  # the share of two sources, not three
    everything, all_sources = heldout_blocks(tokenizer, [], [corpus], **kw)
    book = [row for row, s in zip(everything, all_sources, strict=True) if s == "RedPajamaBook"]
    assert torch.equal(tokens[:2], torch.stack(book))  # the same text, packed the same way
    with pytest.raises(ValueError, match=r"no held-out text of the sources \['RedPajamaArXiv'\]"):
        heldout_blocks(tokenizer, [], [corpus], **kw, only_sources=["RedPajamaArXiv"])


def test_heldout_blocks_warn_about_a_short_source_and_fail_without_text(tmp_path):
    path = tmp_path / "eval.jsonl"
    lines = [
        {
            "text": "in the beginning god created the heaven and the earth " * 8,
            "meta": {"redpajama_set_name": "A"},
        }
    ]
    lines += [{"text": "the river flows", "meta": {"redpajama_set_name": "B"}}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.warns(UserWarning, match="source 'B'"):
        tokens, sources = heldout_blocks(
            make_tokenizer(), [], [path], seq_len=8, num_sequences=4, heldout_fraction=0.5
        )
    assert sources == ["A", "A"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"title": "no text here"}) + "\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        heldout_blocks(make_tokenizer(), [], [empty], seq_len=8, num_sequences=4, heldout_fraction=0.5)


# ---------------------------------------------------------------------------------------------- lm-eval
def _choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.integration
def test_lm_eval_runs_on_the_in_memory_model_and_agrees_with_a_direct_computation(tmp_path):
    model, tokenizer = make_model("llama").eval(), make_tokenizer()
    docs = write_task(tmp_path / "tasks")
    results = lm_eval_tasks(model, tokenizer, ["tiny_choice"], paths=[tmp_path / "tasks"], batch_size=4)
    expected = sum(
        max(range(3), key=lambda c: _choice_logprob(model, tokenizer, d["context"], d["choices"][c]))
        == d["label"]
        for d in docs
    ) / len(docs)
    assert set(results) == {"tiny_choice"}
    assert results["tiny_choice"]["acc"] == pytest.approx(expected)
    # The size and the standard error beside the accuracy: the harness's mean_stderr over the 0/1 scores.
    from lm_eval.api.metrics import mean_stderr

    assert results["tiny_choice"]["samples"] == len(docs)
    scores = [1.0] * round(expected * len(docs)) + [0.0] * (len(docs) - round(expected * len(docs)))
    assert results["tiny_choice"]["acc_stderr"] == pytest.approx(mean_stderr(scores))
    assert results["tiny_choice"]["chance"] == pytest.approx(1 / 3)  # three choices each


@pytest.mark.integration
def test_the_shipped_local_tasks_are_known_offline():
    manager = task_manager()
    assert {"cqil_next_sentence", "cqil_last_word", "cqil_next_line"} <= set(manager.all_tasks)
    for name in ("cqil_next_sentence", "cqil_last_word", "cqil_next_line"):
        rows = (LOCAL_TASKS / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == 500 and all(json.loads(r)["context"] for r in rows)


def test_an_unknown_task_is_named(tmp_path):
    with pytest.raises(UnknownTaskError, match="'hellaswagg'"):
        lm_eval_tasks(make_model("llama"), make_tokenizer(), ["hellaswagg"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        task_manager([tmp_path / "nowhere"])


# ---------------------------------------------------------------------------------------------- latency
def test_latency_times_every_model_against_the_baseline():
    original = make_model("llama")
    parallel = cqil.parallelize(copy.deepcopy(original), cqil.GroupPlan.parse(PLAN, 8))
    out = measure_latency(
        {"original": original, "recovered": parallel}, prefill_len=16, new_tokens=4, reps=2, progress=False
    )
    assert out["baseline"] == "original" and out["device"].startswith("CPU")
    assert set(out["models"]) == {"original", "recovered"} and set(out["speedup"]) == {"recovered"}
    for numbers in out["models"].values():
        assert numbers["prefill_tokens_per_s"] == pytest.approx(16 / numbers["prefill_ms"] * 1e3, rel=1e-2)
        assert numbers["decode_tokens_per_s"] > 0
    assert all(v > 0 for v in out["speedup"]["recovered"].values())


# ---------------------------------------------------------------------------------------------- report
def _report(**extra) -> dict:
    ppl = {
        s: {"ppl": p, "nll": math.log(p), "tokens": 120}
        for s, p in (("original", 10.0), ("parallelized", 20.0), ("recovered", 12.0))
    }
    return {
        "schema_version": 1,
        "base_model": "tiny",
        "plan": {
            "spec": PLAN,
            "groups": [[2, 3], [4, 5]],
            "num_layers": 8,
            "num_layers_after": 6,
            "ideal_speedup": 1.3333,
            "mode": "parallel",
            "bypass": "lp",
            "gates": "learned",
            "form": "merged",
        },
        "perplexity": ppl,
        "perplexity_by_source": {"A": {s: dict(v, tokens=60) for s, v in ppl.items()}},
        "gap_closed": gap_closed(ppl),
        "gap_closed_by_source": {"A": gap_closed(ppl)},
        "latency": {
            "device": "CPU x",
            "prefill_len": 16,
            "new_tokens": 4,
            "reps": 1,
            "baseline": "original",
            "models": {
                "original": {
                    "prefill_ms": 2.0,
                    "prefill_tokens_per_s": 8000.0,
                    "decode_ms_per_token": 1.0,
                    "decode_tokens_per_s": 1000.0,
                },
                "recovered": {
                    "prefill_ms": 1.6,
                    "prefill_tokens_per_s": 10000.0,
                    "decode_ms_per_token": 0.8,
                    "decode_tokens_per_s": 1250.0,
                },
            },
            "speedup": {"recovered": {"prefill": 1.25, "decode": 1.25}},
            "ideal": 1.3333,
        },
        "lm_eval": {"original": {"t": {"acc": 0.5}}, "recovered": {"t": {"acc": 0.4}}},
        **extra,
    }


def test_gap_closed_and_headline():
    assert gap_closed(_report()["perplexity"]) == pytest.approx(0.8)
    assert (
        headline(_report())
        == "80 % of the perplexity gap closed on the held-out text; 1.25× faster decode (eager decode on a CPU)"
    )
    nothing_lost = {s: {"ppl": 10.0} for s in ("original", "parallelized", "recovered")}
    assert gap_closed(nothing_lost) is None


def _stage_results(*ppls, source="A", tokens=100) -> dict:
    """``perplexity()``-shaped results of the three stages, one source."""
    out = {}
    for stage, p in zip(("original", "parallelized", "recovered"), ppls, strict=True):
        numbers = {"ppl": p, "nll": math.log(p), "tokens": tokens}
        out[stage] = {**numbers, "by_source": {source: dict(numbers)}}
    return out


def test_a_run_headline_leads_with_the_text_it_did_not_train_on():
    from cqil.evaluation.report import build_report

    heldout = _stage_results(10.0, 20.0, 9.0, source="RedPajamaBook")
    other = _stage_results(25.0, 41.0, 29.0, source="ProjectReadmes", tokens=300)
    for stage in heldout:
        heldout[stage]["other_domain"] = {**other[stage], "dataset": "data/other_domain/x.jsonl.gz"}
    plan = _report()["plan"]
    report = build_report(base_model="m", plan=plan, perplexity_results=heldout, datasets=["train.jsonl"])
    assert report["other_domain_gap_closed"] == pytest.approx(0.75)
    assert report["gap_closed"] == pytest.approx(1.1)
    assert report["other_domain_by_source"]["ProjectReadmes"]["recovered"]["ppl"] == 29.0
    assert report["other_domain_dataset"] == "data/other_domain/x.jsonl.gz"
    assert headline(report) == (
        "75 % of the perplexity gap closed on text the run did not train on (recovered perplexity 29.00, "
        "original 25.00; `data/other_domain/x.jsonl.gz`); 110 % on the in-domain held-out split of the "
        "training sources"
    )
    md = render_markdown(report)
    ood, ind = md.index("### Out-of-domain perplexity"), md.index("### Perplexity on the in-domain held-out")
    assert ood < ind
    assert "| ProjectReadmes (300 tokens) | 25.00 | 41.00 | 29.00 | 75 % |" in md
    assert "| RedPajamaBook (100 tokens) | 10.00 | 20.00 | 9.00 | 110 % |" in md
    assert (
        "- Perplexity on text the run did not train on: original 25.00, parallelized 41.00, recovered 29.00."
        in md
    )
    # Without out-of-domain text a run's headline says that its figure is in-domain and what to set.
    for stage in heldout:
        del heldout[stage]["other_domain"]
    alone = build_report(base_model="m", plan=plan, perplexity_results=heldout, datasets=["train.jsonl"])
    assert "other_domain" not in alone
    assert headline(alone) == (
        "110 % of the perplexity gap closed on the in-domain held-out split of the training sources "
        "(no text outside the training sources measured: eval.other_domain)"
    )


def _lm_eval_results(chance: dict) -> dict:
    """lm_eval_tasks results by stage for a 4-way task "mc" and a last-word task "lw"."""
    return {
        stage: {
            "mc": {
                "acc": acc,
                "acc_stderr": 0.0221,
                "acc_norm": 0.4,
                "acc_norm_stderr": 0.0219,
                "samples": 500,
                **({"chance": chance["mc"]} if "mc" in chance else {}),
            },
            "lw": {
                "perplexity": 123.456,
                "acc": lw,
                "acc_stderr": 0.0194,
                "samples": 500,
                **({"chance": chance["lw"]} if "lw" in chance else {}),
            },
        }
        for stage, acc, lw in (
            ("original", 0.40, 0.32),
            ("parallelized", 0.36, 0.20),
            ("recovered", 0.325, 0.26),
        )
    }


def test_the_lm_eval_section_prints_each_task_size_and_standard_error():
    from cqil.evaluation.report import build_report

    settings = {"tasks": ["mc", "lw"], "limit": None, "num_fewshot": None}
    report = build_report(
        base_model="m", plan=_report()["plan"], lm_eval=_lm_eval_results({}), lm_eval_settings=settings
    )
    assert report["lm_eval_samples"] == {"mc": 500, "lw": 500}
    assert "samples" not in report["lm_eval"]["original"]["mc"]
    assert "lm_eval_chance" not in report and "lm_eval_kept" not in report
    md = render_markdown(report)
    # Without a chance level the table has no chance or kept columns.
    assert "| task | examples | metric | original | parallelized | recovered |" in md
    assert "| mc | 500 | acc | 0.400 ± 0.022 | 0.360 ± 0.022 | 0.325 ± 0.022 |" in md
    assert "| mc | 500 | acc_norm | 0.400 ± 0.022 |" in md
    assert "| lw | 500 | perplexity | 123.46 | 123.46 | 123.46 |" in md
    assert "acc_stderr" not in md and "± one standard error" in md and "kept" not in md


def test_kept_is_the_share_of_the_original_margin_above_chance():
    from cqil.evaluation.accuracy_report import kept

    assert kept(0.40, 0.325, 0.25) == pytest.approx(0.5)
    assert kept(0.40, 0.325, 0.0) == pytest.approx(0.8125)
    assert kept(0.40, 0.40, 0.25) == pytest.approx(1.0)
    assert kept(0.40, 0.20, 0.25) == pytest.approx(-1 / 3)  # below chance: less than nothing kept
    # No margin to keep: the original at or below chance; or a number unknown.
    assert kept(0.25, 0.30, 0.25) is None
    assert kept(0.20, 0.30, 0.25) is None
    assert kept(0.40, 0.30, None) is None and kept(None, 0.30, 0.25) is None


def test_the_lm_eval_section_prints_the_chance_level_and_the_share_each_model_keeps(tmp_path):
    from cqil.evaluation.report import build_report

    settings = {"tasks": ["mc", "lw"], "limit": None, "num_fewshot": None}
    lm_eval = _lm_eval_results({"mc": 0.25, "lw": 0.0})
    report = build_report(base_model="m", plan=_report()["plan"], lm_eval=lm_eval, lm_eval_settings=settings)
    # The stages' scores keep their keys; the chance level and the shares are new entries.
    assert report["lm_eval"]["original"]["mc"] == {
        "acc": 0.40,
        "acc_stderr": 0.0221,
        "acc_norm": 0.4,
        "acc_norm_stderr": 0.0219,
    }
    assert report["lm_eval_chance"] == {"mc": 0.25, "lw": 0.0}
    kept = report["lm_eval_kept"]
    assert set(kept) == {"parallelized", "recovered"}
    assert kept["recovered"]["mc"]["acc"] == pytest.approx(0.5)
    assert kept["parallelized"]["mc"]["acc"] == pytest.approx(0.11 / 0.15)
    assert kept["recovered"]["mc"]["acc_norm"] == pytest.approx(1.0)
    assert kept["recovered"]["lw"] == {"acc": pytest.approx(0.26 / 0.32)}  # no share of a perplexity
    md = render_markdown(report)
    header = "| task | examples | metric | chance | original | parallelized | recovered | kept, parallelized | kept, recovered |"
    assert header in md
    assert "| mc | 500 | acc | 0.250 | 0.400 ± 0.022 | 0.360 ± 0.022 | 0.325 ± 0.022 | 73 % | 50 % |" in md
    assert "| lw | 500 | acc | 0.000 | 0.320 ± 0.019 | 0.200 ± 0.019 | 0.260 ± 0.019 | 62 % | 81 % |" in md
    assert "| lw | 500 | perplexity | – | 123.46 | 123.46 | 123.46 | – | – |" in md
    assert "kept: the share of the original's accuracy above chance" in md

    # The original at or below chance keeps no margin: "–", and no share in report.json.
    lm_eval["original"]["mc"]["acc"] = 0.25
    lm_eval["original"]["mc"]["acc_norm"] = 0.2
    report = build_report(base_model="m", plan=_report()["plan"], lm_eval=lm_eval, lm_eval_settings=settings)
    assert "mc" not in report["lm_eval_kept"]["recovered"]
    md = render_markdown(report)
    assert "| mc | 500 | acc | 0.250 | 0.250 ± 0.022 | 0.360 ± 0.022 | 0.325 ± 0.022 | – | – |" in md
    assert "| mc | 500 | acc_norm | 0.250 | 0.200 ± 0.022 | 0.400 ± 0.022 | 0.400 ± 0.022 | – | – |" in md

    # report.json carries the new entries through the folder written to disk.
    write_report(report, tmp_path / "report")
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["lm_eval_chance"] == {"mc": 0.25, "lw": 0.0}
    assert written["lm_eval_kept"]["recovered"]["lw"]["acc"] == pytest.approx(0.8125)


def test_the_latency_section_names_the_mode_the_ideal_and_never_calls_a_slowdown_faster():
    from cqil.evaluation.latency_report import latency_markdown

    slow = _report()
    slow["latency"]["speedup"]["recovered"] = {"prefill": 1.02, "decode": 0.96}
    assert headline(slow).endswith("slower decode: 0.96× the original's speed (eager decode on a CPU)")
    assert "faster" not in headline(slow)
    md = "\n".join(latency_markdown(slow))
    assert "| decode | eager | recovered | 1,000.0 | 1,250.0 | 0.960× (slower) | -12 % |" in md
    assert "| prefill 16 tokens | – | recovered | 8,000.0 | 10,000.0 | 1.020× | 6 % |" in md
    assert "L / L_eff = 1.333×" in md and "(speedup − 1) / (ideal − 1)" in md
    assert (
        "cannot show that gain: on a CPU each core streams the same weights" in md and "at best match" in md
    )
    assert "bench/results/gpu-h200.jsonl" in md and "separate devices" not in md


def test_the_latency_section_on_a_gpu_reports_every_phase_and_mode():
    from cqil.evaluation.latency_report import latency_markdown

    gpu = _report()
    phases = {
        "prefill_512": {"ms": 20.0, "tokens": 512, "tokens_per_s": 25600.0},
        "prefill_2048": {"ms": 60.0, "tokens": 2048, "tokens_per_s": 34133.3},
        "decode_eager": {"ms": 640.0, "tokens": 64, "tokens_per_s": 100.0, "ms_per_token": 10.0},
        "decode_graph": {"ms": 192.0, "tokens": 64, "tokens_per_s": 333.3, "ms_per_token": 3.0},
    }
    faster = {k: dict(v, tokens_per_s=v["tokens_per_s"] * 1.25) for k, v in phases.items()}
    speedup = {k: 1.25 for k in phases} | {"prefill": 1.25, "decode": 1.25}
    gpu["latency"] |= {
        "device": "NVIDIA H200",
        "device_type": "cuda",
        "modes": ["eager", "graph"],
        "decode_mode": "graph",
        "prefill_lens": [512, 2048],
        "models": {"original": {"phases": phases}, "recovered": {"phases": faster}},
        "speedup": {"recovered": speedup},
    }
    assert headline(gpu).endswith("1.25× faster decode (CUDA-graph decode on NVIDIA H200)")
    md = "\n".join(latency_markdown(gpu))
    assert "| decode | CUDA-graph | recovered | 333.3 | 416.6 | 1.250× | 75 % |" in md
    assert "| prefill 2,048 tokens | – | recovered |" in md and "cannot show" not in md


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "kd": 0.5 / s} for s in range(1, 6)]
    out = write_report(_report(), tmp_path / "report", similarity=torch.eye(8), history=history)
    saved = json.loads((out / "report.json").read_text())
    assert saved["plots"] == ["similarity.png", "losses.png", "perplexity.png", "quality_latency.png"]
    for name in saved["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert (
        "**80 % of the perplexity gap closed on the held-out text; 1.25× faster decode (eager decode on a CPU).**"
        in md
    )
    assert "| A (60 tokens) | 10.00 | 20.00 | 12.00 | 80 % |" in md and "![losses](losses.png)" in md
    with pytest.raises(FileExistsError, match="overwrite"):
        write_report(_report(), out)
    write_report(_report(gap_closed=None), out, overwrite=True)
    assert "gap closed" not in (out / "report.md").read_text()


def test_a_failed_report_leaves_nothing_behind(tmp_path, monkeypatch):
    import cqil.evaluation.report

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(cqil.evaluation.report, "perplexity_png", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(_report(), tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_read_history_keeps_the_last_entry_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "loss": 2.5},
        {"step": 3, "loss": 1.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in read_history(path)] == [3.0, 2.5, 1.0]


# ---------------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, original folder, eval text, the recovered model in memory)."""
    root = tmp_path_factory.mktemp("evaluate")
    original = make_model("llama")
    original.save_pretrained(root / "original")
    make_tokenizer().save_pretrained(root / "original")
    recovered = cqil.parallelize(copy.deepcopy(original), cqil.GroupPlan.parse(PLAN, 8))
    with torch.no_grad():  # "trained": gates and weights moved away from the rewrite's start
        for p in cqil.trainable_parameters(recovered).values():
            p.add_(0.01 * torch.randn_like(p))
    export_model(recovered, root / "model", tokenizer=make_tokenizer())
    write_corpus(root / "heldout.jsonl.gz", repeats=10)
    write_task(root / "tasks")
    return root, recovered


@pytest.mark.integration
def test_evaluate_measures_the_three_stages_on_the_same_tokens(exported, tmp_path):
    root, recovered = exported
    report = evaluate(
        root / "model",
        original=root / "original",
        data=root / "heldout.jsonl.gz",
        seq_len=8,
        num_sequences=6,
        tasks=["tiny_choice"],
        task_paths=[root / "tasks"],
        latency_reps=1,
        out_dir=tmp_path / "report",
        progress=False,
    )
    tokenizer = make_tokenizer()
    tokens, sources = heldout_blocks(
        tokenizer, [], [root / "heldout.jsonl.gz"], seq_len=8, num_sequences=6, heldout_fraction=0.5
    )
    original = load_export  # keep the name space tidy below
    original = cqil.load_model(str(root / "original"))[0]
    rewritten = cqil.parallelize(copy.deepcopy(original), cqil.GroupPlan.parse(PLAN, 8))
    for stage, model in (("original", original), ("parallelized", rewritten), ("recovered", recovered)):
        expected = perplexity(model, tokens, sources=sources, progress=False)
        assert report["perplexity"][stage]["nll"] == pytest.approx(expected["nll"], rel=1e-5), stage
        assert report["perplexity_by_source"]["RedPajamaGithub"][stage]["nll"] == pytest.approx(
            expected["by_source"]["RedPajamaGithub"]["nll"], rel=1e-5
        )
    assert set(report["lm_eval"]) == {"original", "parallelized", "recovered"}
    assert report["latency"]["ideal"] == pytest.approx(8 / 6, rel=1e-3)
    assert (tmp_path / "report" / "report.md").is_file() and (
        tmp_path / "report" / "similarity.png"
    ).is_file()


def run_cli(*argv) -> int:
    return cli_main([str(a) for a in argv])


def test_cli_evaluate_writes_the_report(exported, tmp_path, capsys):
    root, _ = exported
    assert (
        run_cli(
            "evaluate",
            root / "model",
            "--data",
            root / "heldout.jsonl.gz",
            "--seq-len",
            8,
            "--num-sequences",
            3,
            "--no-latency",
            "--out",
            tmp_path / "r",
        )
        == 0
    )
    assert "recovered perplexity" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["perplexity"]) == {"recovered"} and "latency" not in report


def test_cli_evaluate_measures_every_document_of_the_other_domain_text(exported, tmp_path, capsys):
    from cqil.evaluation.metrics import document_blocks

    root, recovered = exported
    other = tmp_path / "other.jsonl"
    docs = [
        ("the river flows to the sea " * 3, "Rivers"),
        ("a b", "Rivers"),
        ("god made light " * 4, "Light"),
    ]
    other.write_text(
        "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in docs)
    )
    argv = ["evaluate", root / "model", "--other-domain", other, "--seq-len", 8, "--no-latency"]
    assert run_cli(*argv, "--out", tmp_path / "r") == 0
    assert capsys.readouterr().out.startswith("text the run did not train on (recovered perplexity ")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # Each document packed on its own: the short one gives no block, none spans two documents.
    tokens, sources = document_blocks(make_tokenizer(), other, seq_len=8)
    assert sources == ["Rivers"] * (len(sources) - sources.count("Light")) + ["Light"] * sources.count(
        "Light"
    )
    expected = perplexity(recovered, tokens, sources=sources, progress=False)
    assert report["other_domain"]["recovered"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert set(report["other_domain_by_source"]) == {"Rivers", "Light"}
    assert report["other_domain_dataset"] == str(other) and "perplexity" not in report
    assert (
        "### Out-of-domain perplexity, text the run did not train on"
        in (tmp_path / "r" / "report.md").read_text()
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_export", "config.json"),
        ("no_text", "empty.jsonl"),
        ("unknown_task", "'nope'"),
        ("out_exists", "not empty"),
        ("missing_data", "no such file"),
        ("missing_other_domain", "--other-domain"),
        ("short_other_domain", "no document of 8 tokens or more"),
    ],
)
def test_cli_evaluate_bad_input_is_one_line_and_writes_nothing(case, match, exported, tmp_path, capsys):
    root, _ = exported
    out = tmp_path / "out"
    model, data, extra = root / "model", root / "heldout.jsonl.gz", []
    if case == "not_export":
        model = root / "original"  # a plain checkpoint, not a cqil export
    elif case == "no_text":
        data = tmp_path / "empty.jsonl"
        data.write_text(json.dumps({"meta": {}}) + "\n")
    elif case == "unknown_task":
        extra = ["--tasks", "nope"]
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "missing_data":
        data = tmp_path / "missing.jsonl"
    elif case == "missing_other_domain":
        extra = ["--other-domain", tmp_path / "missing.jsonl"]
    elif case == "short_other_domain":
        (tmp_path / "short.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
        extra = ["--other-domain", tmp_path / "short.jsonl"]
    code = run_cli(
        "evaluate",
        model,
        "--data",
        data,
        "--seq-len",
        8,
        "--num-sequences",
        2,
        "--no-latency",
        "--out",
        out,
        *extra,
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("cqil: error:") and match in err, err
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_update_model_card_embeds_the_report(exported, tmp_path):
    import shutil

    from cqil.export.card import update_model_card

    root, recovered = exported
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    report_dir = write_report(_report(), tmp_path / "report", history=[{"step": 1, "loss": 1.0}])
    update_model_card(folder, report_dir / "report.json")
    card = (folder / "README.md").read_text()
    assert (
        "**80 % of the perplexity gap closed on the held-out text; 1.25× faster decode (eager decode on a CPU).**"
        in card
    )
    assert "![losses](plots/losses.png)" in card and (folder / "plots" / "losses.png").is_file()
    assert "model-index" in card
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the weights were not touched
        torch.testing.assert_close(
            load_export(folder)(ids).logits, recovered(ids).logits, rtol=1e-5, atol=1e-5
        )

"""Export: a fresh-process round trip on every architecture, fold, refusals, bad input, the card, the Hub.

The round trip loads each export the way a user would — ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` in a new Python process, offline, with cqil made unimportable — and
compares its logits and greedy tokens with the in-memory model's, saved by this process.

Nothing here touches the network: the Hub push is tested at huggingface_hub's HTTP boundary (its
``httpx2`` client is replaced by one whose transport records every request and answers like the Hub).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import subprocess
import sys

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import cqil
from cqil.cli.export import add_export_parser
from cqil.export.hub import push_to_hub
from cqil.export.load import check_export, load_export
from cqil.export.write import export_model
from cqil.rewrite.group import BranchGroup, MergedGroup
from cqil.testing import ARCHS, VOCAB, make_model, make_tokenizer

PLAN = [[1, 2, 3], [4, 5]]  # a triple (cqil distance 2 reaches two branches back) and a pair
# (bypass, form, gate_shape): every bypass mode in both forms, channel gates in some.
VARIANTS = [
    ("lp", "merged", "scalar"),
    ("lp", "branches", "channel"),
    ("none", "merged", "scalar"),
    ("none", "branches", "scalar"),
    ("cqil", "merged", "channel"),
    ("cqil", "branches", "scalar"),
]
GENERATE = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

# Runs in a new interpreter: transformers alone must load the export (cqil is made unimportable).
CHILD = r"""
import json, sys
sys.modules["cqil"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
input_ids = load_file(sys.argv[1])["input_ids"]
folders, generate = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "CqilForCausalLM", type(model)
    with torch.no_grad():
        out[name + ".logits"] = model(input_ids).logits
    out[name + ".tokens"] = model.generate(input_ids, **generate)
    ids = input_ids  # the same greedy tokens without the KV cache: the cache must change nothing
    with torch.no_grad():
        for _ in range(generate["max_new_tokens"]):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    out[name + ".nocache"] = ids
save_file(out, sys.argv[4])
"""


def share_head_norms(model, plan=PLAN) -> None:
    """Give the layers of each group the same q/k norms (Qwen3), which folding requires."""
    with torch.no_grad():
        for group in plan:
            first = model.model.layers[group[0]].self_attn
            for i in group[1:]:
                attn = model.model.layers[i].self_attn
                if hasattr(attn, "q_norm"):
                    attn.q_norm.weight.copy_(first.q_norm.weight)
                    attn.k_norm.weight.copy_(first.k_norm.weight)


def parallel_model(arch, bypass="lp", form="merged", gate_shape="scalar", *, perturb=True, plan=PLAN):
    model = make_model(arch)
    distance = 2 if bypass == "cqil" else 1
    cqil.parallelize(model, plan, bypass=bypass, bypass_distance=distance, form=form, gate_shape=gate_shape)
    if perturb:  # as after training: gates away from their initial values
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, gates in model.named_parameters():
                if name.endswith(".gates"):
                    gates.add_(0.3 * torch.randn(gates.shape, generator=generator))
    return model


def in_memory_outputs(model, input_ids):
    with torch.no_grad():
        logits = model(input_ids).logits
    return logits, model.generate(input_ids, **GENERATE)


def assert_no_pickles(folder) -> None:
    found = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not found, f"pickle files in {folder}: {found}"


def leftovers(parent) -> list[str]:
    """Hidden temporary siblings an export may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ the round trip


def export_variants(arch, root, input_ids) -> dict[str, tuple]:
    """Export every variant of ``arch`` under ``root``: ``{name: (folder, logits, greedy tokens)}``."""
    out = {}
    for bypass, form, gate_shape in VARIANTS:
        name = f"{arch}-{bypass}-{form}-{gate_shape}"
        model = parallel_model(arch, bypass, form, gate_shape)
        tokenizer = make_tokenizer() if bypass == "lp" and form == "merged" else None
        out[name] = (
            export_model(model, root / name, tokenizer=tokenizer),
            *in_memory_outputs(model, input_ids),
        )
        # Gates are exported with their trained values.
        saved = load_file(out[name][0] / "model.safetensors")
        gates = {k: v for k, v in model.state_dict().items() if k.endswith(".gates")}
        assert gates or bypass == "none"
        for key, value in gates.items():
            assert torch.equal(saved[key], value), f"{name}: {key}"
    # Folded: every group one plain wide decoder layer (lp, gates at 1).
    model = make_model(arch)
    share_head_norms(model)
    cqil.parallelize(model, PLAN, bypass="lp", form="merged")
    name = f"{arch}-lp-folded"
    out[name] = (export_model(model, root / name, fold=True), *in_memory_outputs(model, input_ids))
    return out


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every architecture's variants, then load them all in one fresh, offline process.

    Returns ``{name: (folder, expected logits, expected tokens, loaded logits, loaded tokens)}``.
    """
    root = tmp_path_factory.mktemp("round-trip")
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    exports = {}
    for arch in ARCHS:
        exports.update(export_variants(arch, root, input_ids))
    save_file({"input_ids": input_ids}, root / "inputs.safetensors")
    folders = {name: str(folder) for name, (folder, _, _) in exports.items()}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf-home"))
    args = [
        str(root / "inputs.safetensors"),
        json.dumps(folders),
        json.dumps(GENERATE),
        str(root / "got.safetensors"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = load_file(root / "got.safetensors")
    for name in exports:
        assert torch.equal(got[name + ".tokens"], got[name + ".nocache"]), (
            f"{name}: cached generation differs"
        )
    return {name: (*e, got[name + ".logits"], got[name + ".tokens"]) for name, e in exports.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.integration
def test_round_trip_in_a_fresh_process(arch, round_trip):
    diffs = {}
    for name, (folder, logits, tokens, got_logits, got_tokens) in round_trip.items():
        if not name.startswith(f"{arch}-"):
            continue
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "configuration_cqil.py", "modeling_cqil.py", "cqil_group.py"} <= files
        assert {"model.safetensors", "generation_config.json", "README.md"} <= files
        if name.endswith("lp-merged-scalar"):
            assert {"tokenizer.json", "tokenizer_config.json"} <= files
        assert_no_pickles(folder)
        assert leftovers(folder.parent) == []
        diffs[name.removeprefix(f"{arch}-")] = (got_logits - logits).abs().max().item()
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert torch.equal(got_tokens, tokens), name
    assert len(diffs) == len(VARIANTS) + 1
    print(f"{arch}: max |logit diff| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_load_export_gives_the_package_classes(tmp_path):
    model = parallel_model("qwen2", "cqil", "merged")
    loaded = load_export(export_model(model, tmp_path / "out"))
    assert [type(layer) for layer in loaded.model.layers] == [type(layer) for layer in model.model.layers]
    assert isinstance(loaded.model.layers[1], MergedGroup)
    assert cqil.trainable_parameters(loaded).keys() == cqil.trainable_parameters(model).keys()
    for mine, theirs in zip(loaded.model.layers, model.model.layers, strict=True):
        if isinstance(mine, MergedGroup):  # non-persistent buffers are rebuilt, not loaded
            assert torch.equal(mine.gate_mask, theirs.gate_mask) and torch.equal(
                mine.gate_eye, theirs.gate_eye
            )
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = model(input_ids, output_hidden_states=True)
        got = loaded(input_ids, output_hidden_states=True)
    assert torch.equal(got.logits, expected.logits)
    assert (
        len(got.hidden_states)
        == len(expected.hidden_states)
        == loaded.config.text_config.num_hidden_layers + 1
    )
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(mine, theirs)

    eager = load_export(tmp_path / "out", attn_implementation="eager")
    assert eager.config._attn_implementation == eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids).logits, expected.logits, atol=1e-5, rtol=0)


def test_dtype_is_selectable_and_defaults_to_the_models(tmp_path):
    model = parallel_model("llama", "lp", "branches")
    assert load_export(export_model(model, tmp_path / "f32")).dtype == torch.float32
    out = export_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_export(out).dtype == torch.bfloat16
    assert load_export(export_model(model.to(torch.float16), tmp_path / "f16")).dtype == torch.float16


def test_large_models_are_sharded(tmp_path):
    out = export_model(parallel_model("mistral"), tmp_path / "out", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    check_export(out)


# ------------------------------------------------------------------ fold


@pytest.mark.parametrize("form", ["merged", "branches"])
def test_fold_writes_plain_wide_decoder_layers(form, tmp_path):
    model = make_model("llama")
    cqil.parallelize(model, PLAN, bypass="lp", form=form)
    loaded = load_export(export_model(model, tmp_path / "out", fold=True))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["cqil"]["folded"] is True
    layer = loaded.model.layers[1]
    assert type(layer).__name__ == "LlamaDecoderLayer"  # the base class, not a group
    assert layer.self_attn.config is loaded.config.text_config  # run-time switches reach it
    assert layer.self_attn.q_proj.weight.shape == (3 * 4 * 16, 48)  # 3 branches x 4 heads x head_dim 16
    assert layer.mlp.down_proj.weight.shape == (48, 3 * 80)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case, match",
    [
        ("cqil bypass", "fold needs bypass 'lp'"),
        ("trained gates", r"cannot fold group \[1, 2, 3\].*gates are not all 1"),
        ("qwen3 head norms", r"cannot fold group \[1, 2, 3\].*q/k norms differ"),
    ],
)
def test_fold_refuses_what_one_plain_layer_cannot_express(case, match, tmp_path):
    if case == "cqil bypass":
        model = parallel_model("llama", "cqil", perturb=False)
    elif case == "trained gates":
        model = parallel_model("llama", "lp")
    else:
        model = parallel_model("qwen3", "lp", perturb=False)
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "out", fold=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the output folder


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    model = parallel_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out exists and is not empty.*overwrite"):
        export_model(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_model(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(model, empty) / "config.json").is_file()  # an empty folder is fine


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import cqil.export.write

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    model = parallel_model("llama")
    previous = export_model(model, tmp_path / "previous")
    monkeypatch.setattr(cqil.export.write, "_save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, tmp_path / "new")
    with pytest.raises(OSError, match="No space left"):
        export_model(model, previous, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # no temp folder, no partial "new"
    check_export(previous)  # the folder it would have replaced is intact


def test_refuses_a_model_that_is_not_parallelized(tmp_path):
    with pytest.raises(ValueError, match="not parallelized"):
        export_model(make_model("llama"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_file_or_key(tmp_path):
    plain = tmp_path / "plain"
    make_model("llama").save_pretrained(plain)
    with pytest.raises(
        ValueError, match=r"plain/config.json: model_type is 'llama', not 'cqil'.*not a cqil export"
    ):
        load_export(plain)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: no such file"):
        load_export(tmp_path / "empty")

    model = parallel_model("qwen3", "cqil", "merged")
    single = export_model(model, tmp_path / "single")
    (single / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"single: no model.safetensors or model.safetensors.index.json"
    ):
        load_export(single)

    sharded = export_model(model, tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"sharded/{shard.name}: missing weight file"):
        load_export(sharded)

    mismatch = export_model(model, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"mismatch/model.safetensors: weight 'model.layers.0.mlp.gate_proj.weight' has shape "
        r"\[80, 48\] but config.json implies \[96, 48\]",
    ):
        load_export(mismatch)

    code = export_model(model, tmp_path / "code")
    (code / "cqil_group.py").unlink()
    with pytest.raises(FileNotFoundError, match=r"code/cqil_group.py: no such file"):
        load_export(code)


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="cqil")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.run(args)


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    report = {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "datasets": ["togethercomputer/RedPajama-Data-1T-Sample"],
    }
    checkpoint = export_model(
        parallel_model("llama", "lp"), tmp_path / "ckpt", tokenizer=make_tokenizer(), report=report
    )
    assert run_cli(checkpoint, "--out", tmp_path / "out", "--dtype", "bfloat16") == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert load_export(tmp_path / "out").dtype == torch.bfloat16
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    card = huggingface_hub.ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == report["base_model"] and card.data.datasets == report["datasets"]


@pytest.mark.parametrize("bad", ["not-cqil", "missing-weights"])
def test_cli_bad_checkpoint_leaves_no_output(bad, tmp_path):
    checkpoint = tmp_path / "ckpt"
    if bad == "not-cqil":
        make_model("mistral").save_pretrained(checkpoint)
    else:
        export_model(parallel_model("mistral"), checkpoint)
        (checkpoint / "model.safetensors").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=r"ckpt"):
        run_cli(checkpoint, "--out", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cqil_export_prints_one_error_line(tmp_path, capsys):
    from cqil.cli import main

    make_model("qwen2").save_pretrained(tmp_path / "plain")
    capsys.readouterr()  # its progress bar
    assert main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cqil: error: ") and "plain/config.json" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_usage_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to do"):
        run_cli(tmp_path)
    with pytest.raises(ValueError, match="only apply with --push-to-hub"):
        run_cli(tmp_path, "--out", tmp_path / "out", "--private")


# ------------------------------------------------------------------ the model card

REPORT = {
    "base_model": "HuggingFaceTB/SmolLM2-135M",
    "datasets": ["togethercomputer/RedPajama-Data-1T-Sample"],
    "eval_dataset": "redpajama-sample",
    "perplexity": {"original": {"ppl": 10.5}, "parallelized": 31.25, "recovered": {"ppl": 12.0, "nll": 2.48}},
    "latency": {"original": {"ms_per_token": 20.0}, "recovered": {"ms_per_token": 15.5}},
    "lm_eval": {
        "original": {"hellaswag": {"acc,none": 0.41, "acc_stderr,none": 0.01, "alias": "hellaswag"}},
        "recovered": {"hellaswag": {"acc,none": 0.39, "acc_stderr,none": 0.01, "alias": "hellaswag"}},
    },
    "plots": ["loss.png"],
}
RECIPE = (
    "# Recover SmolLM2 after parallelizing layers 15-29\nmodel: smollm2-135m\nplan: 15-29:2\nbypass: lp\n"
)


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_model_card_has_the_metadata_and_the_story(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text(json.dumps(REPORT))
    (tmp_path / "report" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = export_model(
        parallel_model("llama", "lp"),
        tmp_path / "out",
        report=tmp_path / "report" / "report.json",
        recipe=RECIPE,
        model_id="org/smollm2-cqil",
    )
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["library_name"] == "transformers"
    assert "cqil" in meta["tags"]
    assert meta["datasets"] == ["togethercomputer/RedPajama-Data-1T-Sample"]
    results = meta["model-index"][0]["results"]
    metrics = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert metrics == {("redpajama-sample", "perplexity"): 12.0, ("hellaswag", "acc"): 0.39}
    assert huggingface_hub.ModelCard.load(out / "README.md").data.eval_results  # the Hub's parser reads it

    for heading in ("## What was parallelized", "## How it was recovered", "## Results", "## How to load"):
        assert heading in readme
    assert "| 1 | 1, 2, 3 | 3 parallel branches |" in readme
    assert "plan: 15-29:2" in readme  # the recipe excerpt
    assert "| parallelized | 31.25 |" in readme and "| recovered | 12 |" in readme
    assert "| hellaswag | acc | 0.41 | 0.39 |" in readme
    assert "ms_per_token" in readme
    assert "![loss](plots/loss.png)" in readme and (out / "plots" / "loss.png").is_file()
    assert 'from_pretrained("org/smollm2-cqil", trust_remote_code=True)' in readme


def test_model_card_without_a_report(tmp_path):
    meta = front_matter((export_model(parallel_model("qwen2"), tmp_path / "out") / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "cqil" in meta["tags"]
    assert "model-index" not in meta and "base_model" not in meta  # nothing known: nothing claimed


# ------------------------------------------------------------------ the Hub, at its HTTP boundary

TOKEN = "hf_cqilTestToken0123456789abcdef"


class FakeHub:
    """Answers huggingface_hub's requests like the Hub does and records them."""

    def __init__(self, fail_commit: bool = False):
        self.requests: list[httpx2.Request] = []
        self.fail_commit = fail_commit

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/org/name", "name": "org/name"})
        if "/branch/" in path or path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes, "commitOid": "a" * 40})
        if "/commit/" in path:
            if self.fail_commit:  # a server that echoes the credentials it was sent
                return httpx2.Response(403, json={"error": f"token {TOKEN} may not write to org/name"})
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/org/name/commit/{'b' * 40}",
                    "commitOid": "b" * 40,
                },
            )
        return httpx2.Response(404, json={"error": "not found"})

    def posts(self, fragment: str) -> list[httpx2.Request]:
        return [r for r in self.requests if r.method == "POST" and fragment in r.url.path]


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token comes from the environment
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    huggingface_hub.close_session()
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


@pytest.mark.parametrize("private, revision", [(True, "v1"), (False, None)])
def test_push_creates_the_repo_and_makes_one_commit(fake_hub, private, revision, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    folder = export_model(parallel_model("llama"), tmp_path / "out", tokenizer=make_tokenizer())
    url = push_to_hub(folder, "org/name", private=private, revision=revision)
    assert url.startswith("https://huggingface.co/org/name/commit/")

    (create,) = fake_hub.posts("/api/repos/create")
    body = json.loads(create.content)
    assert (body["organization"], body["name"], body.get("type", "model")) == ("org", "name", "model")
    assert body.get("private", body.get("visibility") == "private") is private
    assert len(fake_hub.posts("/branch/")) == (1 if revision else 0)
    if revision:
        assert fake_hub.posts("/branch/")[0].url.path == f"/api/models/org/name/branch/{revision}"
    (commit,) = fake_hub.posts("/commit/")  # one commit with every file
    assert commit.url.path == f"/api/models/org/name/commit/{revision or 'main'}"
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
    assert files.keys() == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    for request in fake_hub.posts(""):
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_push_never_shows_the_token(fake_hub, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    fake_hub.fail_commit = True
    folder = export_model(parallel_model("llama"), tmp_path / "out")
    with pytest.raises(OSError) as info:
        push_to_hub(folder, "org/name")
    message = str(info.value)
    assert "pushing" in message and "org/name" in message and "403" in message
    assert TOKEN not in message and "***" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_cli_pushes_without_an_out_folder(fake_hub, tmp_path, capsys):
    checkpoint = export_model(parallel_model("qwen2", "lp"), tmp_path / "ckpt")
    assert run_cli(checkpoint, "--push-to-hub", "org/name", "--private", "--revision", "v2") == 0
    assert "pushed to https://huggingface.co/org/name/commit/" in capsys.readouterr().out
    (commit,) = fake_hub.posts("/commit/")
    assert commit.url.path == "/api/models/org/name/commit/v2"
    files = {
        entry["value"]["path"]: base64.b64decode(entry["value"]["content"])
        for entry in map(json.loads, commit.content.splitlines())
        if entry["key"] == "file"
    }
    assert {"config.json", "modeling_cqil.py", "model.safetensors"} <= files.keys()
    assert 'from_pretrained("org/name", trust_remote_code=True)' in files["README.md"].decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the temporary folder is gone


def test_push_refuses_a_folder_that_is_not_an_export(fake_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(tmp_path, "org/name")
    assert fake_hub.requests == []


def test_group_classes_in_the_export_are_the_package_ones():
    # cqil_group.py ships cqil/rewrite/group.py verbatim; in the package it is the same module.
    from cqil.modeling import cqil_group

    assert cqil_group.MergedGroup is MergedGroup and cqil_group.BranchGroup is BranchGroup

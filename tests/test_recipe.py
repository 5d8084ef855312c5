"""cqil.recovery.recipe: every shipped recipe loads; every bad key, type or range names its file and dotted path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cqil.recovery.recipe import (
    Recipe,
    RecipeError,
    dump_recipe,
    field_docs,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
REQUIRED_KEYS = [
    "model.name_or_path",
    "model.dtype",
    "parallelize.groups",
    "parallelize.mode",
    "parallelize.bypass",
    "parallelize.bypass_distance",
    "parallelize.gates",
    "parallelize.form",
    "train.max_steps",
    "train.seq_len",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.lr",
    "train.warmup_steps",
    "train.save_every_steps",
    "train.seed",
    "train.loss.lm",
    "train.loss.kd",
    "train.loss.kd_temperature",
    "train.loss.hidden",
    "train.loss.local",
    "train.local_steps",
    "train.lora",
    "data.train",
    "data.eval",
    "data.mixture",
    "output_dir",
]
MINIMAL = {"parallelize": {"groups": "2-6:2"}, "output_dir": "out"}


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"smollm2_135m", "llama7b", "llama3_2_3b", "qwen2_5_7b", "cqil_style", "lp_style"} <= names
    assert "smollm2_135m_coalesce" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_documents_itself(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    head = path.read_text().splitlines()
    assert head[0].startswith("# ")
    header = "\n".join(line for line in head if line.startswith("#"))
    assert (
        "Purpose" in header
        and "Needs" in header
        and "train/recover.py recipes/" + path.name
        in header.replace("\\\n#       ", "").replace("\n#   ", " ")
    )


def test_comparison_recipes_use_equal_tokens():
    def tokens(name):
        t = load_recipe(next(p for p in RECIPES if p.stem == name)).train
        return t.max_steps * t.seq_len * t.micro_batch_size * t.grad_accum_steps

    assert (
        tokens("smollm2_135m")
        == tokens("cqil_style")
        == tokens("lp_style")
        == tokens("smollm2_135m_coalesce")
    )
    cqil = load_recipe(next(p for p in RECIPES if p.stem == "cqil_style"))
    assert cqil.train.lora.r == 32 and cqil.train.lora.target == "all" and cqil.train.loss.lm == 0
    lp = load_recipe(next(p for p in RECIPES if p.stem == "lp_style"))
    assert lp.train.loss.kd == 0 and lp.train.loss.lm > 0 and lp.train.lora is None
    # The baselines read the default's text, so the comparison is of the recipes alone.
    default = load_recipe(next(p for p in RECIPES if p.stem == "smollm2_135m"))
    assert cqil.data.mixture == lp.data.mixture == default.data.mixture
    assert cqil.data.train == lp.data.train == default.data.train


def test_coalesce_recipe_is_the_default_run_with_the_other_transform():
    def load(name):
        return load_recipe(next(p for p in RECIPES if p.stem == name))

    parallel, coalesce = load("smollm2_135m"), load("smollm2_135m_coalesce")
    assert parallel.parallelize.mode == "parallel" and coalesce.parallelize.mode == "coalesce"
    a, b = recipe_to_dict(parallel), recipe_to_dict(coalesce)
    # The same plan; a coalesced pair has no branches, so the options of parallel groups do not apply.
    branches = {"mode", *type(parallel.parallelize).PARALLEL_ONLY}
    a_plan, b_plan = ({k: v for k, v in d["parallelize"].items() if k not in branches} for d in (a, b))
    assert a_plan == b_plan and a_plan["groups"] == "14-26:2"
    for section in ("model", "train", "data", "eval"):
        assert a[section] == b[section], section
    assert a["output_dir"] != b["output_dir"]


def test_coalesce_mode_refuses_the_options_of_parallel_groups(tmp_path):
    recipe = tmp_path / "c.yaml"
    recipe.write_text("parallelize:\n  groups: '2-6:2'\n  mode: coalesce\noutput_dir: out\n")
    assert load_recipe(recipe).parallelize.mode == "coalesce"
    # The defaults, even written out, are accepted: they describe nothing a coalesced layer lacks.
    defaults = ["parallelize.bypass=lp", "parallelize.gates=learned", "parallelize.form=merged"]
    assert load_recipe(recipe, defaults).parallelize.mode == "coalesce"
    for override in [
        "parallelize.bypass=none",
        "parallelize.bypass_distance=2",
        "parallelize.gates=fixed",
        "parallelize.gate_shape=channel",
        "parallelize.form=branches",
    ]:
        assert override.partition("=")[0].startswith("parallelize.")
        with pytest.raises(RecipeError, match="does not apply with parallelize.mode=coalesce") as caught:
            load_recipe(recipe, [override])
        assert str(caught.value).startswith(f"<command line>: {override}: ") and caught.value.path == override
    # The same options are fine in parallel mode (the default).
    assert (
        load_recipe(recipe, ["parallelize.mode=parallel", "parallelize.gates=fixed"]).parallelize.gates
        == "fixed"
    )


def test_llama7b_is_the_cqil_paper_setting():
    r = load_recipe(next(p for p in RECIPES if p.stem == "llama7b"))
    assert r.parallelize.groups == "12-30:2" and r.model.dtype == "bfloat16"
    # The full corpus, not the 1B-token sample: SlimPajama-627B, RedPajama-1T cleaned and deduplicated,
    # with the same text / meta.redpajama_set_name fields and no loading script.
    assert r.data.train == ["hf://cerebras/SlimPajama-627B"]


def test_required_keys_exist_and_every_field_has_a_doc():
    docs = field_docs()
    assert set(REQUIRED_KEYS) <= set(docs)
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_defaults_and_overrides():
    r = recipe_from_dict(
        MINIMAL,
        overrides=[
            "parallelize.groups=[[2,3],[4,5]]",
            "train.lr=3e-4",
            "train.lora={r: 8}",
            "data.train=x.jsonl",
        ],
    )
    assert r.parallelize.groups == [[2, 3], [4, 5]]
    assert r.train.lr == 3e-4 and r.train.lora.r == 8 and r.train.lora.target == "groups"
    assert r.data.train == ["x.jsonl"] and r.train.lora is not None
    assert recipe_from_dict(MINIMAL).train.lora is None
    # Defaults are not shared between recipes.
    a, b = recipe_from_dict(MINIMAL), recipe_from_dict(MINIMAL)
    a.train.loss.kd = 5
    assert b.train.loss.kd == 1.0 and dataclasses.is_dataclass(b.train.loss)


def test_an_unquoted_no_is_accelerates_no_mixed_precision(tmp_path):
    """YAML 1.1 reads `no` as false; `train.mixed_precision: no` is what accelerate calls it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallelize:\n  groups: '2-6:2'\ntrain:\n  mixed_precision: no\noutput_dir: out\n")
    assert load_recipe(recipe).train.mixed_precision == "no"
    assert load_recipe(recipe, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    assert load_recipe(recipe, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    # It survives the round trip through the YAML the run writes (recipe.yaml).
    written = tmp_path / "written.yaml"
    written.write_text(dump_recipe(load_recipe(recipe)))
    assert load_recipe(written).train.mixed_precision == "no"
    # Other booleans stay errors where a word is expected.
    with pytest.raises(RecipeError, match=r"train\.mixed_precision=true: must be one of"):
        load_recipe(recipe, ["train.mixed_precision=true"])
    with pytest.raises(RecipeError, match=r"parallelize\.gates=no: must be one of .*got False"):
        load_recipe(recipe, ["parallelize.gates=no"])


@pytest.mark.parametrize(
    "override, path, message",
    [
        ("train.lrr=1", "train.lrr", "did you mean 'lr'"),
        ("trian.lr=1", "trian", "unknown key"),
        ("train.loss.kl=1", "train.loss.kl", "unknown key"),
        ("train.max_steps=1.5", "train.max_steps", "integer"),
        ("train.max_steps=0", "train.max_steps", ">= 1"),
        ("train.max_steps=true", "train.max_steps", "integer"),
        ("train.lr=-1", "train.lr", "> 0"),
        ("train.lr=fast", "train.lr", "number"),
        ("train.loss.kd=-0.5", "train.loss.kd", ">= 0"),
        ("train.loss.kd_temperature=0", "train.loss.kd_temperature", "> 0"),
        ("train.lora.r=0", "train.lora.r", ">= 1"),
        ("train.lora.target=attention", "train.lora.target", "one of"),
        ("parallelize.bypass=both", "parallelize.bypass", "one of"),
        ("parallelize.mode=fold", "parallelize.mode", "one of 'parallel', 'coalesce'"),
        ("parallelize.bypass_distance=0", "parallelize.bypass_distance", ">= 1"),
        ("parallelize.groups=5", "parallelize.groups", "string"),
        ("parallelize.groups=12-31:2", "parallelize.groups", "multiple of the degree"),
        ("model.dtype=float8", "model.dtype", "one of"),
        ("data.mixture=[a]", "data.mixture", "mapping"),
        ("data.mixture={a: -1}", "data.mixture.a", "negative"),
        ("data.eval_fraction=1", "data.eval_fraction", "< 1"),
        ("data.repeat_share=1", "data.repeat_share", "< 1"),
        ("data.repeat_share=-0.1", "data.repeat_share", ">= 0"),
        ("train.warmup_steps=500", "train.warmup_steps", "max_steps"),
        ("train.local_steps=500", "train.local_steps", "max_steps"),
        ("train.loss.local=-1", "train.loss.local", ">= 0"),
        ("train.cpu_threads=0", "train.cpu_threads", ">= 1"),
        ("train.loss={kd: 0, lm: 0, hidden: 0}", "train.loss", "nothing would train"),
        ("train.trackers=[mlflow]", "train.trackers[0]", "one of"),
        ("train=3", "train", "mapping"),
        ("eval.other_domain=3", "eval.other_domain", "string"),
        ("eval.other_domain=[]", "eval.other_domain", "an empty list"),
        ("eval.other_domain=hf://org/set", "eval.other_domain", "local files only"),
        ("eval.other_domain=data/sample/train.jsonl.gz", "eval.other_domain", "is in data.train"),
    ],
)
def test_errors_name_the_file_and_dotted_path(tmp_path, override, path, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("parallelize:\n  groups: '2-6:2'\noutput_dir: out\n")
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(recipe, [override])
    # An override's error names the command line and the override, not the recipe file.
    assert str(caught.value).startswith(f"<command line>: {override}: ")
    assert caught.value.path == override and path


def test_other_domain_text_is_a_list_of_paths_and_the_default_names_a_shipped_frozen_set():
    assert recipe_from_dict(MINIMAL).eval.other_domain is None
    one = recipe_from_dict(MINIMAL, overrides=["eval.other_domain=data/other_domain/dialogue.jsonl.gz"])
    assert one.eval.other_domain == ["data/other_domain/dialogue.jsonl.gz"]
    root = Path(__file__).resolve().parents[1]
    default = load_recipe(root / "recipes" / "smollm2_135m.yaml").eval.other_domain
    frozen = {"dialogue.jsonl.gz", "science_docs.jsonl.gz", "project_readmes.jsonl.gz"}
    assert default and all(Path(p).name in frozen and (root / p).is_file() for p in default)


def test_the_local_loss_refuses_adapters_outside_the_groups(tmp_path):
    recipe = tmp_path / "local.yaml"
    recipe.write_text(
        "parallelize:\n  groups: '2-6:2'\ntrain:\n  max_steps: 4\n  local_steps: 2\n"
        "  lora: {target: all}\noutput_dir: out\n"
    )
    with pytest.raises(
        RecipeError, match=r"local.yaml: train.local_steps: the local loss trains the groups alone"
    ):
        load_recipe(recipe)
    assert load_recipe(recipe, ["train.lora.target=groups"]).train.local_steps == 2


def test_errors_in_the_file_itself(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("parallelize:\n  groups: '2-6:2'\n  gate: fixed\noutput_dir: out\n")
    with pytest.raises(RecipeError, match=rf"^{bad}: parallelize.gate: unknown key; did you mean 'gates'"):
        load_recipe(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("output_dir: out\n")
    with pytest.raises(RecipeError, match=rf"^{missing}: parallelize: required"):
        load_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(bad, ["train.lr"])


AUTO = {"parallelize": {"groups": "auto", "search": {"target_depth": 26}}, "output_dir": "out"}


def test_auto_groups_with_a_search_budget_loads(tmp_path):
    recipe = tmp_path / "auto.yaml"
    recipe.write_text(
        "parallelize:\n  groups: auto\n  search:\n    degree: 3\n    speedup: 1.2\n    num_sequences: 8\n"
        "output_dir: out\n"
    )
    r = load_recipe(recipe)
    assert r.parallelize.groups == "auto"
    s = r.parallelize.search
    assert (s.degree, s.speedup, s.target_depth, s.num_sequences, s.beam_width) == (3, 1.2, None, 8, 2)
    assert recipe_from_dict(AUTO).parallelize.search.target_depth == 26
    assert recipe_from_dict(MINIMAL).parallelize.search is None
    assert "parallelize.search.target_depth" in field_docs()
    # Written out, the recipe reads back the same.
    assert recipe_from_dict(recipe_to_dict(r)) == r


@pytest.mark.parametrize(
    "parallelize, path, message",
    [
        ({"groups": "auto"}, "parallelize.search", "needs a search section"),
        ({"groups": "auto", "search": {}}, "parallelize.search", "exactly one budget.*got none"),
        (
            {"groups": "auto", "search": {"target_depth": 20, "speedup": 1.5}},
            "parallelize.search",
            "exactly one budget.*got target_depth, speedup",
        ),
        ({"groups": "2-6:2", "search": {"target_depth": 20}}, "parallelize.search", "only with"),
        (
            {"groups": "auto", "mode": "coalesce", "search": {"target_depth": 20}},
            "parallelize.groups",
            "coalesce needs explicit groups",
        ),
        ({"groups": "auto", "search": {"degree": 1, "speedup": 2}}, "parallelize.search.degree", ">= 2"),
        ({"groups": "auto", "search": {"speedup": 1}}, "parallelize.search.speedup", "> 1"),
        ({"groups": "auto", "search": {"target_depth": 9, "beam": 2}}, "parallelize.search.beam", "unknown"),
    ],
)
def test_auto_groups_errors_name_their_dotted_path(tmp_path, parallelize, path, message):
    import yaml

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"parallelize": parallelize, "output_dir": "out"}))
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(recipe)
    assert str(caught.value).startswith(f"{recipe}: {path}: ")
    assert caught.value.path == path

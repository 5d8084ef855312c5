"""The recipe: one typed, strict tree of settings for a recovery run, read from YAML.

Every field carries a one-line doc (``field(metadata={"doc": ...})``) and, where it has one, a range.
Loading is strict: an unknown or misspelled key, a value of the wrong type or out of range raises
:class:`RecipeError`, whose message starts with the file and the dotted path of the culprit
(``recipes/x.yaml: train.lr: ...``). ``key=value`` overrides use dotted keys and YAML values
(``parallelize.groups=[[2,3],[4,5]]``); an override's error names ``<command line>``. This is the only
module that reads YAML, and it is longer than 500 lines because the schema and its strict loader
belong together.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cqil.errors import RecipeError
from cqil.selection.options import SearchOptions


def _f(default: Any = dataclasses.MISSING, doc: str = "", **checks: Any) -> Any:
    """A dataclass field with its one-line doc and optional range checks (ge, gt, le)."""
    meta = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default):
        section = default
        return field(default_factory=lambda: copy.deepcopy(section), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------- schema
@dataclass(kw_only=True)
class ModelConfig:
    """Which pretrained causal LM to recover."""

    name_or_path: str = _f(
        "smollm2-135m", "Hugging Face id, local folder, or an embedded name (smollm2-135m)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "dtype the weights are loaded and trained in"
    )
    attn_implementation: str | None = _f(
        "sdpa", "transformers attention kernel (sdpa, eager, flash_attention_2)"
    )


@dataclass(kw_only=True)
class PlanSearchConfig:
    """How ``parallelize.groups: auto`` chooses the groups: the recipe's view of
    :class:`~cqil.selection.options.SearchOptions` (:meth:`options` converts); one budget."""

    degree: int = _f(SearchOptions.degree, "layers per searched group", ge=2)
    target_depth: int | None = _f(None, "budget: the effective depth to reach exactly", ge=1)
    speedup: float | None = _f(
        None, "budget: the least estimated speedup (latency model of cqil.selection.latency)", gt=1
    )
    max_ppl_increase: float | None = _f(
        None, "budget: the shallowest plan within this calibration perplexity rise, in percent", gt=0
    )
    num_sequences: int = _f(32, "calibration sequences of train.seq_len tokens (train split)", ge=1)
    beam_width: int = _f(SearchOptions.beam_width, "plans kept from one search round to the next", ge=1)
    pool_size: int = _f(SearchOptions.pool_size, "cheapest groups tried as each kept plan's next group", ge=1)
    batch_size: int = _f(SearchOptions.batch_size, "calibration sequences per forward pass", ge=1)

    BUDGETS = SearchOptions.BUDGETS

    def options(self, *, bypass: str = "lp", bypass_distance: int = 1, seed: int = 0) -> SearchOptions:
        """The :class:`~cqil.selection.options.SearchOptions` this section asks for."""
        shared = ("degree", *self.BUDGETS, "beam_width", "pool_size", "batch_size")
        kw = {k: getattr(self, k) for k in shared}
        return SearchOptions(bypass=bypass, bypass_distance=bypass_distance, seed=seed, **kw)


@dataclass(kw_only=True)
class ParallelizeConfig:
    """How the layers are grouped and combined (arguments of ``cqil.parallelize`` or ``cqil.coalesce``)."""

    groups: str | list[list[int]] = _f(
        doc='layer groups: "S-E:P" ranges (commas join several), lists of indices, or auto '
        "(chosen by a plan search under parallelize.search)"
    )
    search: PlanSearchConfig | None = _f(
        None, "with groups: auto, the plan search's budget and settings; null otherwise"
    )
    mode: Literal["parallel", "coalesce"] = _f(
        "parallel",
        "parallel: each group runs as one parallel layer (cqil.parallelize); "
        "coalesce: one standard layer of averaged weights per group (cqil.coalesce)",
    )
    bypass: Literal["lp", "none", "cqil"] = _f(
        "lp", "lp: G=1 (Layer Parallelism); none: G=0; cqil: d preceding branches"
    )
    bypass_distance: int = _f(1, "under cqil bypass: how many preceding branches feed each MLP", ge=1)
    gates: Literal["learned", "fixed"] = _f(
        "learned", "learned: gates are trained parameters; fixed: buffers at the mode's G"
    )
    gate_shape: Literal["scalar", "channel"] = _f(
        "scalar", "one gate per branch pair, or one per hidden channel"
    )
    form: Literal["merged", "branches"] = _f(
        "merged", "merged: fused wide projections; branches: original modules"
    )

    # The options of a parallel group, which a coalesced layer (one plain layer, no branches) does not
    # have. Under mode=coalesce they must keep their defaults: a value that would be silently ignored
    # is refused, naming the key, like any other recipe mistake.
    PARALLEL_ONLY = ("bypass", "bypass_distance", "gates", "gate_shape", "form")

    def check(self, source: str, path: str = "parallelize") -> None:
        """Cross-field checks of this section (raise :class:`RecipeError` naming the field)."""
        if self.groups == "auto":
            if self.mode == "coalesce":
                raise RecipeError(
                    source,
                    f"{path}.groups",
                    f"auto searches groups to run in parallel; {path}.mode=coalesce needs explicit groups",
                )
            if self.search is None:
                raise RecipeError(
                    source,
                    f"{path}.search",
                    f"{path}.groups=auto needs a search section with one budget "
                    f"({', '.join(PlanSearchConfig.BUDGETS)})",
                )
            given = [k for k in PlanSearchConfig.BUDGETS if getattr(self.search, k) is not None]
            if len(given) != 1:
                raise RecipeError(
                    source,
                    f"{path}.search",
                    f"give exactly one budget of {', '.join(PlanSearchConfig.BUDGETS)}; "
                    f"got {', '.join(given) or 'none'}",
                )
        elif self.search is not None:
            raise RecipeError(
                source,
                f"{path}.search",
                f"applies only with {path}.groups=auto; remove it or set groups: auto",
            )
        if self.mode == "coalesce":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in self.PARALLEL_ONLY:
                value = getattr(self, name)
                if value != defaults[name]:
                    raise RecipeError(
                        source,
                        f"{path}.{name}",
                        f"{value!r} does not apply with {path}.mode=coalesce (a coalesced group is one "
                        f"plain layer, without branches or gates); remove it or leave it at {defaults[name]!r}",
                    )


@dataclass(kw_only=True)
class LossConfig:
    """Weights of the recovery losses; the total is their weighted sum."""

    lm: float = _f(0.0, "weight of next-token cross-entropy on the data", ge=0)
    kd: float = _f(1.0, "weight of KL(teacher || student) on logits, mean over tokens", ge=0)
    kd_temperature: float = _f(1.0, "softmax temperature T of the KD loss (scaled by T^2)", gt=0)
    hidden: float = _f(
        0.0, "weight of the MSE between student and teacher states at each group's output", ge=0
    )
    local: float = _f(
        0.0,
        "weight of the local loss: each group run on the original model's state at its input, against "
        "the original layers' output there (relative squared error of the group's update)",
        ge=0,
    )


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (through peft) instead of training the weights themselves."""

    r: int = _f(32, "adapter rank", ge=1)
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r)", gt=0)
    dropout: float = _f(0.0, "dropout on the adapter input", ge=0, le=1)
    target: Literal["groups", "all"] = _f(
        "groups", "groups: adapters on the merged layers only; all: every linear layer of every layer"
    )


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = _f(100, "optimizer steps in the whole run", ge=1)
    layers_after_groups: int = _f(
        0,
        "also train the N original layers right after the last group, whole (the teacher keeps its own "
        "frozen copies of them); 0 trains the groups alone",
        ge=0,
    )
    local_steps: int = _f(
        0,
        "the first N of max_steps train on the local loss alone (each group against its own exact "
        "target, without a pass of the whole student); the rest on train.loss",
        ge=0,
    )
    seq_len: int = _f(512, "tokens per packed training sequence", ge=2)
    micro_batch_size: int = _f(1, "sequences per process per forward pass", ge=1)
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step", ge=1)
    lr: float = _f(1e-4, "peak learning rate (AdamW)", gt=0)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "decay after warmup")
    warmup_steps: int = _f(0, "linear warmup from 0 to the peak, in optimizer steps", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to gates)", ge=0)
    adam_betas: list[float] = _f([0.9, 0.95], "AdamW (beta1, beta2)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping", ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "autocast mode handed to accelerate")
    gradient_checkpointing: bool = _f(
        False, "recompute the student's grouped layers in backward to save memory"
    )
    save_every_steps: int = _f(0, "checkpoint every N optimizer steps (0: only at the end)", ge=0)
    keep_checkpoints: int = _f(2, "how many of the latest checkpoints to keep", ge=1)
    log_every_steps: int = _f(10, "one log line (and tracker point) every N optimizer steps", ge=1)
    seed: int = _f(0, "seed of initialisation-free randomness: data mixture, dropout", ge=0)
    cpu_threads: int | None = _f(
        None,
        "torch threads per process when training on CPU; null: every core this process may use, shared "
        "among the node's processes, unless OMP_NUM_THREADS is set above 1 (accelerate launch sets it "
        "to 1 by default, which would leave all but one core idle; give 1 here to keep that)",
        ge=1,
    )
    trackers: list[Literal["tensorboard", "wandb"]] = _f(
        ["tensorboard"], "metric sinks via accelerate; [] for none"
    )
    loss: LossConfig = _f(LossConfig(), "loss weights")
    lora: LoraConfig | None = _f(None, "LoRA adapters; null (the default) trains the weights directly")
    resume: Literal["auto", "reset_optimizer"] = _f(
        "auto",
        "auto: resume only a run of the same recipe; "
        "reset_optimizer: also when only optimizer/schedule keys changed (lr, max_steps, ...): weights, step, "
        "data position and RNG resume, the optimizer and schedule restart from this recipe",
    )


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it is mixed."""

    train: str | list[str] = _f(
        ["data/sample/train.jsonl.gz"],
        "JSONL(.gz/.zst) / Parquet files, folders, globs, or hf://<dataset id>[@config] streamed from the Hub",
    )
    eval: str | list[str] | None = _f(None, "held-out text, same forms; null: a hash split of data.train")
    eval_fraction: float = _f(
        0.01, "share of train documents held out by hash when data.eval is null", gt=0, lt=1
    )
    mixture: dict[str, float] | None = _f(
        None, "sampling weight per source label; null: records in file order"
    )
    source_field: str = _f("meta.redpajama_set_name", "dotted path of a record's source label")
    text_field: str = _f("text", "key of a record's text")
    hub_split: str = _f("train", "split to stream for hf:// datasets")
    repeat_share: float = _f(
        0.0,
        "share of training blocks whose second half repeats the first (chosen by a hash of the tokens): "
        "distillation on them trains back the in-context copying the rewrite damages; 0: none",
        ge=0,
        lt=1,
    )

    def __post_init__(self) -> None:
        # One path or many: always a list from here on.
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.eval, str):
            self.eval = [self.eval]


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out perplexity of the original, parallelized (or coalesced) and recovered models."""

    num_sequences: int = _f(32, "held-out sequences of eval.seq_len tokens", ge=1)
    seq_len: int | None = _f(
        None,
        "tokens per block of the held-out and out-of-domain perplexities; null: train.seq_len (set it "
        "to compare runs that train on different lengths on the same blocks)",
        ge=1,
    )
    other_domain: str | list[str] | None = _f(
        None,
        "text the run does not train on (local JSONL files, folders or globs): every document's "
        "perplexity, each packed on its own, leads the report; null: the held-out split alone",
    )
    batch_size: int = _f(4, "sequences per forward pass", ge=1)
    before: bool = _f(True, "also measure the original and the untrained parallelized (or coalesced) model")
    tasks: list[str] = _f(
        [], "lm-eval-harness tasks (Hub tasks such as hellaswag need network; data/tasks/ ships cqil_* ones)"
    )
    task_paths: list[str] = _f([], "extra folders of lm-eval task YAMLs (data/tasks/ is always included)")
    task_limit: int | None = _f(None, "at most this many examples per lm-eval task; null: all", ge=1)
    num_fewshot: int | None = _f(
        None, "few-shot examples per lm-eval prompt; null: each task's default", ge=0
    )
    task_batch_size: int = _f(8, "lm-eval requests per forward pass", ge=1)
    latency: bool = _f(True, "time prefill and greedy decode of the original and recovered models")
    latency_prefill_len: int = _f(512, "prompt tokens of the timed prefill (batch 1)", ge=1)
    latency_new_tokens: int = _f(64, "greedy tokens of the timed decode (batch 1, KV cache)", ge=1)
    latency_reps: int = _f(3, "interleaved timing repetitions (medians are reported)", ge=1)
    report: bool = _f(True, "write output_dir/report/ (report.json, report.md, plots)")

    def __post_init__(self) -> None:
        if isinstance(self.other_domain, str):  # one path or many: a list from here on
            self.other_domain = [self.other_domain]


@dataclass(kw_only=True)
class ExportConfig:
    """What the end of a run writes into ``output_dir/model/`` besides the Hugging Face folder."""

    gguf: Literal["f32", "f16", "q8_0"] | None = _f(
        None,
        "also write model.gguf for llama.cpp / Ollama in this type; needs groups that fold "
        "(parallelize.bypass: lp, parallelize.gates: fixed); null: no GGUF",
    )


@dataclass(kw_only=True)
class Recipe:
    """A whole recovery run."""

    model: ModelConfig = _f(ModelConfig(), "the pretrained model")
    parallelize: ParallelizeConfig = _f(doc="the layer groups")
    train: TrainConfig = _f(TrainConfig(), "the optimisation loop")
    data: DataConfig = _f(DataConfig(), "the text")
    eval: EvalConfig = _f(EvalConfig(), "the evaluation")
    export: ExportConfig = _f(ExportConfig(), "what the export writes besides the Hugging Face folder")
    output_dir: str = _f(doc="run folder: checkpoints/, logs/, the recovered state and eval.json")

    @property
    def eval_seq_len(self) -> int:
        """Tokens per block of the held-out and out-of-domain perplexities."""
        return self.eval.seq_len or self.train.seq_len

    def check(self, source: str) -> None:
        """Cross-field checks (raise :class:`RecipeError` naming the field)."""
        from cqil.rewrite.plan import GroupPlan

        if self.parallelize.groups != "auto":  # auto: chosen by the plan search once the model is loaded
            try:  # the syntax now; the layer range once the model is loaded
                GroupPlan.parse(self.parallelize.groups, 1 << 20)
            except ValueError as e:
                raise RecipeError(source, "parallelize.groups", str(e)) from None
        self.parallelize.check(source)
        loss = self.train.loss
        if (
            loss.lm == loss.kd == loss.hidden == loss.local == 0
            and self.train.local_steps < self.train.max_steps
        ):
            raise RecipeError(source, "train.loss", "every loss weight is 0; nothing would train")
        if self.train.local_steps > self.train.max_steps:
            raise RecipeError(source, "train.local_steps", f"{self.train.local_steps} > train.max_steps")
        if self.train.warmup_steps > self.train.max_steps:
            raise RecipeError(source, "train.warmup_steps", f"{self.train.warmup_steps} > train.max_steps")
        if len(self.train.adam_betas) != 2 or not all(0 <= b < 1 for b in self.train.adam_betas):
            raise RecipeError(
                source, "train.adam_betas", f"expected two numbers in [0, 1), got {self.train.adam_betas}"
            )
        if loss.hidden and self.train.lora is not None and self.train.lora.target == "all":
            raise RecipeError(
                source, "train.loss.hidden", "hidden-state loss is not defined with lora.target=all"
            )
        if (
            (loss.local or self.train.local_steps)
            and self.train.lora is not None
            and self.train.lora.target == "all"
        ):
            key = "train.loss.local" if loss.local else "train.local_steps"
            raise RecipeError(
                source, key, "the local loss trains the groups alone; it is not defined with lora.target=all"
            )
        if self.train.layers_after_groups and self.train.lora is not None:
            raise RecipeError(
                source,
                "train.layers_after_groups",
                "trains whole layers; it is not defined with train.lora (set one of them)",
            )
        if self.data.mixture is not None:
            for name, w in self.data.mixture.items():
                if w < 0:
                    raise RecipeError(source, f"data.mixture.{name}", f"weight {w} is negative")
            if not sum(self.data.mixture.values()) > 0:
                raise RecipeError(source, "data.mixture", "weights sum to 0")
        if not self.data.train:
            raise RecipeError(source, "data.train", "no training data given")
        self._check_other_domain(source)

    def _check_other_domain(self, source: str) -> None:
        """``eval.other_domain`` names local text that is none of the training data's paths (the files
        themselves are read, and a missing one named, before training starts)."""
        paths = self.eval.other_domain
        if paths is None:
            return
        if not paths:
            raise RecipeError(source, "eval.other_domain", "an empty list; null measures no other text")
        train = {os.path.normpath(p) for p in self.data.train}
        for path in paths:
            if path.startswith("hf://"):
                raise RecipeError(source, "eval.other_domain", f"{path}: local files only (not hf://)")
            if os.path.normpath(path) in train:
                raise RecipeError(
                    source,
                    "eval.other_domain",
                    f"{path} is in data.train: it must be text the run does not train on",
                )


# ---------------------------------------------------------------------------------------- loading
def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read the YAML recipe at ``path``, apply ``key=value`` overrides, and validate it."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(source, "", "not a text file (not UTF-8); a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        raise RecipeError(source, "", f"not valid YAML: {' '.join(str(e).split())}") from None
    return recipe_from_dict(raw if raw is not None else {}, source=source, overrides=overrides)


def recipe_from_dict(raw: dict, *, source: str = "<dict>", overrides=()) -> Recipe:
    """Validate a plain dict (as YAML would give) into a :class:`Recipe`."""
    if not isinstance(raw, dict):
        raise RecipeError(source, "", f"the top level must be a mapping of sections, got {_describe(raw)}")
    raw = _deep_copy(raw)
    given = {}  # dotted key -> the override that set it, so that its errors name the command line
    for item in overrides:
        apply_override(raw, item)
        given[item.partition("=")[0].strip()] = item
    try:
        recipe = _build(Recipe, raw, "", source)
        recipe.check(source)
    except RecipeError as e:
        item = next((v for k, v in given.items() if _names(k, e.path)), None)
        if item is None:
            raise
        message = str(e)[len(f"{e.source}: {e.path or '<root>'}: ") :]
        raise RecipeError(COMMAND_LINE, item, message) from None
    return recipe


def _names(key: str, path: str) -> bool:
    """Whether an error at ``path`` is the override of ``key``'s: the key, one under it, or a section it made."""
    return bool(path) and (
        path == key or path.startswith((key + ".", key + "[")) or key.startswith(path + ".")
    )


COMMAND_LINE = "<command line>"  # the "file" an override's error names


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(COMMAND_LINE, item, "expected key=value with a dotted key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise RecipeError(COMMAND_LINE, item, f"value {text!r} is not valid YAML") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(COMMAND_LINE, item, f"{'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (what gets written next to a run's outputs)."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def field_docs(cls: type = Recipe, prefix: str = "") -> dict[str, str]:
    """Dotted key -> one-line doc for every field of the schema (nested sections included)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out[key] = f.metadata.get("doc", "")
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            out |= field_docs(nested, key + ".")
    return out


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _build(cls: type, raw, path: str, source: str):
    if not isinstance(raw, dict):
        raise RecipeError(source, path, f"expected a mapping (section), got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = [n for n in names if _similar(str(key), n)]
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(names))}"
            raise RecipeError(source, _join(path, key), f"unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(source, key, f"required ({f.metadata.get('doc', '')})")
            continue
        value = _convert(hints[f.name], raw[f.name], key, source)
        _check_range(f, value, key, source)
        kwargs[f.name] = value
    return cls(**kwargs)


def _convert(tp, value, path: str, source: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # "X | None": X's own error, with its own path
            return _convert(alternatives[0], value, path, source)
        errors = []
        for alt in alternatives:
            try:
                return _convert(alt, value, path, source)
            except RecipeError as e:
                errors.append(str(e).split(": ", 2)[-1])
        raise RecipeError(source, path, " / ".join(errors))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    if origin is Literal:
        # YAML 1.1 reads an unquoted `no` as false; "no" is accelerate's word for no mixed precision.
        if value is False and "no" in args:
            value = "no"
        if value not in args:
            raise RecipeError(source, path, f"must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(source, path, f"expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(source, path, f"expected a mapping, got {_describe(value)}")
        return {
            _convert(args[0], k, path, source): _convert(args[1], v, _join(path, k), source)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(source, path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(source, path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(source, path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise RecipeError(source, path, f"must be a finite number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(source, path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"recipe schema: unsupported type {tp!r} at {path}")


def _check_range(f: dataclasses.Field, value, path: str, source: str) -> None:
    if value is None or isinstance(value, (list, dict, str)) or dataclasses.is_dataclass(value):
        return
    checks = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
    }
    checks["lt"] = (lambda v, b: v < b, "<")
    for name, (ok, sign) in checks.items():
        if name in f.metadata and not ok(value, f.metadata[name]):
            raise RecipeError(source, path, f"must be {sign} {f.metadata[name]}; got {value!r}")


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() >= 0.75


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"

"""``cqil export``: write a cqil checkpoint as a Hugging Face model folder; optionally push it to the Hub.

:func:`add_export_parser` declares the arguments and :func:`run_export` calls the library;
``cqil.cli.build_parser`` wires them in. Bad input raises a :class:`cqil.errors.CqilError` with one
message naming the file or key, which ``cqil.cli.main`` prints as one ``cqil: error: ...`` line.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cqil.errors import ModelError, UsageError


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a cqil checkpoint as a Hugging Face model folder; optionally push it to the Hub",
        description="Load a cqil checkpoint or export folder (config.json with model_type 'cqil' and "
        "safetensors weights), and write it as a Hugging Face model folder that loads with "
        "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True): config, modeling code, "
        "safetensors, tokenizer, generation config and a model card. The folder is written under a "
        "temporary name and renamed at the end. --push-to-hub uploads it in one commit; the token "
        "comes from $HF_TOKEN or `hf auth login` and is never printed.",
    )
    p.add_argument("checkpoint", help="cqil checkpoint or export folder")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder, refused if it exists and is not empty (see --overwrite); "
        "optional with --push-to-hub (a temporary folder is used then)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default: the checkpoint's)",
    )
    p.add_argument(
        "--fold",
        action="store_true",
        help="write each group as one plain wide decoder layer, norms folded into the projections "
        "(bypass 'lp' with every gate at 1 only; same logits)",
    )
    p.add_argument(
        "--gguf",
        choices=["f32", "f16", "q8_0"],
        help="also write model.gguf for llama.cpp / Ollama in the folder (groups folded: bypass 'lp', "
        "gates at 1; see cqil.export.gguf)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: 5GB)")
    p.add_argument(
        "--report",
        metavar="FILE",
        help="evaluation report.json for the model card (plots beside it are copied)",
    )
    p.add_argument("--recipe", metavar="FILE", help="recovery recipe YAML quoted in the model card")
    p.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the original model's Hub id for the card (default: the report's, or the checkpoint card's)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload the folder to this Hub model repo (created if missing)",
    )
    p.add_argument(
        "--private", action="store_true", help="create the Hub repo as private (with --push-to-hub)"
    )
    p.add_argument(
        "--revision",
        metavar="BRANCH",
        help="Hub branch to commit to, created if missing (with --push-to-hub)",
    )
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from cqil.export.hub import push_to_hub
    from cqil.export.load import load_export
    from cqil.export.write import export_model

    if not args.out and not args.push_to_hub:
        raise UsageError("nothing to do: give --out DIR, --push-to-hub ORG/NAME, or both")
    if (args.private or args.revision) and not args.push_to_hub:
        raise UsageError("--private and --revision only apply with --push-to-hub ORG/NAME")
    if args.out:
        from cqil.recovery.run_lock import refuse_if_claimed

        refuse_if_claimed(args.out)  # never write into a live run's output_dir (its model/, say)

    checkpoint = Path(args.checkpoint)
    model = load_export(checkpoint)
    tokenizer = _load_tokenizer(checkpoint)
    if args.gguf:  # refuse before writing anything
        from cqil.export.gguf import check_gguf, write_gguf

        check_gguf(model, tokenizer)
    base_model, datasets = _card_metadata(checkpoint)
    report = args.report
    if datasets and report is None:
        report = {"datasets": datasets}
    options = dict(
        tokenizer=tokenizer,
        report=report,
        recipe=Path(args.recipe) if args.recipe else None,
        base_model=args.base_model or base_model,
        model_id=args.push_to_hub,
        dtype=args.dtype,
        fold=args.fold,
        max_shard_size=args.max_shard_size,
    )
    if args.out:
        out = export_model(model, args.out, overwrite=args.overwrite, **options)
        print(f"wrote {out}")
        if args.gguf:
            print(f"wrote {write_gguf(model, tokenizer, out / 'model.gguf', dtype=args.gguf)}")
        if args.push_to_hub:
            print(
                f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)}"
            )
        return 0
    with tempfile.TemporaryDirectory(prefix="cqil-export-") as tmp:
        out = export_model(model, Path(tmp) / Path(args.push_to_hub).name, **options)
        if args.gguf:
            write_gguf(model, tokenizer, out / "model.gguf", dtype=args.gguf)
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision)}")
    return 0


def _load_tokenizer(folder: Path):
    """The checkpoint's tokenizer, or ``None`` when it has none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            folder, trust_remote_code=False
        )  # no prompt: tokenizers need no code
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load its tokenizer ({e})") from None


def _card_metadata(folder: Path) -> tuple[str | None, list[str] | None]:
    """``base_model`` and ``datasets`` from the checkpoint's own model card, so a re-export keeps them."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None, None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data
    except Exception:  # a hand-written README without valid metadata: nothing to keep
        return None, None
    base_model = data.base_model if isinstance(data.base_model, str) else None
    datasets = [data.datasets] if isinstance(data.datasets, str) else data.datasets
    return base_model, datasets

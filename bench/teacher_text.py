"""The original model's own continuations of training-text openings, as a source a recipe can mix in.

KD needs no gold continuation: the teacher labels any text, its own included. This writes one
record per opening, in the sample's record shape with the source label ``Teacher``: the first
``--prefix-tokens`` tokens of a training document (taken from each source of the recipe's
``data.mixture`` in proportion to its weight, in the file's order) followed by ``--new-tokens``
tokens the recipe's model samples from its own distribution (temperature ``--temperature``, no
top-k or top-p). A recipe trains on it with ``data.train=[data/sample/train.jsonl.gz, FILE]`` and a
``Teacher`` weight in ``data.mixture``; docs/recovery-quality.md has what it did.
The output is a function of the seed, the model, the data and the torch build.

    python bench/teacher_text.py /tmp/teacher.jsonl.gz --documents 448
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "Teacher"


def openings(tokenizer, recipe, documents: int, prefix_tokens: int) -> list[tuple[str, list[int]]]:
    """``(source, first prefix_tokens token ids)`` of the first documents of each mixture source long
    enough, ``documents`` in all, each source's count in proportion to its weight."""
    from cqil.recovery.data import iter_records

    data = recipe.data
    weights = {s: w for s, w in (data.mixture or {}).items() if s != SOURCE}
    total = sum(weights.values())
    wanted = {s: round(w / total * documents) for s, w in weights.items()}
    found = []
    for text, source in iter_records(data.train, source_field=data.source_field, text_field=data.text_field):
        if wanted.get(source, 0) <= 0:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prefix_tokens:
            found.append((source, ids[:prefix_tokens]))
            wanted[source] -= 1
            if not any(n > 0 for n in wanted.values()):
                break
    return found


def continuations(model, tokenizer, found, *, new_tokens: int, temperature: float, batch_size: int):
    """Yield one record per opening: the opening and the model's sampled continuation, decoded."""
    import torch
    from tqdm import tqdm

    with torch.no_grad():
        for start in tqdm(range(0, len(found), batch_size), desc="continuations", unit="batch"):
            chunk = found[start : start + batch_size]
            ids = torch.tensor([p for _, p in chunk])  # every opening has the same length: no padding
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            for (source, _), row in zip(chunk, out, strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                yield {
                    "text": text,
                    "meta": {"redpajama_set_name": SOURCE, "title": f"continuation of {source}"},
                }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .jsonl.gz to write; refused if it exists")
    parser.add_argument("--recipe", default="recipes/smollm2_135m.yaml", help="its model, data and mixture")
    parser.add_argument(
        "--documents", type=int, default=448, help="openings in all, each source's share rounded"
    )
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("documents", "prefix_tokens", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.temperature <= 0:
        parser.error("--temperature must be above 0")
    if args.out.exists():
        parser.error(f"{args.out} exists; remove it first")

    import torch

    from cqil.errors import CqilError
    from cqil.files import write_atomic
    from cqil.pretrained import load_model
    from cqil.recovery.recipe import load_recipe

    try:  # a bad recipe, model or data file: one line naming it
        recipe = load_recipe(ROOT / args.recipe)
        if not set(recipe.data.mixture or {}) - {SOURCE}:
            parser.exit(2, f"error: {args.recipe}: data.mixture names no source to take openings from\n")
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype)
        found = openings(tokenizer, recipe, args.documents, args.prefix_tokens)
    except CqilError as e:
        parser.exit(2, f"error: {e}\n")
    model.eval()
    records = continuations(
        model,
        tokenizer,
        found,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
    )
    # Everything is generated before anything is written: a failed run leaves no file.
    lines = "".join(json.dumps(record) + "\n" for record in records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, gzip.compress(lines.encode(), mtime=0))
    print(f"wrote {len(found)} continuations to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate text from a cqil export with its groups running concurrently, one branch per rank.

Launch one process per branch of the export's largest group (2 for pairs)::

    torchrun --standalone --nproc_per_node 2 -m cqil.serving.serve --model EXPORT_DIR --prompt "Once upon a time" \\
        --max-new-tokens 32

``--model`` is an export folder (written by ``cqil export`` or :func:`cqil.export_model`) or the Hub id
of one (resolved through the local Hugging Face cache). Every rank loads the export and keeps its own
branches (:mod:`cqil.serving.concurrent`); rank 0 prints the generated text (greedy decoding, prompt left
out). CPU ranks use gloo and one thread each unless told otherwise; CUDA ranks use NCCL, one GPU per
rank. Bad input (not a cqil export, a folded export, the wrong number of ranks, no tokenizer) stops
every rank before any weight is loaded, with one error line on rank 0 and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cqil.serving.comm import TRANSPORTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m cqil.serving.serve",
        description="Generate text from a cqil export, its groups' branches spread over the ranks.",
    )
    parser.add_argument("--model", required=True, help="export folder, or the Hub id of an export")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the export's own)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the export's)")
    parser.add_argument("--threads", type=int, help="CPU threads per rank (default: cores / local ranks)")
    parser.add_argument("--transport", default="auto", choices=TRANSPORTS, help="CPU collectives")
    parser.add_argument("--timing", action="store_true", help="print prefill and decode times to stderr")
    return parser


def resolve_export(name: str) -> Path:
    """The folder of ``name``: a local path, else a Hub id found in the local Hugging Face cache."""
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return path.expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as e:  # offline, unknown repo, no access: one line that says which
        raise FileNotFoundError(
            f"{name}: no such folder, and not found on the Hub ({type(e).__name__})"
        ) from None


def check_launch(config, world_size: int) -> int:
    """Raise ``ValueError`` unless ``world_size`` equals the export's largest group; return that size."""
    cqil = config.cqil
    if cqil.get("folded"):
        raise ValueError(
            "the export is folded (each group one plain wide layer), so its branches cannot run apart; "
            "export the recovered model without --fold"
        )
    degree = max((len(g) for g in cqil["plan"]["groups"]), default=1)
    if world_size != degree:
        raise ValueError(
            f"the export's largest group has {degree} branches, so it runs on {degree} ranks, "
            f"but {world_size} were launched; use torchrun --nproc_per_node {degree}"
        )
    return degree


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    import torch
    from transformers import AutoTokenizer

    from cqil.export.load import check_export

    # Every rank validates the same input, so all of them stop before the process group forms.
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        folder = resolve_export(args.model)
        config = check_export(folder)
        check_launch(config, world_size)
        try:
            # The export's config names its model code (auto_map); the tokenizer needs none of it.
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or folder, trust_remote_code=False)
        except (OSError, ValueError) as e:
            source = args.tokenizer or folder
            raise ValueError(
                f"{source}: no usable tokenizer ({type(e).__name__}); pass --tokenizer"
            ) from None
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    except (FileNotFoundError, ValueError) as e:
        if rank == 0:
            print(f"cqil.serving.serve: error: {e}", file=sys.stderr)
        return 2

    from cqil.export.load import load_export
    from cqil.serving.comm import init_distributed, make_communicator
    from cqil.serving.concurrent import generate_greedy, shard_model

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(args.threads or max(1, cores // local_world_size))

    init_distributed(device)
    try:
        model = load_export(folder, dtype=args.dtype, device=device)
        shard_model(model, make_communicator(args.transport) if not use_cuda else make_communicator("torch"))
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        start = time.perf_counter()
        tokens = generate_greedy(model, ids, args.max_new_tokens, eos_token_id=eos)
        seconds = time.perf_counter() - start
        if rank == 0:
            print(tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True), flush=True)
            if args.timing:
                new = tokens.shape[1] - ids.shape[1]
                print(
                    f"{new} tokens in {seconds * 1e3:.1f} ms on {world_size} ranks "
                    f"({seconds * 1e3 / new:.2f} ms/token, prefill included)",
                    file=sys.stderr,
                )
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

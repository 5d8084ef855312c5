"""Run by tests/test_distributed.py under torchrun: ZeRO-3's partitioned surgery against the whole-model one.

Every rank loads the saved model partitioned (transformers' ZeRO-3 path) and builds the teacher copy and
the parallelized student with :mod:`cqil.recovery.sharded`; rank 0 also loads it whole and transforms it
with :func:`cqil.parallelize`. The teacher copies, the gathered student's weights and its logits must
equal the whole-model path's bit for bit, and each rank must hold only its share of every large weight.
Prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from cqil._compat import zero3_init_disabled
from cqil.recovery import sharded
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallelize

OPTIONS = {"bypass": "lp", "gates": "learned"}


def main(folder: str, groups: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(config)  # while alive, transformers loads into deepspeed.zero.Init
    partitioned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plan = GroupPlan.parse(groups, partitioned.config.num_hidden_layers)
    report = {"world": world}

    large = [p for p in partitioned.parameters() if p.ds_numel >= 1024]
    report["share"] = max(p.ds_tensor.numel() / p.ds_numel for p in large)
    report["whole_on_rank"] = sum(p.data.numel() for p in partitioned.parameters())

    teacher = sharded.teacher_copies(partitioned, [i for g in plan.groups for i in g], config)
    sharded.parallelize_partitioned(partitioned, plan, config, **OPTIONS)
    copy = sharded.main_process_copy(partitioned, main=rank == 0)
    teacher_states = {}
    for i, layer in teacher.items():
        state = sharded.gathered_state(dict(layer.named_parameters()), main=rank == 0)
        teacher_states[i] = state
    if rank == 0:
        with zero3_init_disabled():
            whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        report["teacher_equal"] = all(
            torch.equal(t, dict(whole.model.layers[i].named_parameters())[n])
            for i, state in teacher_states.items()
            for n, t in state.items()
        )
        parallelize(whole, plan, **OPTIONS)
        mine, theirs = copy.state_dict(), whole.state_dict()
        report["keys_equal"] = sorted(mine) == sorted(theirs)
        report["weights_equal"] = all(torch.equal(mine[k], theirs[k]) for k in theirs)
        ids = torch.randint(0, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            report["logits_max_diff"] = float((copy(ids).logits - whole(ids).logits).abs().max())
        print("RESULT " + json.dumps(report), flush=True)
    del keep
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])

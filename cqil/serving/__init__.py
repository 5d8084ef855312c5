"""Serving: the concurrent runtime (each rank runs its branch of every group, ``torchrun -m
cqil.serving.serve``; :mod:`.concurrent`, :mod:`.comm`) and the vLLM plugin (:mod:`.vllm`)."""

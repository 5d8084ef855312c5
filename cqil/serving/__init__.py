"""The concurrent runtime: each rank runs its branch of every group (``torchrun -m cqil.serving.serve``)."""

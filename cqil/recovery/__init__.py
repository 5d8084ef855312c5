"""Recovery training: the recipe, the data pipeline, the losses and the trainer."""

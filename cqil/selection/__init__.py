"""Choosing which layers to group: layer-input similarity and the measured plan search."""

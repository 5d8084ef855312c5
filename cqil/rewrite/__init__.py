"""Rewriting a model's layers into parallel groups: the plan, the group modules, the surgery and depth coalescing."""

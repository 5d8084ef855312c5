"""cqil.recovery.threads: how many torch threads a CPU training process takes."""

from __future__ import annotations

import pytest

from cqil.recovery.threads import training_threads, usable_cores


def test_the_recipe_count_wins():
    assert training_threads(1, env={"OMP_NUM_THREADS": "8"}, cores=16) == 1
    assert training_threads(3, env={}, cores=2) == 3


def test_a_users_count_above_one_is_kept():
    assert training_threads(None, env={"OMP_NUM_THREADS": "6"}, cores=16) == 6


def test_accelerates_default_of_one_gives_every_core_shared_among_local_processes():
    assert training_threads(None, env={"OMP_NUM_THREADS": "1"}, cores=8) == 8
    assert training_threads(None, env={"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, cores=8) == 4
    assert training_threads(None, env={"LOCAL_WORLD_SIZE": "4"}, cores=2) == 1  # never 0
    assert training_threads(None, env={"OMP_NUM_THREADS": "junk"}, cores=2) == 2


def test_usable_cores_is_positive():
    assert usable_cores() >= 1


def test_a_broken_local_world_size_names_the_variable():
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):
        training_threads(None, env={"LOCAL_WORLD_SIZE": "two"}, cores=8)

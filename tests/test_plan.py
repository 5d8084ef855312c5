import pytest

from cqil import GroupPlan


def test_range_spec_cuts_consecutive_groups():
    plan = GroupPlan.parse("12-30:2", 32)
    assert plan.groups[0] == (12, 13) and plan.groups[-1] == (28, 29)
    assert len(plan.groups) == 9
    assert plan.num_layers_after == 23  # the CQIL paper's LLaMA-7B P2 S12 E30


def test_several_ranges_and_lists():
    assert GroupPlan.parse("2-6:2, 10-13:3", 16).groups == ((2, 3), (4, 5), (10, 11, 12))
    plan = GroupPlan.parse([[14, 15, 16], [12, 13]], 32)
    assert plan.groups == ((12, 13), (14, 15, 16))  # kept in model order
    assert plan.num_layers_after == 32 - 1 - 2


@pytest.mark.parametrize("spec", [[], "", "[]"])
def test_empty_plan(spec):
    plan = GroupPlan.parse(spec, 8)
    assert plan.groups == () and plan.num_layers_after == 8 and plan.is_identity()
    assert plan.effective_layers() == [(i,) for i in range(8)]


def test_effective_layers_and_round_trip():
    plan = GroupPlan.parse([[1, 2], [4, 5, 6]], 8)
    assert plan.effective_layers() == [(0,), (1, 2), (3,), (4, 5, 6), (7,)]
    assert GroupPlan.from_dict(plan.to_dict()) == plan
    assert plan.ideal_speedup == pytest.approx(8 / 5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("4-9:2", "not a multiple of the degree 2"),
        ("4-8:0", "degree P=0"),
        ("4-8:-1", "degree P=-1"),
        ("8-4:2", "end 4 must be greater than start 8"),
        ("4..8:2", "not of the form 'S-E:P'"),
        ([[1, 2], [2, 3]], "overlap at layer 2"),
        ([[1, 3]], r"group \[1, 3\]: layers must be consecutive"),
        ([[6, 7], [7, 8]], r"group \[7, 8\]: layer index 8 is out of range"),
        ([[-1, 0]], "layer index -1 is out of range"),
        ([[]], "empty"),
        ([[1, "2"]], "is not an integer"),
        ("30-34:2", "layer index 32 is out of range"),
    ],
)
def test_bad_plans_name_the_offender(spec, message):
    with pytest.raises(ValueError, match=message):
        GroupPlan.parse(spec, 32 if isinstance(spec, str) else 8)


def test_plan_for_another_model_is_rejected():
    with pytest.raises(ValueError, match="made for 8 layers"):
        GroupPlan.parse(GroupPlan.parse("2-4:2", 8), 12)

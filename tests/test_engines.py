"""Which engines serve which bypass mode: the rule the report, ``cqil plan`` and the GGUF writer share."""

import pytest

from cqil.export.engines import describe_engines, serving_engines


@pytest.mark.parametrize(
    "bypass, gates, gguf",
    [("lp", "fixed", True), ("lp", "learned", False), ("cqil", "fixed", False), ("none", "learned", False)],
)
def test_only_lp_with_fixed_gates_reaches_llama_cpp(bypass, gates, gguf):
    engines = serving_engines(bypass, gates)
    assert engines["transformers"] is None and engines["vLLM"] is None
    assert (engines["llama.cpp"] is None) is gguf
    line = describe_engines(bypass, gates)
    assert line.startswith("served by transformers, vLLM (cqil plugin)")
    assert ("not by llama.cpp/Ollama (GGUF)" in line) is not gguf


def test_unknown_settings_are_errors():
    with pytest.raises(ValueError, match="bypass"):
        serving_engines("wide", "fixed")
    with pytest.raises(ValueError, match="gate"):
        serving_engines("lp", "trained")


@pytest.mark.parametrize("bypass, gates", [("lp", "fixed"), ("cqil", "learned")])
def test_the_report_says_which_engines_serve_the_model(bypass, gates):
    from cqil.evaluation.report import plan_summary, render_markdown
    from cqil.rewrite.plan import GroupPlan

    plan = plan_summary(GroupPlan.parse("2-6:2", 8), {"bypass": bypass, "gates": gates, "form": "merged"})
    text = render_markdown({"schema_version": 1, "base_model": "tiny", "plan": plan})
    line = next(x for x in text.splitlines() if x.startswith("- Engines: "))
    assert line == f"- Engines: {describe_engines(bypass, gates)}."
    assert ("llama.cpp/Ollama (GGUF)" in line.split("; not by")[0]) is (bypass == "lp")

"""The pieces of data/build_sample.py that shape the documentation source's text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build_sample():
    spec = importlib.util.spec_from_file_location("build_sample", REPO / "data/build_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_prose_drops_markup_lines_and_keeps_text_and_code(build_sample):
    page = (
        ".. _composite:\n\nComposite types\n===============\n\n.. versionadded:: 2.0\n\n"
        "Sets of columns form one type::\n\n    x = Point(1, 2)\n\n\n\n"
        ".. code-block:: python\n    :caption: example\n\n    y = 3\n"
    )
    assert build_sample.rst_prose(page) == (
        "Composite types\n===============\n\nSets of columns form one type::\n\n    x = Point(1, 2)\n\n    y = 3"
    )


def test_parts_cut_at_paragraph_breaks_within_the_limit(build_sample):
    paragraphs = ["a" * 30, "b" * 30, "c" * 30]
    text = "\n\n".join(paragraphs)
    assert build_sample.parts(text, 70) == ["\n\n".join(paragraphs[:2]), paragraphs[2]]
    assert build_sample.parts(text, 1_000) == [text]
    # A paragraph longer than the limit is cut at the limit; nothing is lost.
    long = build_sample.parts("x" * 25, 10)
    assert long == ["x" * 10, "x" * 10, "x" * 5]
    for limit in (7, 31, 64, 95):
        pieces = build_sample.parts(text, limit)
        assert all(len(p) <= limit for p in pieces)
        assert "".join(pieces).replace("\n", "") == text.replace("\n", "")

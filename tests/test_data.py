"""cqil.data on small files written to tmp_path, with a word-level tokenizer built locally."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cqil.data import calibration_tokens, expand_paths, iter_records, pack_tokens

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
SOURCES = {"RedPajamaWikipedia", "RedPajamaBook", "RedPajamaGithub"}
WORDS = [f"w{i}" for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def ids(words: str) -> list[int]:
    return [WORDS.index(w) + 2 for w in words.split()]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts, dumped as JSON) or raw strings (written verbatim), one per line."""
    body = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body, encoding="utf-8")
    return path


def rp(text: str, source: str = "RedPajamaBook") -> dict:
    return {"text": text, "meta": {"redpajama_set_name": source}}


# ------------------------------------------------------------------------------------ reading
def test_plain_and_gzip_directory_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl.gz", [rp("w2", "RedPajamaGithub")])
    write_jsonl(tmp_path / "a.jsonl", [rp("w0"), rp("w1", "RedPajamaWikipedia")])
    (tmp_path / "notes.txt").write_text("not data")
    assert list(iter_records(tmp_path)) == [
        ("w0", "RedPajamaBook"),
        ("w1", "RedPajamaWikipedia"),
        ("w2", "RedPajamaGithub"),
    ]


def test_glob_and_path_list(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [rp("w0")])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [rp("w1")])
    assert expand_paths(str(tmp_path / "*.jsonl*")) == [a, b]
    assert [t for t, _ in iter_records([b, a])] == ["w1", "w0"]


@pytest.mark.parametrize("name", ["missing.jsonl", "nothing-*.jsonl", "empty_dir"])
def test_path_matching_nothing_is_named(tmp_path, name):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=name.replace("*", r"\*")):
        list(iter_records(tmp_path / name))


def test_bad_lines_are_skipped_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            rp("w0"),
            "{not json",
            rp("w1"),
            {"meta": {}},
            "",
            {"text": 3},
            rp("w2"),
            "[1, 2]",
            rp("w3"),
            rp("w4"),
        ],
    )
    with pytest.warns(UserWarning) as caught:
        texts = [t for t, _ in iter_records(path)]
    assert texts == ["w0", "w1", "w2", "w3", "w4"]
    messages = [str(w.message) for w in caught]
    assert [m.split(": ")[0] for m in messages] == [f"{path}:{n}" for n in (2, 4, 6, 8)]
    assert "invalid JSON" in messages[0] and '"text"' in messages[1] and "int" in messages[2]


def test_mostly_bad_file_raises(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [rp("w0"), "oops", "{}", '{"text": null}'])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="bad.jsonl"):
        list(iter_records(path))


def test_file_without_usable_text_raises(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [rp("   "), ""])
    with pytest.raises(ValueError, match="blank.jsonl"):
        list(iter_records(path))


def test_many_bad_lines_warn_a_bounded_number_of_times(tmp_path):
    path = write_jsonl(tmp_path / "noisy.jsonl", [rp("w0")] * 30 + ["x"] * 20)
    with pytest.warns(UserWarning) as caught:
        assert len(list(iter_records(path))) == 30
    assert len(caught) == 6 and "20 bad lines" in str(caught[-1].message)


def test_source_field_dotted_path_and_json_string_meta(tmp_path):
    path = write_jsonl(
        tmp_path / "meta.jsonl",
        [
            {"text": "w0", "info": {"origin": {"name": "books"}}},
            {"text": "w1", "info": json.dumps({"origin": {"name": "arxiv"}})},
            {"text": "w2", "info": {"origin": "flat"}},
            {"text": "w3"},
        ],
    )
    assert [s for _, s in iter_records(path, source_field="info.origin.name")] == [
        "books",
        "arxiv",
        None,
        None,
    ]
    assert [s for _, s in iter_records(path, source_field=None)] == [None] * 4

    rp_string = write_jsonl(
        tmp_path / "rp.jsonl", [{"text": "w0", "meta": json.dumps({"redpajama_set_name": "X"})}]
    )
    assert list(iter_records(rp_string)) == [("w0", "X")]


# ------------------------------------------------------------------------------------ packing
def test_pack_tokens_appends_eos_and_drops_the_tail(tokenizer):
    eos = tokenizer.eos_token_id
    stream = ids("w1 w2 w3") + [eos] + ids("w4 w5") + [eos] + ids("w6 w7 w8 w9") + [eos]  # 12 tokens
    blocks = pack_tokens(tokenizer, ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"], seq_len=5)
    assert blocks.dtype == torch.long and blocks.shape == (2, 5)
    assert blocks.flatten().tolist() == stream[:10]
    assert blocks[0, 3] == eos and blocks[1, 1] == eos

    assert pack_tokens(tokenizer, ["w1 w2 w3", "w4 w5", "w6 w7"], seq_len=4, max_sequences=1).shape == (1, 4)
    assert pack_tokens(tokenizer, ["w1"], seq_len=5).shape == (0, 5)


def test_pack_tokens_is_continuous_across_tokenizer_batches(tokenizer):
    docs = [" ".join(WORDS[i : i + 1 + i % 7]) for i in range(250)]  # more docs than one batch
    expected = [t for doc in docs for t in ids(doc) + [tokenizer.eos_token_id]]
    blocks = pack_tokens(tokenizer, iter(docs), seq_len=16)
    assert blocks.shape == (len(expected) // 16, 16)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]


def test_pack_tokens_needs_eos():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "w0": 1}, unk_token="[UNK]"))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(ValueError, match="eos"):
        pack_tokens(no_eos, ["w0"], seq_len=2)


def test_calibration_tokens(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [rp(" ".join(WORDS[:50])), rp(" ".join(WORDS[50:100]))])
    tokens = calibration_tokens(tokenizer, tmp_path, seq_len=10, num_sequences=3)
    assert tokens.shape == (3, 10) and tokens[0].tolist() == ids(" ".join(WORDS[:10]))

    with pytest.warns(UserWarning, match="only 10 of 20"):
        assert calibration_tokens(tokenizer, tmp_path, seq_len=10, num_sequences=20).shape == (10, 10)

    short = write_jsonl(tmp_path / "short.jsonl.gz", [rp("w1 w2")])
    with pytest.raises(ValueError, match="short.jsonl.gz"):
        calibration_tokens(tokenizer, short, seq_len=10, num_sequences=1)


# ------------------------------------------------------------------------------------ shipped sample
def test_shipped_sample_files():
    train = list(iter_records(SAMPLE_DIR / "train.jsonl.gz"))
    heldout = list(iter_records(SAMPLE_DIR / "heldout.jsonl.gz"))
    assert {s for _, s in train} == SOURCES and {s for _, s in heldout} == SOURCES
    assert not {t for t, _ in train} & {t for t, _ in heldout}
    assert sum(len(t) for t, _ in heldout) > 300_000
    assert sum(p.stat().st_size for p in SAMPLE_DIR.glob("*.jsonl.gz")) < 8_000_000

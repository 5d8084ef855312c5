"""cqil.recovery.data on small files written to tmp_path, with a word-level tokenizer built locally."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cqil.recovery.data import calibration_tokens, expand_paths, iter_records, pack_tokens

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


# ------------------------------------------------------------------------------------ formats and streams
def test_zstd_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.compress((json.dumps(rp("w0")) + "\n").encode()))
    table = pa.table({"text": ["w1", None], "meta": ['{"redpajama_set_name": "P"}', "{}"]})
    pq.write_table(table, tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text(json.dumps(rp("w2")) + "\n")
    with pytest.warns(UserWarning, match=r"b.parquet:2: .*NoneType"):
        records = list(iter_records(tmp_path))
    assert records == [("w0", "RedPajamaBook"), ("w1", "P"), ("w2", "RedPajamaBook")]


def stream_docs(n: int = 200) -> list[dict]:
    sources = ["RedPajamaBook", "RedPajamaWikipedia", "RedPajamaGithub"]
    return [
        rp(" ".join(WORDS[(i * 7 + k) % 300] for k in range(3 + i % 5)), sources[i % 3]) for i in range(n)
    ]


def test_heldout_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    from cqil.recovery.data import TokenStream, heldout_tokens, in_heldout

    path = write_jsonl(tmp_path / "d.jsonl", stream_docs())
    texts = [t for t, _ in iter_records(path)]
    held = {t for t in texts if in_heldout(t, 0.2)}
    assert 0 < len(held) < len(texts) and held == {t for t in texts if in_heldout(t, 0.2)}
    stream = TokenStream(tokenizer, [path], seq_len=4, split="train", heldout_fraction=0.2)
    seen = {stream._next_document() for _ in range(len(texts) - len(held))}
    assert not seen & held
    assert heldout_tokens(
        tokenizer, [path], None, seq_len=4, num_sequences=2, heldout_fraction=0.2
    ).shape == (2, 4)


def test_stream_mixture_sharding_and_exact_resume(tmp_path, tokenizer):
    from cqil.recovery.data import TokenStream

    path = write_jsonl(tmp_path / "d.jsonl", stream_docs())
    kw = dict(seq_len=8, mixture={"RedPajamaBook": 3.0, "RedPajamaGithub": 1.0}, seed=5)
    stream = TokenStream(tokenizer, [path], **kw)
    labels = [stream._next_document() for _ in range(400)]
    books = {t for t, s in iter_records(path) if s == "RedPajamaBook"}
    share = sum(t in books for t in labels) / len(labels)
    assert 0.65 < share < 0.85  # 3:1, and no Wikipedia at all
    assert not {t for t, s in iter_records(path) if s == "RedPajamaWikipedia"} & set(labels)

    ranks = [TokenStream(tokenizer, [path], rank=r, world_size=2, **kw) for r in range(2)]
    a, b = ranks[0].next_batch(3), ranks[1].next_batch(3)
    assert not torch.equal(a, b)

    stream = TokenStream(tokenizer, [path], rank=1, world_size=2, **kw)
    stream.next_batch(5)
    state = stream.state_dict()
    expected = stream.next_batch(40)  # beyond one epoch of the smaller source
    resumed = TokenStream(tokenizer, [path], rank=1, world_size=2, **kw)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(40), expected)
    with pytest.raises(ValueError, match="same number of processes"):
        TokenStream(tokenizer, [path], rank=0, world_size=1, **kw).load_state_dict(state)


def test_stream_source_without_documents_is_named(tmp_path, tokenizer):
    from cqil.recovery.data import TokenStream

    path = write_jsonl(tmp_path / "d.jsonl", stream_docs(10))
    stream = TokenStream(tokenizer, [path], seq_len=4, mixture={"RedPajamaArXiv": 1.0})
    with pytest.raises(ValueError, match="RedPajamaArXiv"):
        stream.next_batch(1)

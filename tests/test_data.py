"""cqil.recovery.data on small files written to tmp_path, with a word-level tokenizer built locally."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cqil.errors import DataError, DataNotFoundError
from cqil.recovery.data import calibration_tokens, expand_paths, iter_records, pack_tokens

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
SOURCES = {"RedPajamaWikipedia", "RedPajamaBook", "RedPajamaGithub"}
SAMPLE_SOURCES = SOURCES | {"SoftwareDocs", "MailingLists", "Chat"}
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
    assert {s for _, s in train} == SAMPLE_SOURCES and {s for _, s in heldout} == SAMPLE_SOURCES
    assert not {t for t, _ in train} & {t for t, _ in heldout}
    assert sum(len(t) for t, _ in heldout) > 300_000
    assert sum(p.stat().st_size for p in SAMPLE_DIR.glob("*.jsonl.gz")) < 8_000_000


def test_discussion_dev_set_holds_lists_the_sample_never_trains_on():
    dev = list(
        iter_records(
            SAMPLE_DIR.parent / "other_domain" / "discussion_dev.jsonl.gz", source_field="meta.title"
        )
    )
    mail = [
        (text, title)
        for split in ("train", "heldout")
        for (text, title), (_, source) in zip(
            iter_records(SAMPLE_DIR / f"{split}.jsonl.gz", source_field="meta.title"),
            iter_records(SAMPLE_DIR / f"{split}.jsonl.gz"),
            strict=True,
        )
        if source == "MailingLists"
    ]
    dev_lists = {title.split()[0] for _, title in dev}
    assert dev_lists and all(name.endswith(".linux.ie") for name in dev_lists)
    assert not dev_lists & {title.split()[0] for _, title in mail}
    assert not {text for text, _ in dev} & {text for text, _ in mail}
    assert 100_000 < sum(len(text) for text, _ in dev) <= 150_000


def test_chat_dev_set_holds_conversations_the_sample_never_trains_on():
    dev = list(iter_records(SAMPLE_DIR.parent / "other_domain" / "chat_dev.jsonl.gz"))
    chat = [
        text
        for split in ("train", "heldout")
        for text, source in iter_records(SAMPLE_DIR / f"{split}.jsonl.gz")
        if source == "Chat"
    ]
    conversations = [c for text, _ in dev for c in text.split("\n\n")]
    assert {source for _, source in dev} == {"ChatDev"} and len(conversations) > len(dev)
    assert all(line[:3] in ("A: ", "B: ") for c in conversations + chat for line in c.splitlines())
    assert not set(conversations) & set(chat)
    assert 100_000 < sum(len(text) for text, _ in dev) <= 150_000


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
    from cqil.recovery.data import heldout_tokens, in_heldout
    from cqil.recovery.stream import TokenStream

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
    from cqil.recovery.stream import TokenStream

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


def test_stream_repeat_share_repeats_first_halves_and_reads_the_text_once(tmp_path, tokenizer):
    from cqil.recovery.stream import TokenStream

    path = write_jsonl(tmp_path / "d.jsonl", stream_docs())
    plain = TokenStream(tokenizer, [path], seq_len=9).next_batch(60).flatten().tolist()
    stream = TokenStream(tokenizer, [path], seq_len=9, repeat_share=0.3, seed=2)
    blocks = stream.next_batch(60).tolist()
    repeated = [b for b in blocks if b[5:] == b[:4]]
    assert 0.15 < len(repeated) / len(blocks) < 0.45
    # Every text token is read once, in order: a repeated block reads its first five tokens only.
    read = [t for b in blocks for t in (b[:5] if b in repeated else b)]
    assert read == plain[: len(read)]

    state = stream.state_dict()
    expected = stream.next_batch(30)
    resumed = TokenStream(tokenizer, [path], seq_len=9, repeat_share=0.3, seed=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(30), expected)
    other_seed = TokenStream(tokenizer, [path], seq_len=9, repeat_share=0.3, seed=3).next_batch(60)
    assert other_seed.tolist() != blocks
    with pytest.raises(ValueError, match="repeat_share"):
        TokenStream(tokenizer, [path], seq_len=9, repeat_share=1.0)


def test_stream_source_without_documents_is_named(tmp_path, tokenizer):
    from cqil.recovery.stream import TokenStream

    path = write_jsonl(tmp_path / "d.jsonl", stream_docs(10))
    with pytest.raises(ValueError, match=r"data\.mixture\.RedPajamaArXiv.*sources found: RedPajamaBook"):
        TokenStream(tokenizer, [path], seq_len=4, mixture={"RedPajamaArXiv": 1.0}).next_batch(1)


# ------------------------------------------------------------------------------------ sharded streams
def shards(tmp_path: Path, n: int = 4, docs: int = 240) -> list[Path]:
    """``n`` JSONL shards per source (the RedPajama-1T layout: one source per file)."""
    by_source: dict[str, list[dict]] = {}
    for doc in stream_docs(docs):
        by_source.setdefault(doc["meta"]["redpajama_set_name"], []).append(doc)
    return [
        write_jsonl(tmp_path / f"{source}-{i}.jsonl", records[i::n])
        for source, records in sorted(by_source.items())
        for i in range(n)
    ]


def test_each_rank_opens_only_its_own_shards(tmp_path, tokenizer, monkeypatch):
    from cqil.recovery import data
    from cqil.recovery.stream import TokenStream

    files = shards(tmp_path)
    opened: list[str] = []
    original = data._open_binary
    monkeypatch.setattr(data, "_open_binary", lambda p: opened.append(Path(p).name) or original(p))
    kw = dict(seq_len=8, mixture={"RedPajamaBook": 1.0, "RedPajamaGithub": 1.0, "RedPajamaWikipedia": 1.0})
    blocks = []
    for rank in range(2):
        stream = TokenStream(tokenizer, files, rank=rank, world_size=2, **kw)
        opened.clear()
        blocks.append(stream.next_batch(60))  # more than one epoch of the rank's shards
        assert opened and {int(name.split("-")[1][0]) % 2 for name in opened} == {rank}, opened
    assert not torch.equal(blocks[0], blocks[1])


def test_resume_restores_the_position_without_replaying(tmp_path, tokenizer, monkeypatch):
    """The restored state starts in the current shard: the earlier shards are never opened."""
    from cqil.recovery import data
    from cqil.recovery.stream import TokenStream

    files = shards(tmp_path, n=6)
    kw = dict(seq_len=8, mixture={"RedPajamaBook": 2.0, "RedPajamaWikipedia": 1.0}, seed=3)
    stream = TokenStream(tokenizer, files, **kw)
    stream.next_batch(45)
    state = stream.state_dict()
    expected = stream.next_batch(80)
    resumed = TokenStream(tokenizer, files, **kw)  # (peeks at every file's head)
    opened: list[str] = []
    original = data._open_binary
    monkeypatch.setattr(data, "_open_binary", lambda p: opened.append(Path(p).name) or original(p))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(80), expected)
    for i, name in enumerate(["RedPajamaBook", "RedPajamaWikipedia"]):
        shard = dict(_shard_positions(state["dataset"]))[i]
        assert shard > 0  # the test reaches past the first shard of each source
        assert [n for n in opened if n.startswith(name)][0] == f"{name}-{shard}.jsonl", opened


def _shard_positions(state):
    inner = state["examples_iterable"]
    for i, source in enumerate(inner["previous_states"]):
        if source is not None:
            yield i, source["examples_iterable"]["shard_idx"]


def test_resume_with_another_world_size_is_refused(tmp_path, tokenizer):
    from cqil.recovery.stream import TokenStream

    files = shards(tmp_path)
    stream = TokenStream(tokenizer, files, rank=0, world_size=2, seq_len=8)
    stream.next_batch(3)
    with pytest.raises(ValueError, match=r"saved by 2 processes, this run has 4.*same number of processes"):
        TokenStream(tokenizer, files, rank=0, world_size=4, seq_len=8).load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="changed since"):
        TokenStream(tokenizer, files[:-1], rank=0, world_size=2, seq_len=8).load_state_dict(
            stream.state_dict()
        )


def test_state_survives_torch_save_weights_only(tmp_path, tokenizer):
    from cqil.recovery.stream import TokenStream

    kw = dict(seq_len=8, mixture={"RedPajamaBook": 1.0, "RedPajamaGithub": 1.0}, seed=1)
    stream = TokenStream(tokenizer, shards(tmp_path), **kw)
    stream.next_batch(7)
    torch.save(stream.state_dict(), tmp_path / "state.pt")
    expected = stream.next_batch(20)
    resumed = TokenStream(tokenizer, shards(tmp_path), **kw)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(resumed.next_batch(20), expected)


@pytest.mark.parametrize("layout", ["jsonl.zst", "parquet"])
def test_hub_code_path_on_a_local_repository_layout(tmp_path, tokenizer, layout):
    """``hf://<id>`` goes through ``load_dataset(id, split=..., streaming=True)``; here the id is a
    local folder laid out like cerebras/SlimPajama-627B (``train/chunk1/example_train_<i>.jsonl.zst``)
    or a Parquet conversion (``data/train-0000<i>-of-00004.parquet``), same fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from cqil.recovery.data_checks import check_data
    from cqil.recovery.recipe import DataConfig
    from cqil.recovery.stream import TokenStream

    repo = tmp_path / "SlimPajama-627B"
    docs = stream_docs(400)
    for i in range(4):
        part = docs[i::4]
        if layout == "parquet":
            (repo / "data").mkdir(parents=True, exist_ok=True)
            meta = [json.dumps(d["meta"]) for d in part]  # meta as a JSON string, as some dumps have it
            table = pa.table({"text": [d["text"] for d in part], "meta": meta})
            pq.write_table(table, repo / "data" / f"train-{i:05d}-of-00004.parquet")
        else:
            (repo / "train" / "chunk1").mkdir(parents=True, exist_ok=True)
            body = "".join(json.dumps(d) + "\n" for d in part).encode()
            (repo / "train" / "chunk1" / f"example_train_{i}.jsonl.zst").write_bytes(zstandard.compress(body))
    spec = f"hf://{repo}"
    config = DataConfig(train=[spec], mixture={"RedPajamaBook": 1.0, "RedPajamaGithub": 1.0})
    assert check_data(config) == SOURCES
    kw = dict(seq_len=8, mixture=config.mixture, seed=2, split="train", heldout_fraction=0.1)
    stream = TokenStream(tokenizer, [spec], rank=1, world_size=2, **kw)
    assert stream.dataset.num_shards == 2  # this rank's two files of four
    stream.next_batch(30)
    state = stream.state_dict()
    expected = stream.next_batch(40)
    resumed = TokenStream(tokenizer, [spec], rank=1, world_size=2, **kw)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(40), expected)
    wiki = {d["text"] for d in docs if d["meta"]["redpajama_set_name"] == "RedPajamaWikipedia"}
    assert not any(stream._next_document() in wiki for _ in range(50))
    with pytest.raises(ValueError, match=r"data\.mixture\.RedPajamaArXiv.*RedPajamaBook, RedPajamaGithub"):
        check_data(DataConfig(train=[spec], mixture={"RedPajamaArXiv": 1.0}))


# ------------------------------------------------------------------------------------ bad input, caught early
def _gz(path: Path, body: bytes) -> Path:
    path.write_bytes(gzip.compress(body))
    return path


def _bad_utf8(tmp_path):
    body = (json.dumps(rp("w0")) + "\n").encode() * 3 + b'{"text": "w1 \xff\xfe"}\n'
    return [_gz(tmp_path / "bad-utf8.jsonl.gz", body)], None


def _truncated(tmp_path):
    data = gzip.compress((json.dumps(rp("w0 w1 w2")) + "\n").encode() * 2000)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) - 40])
    return [path], None


def _not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(json.dumps(rp("w0")) + "\n")
    return [path], None


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty"], None


def _no_match(tmp_path):
    return [str(tmp_path / "shard-*.jsonl.zst")], None


def _absent_source(tmp_path):
    return [write_jsonl(tmp_path / "d.jsonl", stream_docs(30))], {"RedPajamaArXiv": 0.5, "RedPajamaBook": 0.5}


BAD_INPUT = {
    "glob matching nothing": (_no_match, DataNotFoundError, r"data\.train: .*shard-\*\.jsonl\.zst"),
    "empty directory": (_empty_dir, DataNotFoundError, r"data\.train: .*empty"),
    "mixture source absent": (
        _absent_source,
        DataError,
        r"data\.mixture\.RedPajamaArXiv.*sources found: RedPajamaBook, RedPajamaGithub, RedPajamaWikipedia",
    ),
    "not gzip": (_not_gzip, DataError, r"plain\.jsonl\.gz:1: damaged or truncated"),
    "truncated gzip": (_truncated, DataError, r"cut\.jsonl\.gz:\d+: damaged or truncated"),
    "invalid UTF-8": (_bad_utf8, DataError, r"bad-utf8\.jsonl\.gz:4: invalid UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_check_data_names_the_culprit(tmp_path, case):
    from cqil.recovery.data_checks import check_data
    from cqil.recovery.recipe import DataConfig

    setup, error, message = BAD_INPUT[case]
    train, mixture = setup(tmp_path)
    with pytest.raises(error, match=message) as caught:
        check_data(DataConfig(train=[str(p) for p in train], mixture=mixture), source="r.yaml")
    assert type(caught.value) is error


def test_damaged_shard_mid_run_is_named_by_the_stream(tmp_path, tokenizer):
    from cqil.recovery.data_checks import check_data
    from cqil.recovery.recipe import DataConfig
    from cqil.recovery.stream import TokenStream

    good = write_jsonl(tmp_path / "a-0.jsonl.gz", stream_docs(100))
    (bad,), _ = _truncated(tmp_path)
    check_data(DataConfig(train=[str(good), str(bad)]), full_check_bytes=1)  # bad is beyond the budget
    stream = TokenStream(tokenizer, [good, bad], seq_len=8)
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: damaged or truncated gzip"):
        stream.next_batch(10_000)

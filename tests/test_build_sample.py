"""The pieces of data/build_sample.py that shape the documentation, mailing-list and chat sources' text."""

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


def test_mail_body_keeps_the_writer_and_one_level_of_quotes(build_sample):
    body = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA1\n\n"
        "On Mon, Ann Other <ann@example.org> wrote:\n> Does it build?\n>> It did last week.\n\n\n\n"
        "Yes, mail me at bob.smith+lists@mail.example.co.uk if not.\n"
        "-- \nBob, whose signature is not text\n"
    )
    assert build_sample.mail_body(body) == (
        "On Mon, Ann Other <[address]> wrote:\n> Does it build?\n\nYes, mail me at [address] if not."
    )
    for footer in (
        "_______________________________________________\nRPM-List mailing list",
        "-------------------------------------------------------\nThis sf.net email is sponsored by:",
        "http://xent.com/mailman/listinfo/fork",
        "-----Original Message-----\nFrom: someone",
    ):
        assert build_sample.mail_body(f"Thanks.\n{footer}\nmore") == "Thanks."
    # A charset Python does not know still gives text.
    assert build_sample.decoded("caf\xe9".encode("latin-1"), "unknown-8bit") == "caf\xe9"


def test_mailing_list_messages_split_by_list_into_training_and_dev(build_sample, tmp_path, monkeypatch):
    import io
    import json
    import tarfile

    def mail(list_id, body, content_type="text/plain"):
        return (
            f"From: x@example.org\nSubject: =?iso-8859-1?q?Caf=E9?= question\nList-Id: Talk <{list_id}>\n"
            f"Content-Type: {content_type}; charset=us-ascii\n\n{body}\n"
        )

    long = "A question about the build, in a few more words. " * 8
    mails = {
        "easy-ham-1/00001": mail("fork.xent.com", long),
        "easy-ham-1/00002": mail("ilug.linux.ie", "Another " + long),
        "easy-ham-1/00003": mail("ilug.linux.ie", long),  # a cross-post: also in training
        "easy-ham-1/00004": mail("fork.xent.com", "Too short."),
        "easy-ham-1/00005": mail("fork.xent.com", f"<p>{long}</p>", "text/html"),
        "easy-ham-2/00006": mail("freshmeat-news.lists.freshmeat.net", long),  # neither list
        "spam-1/00007": mail("fork.xent.com", long),
    }
    tarball = tmp_path / "mail.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, text in mails.items():
            group, number = name.split("/")
            data = json.dumps({"id": number, "group": group, "text": text}).encode()
            info = tarfile.TarInfo(f"package/data/{name}.deadbeef.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    messages = build_sample.mailing_list_messages(tarball)
    assert [title for _, title, _ in messages] == [
        "fork.xent.com easy-ham-1/00001",
        "ilug.linux.ie easy-ham-1/00002",
        "ilug.linux.ie easy-ham-1/00003",
        "freshmeat-news.lists.freshmeat.net easy-ham-2/00006",
    ]
    assert messages[0][2] == "Subject: Caf\xe9 question\n\n" + long.strip()
    train = list(build_sample.mailing_list_docs(messages))
    assert [title for title, _ in train] == ["fork.xent.com easy-ham-1/00001"]
    dev = build_sample.discussion_dev(messages, {build_sample.text_hash(text) for _, text in train})
    assert [r["meta"]["title"] for r in dev] == ["ilug.linux.ie easy-ham-1/00002"]
    assert dev[0]["meta"]["license"] == "CC0-1.0"
    monkeypatch.setattr(build_sample, "MAIL_DEV_MAX_TOTAL_CHARS", 100)
    assert build_sample.discussion_dev(messages, set()) == []


def test_mailing_list_messages_refuses_a_damaged_tarball_naming_it(build_sample, tmp_path):
    damaged = tmp_path / "mail.tgz"
    damaged.write_bytes(b"\x1f\x8b\x08\x00 not a whole gzip stream")
    with pytest.raises(SystemExit, match="mail.tgz: not a readable copy"):
        build_sample.mailing_list_messages(damaged)


def test_chat_conversations_label_speakers_and_split_by_round(build_sample, tmp_path, monkeypatch):
    import json
    import zipfile

    def conversation(start, *turns):
        messages = [
            [{"text": text, "timestamp": start, "sender": sender} for text in texts]
            for sender, texts in turns
        ]
        return {"start": start, "prompt": "", "ratings": {}, "messages": messages}

    chatty = "and then we walked all the way back along the river in the rain " * 3
    data = {
        "c1": conversation(
            "2018-05-01T10:00:00Z", ("u2", ["Hi!", "how are\nyou?"]), ("u1", [chatty]), ("u2", [chatty])
        ),
        "c2": conversation("2018-10-01T10:00:00Z", ("u1", [chatty]), ("u3", ["  ", chatty])),
        "c3": conversation("2018-05-02T10:00:00Z", ("u1", [chatty * 3])),  # the other never answered
        "c4": conversation("2018-05-03T10:00:00Z", ("u1", ["Hi"]), ("u2", ["Hey"])),  # too short
    }
    wheel = tmp_path / build_sample.CHAT_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chitchat_dataset/dataset.json", json.dumps(data))
    conversations = build_sample.chat_conversations(wheel)
    assert [title for _, title, _ in conversations] == ["chitchat c1", "chitchat c2"]
    # One message a line; the first writer is A; a message's line break becomes a space; empty ones go.
    assert conversations[0][2] == f"A: Hi!\nA: how are you?\nB: {chatty.strip()}\nA: {chatty.strip()}"
    assert conversations[1][2] == f"A: {chatty.strip()}\nB: {chatty.strip()}"
    # The spring round trains; the autumn round is the dev set, never trained on.
    assert [title for title, _ in build_sample.chat_docs(conversations)] == ["chitchat c1"]
    dev = build_sample.chat_dev(conversations)
    assert [r["text"] for r in dev] == [conversations[1][2]]
    assert dev[0]["meta"] == {"redpajama_set_name": "ChatDev", "title": "chitchat dev 1", "license": "MIT"}
    # Dev conversations are joined into documents within the limit; the total is capped by whole documents.
    later = [(f"2018-10-0{i}", f"chitchat d{i}", f"A: {i}{chatty}\nB: ok") for i in range(1, 5)]
    monkeypatch.setattr(build_sample, "CHAT_DEV_DOC_CHARS", 2 * len(later[0][2]) + 2)
    docs = build_sample.chat_dev(later)
    assert len(docs) == 2 and all(r["text"].count("\n\nA: ") == 1 for r in docs)
    monkeypatch.setattr(build_sample, "CHAT_DEV_MAX_TOTAL_CHARS", len(docs[0]["text"]))
    assert len(build_sample.chat_dev(later)) == 1


def test_chat_conversations_refuse_a_damaged_wheel_naming_it(build_sample, tmp_path):
    damaged = tmp_path / "chat.whl"
    damaged.write_bytes(b"PK not a whole zip")
    with pytest.raises(SystemExit, match="chat.whl: not a readable copy"):
        build_sample.chat_conversations(damaged)

"""Upload a cqil export folder to the Hugging Face Hub in one commit (:func:`push_to_hub`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cqil.errors import HubError, ModelNotFoundError

if TYPE_CHECKING:
    pass


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an export folder to the Hub model repo ``repo_id`` in one commit; return the commit URL.

    The repo is created when missing (``private`` applies only then; an existing repo keeps its
    visibility); ``revision`` names a branch, created from the default branch when missing. The
    token is ``token``, else ``$HF_TOKEN``, else the user's ``hf auth login``; it is never printed:
    any failure is re-raised as one ``OSError`` whose message has the token masked out.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder / 'config.json'}: no such file; push an export folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    secret = token or get_token()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in files
        ]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.name} (cqil export)",
            repo_type="model",
            revision=revision,
        )
    except Exception as e:  # whatever failed, its message must not carry the token
        message = " ".join(str(e).split())
        if secret:
            message = message.replace(secret, "***")
        raise HubError(f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {message}") from None
    return info.commit_url

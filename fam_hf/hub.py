"""Pushing FAM runs to the Hugging Face Hub through ``huggingface_hub``'s client, with failures that say what to do.

``FAMTrainer.push_to_hub`` (and the recipes' ``--push_to_hub``) go through ``Trainer``'s own push and turn a
failure into :class:`HubPushError`; ``fam-hf publish`` pushes a finished run folder with :func:`publish_run`.
The model card itself is :mod:`fam_hf.model_card`'s. No token ever reaches an error message.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .model_card import CARD_NAME, mask_tokens, model_card, run_card_facts

# What Trainer.push_to_hub leaves out of an upload; fam-hf publish does the same.
IGNORE_PATTERNS = ["_*", "checkpoint-*"]
MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors")
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}  # huggingface_hub's HTTP stack, any version


class HubPushError(RuntimeError):
    """A push to the Hub failed: the message names the cause, the fix, and where the model is saved locally."""


def publish_run(run_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:  # fmt: skip
    """Push a finished run folder to ``repo_id`` with ``huggingface_hub`` (``create_repo``, ``upload_folder``);
    writes the model card first if the folder has none. Returns the commit URL.

    Raises:
        FileNotFoundError / ValueError: no such folder, or no saved model in it.
        HubPushError: the Hub could not be reached or refused the push (the message says how to fix it).
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist; pass the output_dir of a finished run")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise ValueError(
            f"'{run_dir}' holds no saved model ({', '.join(MODEL_FILES)}); pass the output_dir of a finished run "
            "(trainer.save_model() writes them)"
        )
    if not (folder / CARD_NAME).is_file():
        model_card(run_card_facts(folder, repo_id), secrets=(token,)).save(folder / CARD_NAME)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload FAM run {folder.resolve().name}",
            revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except Exception as error:
        message = push_failure_message(error, repo_id=repo_id, endpoint=api.endpoint, local_dir=str(folder))
        raise HubPushError(mask_tokens(message, (token,))) from error
    return info.commit_url


def push_failure_message(error: BaseException, *, repo_id: str | None, endpoint: str, local_dir: str | None = None,
                         before_training: bool = False) -> str:  # fmt: skip
    """What went wrong pushing to ``repo_id`` at ``endpoint``, how to fix it, and where the model is safe."""
    problem, fix = _diagnose(error, repo_id)
    lines = [f"could not push to the Hugging Face Hub repository '{repo_id}' at {endpoint}: {problem}", f"Fix: {fix}"]
    if local_dir is not None:
        lines.append(
            f"The model is saved locally at {os.path.abspath(local_dir)}; once fixed, push it with "
            f"`fam-hf publish {local_dir} --repo-id {repo_id}`."
        )
    if before_training:
        lines.append(
            "Nothing has been trained yet. To train without the Hub, drop push_to_hub and publish the finished run "
            f"with `fam-hf publish OUTPUT_DIR --repo-id {repo_id}`."
        )
    return mask_tokens("\n".join(lines))


def _diagnose(error: BaseException, repo_id: str | None) -> tuple[str, str]:
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE)", "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        detail = str(error).splitlines()[0]
        if status in (401, 403):
            namespace = (repo_id or "").split("/")[0] or "your namespace"
            return f"the Hub refused the credentials (HTTP {status}: {detail})", (
                f"log in with `hf auth login`, or set HF_TOKEN to a token with write access to '{namespace}'"
            )
        if status == 404:
            return (
                f"not found (HTTP 404: {detail})",
                "check the repository id (--hub_model_id / --repo-id) and HF_ENDPOINT",
            )
        return (
            f"the Hub answered HTTP {status}: {detail}",
            "retry later; if it persists, check the repository on the Hub",
        )
    if _is_network_error(error):
        return f"cannot connect ({type(error).__name__}: {error})", (
            f"check the network connection and HF_ENDPOINT ({'set' if os.environ.get('HF_ENDPOINT') else 'unset'}; "
            f"unset it to push to https://huggingface.co), and that a token is set (HF_TOKEN or "
            "`hf auth login`)"
        )
    if isinstance(error, ValueError) and "README.md" in str(error):
        return f"the Hub rejected the model card: {error}", "fix the metadata at the top of README.md, then push again"
    return f"{type(error).__name__}: {error}", "see the error above; check HF_ENDPOINT, the token and the repository id"


def _is_network_error(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 8:
        root = type(error).__module__.split(".")[0]
        if isinstance(error, (ConnectionError, TimeoutError)) or root in _NETWORK_MODULES:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False

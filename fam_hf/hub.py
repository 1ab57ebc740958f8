"""Pushing FAM runs to the Hugging Face Hub through ``huggingface_hub``'s client, with failures that say what to do.

:class:`HubCardMixin` (which the FAM and SAM trainers and the recipes' ``--push_to_hub`` go through)
writes fam_hf's model card and turns a failure of ``Trainer``'s own push into :class:`HubPushError`;
``fam-hf publish`` pushes a finished run folder with :func:`publish_run`.
The model card itself is :mod:`fam_hf.model_card`'s. No token ever reaches an error message.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .model_card import CARD_NAME, FOLDER_PLACEHOLDER, card_facts, mask_tokens, model_card, run_card_facts

logger = logging.getLogger(__name__)

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
    if not (folder / CARD_NAME).is_file():  # written for no repository in particular: it stays in the folder
        model_card(run_card_facts(folder), secrets=(token,)).save(folder / CARD_NAME)
    # the card the repository gets says how to load the model from it (a recipe's card names no repository)
    card = (folder / CARD_NAME).read_text().replace(f'"{FOLDER_PLACEHOLDER}"', f'"{repo_id}"')
    api = HfApi(token=token)
    message = commit_message or f"Upload FAM run {folder.resolve().name}"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(url.repo_id).private:
            raise HubPushError(
                f"{url.repo_id} exists and is public, and --private sets only a new repository's visibility: "
                "nothing was uploaded. Make it private on the Hub (Settings) or with HfApi().update_repo_settings("
                f"'{url.repo_id}', private=True), then publish again (or publish to another --repo-id)"
            )
        if revision is not None:  # upload_folder commits to an existing branch only
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=message, revision=revision,
                          ignore_patterns=[*IGNORE_PATTERNS, CARD_NAME])  # fmt: skip
        info = api.upload_file(path_or_fileobj=card.encode(), path_in_repo=CARD_NAME, repo_id=url.repo_id,
                               revision=revision, commit_message=f"{message}: model card")  # fmt: skip
    except HubPushError:
        raise
    except Exception as error:
        message = push_failure_message(error, repo_id=repo_id, endpoint=api.endpoint, local_dir=str(folder))
        raise HubPushError(mask_tokens(message, (token,))) from error
    return info.commit_url


class HubCardMixin:
    """The model card and the Hub push of fam_hf's trainers, in front of any ``transformers.Trainer`` subclass.

    Overrides what ``Trainer`` (and TRL's trainers, which override little more than ``create_model_card``) use
    to save and publish: ``create_model_card`` writes fam_hf's card (:func:`~fam_hf.model_card.model_card`: the
    trainer that ran, the FAM settings as they resolved, κ, the metrics) in place of the generic draft;
    ``save_model`` writes it beside the weights; a failed ``push_to_hub`` / ``init_hf_repo`` raises
    :class:`HubPushError` naming the cause and the fix, once the model is saved; an explicit ``hub_token`` is
    kept out of ``training_args.bin``. :class:`~fam_hf.trainer.FAMMixin` and :class:`~fam_hf.sam_trainer.SAMMixin`
    inherit it (the card follows the method: :func:`~fam_hf.model_card.model_card`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._card_saves = 0  # save_model calls, so a failed push knows whether the model reached output_dir

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        dataset_name: str | None = None,
    ) -> None:
        """Write ``README.md`` into ``output_dir``: a card that records the FAM settings, κ, the evaluation
        metrics and the citations (:func:`fam_hf.model_card.model_card`), in place of Trainer's generic draft.
        ``Trainer.push_to_hub`` calls it and passes on its own keyword arguments (TRL's trainers pass
        ``dataset_name``)."""
        dataset = dataset if dataset is not None else dataset_name
        if self.is_world_process_zero():
            given = dict(language=language, license=license, tags=tags, model_name=model_name, tasks=tasks,
                         finetuned_from=finetuned_from, dataset_tags=dataset_tags, dataset=dataset)  # fmt: skip
            self._write_card(self.args.output_dir, **{k: v for k, v in given.items() if v is not None})

    def train(self, *args: Any, **kwargs: Any):
        self._card_run_start = time.time()  # the card reads only the run files written since (card_facts)
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer.save_model, with the model card written beside the weights (main process) before any push.
        super().save_model(output_dir, _internal_call=True)
        self._card_saves += 1
        if self.args.should_save:
            self._write_card(output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """``Trainer.push_to_hub``: save model, tokenizer and FAM model card, and upload ``output_dir`` with
        ``huggingface_hub``. A failure raises :class:`~fam_hf.hub.HubPushError` naming the cause and the fix,
        once the model is saved in ``output_dir`` (nothing trained is lost)."""
        saves = self._card_saves
        try:
            return super().push_to_hub(
                commit_message=commit_message,
                blocking=blocking,
                token=token,
                revision=revision,
                private=private,
                **kwargs,
            )
        except Exception as error:
            cause = error.__cause__ if isinstance(error, HubPushError) and error.__cause__ is not None else error
            if self._card_saves == saves:  # failed before Trainer saved (creating the repo): save now
                self.save_model(_internal_call=True)
            message = push_failure_message(
                cause, repo_id=self._hub_repo_id(), endpoint=self._hub_endpoint(), local_dir=self.args.output_dir
            )
            raise HubPushError(mask_tokens(message, (token, self.args.hub_token))) from cause

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:
            # Trainer.__init__ creates the repo when push_to_hub is set: fail there, before any training.
            before_training = not hasattr(self, "_card_saves")
            message = push_failure_message(
                error, repo_id=self._hub_repo_id(), endpoint=self._hub_endpoint(), before_training=before_training
            )
            raise HubPushError(mask_tokens(message, (token, self.args.hub_token))) from error

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer pickles the whole TrainingArguments into training_args.bin, which push_to_hub uploads: keep an
        # explicit hub_token out of that file (push_to_hub has read the token it uploads with before saving).
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    def _write_card(self, folder: str, **card_args: Any) -> None:
        card_args.setdefault("model_name", self._hub_repo_id().split("/")[-1])
        try:
            card = model_card(card_facts(self, **card_args), secrets=(self.args.hub_token,))
            card.save(os.path.join(folder, CARD_NAME))
        except Exception:  # a card is never worth a training run
            logger.warning("fam_hf: could not write the model card into %s", folder, exc_info=True)

    def _hub_repo_id(self) -> str:
        return self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))

    @staticmethod
    def _hub_endpoint() -> str:
        from transformers.utils.hub import hf_api  # the HfApi client Trainer pushes with (HF_ENDPOINT at import)

        return hf_api().endpoint


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

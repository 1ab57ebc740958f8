"""Conversations for chat fine-tuning (``recipes/sft.py``): Shakespeare's dialogue as user/assistant turns,
the checks a user's own conversations get, and a chat template that marks the assistant's tokens.

* :func:`play_speeches` / :func:`dialogue_conversations`: consecutive speeches of a scene become the
  alternating ``user`` / ``assistant`` turns of one conversation (a ``messages`` column as TRL takes it). Built
  per play, after the plays are split, so no play is in two splits.
* :func:`check_conversations`: every row is a list of ``{"role", "content"}`` turns with at least one
  assistant turn; a conversation without one has no position the assistant-only loss counts (its loss and κ
  would be 0/0), so it is an error naming the rows.
* :func:`with_counted_positions`: after tokenization and truncation, the rows the loss still counts a position
  of (a reply cut off by ``max_length`` leaves none), logged with the count; none at all is an error.
* :func:`training_chat_template`: TRL's assistant-only loss needs ``{% generation %}`` markers, which SmolLM2's
  ChatML template lacks; this adds them without changing a character of what the template renders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from .data_checks import rows_text, where
from .head_loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")

# SmolLM2-Instruct's (ChatML) rendering of one message, and the same with the assistant's reply and its
# end-of-turn token inside the generation markers (the newline after it belongs to no one: it is the next
# turn's separator, as TRL's own patched ChatML templates have it).
_CHATML_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_CHATML_MARKED = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + _CHATML_MESSAGE + "{% endif %}"
)


# -- Shakespeare's dialogue --------------------------------------------------------------------------------


def play_speeches(text: str) -> list[list[tuple[str, str]]]:
    """The speeches of one play (the ``shakespeare`` alias's text, Markdown marks removed), scene by scene.

    A speech is a paragraph whose first line is the speaker's name in capitals and which has at least one more
    line (``"HERMIA\\nSo is Lysander."``). Act and scene headings start a new scene; stage directions and the
    lines a speaker resumes after one are left out (without their Markdown marks they cannot be told apart).

    Returns:
        ``[[(speaker, speech), …] per scene]``, in the play's order; a speech keeps its verse line breaks.
    """
    scenes: list[list[tuple[str, str]]] = [[]]
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if not lines or not lines[0]:
            continue
        if re.match(r"(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", lines[0]):
            if scenes[-1]:
                scenes.append([])
            continue
        if lines[0].isupper() and len(lines) > 1:
            scenes[-1].append((lines[0], "\n".join(line for line in lines[1:] if line)))
    return [scene for scene in scenes if scene]


def dialogue_conversations(plays: Dataset, *, turns: int = 2, system_prompt: str | None = None) -> Dataset:
    """Conversations from consecutive speeches: speech 1 is the user's turn, speech 2 the assistant's, ….

    Each scene is cut into non-overlapping runs of ``turns`` consecutive speeches (a shorter rest is dropped),
    so a conversation never crosses a scene and every one ends on an assistant turn.

    Args:
        plays: one row per play, columns ``text`` and ``play`` (:func:`fam_hf.data.shakespeare`).
        turns: speeches per conversation, even and ≥ 2 (``user, assistant, user, assistant, …``).
        system_prompt: a first ``system`` message, or None (the chat template may add its own default).

    Returns:
        columns ``messages`` (``[{"role", "content"}, …]``), ``speakers`` (one per turn) and ``play``.
    """
    if turns < 2 or turns % 2:
        raise ValueError(f"turns={turns}: a conversation alternates user and assistant, so give an even number ≥ 2")
    rows: dict[str, list[Any]] = {"messages": [], "speakers": [], "play": []}
    for text, play in zip(plays["text"], plays["play"]):
        for scene in play_speeches(text):
            for start in range(0, len(scene) - turns + 1, turns):
                run = scene[start : start + turns]
                messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
                messages += [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": speech}
                    for i, (_, speech) in enumerate(run)
                ]
                rows["messages"].append(messages)
                rows["speakers"].append([speaker for speaker, _ in run])
                rows["play"].append(play)
    return Dataset.from_dict(rows)


# -- a user's conversations ------------------------------------------------------------------------------------


def check_conversations(data: Mapping[str, Dataset], source: str, column: str = "messages") -> None:
    """Refuse conversations the assistant-only loss cannot train on, naming the split, the count and the rows.

    Each row of ``column`` must be a list of ``{"role": one of system/user/assistant/tool, "content": text}``
    with at least one ``assistant`` turn: without one, no position is counted, and the loss and κ of such a
    conversation are 0/0 (TRL would stop later with an error that names no row).
    """
    for split, dataset in data.items():
        place = where(data, split, source)
        if column not in dataset.column_names:
            raise ValueError(
                f"messages_column={column!r} is not a column of {place} (columns: {', '.join(dataset.column_names)}); "
                "set messages_column to the column that holds the conversations"
            )
        malformed, silent = [], []
        for i, messages in enumerate(dataset[column]):
            if not _is_conversation(messages):
                malformed.append(i)
            elif not any(m["role"] == "assistant" for m in messages):
                silent.append(i)
        total = len(dataset)
        if malformed:
            raise ValueError(
                f"{place} has {len(malformed)} of {total} rows whose {column!r} is not a conversation "
                f"({rows_text(malformed)}, e.g. {dataset[malformed[0]][column]!r}): each row must be a list of "
                f"{{'role': {'/'.join(ROLES)}, 'content': text}} turns"
            )
        if silent:
            raise ValueError(
                f"{place} has {len(silent)} of {total} conversations without an assistant turn ({rows_text(silent)}; "
                "row 1 = the first data row): the assistant-only loss counts no position of them, so their loss "
                "and κ would be 0/0; add the assistant's reply, or drop those rows"
            )


def with_counted_positions(prepared: Dataset, split: str, max_length: int | None) -> Dataset:
    """The rows of a tokenized split (TRL's prepared ``labels``) with at least one position the loss counts.

    A row counts nothing when truncation to ``max_length`` cut the assistant's reply off (TRL drops such rows
    unless packing); its loss and κ are 0/0, and a batch of them alone would report 0. The drop is logged.

    Raises:
        ValueError: no row of ``split`` counts a position, naming ``max_length`` and the fix.
    """
    # position 0 is never scored: its label has no hidden state before it
    keep = [i for i, labels in enumerate(prepared["labels"]) if any(x != IGNORE_INDEX for x in labels[1:])]
    if not keep:
        raise ValueError(
            f"no row of the {split} split has a token the assistant-only loss counts ({len(prepared)} rows after "
            f"truncation to max_length={max_length}): its loss and κ would be 0/0; raise max_length, or give "
            "shorter conversations (fewer turns, a shorter system_prompt)"
        )
    if len(keep) < len(prepared):
        logger.warning(
            "%d of %d rows of the %s split count no token after truncation to max_length=%s (the reply was cut off): "
            "left out; raise max_length to keep them",
            len(prepared) - len(keep), len(prepared), split, max_length,
        )  # fmt: skip
        prepared = prepared.select(keep)
    return prepared


def _is_conversation(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) > 0
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
    )


# -- the chat template ---------------------------------------------------------------------------------------


def training_chat_template(tokenizer, check: Sequence[list[dict[str, str]]] = ()) -> str:
    """The tokenizer's chat template with the assistant's reply inside ``{% generation %}`` markers.

    A template that has the markers is returned as it is; TRL's patched version of a template it knows comes
    next; SmolLM2's ChatML template is marked here. The marked template must render ``check`` (conversations)
    character for character as the tokenizer's own does.

    Raises:
        ValueError: no chat template, or one this cannot mark, naming the fix.
    """
    from .extras import require

    templates = require("trl.chat_template_utils", "marking a chat template for assistant-only loss")
    get_training_chat_template, has_generation_markers = (
        templates.get_training_chat_template,
        templates.has_generation_markers,
    )

    own = tokenizer.chat_template
    if not own:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; a chat model (smollm2-135m) brings "
            "one, or set one on the tokenizer (tokenizer.chat_template) before training"
        )
    if has_generation_markers(own):
        return own
    try:
        marked = get_training_chat_template(tokenizer)
    except ValueError:
        marked = None
    if marked is None:
        if _CHATML_MESSAGE not in own:
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} has no {{% generation %}} markers and is not one TRL "
                "or fam_hf can mark, so the assistant's tokens cannot be told apart; add the markers around the "
                "assistant's reply in the template, or set assistant_only_loss: false (loss on every token)"
            )
        marked = own.replace(_CHATML_MESSAGE, _CHATML_MARKED)
    for messages in check:
        theirs = tokenizer.apply_chat_template(messages, tokenize=False)
        ours = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=marked)
        if ours != theirs:
            raise ValueError(f"the marked chat template renders {ours!r} where the model's own renders {theirs!r}")
    return marked

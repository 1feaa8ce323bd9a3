"""One way of turning user instructions into model input, used everywhere.

Every experiment formats prompts through :class:`ChatFormat`, so activations, generations
and judges all see the same text: the tokenizer's own chat template with the generation
prompt appended (the template's default system prompt included, as a user would meet it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from probes.errors import ChatTemplateMissing

PLAIN_TEMPLATE = "User: {instruction}\nAssistant:"
_SENTINEL = "\u2063SENTINEL\u2063"

TemplateMode = Literal["auto", "plain"]


@dataclass(frozen=True)
class ChatFormat:
    """Formats instructions as chat prompts for one tokenizer.

    ``mode="auto"`` uses the tokenizer's chat template and fails clearly when it has none;
    ``mode="plain"`` uses a documented plain ``User:/Assistant:`` format instead.
    """

    tokenizer: Any
    mode: TemplateMode = "auto"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.mode == "auto" and not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateMissing(
                "the tokenizer has no chat template, so prompts cannot be formatted as the "
                "model was trained to see them",
                "pass --chat-template plain to use a plain 'User: ... / Assistant:' format "
                "(results are then not comparable with chat-formatted runs), or give a model "
                "whose tokenizer ships a chat template",
            )

    def format(self, instruction: str) -> str:
        """The full prompt text for one instruction, ending where the reply begins."""
        if self.mode == "plain":
            text = PLAIN_TEMPLATE.format(instruction=instruction)
            return f"{self.system}\n{text}" if self.system else text
        messages: list[dict[str, str]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": instruction})
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(out)

    def format_all(self, instructions: Sequence[str]) -> list[str]:
        return [self.format(t) for t in instructions]

    def post_instruction_suffix(self) -> str:
        """The template text after the user's instruction (e.g. end-of-turn + assistant tag)."""
        text = self.format(_SENTINEL)
        return text[text.index(_SENTINEL) + len(_SENTINEL) :]

    def n_post_instruction_tokens(self) -> int:
        """How many tokens the template places after the instruction (at least 1)."""
        suffix = self.post_instruction_suffix()
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        return max(1, len(ids))

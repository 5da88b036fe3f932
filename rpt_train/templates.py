"""RPT prompts: an instruction, then the context under `### Context` (the paper's v0 structure), by name or
from a user file with a `{context}` placeholder; the policy's chat template wraps it when it has one."""
from __future__ import annotations

from pathlib import Path

from rpt_common.errors import UserError

TEMPLATES = {
    # The paper's v0 structure: instruction, "### Context", the context.
    "v0": (
        "Complete the given text under ### Context by predicting the next token. Think about several "
        "candidate next tokens, weigh them, and choose the most likely one. Put the predicted next token "
        "inside \\boxed{}, exactly as it continues the text (keep a leading space if it has one); it must "
        "not repeat the last token of the context.\n\n### Context\n{context}"
    ),
    "think-brief": (
        "Predict the next token of the text under ### Context. Reason briefly inside <think></think>, then "
        "give only the next token inside \\boxed{} (a leading space belongs to the token).\n\n"
        "### Context\n{context}"
    ),
    # --think-budget: think first, then answer after </think> (the reward reads only what follows it)
    "think": (
        "Predict the next token of the text under ### Context. First think inside <think> </think>: weigh a few "
        "candidate next tokens against the context, briefly. After </think>, give only the next token inside "
        "\\boxed{} (a leading space belongs to the token). An answer without a closed </think> does not count."
        "\n\n### Context\n{context}"
    ),
    "answer-only": (
        "Write the next token of the text under ### Context inside \\boxed{} and nothing else "
        "(a leading space belongs to the token).\n\n### Context\n{context}"
    ),
}


def load_template(spec: str) -> str:
    """A named template or the text of a file; it must contain `{context}` exactly once."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"template '{spec}' is neither a built-in ({', '.join(TEMPLATES)}) nor a file")
    text = path.read_text()
    if text.count("{context}") != 1:
        raise UserError(f"template file '{spec}' must contain the placeholder {{context}} exactly once")
    return text


def uses_chat_template(tokenizer, mode: str) -> bool:
    """auto: when the tokenizer has a chat template; on: required; off: never."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError("--chat-template on, but the policy's tokenizer has no chat template")
    return has and mode != "off"


class PromptBuilder:
    """Context -> prompt token ids for one policy tokenizer."""

    def __init__(self, tokenizer, template: str = "v0", chat_template: str = "auto", response_prefix: str = ""):
        self.tokenizer = tokenizer
        self.template = load_template(template)
        self.chat = uses_chat_template(tokenizer, chat_template)
        self.response_prefix = response_prefix

    def completion(self, generated: str) -> str:
        """The whole response: the response prefix written into the prompt, then the generated text."""
        return self.response_prefix + generated

    def messages(self, context: str) -> list[dict]:
        """The prompt as chat messages (one user turn), before any chat template is applied."""
        return [{"role": "user", "content": self.template.replace("{context}", context)}]

    def text(self, context: str) -> str:
        messages = self.messages(context)
        if not self.chat:
            return messages[0]["content"] + self.response_prefix
        # enable_thinking is read by templates that support it (e.g. Qwen3) and ignored by the rest.
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True) + self.response_prefix

    def ids(self, context: str) -> list[int]:
        # A chat template already writes its special tokens; a plain prompt gets the tokenizer's BOS, if any.
        return self.tokenizer(self.text(context), add_special_tokens=not self.chat)["input_ids"]

"""The one rule for "does this tokenizer add a BOS, and how to put it in front of a text's tokens".

Models whose tokenizer adds a BOS (Llama, Gemma, Mistral, ...) saw it in front of every training
sequence, so the tagger (rpt_data) and the NTP baseline (rpt_train) both feed `BOS + tokens`. The rule
is read from what the tokenizer does, not from `add_bos_token` (a tokenizer.json post-processor adds
the BOS without that flag, and some tokenizers set the flag but add nothing).
"""
from __future__ import annotations

# Probes: a BOS is the tokenizer's own `bos_token_id`, put first by add_special_tokens=True and
# absent without it (for every probe). Several probes so that a text starting with a token that
# happens to equal the BOS cannot fool it.
_PROBES = ("a", "Hello world", "1 + 1 = 2")


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of every text (add_special_tokens=True), or None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    for text in _PROBES:
        with_special = tokenizer(text, add_special_tokens=True)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not with_special or with_special[0] != bos or with_special[1 : 1 + len(plain)] != plain:
            return None
    return int(bos)


# The manifest's `bos` ({"used", "token_id"}) that a record written before BOS support implies: none was fed.
NO_BOS = {"used": False, "token_id": None}


def with_bos(bos: int | None, ids: list[int]) -> list[int]:
    """`ids` with the BOS in front when there is one: always, as the tagger feeds every window."""
    return list(ids) if bos is None else [bos, *ids]


def encode_with_bos(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as the model saw text in pre-training: BOS (if the tokenizer adds one) + tokens,
    never an EOS or other suffix that add_special_tokens=True may append."""
    bos = bos_token_id(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [with_bos(bos, x) for x in ids]

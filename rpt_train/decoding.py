"""Token ids -> text as it reads after the tokens before it.

A token's text depends on its left neighbours for many policy tokenizers: SentencePiece/Metaspace decoders with a
`Strip(left=1)` step (Llama-2, Mistral v0.x, CodeLlama, Yi in transformers 5) drop the leading space of the first
token decoded, WordPiece decoders join tokens with spaces unless they continue a word. So ids are never decoded
alone where the text after some left context is meant: decode(left + ids) minus decode(left)."""
from __future__ import annotations

LEFT_TOKENS = 8  # tokens of left context that fix a token's leading space (any >= 1 does for the known decoders)
_KW = {"clean_up_tokenization_spaces": False}


def decode_after(tokenizer, left_ids, ids, *, skip_special_tokens: bool = False) -> str:
    """The text `ids` add after `left_ids`; the text of `ids` alone when the joint text does not start with the
    left text (a decoder that rewrites across the join)."""
    return decode_batch_after(tokenizer, [left_ids], [ids], skip_special_tokens=skip_special_tokens)[0]


def decode_batch_after(tokenizer, lefts, ids_list, *, skip_special_tokens: bool = False) -> list[str]:
    """decode_after for many rows at once (two batch_decode calls)."""
    lefts = [list(map(int, left))[-LEFT_TOKENS:] for left in lefts]
    ids_list = [list(map(int, ids)) for ids in ids_list]
    kw = {**_KW, "skip_special_tokens": skip_special_tokens}
    heads = tokenizer.batch_decode(lefts, **kw)
    fulls = tokenizer.batch_decode([left + ids for left, ids in zip(lefts, ids_list)], **kw)
    out, alone = [], []
    for j, (head, full) in enumerate(zip(heads, fulls)):
        out.append(full[len(head):] if full.startswith(head) else None)
        if out[-1] is None:
            alone.append(j)
    if alone:
        for j, text in zip(alone, tokenizer.batch_decode([ids_list[j] for j in alone], **kw)):
            out[j] = text
    return out

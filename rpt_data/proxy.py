"""The proxy pass: windows -> hidden states -> chunked head + stats, batched by token budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rpt_common.bos import bos_token_id
from rpt_common.errors import UserError
from rpt_common.heads import head_spec
from rpt_common.models import cuda_autocast, enable_tf32
from rpt_data.entropy import head_token_stats, token_stats_torch
from rpt_data.windows import Window


@dataclass(slots=True)
class WindowStats:
    """Per-position stats of one window; NaN / -1 where a position is not scored."""

    entropy: np.ndarray
    topk_entropy: np.ndarray
    target_logprob: np.ndarray
    argmax: np.ndarray


def constant_stats(windows: list[Window]) -> list[WindowStats]:
    """Window statistics of a stand-in proxy (tests and bench/overlap.py): every scored position gets 1 nat (entropy
    and top-k entropy), log-prob -1 and argmax 0; context-only positions stay null."""
    out = []
    for w in windows:
        e = np.full(len(w.token_ids), np.nan, np.float32)
        e[w.score_start:] = 1.0
        out.append(WindowStats(e, e.copy(), -e, np.where(np.isnan(e), -1, 0).astype(np.int32)))
    return out


# The start-up check's input: ordinary prose and code, cut to CHECK_TOKENS tokens.
CHECK_TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein wrote four papers; "
              "def f(n):\n    return n * (n + 1) // 2\n")
CHECK_TOKENS = 32


class Proxy:
    """Wraps an HF causal LM: the trunk gives hidden states, the head (`head_spec`) is applied chunk by chunk.

    With `bos` (the tokenizer's BOS id, see rpt_common.bos) the model sees BOS + window tokens, while stats
    stay indexed by window token: index t is p(x_t | BOS, x<t), so index 0 can be scored too.
    `vocab_size` (the tokenizer's, `len(tokenizer)`): a head padded past it (e.g. to a multiple of 64) has rows that
    are no token; only the first `vocab_size` are scored, so no argmax is an id the tokenizer cannot decode and
    no entropy counts mass on non-tokens.

    Scoring is split in two so a caller can keep the device busy: `launch` copies a batch's inputs to the device
    (one copy, not waited for), queues the forward, the head and the copy of its stats back; `collect` waits for
    those stats. `score_batch` is both in a row.
    """

    def __init__(self, model: torch.nn.Module, top_k: int = 16, chunk_rows: int | None = None, bos: int | None = None,
                 vocab_size: int | None = None):
        self.model = model
        self.trunk = getattr(model, model.base_model_prefix)
        self.head = head_spec(model)
        self.top_k, self.chunk_rows, self.bos = top_k, chunk_rows, bos
        rows = self.head.weight.shape[0]
        self.vocab_size = None if vocab_size is None or vocab_size >= rows else int(vocab_size)
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        # CUDA: bf16/fp16 autocast when the weights are in that dtype (norms, softmax and rotary stay where
        # autocast puts them), TF32 only then; float32 weights run in exact float32. The CPU path is left as it was.
        self.autocast = self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        self.dtype = dtype
        self.tf32 = enable_tf32(self.device, dtype)

    def precision(self) -> dict:
        """What `--device/--dtype auto` resolved to, as the manifest records it: a resume must match it."""
        return {"device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."), "tf32": self.tf32}

    @property
    def offset(self) -> int:
        """Model inputs before a window's first token (1 with a BOS)."""
        return 0 if self.bos is None else 1

    def _context(self):
        return cuda_autocast(self.device, self.dtype, self.autocast)

    def _inputs(self, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [B, offset + longest] ids (BOS first when there is one) and their attention mask, built
        as one [2, B, L] tensor (pinned on CUDA) and sent in one copy that the host does not wait for."""
        off = self.offset
        longest = max(len(w.token_ids) for w in windows) + off
        both = np.zeros((2, len(windows), longest), dtype=np.int64)
        for i, w in enumerate(windows):
            n = len(w.token_ids)
            if off:
                both[0, i, 0] = self.bos
            both[0, i, off : off + n] = w.token_ids
            both[1, i, : off + n] = 1
        host = torch.from_numpy(both)
        if self.device.type == "cuda":
            host = host.pin_memory()
        both = host.to(self.device, non_blocking=True)
        return both[0], both[1]

    @torch.inference_mode()
    def score_batch(self, windows: list[Window]) -> list[WindowStats]:
        """One forward over right-padded windows; stats only for positions t >= score_start."""
        return self.collect(self.launch(windows))

    @torch.inference_mode()
    def launch(self, windows: list[Window]):
        """Queue one batch: inputs in, forward, head + stats, the stats' copy back to the host (on CUDA none of
        it is waited for here). Returns what `collect` needs."""
        ids, mask = self._inputs(windows)
        with self._context():
            hidden = self.trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # Stats at index t describe p(. | x<t): they come from the hidden state of the input before x_t,
        # which sits at t - 1 + offset (the BOS, if any, is input 0).
        off, rows, targets = self.offset, [], []
        for i, w in enumerate(windows):
            n = len(w.token_ids)
            if w.score_start + off < 1:
                raise ValueError(f"window {w.doc_id}#{w.window_index} scores position 0 but the model sees no BOS")
            rows.append(hidden[i, w.score_start - 1 + off : n - 1 + off])
            targets.append(ids[i, w.score_start + off : n + off])
        h = self.head
        st = head_token_stats(
            torch.cat(rows).to(h.weight.dtype), h.weight, torch.cat(targets), top_k=self.top_k,
            chunk_rows=self.chunk_rows, bias=h.bias, softcap=h.softcap, logit_scale=h.scale,
            vocab_size=self.vocab_size,
        )
        # one [4, N] float32 block (argmax's int32 bits viewed as float32) and one copy back
        packed = torch.stack([st.entropy, st.topk_entropy, st.target_logprob,
                              st.argmax.to(torch.int32).view(torch.float32)])
        if self.device.type != "cuda":
            return windows, packed, None
        host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return windows, host, done

    def collect(self, pending) -> list[WindowStats]:
        """The per-window stats of a launched batch (waits for the device on CUDA)."""
        windows, packed, done = pending
        if done is not None:
            done.synchronize()
        block = packed.numpy()
        cols = [block[0], block[1], block[2], block[3].view(np.int32)]
        out, off = [], 0
        for w in windows:
            n, s = len(w.token_ids), w.score_start
            k = max(n - s, 0)
            per = []
            for col, fill, dt in zip(cols, (np.nan, np.nan, np.nan, -1), (np.float32,) * 3 + (np.int32,)):
                a = np.full(n, fill, dtype=dt)
                a[s:] = col[off : off + k]
                per.append(a)
            off += k
            # NaN/inf logits (a numerical fault, not a distribution): every stat of that position is
            # null, so no tag and no greedy token come from it; the manifest counts them as `nan`.
            broken = np.isnan(per[0]) | np.isnan(per[1]) | np.isnan(per[2])
            per[0][broken] = per[1][broken] = per[2][broken] = np.nan
            per[3][broken] = -1
            out.append(WindowStats(*per))
        return out

    @torch.inference_mode()
    def verify(self, token_ids: np.ndarray) -> float:
        """Score one window both ways, through `score_batch` and through the model's own forward (logits in
        full), and refuse (UserError, exit 2) unless their stats agree; returns the largest difference (nats)."""
        w = Window(doc_id="head-check", window_index=0, token_start=0, text="", token_ids=token_ids.astype(np.int32),
                   token_bytes=np.zeros(len(token_ids), np.int32), score_start=0 if self.bos is not None else 1)
        ours = self.score_batch([w])[0]
        ids, mask = self._inputs([w])
        with self._context():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
        s, n, off = w.score_start, len(token_ids), self.offset
        rows = logits[s - 1 + off : n - 1 + off, : self.vocab_size].float()  # the tokenizer's ids only
        ref = token_stats_torch(rows, ids[0, s + off : n + off], self.top_k)
        tol = check_tolerance(logits.dtype, rows, self.device)
        worst, what = 0.0, "entropy"
        for name, a in zip(("entropy", "topk_entropy", "target_logprob"), (ours.entropy, ours.topk_entropy,
                                                                          ours.target_logprob)):
            d = np.abs(a[s:].astype(np.float64) - getattr(ref, name).cpu().numpy())
            d = np.where(np.isnan(d), np.inf, d)  # a NaN on either side: the check window must give finite stats
            if d.size and d.max() > worst:
                worst, what = float(d.max()), name
        # argmax: equal, or a near-tie of the model's own logits (within the same tolerance)
        mine = torch.from_numpy(ours.argmax[s:].astype(np.int64)).to(rows.device).clamp(min=0)
        gap = rows.max(-1).values - rows.gather(1, mine.view(-1, 1)).squeeze(1)
        if gap.numel() and float(gap.max()) > tol:
            worst, what = max(worst, float(gap.max())), "argmax (logit gap)"
        if worst > tol:
            raise UserError(
                f"the tagger's head does not reproduce the model's own logits for model type '{self.head.model_type}' "
                f"(max difference {worst:.3g} in {what} on a {n}-token check window, tolerance {tol:.2g}); "
                "this family's head (final scale, soft-cap, bias) is not supported, so no shard was written")
        return worst


def check_tolerance(dtype: torch.dtype, logits: torch.Tensor, device: torch.device) -> float:
    """Two rounding steps of the largest logit in the logits' dtype (TF32 for fp32 on CUDA), + 1e-3 nats:
    ~1e-3 in fp32, ~2 bf16 ulps of max|logit| in bf16 (two matmul kernels may round one logit differently)."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        eps = 2.0**-10
    finite = logits[torch.isfinite(logits)]
    top = float(finite.abs().max()) if finite.numel() else 1.0
    return 1e-3 + 2 * eps * max(top, 1.0)


def check_ids(tokenizer) -> np.ndarray:
    """The start-up check's window: CHECK_TEXT's first CHECK_TOKENS tokens (no special tokens)."""
    ids = tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"][:CHECK_TOKENS]
    if len(ids) < 2:  # a tokenizer that cannot spell the text: any ids do
        ids = list(range(min(len(tokenizer), CHECK_TOKENS)))
    return np.asarray(ids, dtype=np.int32)


def build_proxy(lm, top_k: int = 16, chunk_rows: int | None = None) -> Proxy:
    """The tagger's proxy for a loaded model (rpt_common.models.LoadedModel): the BOS rule from its tokenizer,
    and the head checked against the model's own forward before anything is scored."""
    ids = tokenizer_rows(lm.tokenizer)
    proxy = Proxy(lm.model, top_k=top_k, chunk_rows=chunk_rows, bos=bos_token_id(lm.tokenizer), vocab_size=ids)
    rows = proxy.head.weight.shape[0]
    if ids > rows:
        raise UserError(f"the tokenizer's highest token id is {ids - 1} but the model's output head has only {rows} "
                        "rows, so its tokens past that cannot be scored; use the tokenizer that belongs to the model")
    proxy.verify(check_ids(lm.tokenizer))
    return proxy


def tokenizer_rows(tokenizer) -> int:
    """The head rows the tokenizer's ids name: its highest id + 1 (added tokens included). Not len(tokenizer)
    alone: a vocabulary may skip ids (e.g. {a: 0, b: 1, c: 7} has 3 tokens, ids up to 7)."""
    return max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))


def check_context_length(model, window: int, offset: int) -> None:
    """Refuse (exit 2) a window that, with the BOS in front (`offset`), is longer than the proxy's trained context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and window + offset > limit:
        bos = " plus its BOS" if offset else ""
        raise UserError(f"--window {window}{bos} is longer than the proxy's context of {limit} tokens "
                        f"(max_position_embeddings), so its stats would come from positions it was never trained on; "
                        f"use --window {limit - offset} or less")


def token_budget_batches(windows: list[Window], batch_tokens: int, max_pad: float = 0.125) -> list[list[int]]:
    """Indices of `windows` grouped longest first so that rows x longest <= batch_tokens; a window shorter than
    (1 - max_pad) x its batch's longest starts a new batch, so padding stays under max_pad of every batch."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].token_ids))
    batches: list[list[int]] = []
    longest = 0
    for i in order:
        n = len(windows[i].token_ids)
        if batches and (len(batches[-1]) + 1) * longest <= batch_tokens and n >= (1 - max_pad) * longest:
            batches[-1].append(i)
        else:
            batches.append([i])
            longest = n
    return batches

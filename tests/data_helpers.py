"""Small corpus writers and readers shared by the rpt_data tests."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Let x_n be the number of strings of length n; then x_(n+1) = 2 x_n + 1.",
    "Thus, in total, there are 239 such strings. Hello wörld, naïve café 日本語 🙂.",
    "def f(n):\n    return n * (n + 1) // 2",
    "In 1905 Einstein wrote four papers; the third introduced special relativity.",
]


def records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "text": " ".join(SENTENCES[j % len(SENTENCES)] for j in range(i, i + 1 + i % 4))}
            for i in range(n)]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """rows as JSON lines; raw_lines {index: bytes} inserts verbatim (bad) lines before row `index`."""
    raw_lines = raw_lines or {}
    with open(path, "wb") as f:
        for i, r in enumerate(rows):
            if i in raw_lines:
                f.write(raw_lines[i] + b"\n")
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return path


def read_rows(out: Path):
    import polars as pl  # imported here: the kill harness below forks and must not start polars' threads

    return pl.read_parquet(sorted(out.glob("**/shard-*.parquet"))).sort("doc_id", "window_index")


# ---------------------------------------------------------------------------------------------
# Kill -9 harness. One process imports the pipeline once, then forks a child per `rpt-data tag`
# run (imports cost seconds, a tiny run well under one). The parent never runs torch, pyarrow or
# polars itself, so the children fork from a process without thread pools. Kill points:
#   shard / manifest / rejects: during the k-th write() into such a file, after half of its bytes
#       reached the OS (a torn temp file, exactly what a kill mid-write leaves);
#   rename: right after the k-th os.replace of the writer (file renamed, caller not yet told);
#   timer: the parent SIGKILLs the child after a random delay (any moment: model, reading, ...).
# Every child after a kill first checks what the kill left (manifest parses and lists only complete
# shards; every shard-*.parquet on disk is a readable Parquet file), then resumes.
# ---------------------------------------------------------------------------------------------
KILL_KINDS = ("shard", "manifest", "rejects", "rename", "timer")


def _file_kind(path) -> str:
    name = os.path.basename(str(path)).removeprefix(".")  # a temp file is .NAME.PID-RANDOM.tmp
    return "shard" if name.startswith("shard-") else "manifest" if name.startswith("manifest") else "rejects"


def install_fault(kind: str | None, point: int, counts: dict, action: str = "kill", patch=setattr) -> None:
    """Count writes per file kind (and the writer's renames) in `counts`; at the `point`-th one of
    `kind`, half of that write reaches the OS, then the process is SIGKILLed (action "kill") or the
    write raises OSError(ENOSPC) (action "enospc", a full disk). `patch(obj, name, value)` sets the
    hooks (in-process tests pass one that undoes itself, e.g. built on monkeypatch.setattr)."""
    import builtins
    import errno

    import rpt_data.pipeline as pipeline
    import rpt_data.writer as writer

    def fault():
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Watched:
        def __init__(self, f, kind_):
            self.f, self.kind = f, kind_

        def write(self, data):
            counts[self.kind] += 1
            if self.kind == kind and counts[self.kind] == point:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                fault()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def watched_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return Watched(f, _file_kind(path)) if "w" in mode else f

    class OsWithWatchedReplace:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            os.replace(src, dst)
            counts["rename"] += 1
            if kind == "rename" and counts["rename"] == point:
                fault()

    patch(writer, "open", watched_open)  # shadows the builtin inside these two modules only
    patch(pipeline, "open", watched_open)
    patch(writer, "os", OsWithWatchedReplace())


def _state_problems(out: Path) -> list[str]:
    """What a kill may never leave behind: a manifest that does not parse or lists an incomplete
    shard, or a shard-*.parquet that is not a complete Parquet file."""
    import pyarrow.parquet as pq

    problems = []
    if not out.exists():
        return problems
    if (out / "manifest.json").exists():
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except ValueError as e:
            return [f"manifest.json does not parse: {e}"]
        for e in manifest["shards"]:
            p = out / e["file"]
            if not p.exists() or p.stat().st_size != e["bytes"]:
                problems.append(f"manifest lists {e['file']} but it is missing or has another size")
    for p in sorted(out.glob("**/shard-*.parquet")):
        try:
            pq.read_metadata(p)
        except Exception as e:  # any error means a torn shard under its final name
            problems.append(f"{p.name} is not a complete Parquet file: {e}")
    return problems


def forked(body, log: Path | None, delay: float | None = None) -> int:
    """Run body() in a forked child whose stdout/stderr go to `log`; returns its exit code (0, 1 with the
    traceback in the log, or what body passed to os._exit), or -9 when it was killed: by the fault hooks, or
    by this process after `delay` seconds."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # a child that already exited is a zombie: no effect
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _fork_run(cfg, kind=None, point=0, delay=None, log=None, counts_file=None, precheck=False) -> int:
    """Run one tag job in a forked child; returns its exit code, or -9 when it was killed."""
    def body():
        from rpt_data.config import TagConfig
        from rpt_data.pipeline import run_tag

        if precheck:
            problems = _state_problems(Path(cfg["out"]))
            if problems:
                print("STATE PROBLEMS: " + json.dumps(problems), flush=True)
                os._exit(3)
        counts = dict.fromkeys(KILL_KINDS, 0)
        install_fault(kind, point, counts)
        run_tag(TagConfig(**cfg))
        if counts_file is not None:
            counts_file.write_text(json.dumps(counts))

    return forked(body, log, delay)


def kill_harness(plan: dict) -> dict:
    """plan: cfg (TagConfig kwargs without out), root, seed, chains, and kills (how many per chain, kinds
    drawn from `kinds`) or sequence (these kinds in this order). Writes root/ref (an uninterrupted run)
    and root/chain<i> (killed again and again at random points of the given kinds, then run to the end)."""
    root = Path(plan["root"])
    rng = random.Random(plan["seed"])
    cfg = plan["cfg"]
    t0 = time.perf_counter()
    code = _fork_run(dict(cfg, out=str(root / "ref")), log=root / "ref.log", counts_file=root / "ref-counts.json")
    assert code == 0, (root / "ref.log").read_text()
    ref_seconds = time.perf_counter() - t0
    counts = json.loads((root / "ref-counts.json").read_text())
    n_shards = len(json.loads((root / "ref" / "manifest.json").read_text())["shards"])
    steps = []
    for c in range(plan["chains"]):
        out, log = root / f"chain{c}", root / f"chain{c}.log"
        kinds = plan.get("sequence") or [rng.choice([k for k in plan["kinds"] if k == "timer" or counts[k]])
                                         for _ in range(plan["kills"])]
        for kind in kinds:
            done = 0
            if (out / "manifest.json").exists():
                done = len(json.loads((out / "manifest.json").read_text())["shards"])
                if (out / "shards.jsonl").exists():  # shards finished since the record was written (no pyarrow here)
                    done += (out / "shards.jsonl").read_text().count("\n")
            # a resumed run writes only the shards (and manifests) left; rejects.jsonl is rewritten whole
            left = 1.0 if kind == "rejects" else max(1, n_shards - done) / n_shards
            if kind == "timer":
                point, delay = 0, rng.uniform(0, ref_seconds * left)
            else:
                point, delay = rng.randint(1, max(1, round(counts[kind] * left))), None
            code = _fork_run(dict(cfg, out=str(out)), None if kind == "timer" else kind, point, delay, log,
                             precheck=True)
            steps.append({"chain": c, "kind": kind, "point": point if delay is None else round(delay, 3),
                          "killed": code == -9, "exit": code})
            if code != -9:  # finished before the kill point, or failed: nothing left to interrupt
                break
        code = _fork_run(dict(cfg, out=str(out)), log=log, precheck=True)
        steps.append({"chain": c, "kind": "final", "killed": False, "exit": code})
    return {"steps": steps, "counts": counts, "ref_seconds": ref_seconds}


def kill_harness_main() -> None:
    """`python -c 'import data_helpers as h; h.kill_harness_main()' PLAN.json RESULT.json`"""
    import torch

    torch.set_num_threads(1)  # before any fork; each child runs on one core

    import importlib

    import rpt_data.pipeline  # noqa: F401  (the expensive imports, once, before any fork)
    import transformers.tokenization_utils_fast  # noqa: F401

    plan = json.loads(Path(sys.argv[1]).read_text())
    model_type = json.loads((Path(plan["cfg"]["model"]) / "config.json").read_text())["model_type"]
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    Path(sys.argv[2]).write_text(json.dumps(kill_harness(plan)))


# ---------------------------------------------------------------------------------------------
# Tiny tokenizers of the three kinds the tagger must handle, built in-process in well under a second:
# byte-level BPE (GPT-2 / Llama-3 / Qwen style), SentencePiece-like BPE with a Metaspace word-start
# marker (Llama-2 / Mistral style, byte fallback) and a WordPiece (BERT style: whitespace dropped).
# ---------------------------------------------------------------------------------------------
TOKENIZER_CORPUS = [s + " " for s in SENTENCES] + ["<|endoftext|> </s> [SEP] tab\tand  two  spaces\n\n"]


def make_tokenizer_of(kind: str, trim_offsets: bool = False):
    """A fast tokenizer (transformers) of `kind`: bytelevel | metaspace | wordpiece, or a normalizing variant:
    bytelevel-nfc (an NFC normalizer, as transformers' Qwen2 converter builds it), metaspace-nfkc (NFKC, as
    SentencePiece's nmt_nfkc tokenizers: T5, ALBERT); wordpiece always has BertNormalizer (clean_text drops control
    characters, U+FFFD and zero-width/format characters, strip_accents drops combining marks). `trim_offsets`: a
    byte-level one whose ByteLevel post-processor trims offsets and whose tokens may end in spaces (no pre-split
    regex)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = TOKENIZER_CORPUS * 20
    kind, _, norm = kind.partition("-")
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        if norm == "nfc":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not trim_offsets)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>"]
        tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        if trim_offsets:
            tok.post_processor = processors.ByteLevel(trim_offsets=True)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        if norm == "nfkc":
            tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
            vocab_size=420, special_tokens=specials, show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, strip_accents=True, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(corpus, trainer=trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[UNK]", "[SEP]", "[CLS]"], show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]")
    raise ValueError(kind)


# text that normalizers drop or merge (tests of TokenSpans' gap rule): a combining accent (NFC merges it, BERT strips
# it), soft hyphen, zero-width space, BOM inside text, U+FFFD, a control character, NUL, Hangul jamo (NFC makes one
# syllable of three), a ligature (NFKC expands it), a ZWJ emoji sequence
NORMALIZED_TEXT = ["cafe\u0301", "e\u0301", "\u00ad", "quick\u00adbrown", "\u200b", "\ufeff", "\ufffd", "\x01", "\x00",
                   "\u1112\u1161\u11ab\u1100\u1173\u11af", "\u1112\u1161", "\ufb01x", "\U0001F468\u200d\U0001F469",
                   "a\u0323\u0301"]


def stream_tokens(windows) -> tuple[list, bytes]:
    """One stream's tokens and text back from its windows: (ids, text bytes), each window's context prefix dropped."""
    ids, text = [], b""
    for w in windows:
        skip = 0 if w.window_index == 0 else len(ids) - w.token_start  # tokens already seen
        data = w.text.encode()
        lo = 0 if skip == 0 else int(w.token_bytes[skip - 1])
        ids += w.token_ids[skip:].tolist()
        text += data[lo:]
    return ids, text

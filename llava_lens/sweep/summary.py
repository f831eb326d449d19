"""Aggregate a sweep's rows: counts, emergence layers, vision share per layer, accuracy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from llava_lens.analysis.emergence import answer_word_index, row_name
from llava_lens.errors import SweepError
from llava_lens.sweep.shards import scan


def normalize_answer(text: Optional[str]) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse spaces (for accuracy)."""
    words = re.findall(r"[a-z0-9]+", (text or "").lower())
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _unique(rows: list[dict]) -> list[dict]:
    """One row per id (a folder written by an older version may repeat ids): a good row wins."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["id"] not in best or (best[row["id"]]["error"] is not None and row["error"] is None):
            best[row["id"]] = row
    return list(best.values())


def _answer_word_emergence(ok: list[dict], rule: str) -> list[int]:
    """Emergence row of each example's answer word (:func:`answer_word_index` with ``rule``)."""
    found = []
    for row in ok:
        index = answer_word_index(row["tokens"] or [], rule, row.get("target"))
        if index is not None and index < len(row["emergence"] or []) and row["emergence"][index] >= 0:
            found.append(row["emergence"][index])
    return found


def summarize(out_dir: str | Path, answer_word: str = "target") -> dict[str, Any]:
    """Aggregate a sweep: counts, emergence of the answer word, vision share per layer, accuracy.

    The *emergence* of a token is the first logit-lens row from which it stays top-1
    (:func:`llava_lens.analysis.emergence.emergence_layers`); rows are named by the hook they decode
    (``blocks.L.hook_resid_pre``). The headline is the *answer word*'s emergence, picked by
    ``answer_word`` (:data:`~llava_lens.analysis.emergence.ANSWER_WORD_RULES`: the first generated
    word found in the target answer, else the first content word; or ``first-content`` /
    ``last-content``); the first generated token's is kept too. Accuracy (normalised string match,
    :func:`normalize_answer`) needs a target answer in the data; ``accuracy_missing`` says why it
    is absent. Each id counts once (``duplicate_rows`` says how many repeats were dropped);
    unreadable shards are skipped and named in ``unreadable_shards``.
    """
    import numpy as np

    found = scan(out_dir)
    all_rows = [r for t in found.tables for r in t.to_pylist()]
    if not all_rows:
        extra = f" ({len(found.bad)} unreadable)" if found.bad else ""
        raise SweepError(f"no sweep rows (part-*.parquet) in {out_dir}{extra}")
    rows = _unique(all_rows)
    ok = [r for r in rows if r["error"] is None]
    first = [e for e in (r["emergence_first"] for r in ok) if e is not None and e >= 0]
    every = [e for r in ok for e in (r["emergence"] or []) if e >= 0]
    shares = [r["vision_share"] for r in ok if r["vision_share"]]
    answer = _answer_word_emergence(ok, answer_word)
    n_layers = next((len(r["token_ranks"][0]) - 1 for r in ok if r["token_ranks"]), 0)
    summary: dict[str, Any] = {
        "examples": len(rows), "errors": len(rows) - len(ok), "answer_word_rule": answer_word,
        "mean_emergence_answer_word": float(np.mean(answer)) if answer else None,
        "median_emergence_answer_word": float(np.median(answer)) if answer else None,
        "median_emergence_answer_word_hook": row_name(int(np.median(answer)), n_layers) if answer else None,
        "mean_emergence_first": float(np.mean(first)) if first else None,
        "median_emergence_first": float(np.median(first)) if first else None,
        "mean_emergence_all_tokens": float(np.mean(every)) if every else None,
        "median_emergence_all_tokens": float(np.median(every)) if every else None,
        "vision_share_by_layer": np.mean(shares, axis=0).tolist() if shares else [],
        "mean_seconds": float(np.mean([r["seconds"] or 0.0 for r in rows])),
        "duplicate_rows": len(all_rows) - len(rows),
        "unreadable_shards": [f"{p.name}: {reason}" for p, reason in found.bad],
    }
    targets = [r for r in ok if r["target"] is not None]
    if targets:
        right = sum(normalize_answer(r["answer"]) == normalize_answer(r["target"]) for r in targets)
        summary["accuracy"] = right / len(targets)
        summary["accuracy_n"] = len(targets)
    else:
        summary["accuracy_missing"] = ("no example has a target answer (give the data an 'answer' column)"
                                       if ok else "no example finished without an error")
    summary["emergence_first_values"] = first
    summary["emergence_answer_word_values"] = answer
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Format :func:`summarize`'s result as a plain-text table."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    keys = ["examples", "errors", "answer_word_rule", "mean_emergence_answer_word", "median_emergence_answer_word",
            "median_emergence_answer_word_hook", "mean_emergence_first", "median_emergence_first",
            "mean_emergence_all_tokens", "median_emergence_all_tokens", "mean_seconds"]
    keys += [k for k in ("accuracy", "accuracy_n", "accuracy_missing") if k in summary]
    keys += [k for k in ("duplicate_rows",) if summary.get(k)]
    lines = [f"{k:<30} {fmt(summary[k])}" for k in keys]
    lines += [f"unreadable shard (skipped): {bad}" for bad in summary.get("unreadable_shards", [])]
    lines.append("emergence: the first logit-lens row (blocks.L.hook_resid_pre; the last row is the output)"
                 " from which the token stays top-1")
    lines.append("vision share by layer (image keys, mean over tokens/heads/examples):")
    lines += [f"  blocks.{i}.attn {v:.3f}" for i, v in enumerate(summary["vision_share_by_layer"])]
    return "\n".join(lines)

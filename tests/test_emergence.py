"""The one emergence definition and the answer-word rules, against hand-worked cases."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llava_lens import sweep
from llava_lens.analysis.emergence import answer_word_index, emergence_layers, row_name

TOKENS = ["▁the", "▁triangle", "▁is", "▁purple", "▁."]


def test_emergence_is_the_start_of_the_trailing_top1_run():
    ranks = torch.tensor([[3, 0, 1], [0, 0, 0], [1, 0, 2], [0, 0, 0], [0, 0, 1]])  # [rows, tokens]
    assert emergence_layers(ranks) == [3, 0, -1]
    assert emergence_layers(torch.tensor([[0], [1], [0]])) == [2]


@pytest.mark.parametrize("rule, target, expected", [
    ("first-content", None, 1), ("last-content", None, 3), ("target", "purple", 3),
    ("target", "The Purple one", 3), ("target", None, 1), ("target", "green", 1),
])
def test_answer_word_rules(rule, target, expected):
    assert answer_word_index(TOKENS, rule, target) == expected


def test_answer_word_edge_cases():
    assert answer_word_index(["▁the", "▁."], "first-content") is None
    assert answer_word_index(["Ġyes", ","], "target", "yes") == 0  # GPT-2 style space mark, yes is content
    with pytest.raises(ValueError, match="unknown answer-word rule"):
        answer_word_index(TOKENS, "middle")
    assert row_name(0, 4) == "blocks.0.hook_resid_pre" and row_name(4, 4) == "blocks.3.hook_resid_post"


def test_summary_reports_answer_word_emergence_with_hook_names(tmp_path):
    rows = [dict(id=str(i), question="q", answer="the triangle is purple .", target=target, tokens=TOKENS,
                 token_probs=[[0.1] * 5] * 5, token_ranks=[[0] * 5] * 5, emergence=[0, 1, 0, e, 2],
                 emergence_first=0, vision_share=[0.5] * 4, n_tokens=5, seconds=1.0, error=None)
            for i, (target, e) in enumerate([("purple", 3), ("purple", 1), (None, 2)])]
    pq.write_table(pa.Table.from_pylist(rows, schema=sweep.SCHEMA), tmp_path / "part-0-a-0.parquet")
    summary = sweep.summarize(tmp_path)
    # targets -> "purple" (index 3): emergence 3 and 1; no target -> first content word "triangle": 1
    assert summary["emergence_answer_word_values"] == [3, 1, 1]
    assert summary["median_emergence_answer_word_hook"] == "blocks.1.hook_resid_pre"
    assert summary["accuracy"] == 0.0 and summary["accuracy_n"] == 2  # exact (normalised) match only
    last = sweep.summarize(tmp_path, answer_word="last-content")
    assert last["emergence_answer_word_values"] == [3, 1, 2]
    text = sweep.format_summary(summary)
    assert "median_emergence_answer_word_hook" in text and "blocks.0.attn" in text


def test_summary_says_why_accuracy_is_missing(tmp_path):
    row = dict(id="0", question="q", answer="a", target=None, tokens=["▁a"], token_probs=[[0.1] * 5],
               token_ranks=[[0] * 5], emergence=[0], emergence_first=0, vision_share=[0.5] * 4, n_tokens=1,
               seconds=1.0, error=None)
    pq.write_table(pa.Table.from_pylist([row], schema=sweep.SCHEMA), tmp_path / "part-0-a-0.parquet")
    summary = sweep.summarize(tmp_path)
    assert "accuracy" not in summary and "answer' column" in summary["accuracy_missing"]
    assert "accuracy_missing" in sweep.format_summary(summary)

"""Logit-lens sweeps over a dataset: one Parquet row per example, resumable, safe to interrupt.

Modules: :mod:`~llava_lens.sweep.sources` (image folder, saved ``datasets`` dataset, Parquet/CSV
manifest → :class:`Example` with stable ids), :mod:`~llava_lens.sweep.launch` (rank split for
``torchrun``/``accelerate``), :mod:`~llava_lens.sweep.rows` (one row per example, failures as
error rows), :mod:`~llava_lens.sweep.shards` (atomic, never-overwriting shards; unreadable ones
quarantined), :mod:`~llava_lens.sweep.lock` (one run per output folder),
:mod:`~llava_lens.sweep.state` (stored options, crash journal), :mod:`~llava_lens.sweep.run`
(:func:`run_sweep`) and :mod:`~llava_lens.sweep.summary`. The plots of a summary are in
:mod:`llava_lens.views.summary_plot` (analysis code never imports views).

Data parallelism: each process reads its rank from the environment (:func:`launch_context`),
takes the examples :func:`is_mine` gives it and writes its own ``part-<rank>-*`` shards. Ranks
never communicate; resuming, even with another number of processes, skips every id already in
any shard.
"""

from llava_lens.errors import SweepError
from llava_lens.sweep.launch import LaunchContext, is_mine, launch_context, run_id
from llava_lens.sweep.rows import SCHEMA, analyse, analyse_batch, emergence_layers
from llava_lens.sweep.run import SweepSettings, run_sweep
from llava_lens.sweep.shards import ShardWriter, SweepWarning, done_ids, read_rows, shard_files
from llava_lens.sweep.sources import IMAGE_EXTS, Example, iter_examples
from llava_lens.sweep.summary import format_summary, normalize_answer, summarize

__all__ = [
    "Example", "iter_examples", "IMAGE_EXTS", "SweepError", "SweepWarning", "LaunchContext", "launch_context",
    "is_mine", "run_id", "SCHEMA", "analyse", "analyse_batch", "emergence_layers", "run_sweep", "SweepSettings",
    "ShardWriter", "done_ids", "read_rows", "shard_files", "summarize", "format_summary", "normalize_answer",
]


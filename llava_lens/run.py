"""Run folders: trace one example and write every view and the report into a folder; the demo.

``analysis_results/<run-name>/`` holds what :func:`analyse_to_dir` writes (``report.html``,
``attention/``, plots, heatmaps, the saved trace); :func:`run_demo` writes one such folder per
built-in example plus an ``index.html`` linking them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS

DEMO_QUESTION = "How many objects are there?"  # words the embedded model knows


def analyse_to_dir(lens: Any, image: Any, question: str, out: str | Path, layers: Optional[Sequence[int]] = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Any:
    """Trace one example, export every view and the HTML report into ``out``; return the trace.

    ``layers`` selects the LM layers of the attention pages and heatmaps (negative counts from the end).
    """
    from llava_lens import views
    from llava_lens.lens import logit_lens
    from llava_lens.views.report import write_report

    # prefill_cache: the ViT attention maps and prompt-position logit lens need the prefill
    trace = lens.trace(image, question, max_new_tokens=max_new_tokens, prefill_cache=True)
    result = logit_lens(trace, lens, k=5)
    views.export(trace, out, result, layers=layers)
    write_report(out, layers=layers, trace=trace)
    return trace


def demo_examples(n_scenes: int = 3) -> list[tuple[str, Any, str]]:
    """``(name, image, question)`` of the demo: built-in shape scenes plus matplotlib's sample photo."""
    from matplotlib import cbook

    from llava_lens.toy.scenes import make_scene

    examples = []
    for seed in range(n_scenes):
        scene = make_scene(seed)
        qa = scene.qas[seed % len(scene.qas)]  # vary the question type across scenes
        examples.append((f"scene_{seed}_{qa.qtype}", scene.pil(), qa.question))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        examples.append(("grace_hopper", f.read(), DEMO_QUESTION))
    return examples


def run_demo(lens: Any, out: str | Path, n_scenes: int = 3, layers: Optional[Sequence[int]] = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, echo: Any = None) -> Path:
    """Analyse :func:`demo_examples` into ``out/<name>/`` each; return the ``index.html`` linking them.

    ``echo``, if given, is called with one line per example (``name: question -> answer``).
    """
    rows = []
    for name, image, question in demo_examples(n_scenes):
        trace = analyse_to_dir(lens, image, question, Path(out) / name, layers, max_new_tokens)
        rows.append((name, question, trace.text))
        if echo is not None:
            echo(f"{name}: {question} -> {trace.text!r}")
    from llava_lens.views import write_index

    return write_index(out, rows, title="llava-lens demo")

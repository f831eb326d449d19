"""Views: files written by export, offline + escaped attention HTML, attention matrix, plots."""

import dataclasses
import re
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from llava_lens.families import VisionSpan
from llava_lens.lens import LogitLens, logit_lens
from llava_lens.trace import Trace
from llava_lens.views import export, plots
from llava_lens.views import html as vhtml

EVIL = "</script><script>alert(1)</script>"


@pytest.fixture(scope="module")
def setup(lens, prefill_trace):
    return prefill_trace, logit_lens(prefill_trace, lens, k=3)


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.urls += [v for k, v in attrs if k in ("src", "href") and v and "://" in v]


def _check_offline(text: str) -> _Scripts:
    parser = _Scripts()
    parser.feed(text)
    parser.close()
    assert parser.urls == []
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", text, re.I)
    assert not re.search(r"""(import|from)\s*\(?\s*["']https?://""", text)
    low = text.lower()
    assert "unpkg" not in low and "cdn" not in low
    return parser


def test_export_writes_layout(setup, tmp_path):
    trace, res = setup
    out = tmp_path / "run"
    written = export(trace, out, lens_result=res)
    expected = ["attention/layer_00.html", "attention/layer_01.html", "attention/circuitsvis.js",
                "logit_lens.png", "logit_lens.svg", "logit_lens_target.png", "logit_lens.json",
                "logit_lens.safetensors", "vision_share.png", "heatmaps/grid.png", "trace.json",
                "trace.safetensors", "image.png"]
    expected += [f"heatmaps/step_{i:02d}.png" for i in range(len(trace.steps))]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert all(p.is_file() for paths in written.values() for p in paths)
    back = Trace.load(out)
    assert back.tokens == trace.tokens
    assert LogitLens.load(out).tokens == trace.tokens
    for page in (out / "attention").glob("*.html"):
        parser = _check_offline(page.read_text())
        assert parser.scripts[0] == {"src": "circuitsvis.js"}
        assert len(parser.scripts) == 3  # bundle + AttentionPatterns + AttentionHeads


def test_inline_bundle_once_and_offline(setup, tmp_path):
    trace, _ = setup
    (page,) = vhtml.write_attention_html(trace, tmp_path, layers=[1], inline=True)
    text = page.read_text()
    _check_offline(text)
    assert not (tmp_path / "circuitsvis.js").exists()
    bundle = vhtml.circuitsvis_js()
    assert len(bundle) > 100_000 and text.count(bundle[:200]) == 1


def test_token_strings_are_escaped(setup, tmp_path):
    trace, _ = setup
    steps = [dataclasses.replace(s, token=EVIL) for s in trace.steps]
    evil = dataclasses.replace(trace, steps=steps, question=EVIL, text=EVIL)
    for inline in (False, True):
        (page,) = vhtml.write_attention_html(evil, tmp_path / str(inline), layers=[0], inline=inline)
        text = page.read_text()
        assert EVIL not in text
        # HTML-escaped for circuitsvis (which renders labels as HTML), then JSON-escaped
        assert "<script>alert" not in text and "\\u0026lt;/script\\u0026gt;" in text
        parser = _check_offline(text)
        assert len(parser.scripts) == 3  # no injected script element


def test_attention_matrix_and_window(setup):
    trace, _ = setup
    prompt_len, n = len(trace.prompt_ids), len(trace.steps)
    mat = vhtml.attention_matrix(trace, 1)
    assert mat.shape == (trace.info.n_heads, prompt_len + n - 1, prompt_len + n - 1)
    for step in trace.steps:
        keys = step.attention.shape[-1]
        torch.testing.assert_close(mat[:, step.position, :keys], step.attention[1].float())
        assert mat[:, step.position, keys:].abs().sum() == 0
    text = trace.summary.text_positions
    torch.testing.assert_close(mat[:, text, :prompt_len], trace.summary.rows(1).float())
    body = vhtml.layer_views(trace, 0, window=(2, 12), heads=False)
    assert "positions 2–11" in body


def test_position_labels_llava_and_next(setup):
    trace, _ = setup
    labels = vhtml.position_labels(trace)
    span = trace.vision_span
    assert len(labels) == len(trace.all_tokens)
    assert labels[int(span.positions[0])] == "▣r0c0" and "<image>" not in labels
    # a NeXT-style span: base grid 1x2, high-res grid 1x1 + newline
    pos = span.positions[:4]
    next_span = VisionSpan(pos, torch.tensor([0, 0, 1, -1]), torch.tensor([0, 0, 0, -1]),
                           torch.tensor([0, 1, 0, -1]), span.boxes[:4], [(1, 2), (1, 1)], span.image_size)
    labels = vhtml.position_labels(dataclasses.replace(trace, vision_span=next_span))
    assert [labels[int(p)] for p in pos] == ["▣t0r0c0", "▣t0r0c1", "▣t1r0c0", "⏎"]


def test_logit_lens_plot_at_full_size(tmp_path):
    n_rows, n_cols, k = 33, 40, 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n_rows, n_cols, k), generator=gen)
    probs = torch.rand(n_rows, n_cols, k, generator=gen)
    res = LogitLens(ids, probs, ids[-1, :, 0], probs[..., 0], torch.zeros(n_rows, n_cols, dtype=torch.long),
                    torch.zeros(n_rows, 0, k, dtype=torch.long), torch.zeros(n_rows, 0, k),
                    layer_labels=[f"{i}_pre" for i in range(n_rows - 1)] + ["final_post"],
                    tokens=[f"▁tok{i}$" for i in range(n_cols)], vocab={i: f"w{i}" for i in range(50)})
    paths = plots.plot_logit_lens(res, tmp_path / "ll.png")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
    with Image.open(paths[0]) as img:
        assert img.width > 2000  # ~0.6 inch per token column
    assert plots.clean_token("▁a$b") == r"a\$b"

"""Views: files + manifest written by export, offline + escaped attention HTML, grouped attention, plots."""

import dataclasses
import json
import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lens.errors import LlavaLensError
from llava_lens.families import VisionSpan
from llava_lens.lens import LogitLens, logit_lens
from llava_lens.trace import Trace
from llava_lens.views import export, plots, write_index, write_report
from llava_lens.views import html as vhtml
from llava_lens.views.synthetic import synthetic_trace

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


def _scripts(parser: _Scripts) -> list[str]:
    """Kinds of the script elements: 'src', 'json' (data blocks) or 'code'."""
    return ["src" if "src" in s else "json" if s.get("type") == "application/json" else "code"
            for s in parser.scripts]


def test_export_writes_layout_and_manifest(setup, tmp_path):
    trace, res = setup
    out = tmp_path / "run"
    written = export(trace, out, lens_result=res)
    expected = ["attention/layer_00.html", "attention/layer_01.html", "attention/circuitsvis.js",
                "logit_lens.png", "logit_lens.svg", "logit_lens_target.png", "logit_lens.json",
                "logit_lens.safetensors", "vision_share.png", "heatmaps/grid.png", "trace.json",
                "trace.safetensors", "image.png", "run.json"]
    expected += [f"heatmaps/step_{i:02d}.png" for i in range(len(trace.steps))]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert all(p.is_file() for paths in written.values() for p in paths)
    manifest = json.loads((out / "run.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(expected) - {"run.json"}  # every written file, nothing else
    assert listed["attention/layer_01.html"]["layer"] == 1 and listed["heatmaps/step_02.png"]["step"] == 2
    assert listed["logit_lens.svg"] == {"path": "logit_lens.svg", "kind": "svg", "role": "logit_lens"}
    assert manifest["options"] == {"layers": None, "map": "llm_mean", "window": None, "group_image": True,
                                   "inline_js": False}
    assert manifest["model"] == trace.model_name and manifest["steps"] == len(trace)
    back = Trace.load(out)
    assert back.tokens == trace.tokens
    assert LogitLens.load(out).tokens == trace.tokens
    for page in (out / "attention").glob("*.html"):
        parser = _check_offline(page.read_text())
        assert _scripts(parser) == ["json", "src", "json", "code"]  # colormap, bundle, layer data, view code
        assert parser.scripts[1] == {"src": "circuitsvis.js"}


def test_report_reads_the_manifest(setup, tmp_path):
    trace, res = setup
    out = tmp_path / "run"
    export(trace, out, lens_result=res, layers=[1])
    (out / "vision_share.png").rename(out / "renamed.png")
    text = write_report(out).read_text()
    assert "vision_share.png (vision_share) is listed in run.json but missing" in text  # named, not dropped
    assert 'id="logit-lens"' in text and 'id="vision-share"' not in text
    assert 'id="layer-1"' in text and 'id="layer-0"' not in text  # the exported layers, from the manifest
    manifest = json.loads((out / "run.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["role"] != "logit_lens"]
    manifest["files"].append({"path": "../outside.png", "kind": "png", "role": "logit_lens_target"})
    (tmp_path / "outside.png").write_bytes((out / "image.png").read_bytes())
    (out / "run.json").write_text(json.dumps(manifest))
    text = write_report(out).read_text()
    assert 'id="logit-lens"' not in text  # not listed = not guessed from file names
    assert "../outside.png (logit_lens_target) is outside the run directory" in text
    (out / "run.json").unlink()
    assert "no run.json in this run directory" in write_report(out).read_text()


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
        assert len(parser.scripts) == 4  # no injected script element


def test_odd_tokens_are_shown_as_escapes():
    assert plots.clean_token("a\tb\x07") == "a\\tb\\x07"
    assert plots.clean_token("▁a$b") == r"a\$b"
    assert vhtml.label("<id:32010>\n") == "&lt;id:32010&gt;\\n"
    fig = plots.plot_vision_share(__import__("llava_lens").grounding.VisionShare(
        torch.full((2, 1, 1, 3), 1 / 3), tokens=["\tx", "<id:32010>"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    assert not [w for w in caught if "Glyph" in str(w.message)]


def test_grouped_attention_matches_dense_reference(setup):
    trace, _ = setup
    groups = vhtml.group_positions(trace)
    span, n_t = trace.vision_span, vhtml.n_positions(trace)
    rows, _ = span.grids[0]
    assert len(groups.labels) == n_t - len(span) + rows  # text one by one, image one group per grid row
    assert sum(groups.sizes) == n_t and groups.group.shape == (n_t,)
    mat = vhtml.attention_matrix(trace, 1)  # dense [H, T, T] reference
    onehot = torch.nn.functional.one_hot(groups.group, len(groups.labels)).float()  # [T, G]
    expected = onehot.T @ mat @ onehot / onehot.sum(0)[None, :, None]
    got, known = vhtml.grouped_attention(trace, 1, groups, chunk=5)
    torch.testing.assert_close(got, expected)
    # the prefill summary keeps text-query rows only: image-row groups have no query row
    is_image = torch.tensor([label.startswith("▣") for label in groups.labels])
    assert torch.equal(known, ~is_image)
    sums = got[:, known].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-3, rtol=0)  # fp16 rows
    # with raw prefill patterns every row is known, and grouped rows still sum to 1
    raw = synthetic_trace(3, layers=2, heads=2, prefill_layers=(1,))
    groups = vhtml.group_positions(raw)
    got, known = vhtml.grouped_attention(raw, 1, groups, chunk=100)
    onehot = torch.nn.functional.one_hot(groups.group, len(groups.labels)).float()
    expected = onehot.T @ vhtml.attention_matrix(raw, 1) @ onehot / onehot.sum(0)[None, :, None]
    torch.testing.assert_close(got, expected)
    assert known.all() and torch.allclose(got.sum(-1), torch.ones(1), atol=1e-3)
    # a window shows its positions and folds the rest into one group each side
    win = vhtml.group_positions(trace, window=(2, 12), group_image=False)
    assert win.labels[0] == "⋯0–1" and win.labels[-1] == f"⋯12–{n_t - 1}" and len(win.labels) == 12
    assert "positions 2–11" in win.note
    with pytest.raises(LlavaLensError):
        vhtml.group_positions(trace, window=(5, 5))
    with pytest.raises(LlavaLensError, match="smaller window"):  # too many to show is said, not cropped
        vhtml.group_positions(synthetic_trace(1, layers=1, heads=1), group_image=False)


def test_missing_prefill_is_said_and_rows_stay_known(setup):
    trace, _ = setup
    bare = dataclasses.replace(trace, prefill={})
    groups = vhtml.group_positions(bare)
    att, known = vhtml.grouped_attention(dataclasses.replace(bare, summary=None), 0, groups)
    assert known.sum() == len(trace.steps) and att[:, known].sum(-1).allclose(torch.ones(1), atol=1e-3)
    html_text = vhtml.layer_section(dataclasses.replace(bare, summary=None), 0, groups)
    assert "Prompt rows not available" in html_text and "blocks.0.attn.hook_pattern" in html_text
    assert "keeps the rows of the text queries only" in vhtml.layer_section(bare, trace.summary.layers[0], groups)


def test_head_image_maps_match_grid(setup):
    trace, _ = setup
    maps, top = vhtml.head_image_maps(trace, 1)
    span = trace.vision_span
    step = trace.steps[2].attention[1].float()[:, span.positions]  # [H, n]
    ref = span.to_grid(step, 0).flatten(1)
    torch.testing.assert_close(maps[2] * top[2][:, None], ref)
    assert maps.amax(-1).allclose(torch.ones(1))


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


def test_next_geometry_groups_rows_of_both_grids():
    trace = synthetic_trace(2, layers=2, heads=2, next_grid=(48, 48))
    assert len(trace.vision_span) == 24 * 24 + 48 * 49
    groups = vhtml.group_positions(trace)
    image_labels = [x for x in groups.labels if x.startswith("▣")]
    assert image_labels[:2] == ["▣t0r0", "▣t0r1"] and image_labels[24:26] == ["▣t1r0-1", "▣t1r2-3"]
    assert len(image_labels) == 24 + 24  # 48 high-res rows merged two at a time (MAX_IMAGE_GROUPS)


def test_logit_lens_plot_at_full_size(tmp_path):
    n_rows, n_cols, k = 33, 40, 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n_rows, n_cols, k), generator=gen)
    probs = torch.rand(n_rows, n_cols, k, generator=gen)
    res = LogitLens(ids, probs, ids[-1, :, 0], probs[..., 0], torch.zeros(n_rows, n_cols, dtype=torch.long),
                    torch.zeros(n_rows, 0, k, dtype=torch.long), torch.zeros(n_rows, 0, k),
                    layer_labels=[f"{i}_pre" for i in range(n_rows - 1)] + ["final_post"],
                    tokens=[f"▁tok{i}$" for i in range(n_cols)], vocab={i: f"w{i}" for i in range(50)})
    paths = plots.save_figure(plots.plot_logit_lens(res), tmp_path / "ll.png", ("png", "svg"))
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
    with Image.open(paths[0]) as img:
        assert img.width > 2000  # ~0.6 inch per token column


def test_heatmap_keeps_image_colours_and_has_a_colour_bar(tmp_path):
    purple = (128, 0, 128)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    image.paste(purple, (24, 24, 40, 40))
    heat = torch.zeros(64, 64)
    heat[:8, :8] = 1.0  # the map is hot in a corner, zero on the purple square
    fig = plots.plot_heatmap(image, heat, title="tab\there")
    assert len(fig.axes) == 2  # image + colour bar
    assert "max" in fig.axes[1].get_ylabel()  # the colour bar names its normalisation
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    ax = fig.axes[0]
    x, y = ax.transData.transform((32, 32))  # centre of the purple square, in display pixels
    pixel = rgb[rgb.shape[0] - int(round(y)), int(round(x))]
    assert np.abs(pixel - purple).max() <= 3, pixel  # untinted where the map is 0
    x, y = ax.transData.transform((3, 3))
    corner = rgb[rgb.shape[0] - int(round(y)), int(round(x))]
    assert np.abs(corner - (200, 200, 200)).max() > 30  # painted where the map is high
    rgba = plots.heat_rgba(np.array([[0.0, 0.5, 1.0]]))
    assert rgba[0, 0, 3] == 0 and rgba[0, 2, 3] == pytest.approx(plots.HEAT_ALPHA)


def test_heatmap_grid_draws_large_images_at_panel_size():
    image = Image.new("RGB", (640, 480), (200, 200, 200))
    heats = torch.zeros(3, 480, 640)
    heats[1, 240:, 320:] = 1.0  # step 1 is hot in the bottom-right quarter only
    fig = plots.plot_heatmap_grid(image, heats, ["a", "b", "c"])
    ax = fig.axes[1]
    picture, overlay = (im.get_array() for im in ax.get_images())
    assert max(picture.shape[:2]) == plots.GRID_PANEL_PX == max(overlay.shape[:2])
    alpha = np.asarray(overlay[..., 3])
    assert alpha[:120].max() == 0 and alpha[:, :160].max() == 0  # nothing outside the hot quarter
    assert alpha[120:, 160:].min() == pytest.approx(plots.HEAT_ALPHA)  # all of it painted
    small = plots.plot_heatmap_grid(Image.new("RGB", (64, 48)), torch.rand(1, 48, 64), ["x"])
    assert small.axes[0].get_images()[0].get_array().shape[:2] == (48, 64)  # small images kept as they are


def test_write_index_links_runs(setup, tmp_path):
    trace, res = setup
    export(trace, tmp_path / "a b", lens_result=res, layers=[0])
    write_report(tmp_path / "a b")
    page = write_index(tmp_path, [("a b", "what <is> it?", "red"), ("gone", "q", "a")])
    text = page.read_text()
    _check_offline(text)
    assert 'href="a%20b/report.html"' in text and 'src="a%20b/image.png"' in text
    assert 'src="a%20b/heatmaps/step_00.png"' in text and "what &lt;is&gt; it?" in text
    assert "gone <span class=\"missing\">(no report.html)</span>" in text


def test_window_goes_from_export_to_report(setup, tmp_path):
    trace, res = setup
    out = tmp_path / "run"
    export(trace, out, lens_result=res, layers=[0], window=(3, 9))
    assert json.loads((out / "run.json").read_text())["options"]["window"] == [3, 9]
    n_t = vhtml.n_positions(trace)
    text = write_report(out).read_text()
    assert f"positions 3–8 of {n_t} (window)" in text and "folded into one ⋯ group each side" in text
    assert "positions 0–" in write_report(out, window=(0, n_t)).read_text()
    assert vhtml.parse_window("3:9") == (3, 9) and vhtml.parse_window(":5") == (0, 5)
    assert vhtml.parse_window(None) is None
    with pytest.raises(LlavaLensError, match="START:END"):
        vhtml.parse_window("3-9")

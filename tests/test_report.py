"""The self-contained HTML report: one file, embedded images, one inlined bundle, escaped text,
no URL outside the (inert) bundle; with headless Chromium, a rendered page where every layer tab,
once opened, has non-empty canvases; and at real-model geometry (synthetic traces), a bounded size."""

import base64
import json
import math
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from llava_lens import LlavaLensError
from llava_lens.lens import logit_lens
from llava_lens.views import export
from llava_lens.views.export import write_manifest
from llava_lens.views.html import circuitsvis_js, group_positions
from llava_lens.views.report import MAX_LAYERS, report_layers, write_report
from llava_lens.views.synthetic import synthetic_trace

EVIL = "</script><script>alert('x')</script>"
PAYLOAD = "<img\tsrc=x\tonerror=document.title='pwned'>"  # survives circuitsvis' space->&nbsp;
URL = re.compile(r"https?://", re.I)


@pytest.fixture(scope="module")
def run_dir(lens, tmp_path_factory):
    image = Image.fromarray((np.random.default_rng(3).random((40, 56, 3)) * 255).astype("uint8"))
    trace = lens.trace(image, f"what color {EVIL} ?", max_new_tokens=3, prefill_cache=True)
    # hostile tokens must come out escaped everywhere (the last step's token labels no attention
    # position, so both go on earlier steps)
    trace.steps[0].token, trace.steps[1].token = EVIL, PAYLOAD
    out = tmp_path_factory.mktemp("report") / "run"
    export(trace, out, logit_lens(trace, lens, k=3))
    return out, write_report(out)


def test_report_is_one_self_contained_file(run_dir):
    out, path = run_dir
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    bundle = circuitsvis_js()
    assert text.count(bundle) == 1  # the circuitsvis bundle inlined exactly once
    rest = text.replace(bundle, "")
    assert not URL.search(rest)  # no URL anywhere outside the bundle
    # the bundle's own URL strings are inert constants (XML namespaces, error-message links), never loaded
    assert not re.search(r"""(src|href|import)\s*[=(]\s*["']https?://""", text, re.I)
    assert 'src="attention' not in text and 'src="circuitsvis.js"' not in rest  # named in the file list only
    uris = re.findall(r'"(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 5  # input image, logit lens, target curve, vision share, grid (maps are drawn in the page)
    png = base64.b64decode(uris[0].split(",", 1)[1])
    assert png.startswith(b"\x89PNG")
    for element in ('id="summary"', 'id="step-select"', 'id="heatmap-canvas"', 'id="map-data"',
                    'id="logit-lens"', 'id="vision-share"', 'id="layer-select"', 'id="layer-0"',
                    'id="layer-1"'):
        assert element in text


def test_report_escapes_text(run_dir):
    _, path = run_dir
    rest = path.read_text(encoding="utf-8").replace(circuitsvis_js(), "")
    assert EVIL not in rest and "<script>alert" not in rest
    assert "&lt;/script&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in rest  # question + token
    assert rest.count("<script") == rest.count("</script>")


def test_report_needs_a_trace(tmp_path):
    with pytest.raises(LlavaLensError):
        write_report(tmp_path)
    with pytest.raises(LlavaLensError):
        write_report(tmp_path / "missing")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # circuitsvis' bundle carries tfjs, whose software-WebGL start-up costs ~10 s; its views draw
         # on 2D canvases, so WebGL is not needed
         "--disable-webgl", "--disable-software-rasterizer",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # any network lookup fails: the page must not need one


def _chromium(*args):
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


# Opens every layer tab (and its on-demand AttentionHeads) after load; records each tab's canvases.
SELFTEST = """<script>
window.addEventListener("load", function () {
  var sel = document.getElementById("layer-select"), views = document.querySelectorAll(".layer-view");
  var out = {layers: []}, i = 0;
  function inked(c) {
    if (!c.width || !c.height) { return 0; }
    var d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data, n = 0;
    for (var k = 3; k < d.length; k += 4) { if (d[k]) { n++; } }
    return n;
  }
  function record(v) {
    var cs = v.querySelectorAll("canvas"), sizes = [], ink = [];
    for (var k = 0; k < cs.length; k++) {
      sizes.push(Math.min(cs[k].width, cs[k].height, cs[k].offsetWidth, cs[k].offsetHeight));
      ink.push(inked(cs[k]));
    }
    out.layers.push({id: v.id, sizes: sizes, ink: ink, patterns: v.querySelectorAll(".cv-patterns h4").length,
                     zoomed: /Zoomed/.test(v.querySelector(".cv-heads").textContent)});
  }
  function next() {
    if (i > 0) { record(views[i - 1]); }
    if (i < views.length) {
      if (sel) { sel.value = views[i].id; sel.dispatchEvent(new Event("change")); }
      views[i].querySelector(".cv-heads-button").click();
      i++; setTimeout(next, 500);
    } else {
      var hm = document.getElementById("heatmap-canvas"), method = document.getElementById("map-method");
      out.heatmap = [hm.width, hm.height, inked(hm)];
      out.legends = {};  // every map method, drawn for the last generated token
      var step = document.getElementById("step-select");
      step.value = String(step.options.length - 1); step.dispatchEvent(new Event("change"));
      for (var k = 0; k < method.options.length; k++) {
        method.value = method.options[k].value; method.dispatchEvent(new Event("change"));
        out.legends[method.value] = document.getElementById("map-legend").textContent;
      }
      var pre = document.createElement("pre"); pre.id = "selftest";
      pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
    }
  }
  setTimeout(next, 0);
});
</script>"""


@pytest.fixture(scope="module")
def rendered(run_dir, tmp_path_factory):
    """Screenshot + DOM after the page's scripts and SELFTEST ran (skipped without Chromium)."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get update && apt-get install -y chromium)")
    folder = tmp_path_factory.mktemp("shot")
    page = folder / "report.html"
    page.write_text(run_dir[1].read_text(encoding="utf-8").replace("</body>", SELFTEST + "</body>"), encoding="utf-8")
    shot = folder / "shot.png"
    # virtual time runs the page's timers (the tab switches) before the DOM is dumped
    dom = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", "--virtual-time-budget=20000",
                    "--dump-dom", page.as_uri()).stdout
    result = re.search(r'<pre id="selftest">(.*?)</pre>', dom)
    return np.asarray(Image.open(shot).convert("L"), dtype=float), dom, json.loads(result.group(1)) if result else None


def test_report_renders_in_chromium(rendered):
    pixels, dom, selftest = rendered
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # not a blank page
    assert selftest is not None, "the self-test script did not finish"
    assert [v["id"] for v in selftest["layers"]] == ["layer-0", "layer-1"]
    for view in selftest["layers"]:
        # every canvas of every tab, once opened, has a size and something drawn on it
        assert len(view["sizes"]) >= 3 and min(view["sizes"]) > 0 and min(view["ink"]) > 0, view
        assert view["patterns"] >= 1 and view["zoomed"], view  # AttentionPatterns + AttentionHeads' zoomed panel
    width, height, ink = selftest["heatmap"]
    assert width >= 448 and height > 0 and ink > 0
    legends = selftest["legends"]
    assert set(legends) == {"llm_mean", "llm_max", "vlm_visualizer", "vit_rollout", "head"}
    for name, legend in legends.items():  # each method drew a map with a positive max
        assert legend.startswith("0 … max = ") and float(legend.split()[4]) > 0, (name, legend)
    own = dom[dom.index('<section id="summary"'):dom.index('<section id="attention"')]
    assert "&lt;/script&gt;&lt;script&gt;alert('x')&lt;/script&gt;" in own and "<script>alert" not in own


def test_attention_views_keep_tokens_as_text(rendered):
    _, dom, _ = rendered
    assert "<title>pwned</title>" not in dom


def test_default_layers_are_thinned_for_deep_models():
    from types import SimpleNamespace

    deep = SimpleNamespace(info=SimpleNamespace(n_layers=32))
    picked = report_layers(deep, None, None)
    assert len(picked) == MAX_LAYERS and picked[0] == 0 and picked[-1] == 31
    assert report_layers(deep, None, [-1, 3]) == [3, 31]  # named layers are kept as asked
    assert len(report_layers(deep, None, None, budget=3_000_000, layer_cost=1_000_000)) == 3  # size budget
    manifest = {"files": [{"path": f"attention/layer_{x:02d}.html", "role": "attention", "layer": x} for x in (4, 9)]}
    assert report_layers(deep, manifest, None) == [4, 9]  # the exported layers


def _synthetic_run(tmp_path, **kwargs):
    trace = synthetic_trace(**kwargs)
    trace.save(tmp_path)
    write_manifest(tmp_path, trace, {"trace": [tmp_path / "trace.json", tmp_path / "trace.safetensors"],
                                     "image": [tmp_path / "image.png"]}, {})
    return trace, write_report(tmp_path)


def _bound(trace, n_layers_shown: int) -> int:
    """Size bound of a report: bundle + map rows + per shown layer (attention + per-head maps) + slack."""
    span, info, steps = trace.vision_span, trace.info, len(trace)
    n_fine = span.grids[-1][0] * span.grids[-1][1]
    n_map = n_fine if steps * info.n_layers * n_fine <= 2_500_000 else span.grids[0][0] * span.grids[0][1]
    groups = len(group_positions(trace).labels)
    per_layer = info.n_heads * (groups * (groups + 1) // 2 + steps * span.grids[0][0] * span.grids[0][1])
    return math.ceil(1_300_000 + 4 / 3 * (steps * info.n_layers * n_map + n_layers_shown * per_layer)) + 600_000


@pytest.mark.parametrize("geometry", [dict(n_steps=24, prefill_layers=(0, 31)), dict(n_steps=8, next_grid=(48, 48))],
                         ids=["llava-1.5", "llava-next"])
def test_report_size_at_real_geometry(tmp_path, geometry):
    trace, path = _synthetic_run(tmp_path, **geometry)
    text = path.read_text(encoding="utf-8")
    views = re.findall(r'class="layer-view[^"]*" id="layer-(\d+)"', text)
    size = path.stat().st_size
    assert 1 <= len(views) <= MAX_LAYERS and views[0] == "0" and views[-1] == "31"
    assert size <= 8_000_000, f"report is {size / 1e6:.1f} MB"
    assert size <= _bound(trace, len(views)), (size, _bound(trace, len(views)))
    # every position is accounted for: text one by one, image rows grouped, nothing cropped
    groups = group_positions(trace)
    assert sum(groups.sizes) == len(trace.prompt_ids) + len(trace) - 1
    assert f"positions 0–{sum(groups.sizes) - 1} of {sum(groups.sizes)} (all)" in text
    if "next_grid" in geometry:
        assert "Prompt rows not available" in text  # no prefill stored: said on the page


def test_report_of_a_trace_without_generated_tokens(tmp_path):
    _, path = _synthetic_run(tmp_path, n_steps=0, layers=2, heads=2)
    text = path.read_text(encoding="utf-8")
    assert "No generated token." in text and 'id="layer-1"' in text


def test_report_refuses_layers_the_model_does_not_have(run_dir):
    out, _ = run_dir
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        write_report(out, layers=[99])


def test_large_pngs_are_embedded_as_jpeg(tmp_path):
    import base64

    import numpy as np
    from PIL import Image

    from llava_lens.views.report import LOSSLESS_UP_TO, data_uri

    noisy = tmp_path / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype("uint8")).save(noisy)
    assert noisy.stat().st_size > LOSSLESS_UP_TO
    uri = data_uri(noisy)
    assert uri.startswith("data:image/jpeg;base64,")
    assert len(base64.b64decode(uri.split(",", 1)[1])) < noisy.stat().st_size
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(small)
    assert data_uri(small).startswith("data:image/png;base64,")

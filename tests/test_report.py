"""The self-contained HTML report: one file, embedded images, one inlined bundle, escaped text,
no URL outside the (inert) bundle, and — with headless Chromium — a rendered, non-blank page."""

import base64
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
from llava_lens.views.html import circuitsvis_js
from llava_lens.views.report import write_report

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
    assert 'src="attention' not in text and "circuitsvis.js" not in rest
    uris = re.findall(r'"(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)
    assert len(uris) >= 3 + 4  # 3 heatmaps + input image, logit lens, target curve, vision share, grid
    png = base64.b64decode(uris[0].split(",", 1)[1])
    assert png.startswith(b"\x89PNG")
    for element in ('id="summary"', 'id="token-select"', 'id="heatmap-image"', 'id="heatmap-data"',
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


@pytest.fixture(scope="module")
def rendered(run_dir, tmp_path_factory):
    """Screenshot + DOM after scripts ran, from one headless Chromium run (skipped without it)."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get update && apt-get install -y chromium)")
    shot = tmp_path_factory.mktemp("shot") / "shot.png"
    uri = run_dir[1].as_uri()
    dom = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", "--dump-dom", uri).stdout
    return np.asarray(Image.open(shot).convert("L"), dtype=float), dom


def test_report_renders_in_chromium(rendered):
    pixels, dom = rendered
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # not a blank page
    # the JS ran: the selected token's heatmap got its data URI, and circuitsvis rendered every layer
    assert re.search(r'<img id="heatmap-image"[^>]*src="data:image/png;base64,', dom)
    assert dom.count("<h4>Attention Patterns</h4>") == 2
    assert re.search(r'class="layer-view active" id="layer-0"', dom)
    own = dom[dom.index('<section id="summary"'):dom.index('<section id="attention"')]
    assert "&lt;/script&gt;&lt;script&gt;alert('x')&lt;/script&gt;" in own and "<script>alert" not in own


def test_attention_views_keep_tokens_as_text(rendered):
    _, dom = rendered
    assert "<title>pwned</title>" not in dom


def test_default_layers_are_thinned_for_deep_models(tmp_path):
    from types import SimpleNamespace

    from llava_lens.views.report import MAX_LAYERS, _report_layers

    deep = SimpleNamespace(info=SimpleNamespace(n_layers=32))
    picked = _report_layers(deep, tmp_path, None)
    assert len(picked) == MAX_LAYERS and picked[0] == 0 and picked[-1] == 31
    assert _report_layers(deep, tmp_path, [-1, 3]) == [3, 31]  # named layers are kept as asked

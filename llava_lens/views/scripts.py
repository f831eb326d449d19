"""The pages' CSS and vanilla JavaScript (no library but the inlined circuitsvis bundle, no network).

``ATTENTION_JS`` builds a layer's views the first time the layer is shown (circuitsvis measures
its container when it renders: inside a hidden tab that is 0x0) and paints the per-head image maps
for the picked step. ``MAP_JS`` paints the report's image heatmap from the stored attention rows,
for the method, layer range and token picked on the page.
"""

from __future__ import annotations

import json

from matplotlib import colormaps

from llava_lens.views.plots import HEAT_ALPHA, HEAT_CMAP


def colormap_json(name: str = HEAT_CMAP) -> str:
    """The colormap as 256 ``[r, g, b]`` bytes, JSON."""
    table = (colormaps[name](range(256))[:, :3] * 255).round().astype(int).tolist()
    return json.dumps(table, separators=(",", ":"))


def colorbar_css(name: str = HEAT_CMAP, stops: int = 9) -> str:
    """A CSS ``linear-gradient`` of the colormap, for the colour-bar element."""
    cmap = colormaps[name]
    parts = []
    for i in range(stops):
        r, g, b = (round(255 * v) for v in cmap(i / (stops - 1))[:3])
        parts.append(f"rgb({r},{g},{b}) {100 * i / (stops - 1):.0f}%")
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


STYLE = f"""<style>
body {{ font-family: sans-serif; margin: 20px; max-width: 1250px; }}
section {{ margin: 18px 0; padding: 10px; border-top: 1px solid #ccc; }}
img.figure {{ max-width: 100%; }}
#input-image {{ width: 448px; max-width: 100%; image-rendering: auto; float: right; margin-left: 16px; }}
#heatmap-canvas {{ max-width: 100%; border: 1px solid #ddd; }}
.colorbar {{ display: inline-block; width: 240px; height: 12px; background: {colorbar_css()};
  vertical-align: middle; border: 1px solid #999; }}
.qa td, .qa th {{ padding: 3px 10px; vertical-align: top; text-align: left; }}
.layer-view {{ display: none; }}
.layer-view.active {{ display: block; }}
.head-maps {{ display: flex; flex-wrap: wrap; gap: 4px; }}
.head-maps figure {{ margin: 0; font-size: 10px; text-align: center; }}
.head-maps canvas {{ width: 72px; image-rendering: pixelated; border: 1px solid #ccc; display: block; }}
#step-bar {{ position: sticky; top: 0; background: #fff; z-index: 10; padding: 6px 0; }}
.missing, .note {{ color: #555; font-size: 90%; }}
.missing {{ color: #a33; }}
</style>
"""

_COMMON_JS = """
var LL = window.LlavaLens = window.LlavaLens || {};
LL.bytes = function (s) {
  var b = atob(s), a = new Uint8Array(b.length);
  for (var i = 0; i < b.length; i++) { a[i] = b.charCodeAt(i); }
  return a;
};
LL.step = function () { var s = document.getElementById("step-select"); return s ? +s.value : 0; };
LL.cmap = JSON.parse(document.getElementById("colormap").textContent);
// paint n = rows * cols byte values (0-255) from values[offset..] onto canvas; alpha: opacity at 255
LL.paint = function (canvas, values, offset, rows, cols, alpha) {
  canvas.width = cols; canvas.height = rows;
  var ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
  for (var p = 0; p < rows * cols; p++) {
    var v = values[offset + p], c = LL.cmap[v];
    img.data[4 * p] = c[0]; img.data[4 * p + 1] = c[1]; img.data[4 * p + 2] = c[2];
    img.data[4 * p + 3] = alpha === undefined ? 255 : Math.round(v * alpha);
  }
  ctx.putImageData(img, 0, 0);
};
"""

ATTENTION_JS = "(function () {" + _COMMON_JS + """
function build(view) {
  if (view.llData) { return; }
  var d = view.llData = JSON.parse(view.querySelector(".layer-data").textContent);
  d.mapBytes = LL.bytes(d.maps);
  var tri = LL.bytes(d.att), G = d.tokens.length, per = G * (G + 1) / 2, att = [], names = [];
  for (var h = 0; h < d.heads; h++) {
    var mat = [];
    for (var i = 0; i < G; i++) {
      var row = new Array(G).fill(0), base = h * per + i * (i + 1) / 2;
      for (var j = 0; j <= i; j++) { row[j] = tri[base + j] / 255; }
      mat.push(row);
    }
    att.push(mat);
    names.push("L" + d.layer + "H" + h);
  }
  var a = view.querySelector(".cv-patterns"), b = view.querySelector(".cv-heads");
  a.id = "cv-patterns-" + d.layer; b.id = "cv-heads-" + d.layer;
  CircuitsVis.render(a.id, CircuitsVis.AttentionPatterns, {tokens: d.tokens, attention: att});
  // AttentionHeads draws every head at full size (slow at 32 heads x 100 positions): on request
  var button = view.querySelector(".cv-heads-button");
  button.addEventListener("click", function () {
    button.style.display = "none";
    CircuitsVis.render(b.id, CircuitsVis.AttentionHeads,
                       {tokens: d.raw, attention: att, attentionHeadNames: names, maskUpperTri: true});
  });
}
function drawHeads(view) {
  var d = view.llData, box = view.querySelector(".head-maps"), s = LL.step();
  if (!d.mapMax.length) { box.textContent = "no generated token: no per-head map"; return; }
  var rows = d.grid[0], cols = d.grid[1], n = rows * cols;
  if (!box.childElementCount) {
    for (var h = 0; h < d.heads; h++) {
      var fig = document.createElement("figure");
      fig.appendChild(document.createElement("canvas"));
      fig.appendChild(document.createElement("figcaption"));
      box.appendChild(fig);
    }
  }
  for (var k = 0; k < d.heads; k++) {
    var f = box.children[k];
    LL.paint(f.firstChild, d.mapBytes, (s * d.heads + k) * n, rows, cols);
    f.lastChild.textContent = "H" + k + " max " + d.mapMax[s][k];
  }
}
var views = document.querySelectorAll(".layer-view");
LL.showLayer = function (id) {
  for (var k = 0; k < views.length; k++) {
    var on = views[k].id === id;
    views[k].classList.toggle("active", on);
    if (on) { build(views[k]); drawHeads(views[k]); }
  }
};
var layerSelect = document.getElementById("layer-select");
if (layerSelect) { layerSelect.addEventListener("change", function () { LL.showLayer(layerSelect.value); }); }
var stepSelect = document.getElementById("step-select");
if (stepSelect) {
  stepSelect.addEventListener("change", function () {
    var on = document.querySelector(".layer-view.active");
    if (on) { drawHeads(on); }
  });
}
if (views.length) { LL.showLayer(layerSelect ? layerSelect.value : views[0].id); }
})();
"""

MAP_JS = "(function () {" + _COMMON_JS + """
var d = JSON.parse(document.getElementById("map-data").textContent);
var img = document.getElementById("input-image"), canvas = document.getElementById("heatmap-canvas");
var method = document.getElementById("map-method"), lo = document.getElementById("layer-from");
var hi = document.getElementById("layer-to"), legend = document.getElementById("map-legend");
var stored = {};
function bytes(key) { if (!stored[key]) { stored[key] = LL.bytes(d.methods[key].data); } return stored[key]; }
function values(m) {
  var u = bytes(method.value), s = LL.step(), n = m.rows * m.cols;
  var v = new Float64Array(n), L = m.layers, a = 0, b = 0;
  if (L > 1) { a = Math.min(+lo.value, +hi.value); b = Math.max(+lo.value, +hi.value); }
  for (var l = a; l <= b; l++) {
    var scale = m.scale[s * L + l] / 255, off = (s * L + l) * n;
    for (var p = 0; p < n; p++) { v[p] += u[off + p] * scale; }
  }
  for (var q = 0; q < n; q++) { v[q] /= (b - a + 1); }
  return v;
}
var head = document.getElementById("map-head");
// one head's map, from the per-head rows stored with that layer's attention view (shown layers only)
function headValues() {
  var el = document.getElementById("layer-" + lo.value);
  if (!el) { return null; }
  if (!el.llHead) {
    var x = JSON.parse(el.querySelector(".layer-data").textContent);
    el.llHead = {bytes: LL.bytes(x.maps), max: x.mapMax, heads: x.heads};
  }
  var h = el.llHead, s = LL.step(), k = Math.min(+head.value, h.heads - 1), n = d.base.rows * d.base.cols;
  var v = new Float64Array(n), scale = h.max[s][k] / 255, off = (s * h.heads + k) * n;
  for (var p = 0; p < n; p++) { v[p] = h.bytes[off + p] * scale; }
  return v;
}
function draw() {
  var one = method.value === "head", m = one ? d.base : d.methods[method.value];
  var v = one ? headValues() : values(m);
  lo.disabled = !one && m.layers < 2; hi.disabled = one || m.layers < 2; head.disabled = !one;
  var W = img.naturalWidth, H = img.naturalHeight, k = Math.max(1, Math.ceil(448 / Math.max(W, 1)));
  canvas.width = W * k; canvas.height = H * k;
  var ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (!v) {
    legend.textContent = "per-head rows are stored only for the layers shown under 'Attention per layer'";
    return;
  }
  var n = v.length, top = 0;
  for (var p = 0; p < n; p++) { top = Math.max(top, v[p]); }
  var q = new Uint8Array(n);
  for (var r = 0; r < n; r++) { q[r] = top > 0 ? Math.round(255 * v[r] / top) : 0; }
  var off = document.createElement("canvas");
  LL.paint(off, q, 0, m.rows, m.cols, d.alpha);
  ctx.imageSmoothingEnabled = false;
  var box = m.region;  // top, left, bottom, right: fractions of the image
  ctx.drawImage(off, box[1] * canvas.width, box[0] * canvas.height,
                (box[3] - box[1]) * canvas.width, (box[2] - box[0]) * canvas.height);
  legend.textContent = "0 … max = " + top.toPrecision(3) + " (" + m.unit + "); colour and opacity ∝ value / max";
}
if (!img) { legend.textContent = "no input image in this run: heatmap not drawn"; return; }
[method, lo, hi, head, document.getElementById("step-select")].forEach(function (el) {
  if (el) { el.addEventListener("change", draw); }
});
if (img.complete && img.naturalWidth) { draw(); } else { img.addEventListener("load", draw); }
})();
"""

__all__ = ["STYLE", "ATTENTION_JS", "MAP_JS", "colormap_json", "colorbar_css", "HEAT_ALPHA"]

"""The notebook explorer: its state changes drive what each panel shows (no browser needed)."""

import pytest
import torch

import llava_lens as ll
from llava_lens import grounding

ipywidgets = pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def explorer(lens, prefill_trace):
    return ll.explore(prefill_trace, lens)


def test_state_changes_drive_the_panels(explorer, prefill_trace):
    trace = prefill_trace
    box = explorer.build()
    step, layers, method = box.children[0].children
    heads = box.children[1]
    step.value, layers.value, heads.value = 2, (1, 1), (0,)
    assert (explorer.step, explorer.layers, explorer.heads) == (2, (1, 1), (0,))
    rows, cols = trace.vision_span.grids[0]
    expected = grounding.attention_map_mean(trace, [1], heads=[0])[2]
    torch.testing.assert_close(explorer.grid()[0], expected)
    # the painted heat at a patch's box is that patch's value
    heat = explorer.heat()
    assert heat.shape == (trace.image.height, trace.image.width)
    assert float(heat.max()) == pytest.approx(float(expected.max()))
    share = grounding.vision_share(trace).shares[2, 1, 0]
    torch.testing.assert_close(explorer.shares(), share)
    method.value = "vit_rollout"
    torch.testing.assert_close(explorer.grid()[0], grounding.vit_rollout(trace))
    assert "step 2" in explorer.drawn.axes[0].get_title() and "vit_rollout" in explorer.drawn.axes[0].get_title()


def test_lens_column_and_errors(explorer, prefill_trace, lens):
    explorer.set(step=1)
    result = ll.logit_lens(prefill_trace, lens, k=3, prompt=False)
    rows = explorer.lens_rows()
    assert [r[0] for r in rows] == result.layer_labels
    assert rows[-1][1][0][0] == result.vocab[int(result.top_ids[-1, 1, 0])]
    assert "logit lens" in explorer._lens_html() and "image:" in explorer._share_html()
    with pytest.raises(ValueError, match="out of range"):
        explorer.set(step=99)
    with pytest.raises(ValueError, match="not available"):
        explorer.set(method="bogus")


def test_works_on_a_saved_trace_without_the_model(prefill_trace, tmp_path):
    prefill_trace.save(tmp_path / "t")
    explorer = ll.explore(ll.Trace.load(tmp_path / "t"))
    explorer.set(step=0, layers=(0, 1))
    assert explorer.lens_rows()[0][0] == "output"
    fig = explorer.figure()
    assert fig.axes and len(fig.axes) == 2  # the image and its colour bar

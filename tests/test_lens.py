"""Logit lens against an independent plain-torch computation on a tiny random LLaVA."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_lens import hooks
from llava_lens.lens import LogitLens, logit_lens, patch_words


@pytest.fixture(scope="module")
def setup(llava_dir, lens, prefill_trace):
    return llava_dir, lens, prefill_trace


def _hand_logprobs(path: Path, resid: torch.Tensor) -> torch.Tensor:
    """RMSNorm(ln_final weight) + lm_head, from the saved weights, in plain torch."""
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    norm_w = next(v for k, v in weights.items() if re.search(r"language_model(\.model)?\.norm\.weight$", k))
    w_u = next(v for k, v in weights.items() if k.endswith("lm_head.weight"))
    bias = [v for k, v in weights.items() if k.endswith("lm_head.bias")]
    eps = 1e-6  # LlamaConfig default rms_norm_eps used by build_llava
    x = resid.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
    logits = normed @ w_u.double().T
    if bias:
        logits = logits + bias[0].double()
    return logits.log_softmax(-1)


def test_shapes_and_hand_computation(setup):
    path, lens, trace = setup
    res = logit_lens(trace, lens, k=3)
    n_layers, n_steps = trace.info.n_layers, len(trace.steps)
    n_prompt = len(trace.prompt_tokens)
    assert res.top_ids.shape == (n_layers + 1, n_steps, 3)
    assert res.target_probs.shape == (n_layers + 1, n_steps)
    assert res.target_ranks.shape == (n_layers + 1, n_steps)
    assert res.prompt_top_ids.shape == (n_layers + 1, n_prompt, 3)
    assert res.layer_labels[-1] == "final_post" and len(res.layer_labels) == n_layers + 1
    resid = torch.stack([s.resid for s in trace.steps], dim=1)  # [L, S, d]
    hand = _hand_logprobs(path, resid)
    target = torch.tensor(trace.token_ids)
    hand_tp = hand.gather(-1, target.expand(n_layers + 1, -1)[..., None])[..., 0].exp()
    torch.testing.assert_close(res.target_probs.double(), hand_tp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.top_probs.double(), hand.topk(3, -1).values.exp(), atol=1e-5, rtol=1e-4)
    hand_rank = (hand > hand.gather(-1, target.expand(n_layers + 1, -1)[..., None])).sum(-1)
    assert torch.equal(res.target_ranks, hand_rank)
    # the last row is the model's own output: rank 0 for a greedy trace, probs = softmax(logits)
    assert (res.target_ranks[-1] == 0).all()
    final = torch.stack([s.logits for s in trace.steps]).float().softmax(-1)
    torch.testing.assert_close(res.target_probs[-1], final.gather(-1, target[:, None])[:, 0], atol=1e-5, rtol=1e-4)


def test_prompt_positions_match_hand(setup):
    path, lens, summary_trace = setup
    names = hooks.resid_stack(lens.n_layers)  # raw residuals: the hand computation's input
    trace = lens.trace(summary_trace.image, summary_trace.question, max_new_tokens=2, prefill_cache=names)
    res = logit_lens(trace, lens, k=2, chunk=7)  # odd chunk: exercises chunking
    resid = torch.stack([trace.prefill[name] for name in names])
    hand = _hand_logprobs(path, resid)
    torch.testing.assert_close(res.prompt_top_probs.double(), hand.topk(2, -1).values.exp(), atol=1e-5, rtol=1e-4)
    # the default trace keeps no residuals but the prompt positions' top-5, computed during the prefill
    from_summary = logit_lens(summary_trace, lens, k=5)
    torch.testing.assert_close(from_summary.prompt_top_probs.double(), hand.topk(5, -1).values.exp(),
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(from_summary.prompt_top_ids, hand.topk(5, -1).indices)
    torch.testing.assert_close(summary_trace.summary.resid_norms, resid.norm(dim=-1), atol=1e-4, rtol=1e-5)
    words = patch_words(res, trace, layer=1)
    assert len(words) == len(trace.vision_span)
    assert all(isinstance(w, str) for w in words)


def test_save_load_roundtrip(setup, tmp_path):
    _, lens, trace = setup
    res = logit_lens(trace, lens, k=2, prompt=False)
    assert res.prompt_top_ids.shape[1] == 0
    res.save(tmp_path)
    back = LogitLens.load(tmp_path)
    assert torch.equal(back.top_ids, res.top_ids) and back.vocab == res.vocab
    assert back.tokens == trace.tokens and back.top_tokens()[0][0] == res.top_tokens()[0][0]

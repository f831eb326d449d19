"""The tracer against independent references: HF transformers, and a no-cache recompute."""

import pytest
import torch
from helpers import check_bridge_logits_equal_hf, check_greedy_equal_hf_generate

import llava_lens as ll

QUESTION = "what color is the circle ?"


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_bridge_logits_equal_hf(which, lens, next_lens, llava_dir, next_dir, image):
    lens_, model_dir = (lens, llava_dir) if which == "llava" else (next_lens, next_dir)
    check_bridge_logits_equal_hf(lens_, model_dir, which, image, QUESTION)


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_greedy_tokens_equal_hf_generate(which, lens, next_lens, llava_dir, next_dir, image):
    lens_, model_dir = (lens, llava_dir) if which == "llava" else (next_lens, next_dir)
    check_greedy_equal_hf_generate(lens_, model_dir, which, image, QUESTION, n=10)


@pytest.mark.parametrize("which", ["llava", "llava_next"])
@pytest.mark.parametrize("path", ["fast", "bridge"])
def test_steps_equal_no_cache_recompute(which, path, lens, next_lens, image):
    """Each step's attention rows and residuals equal a full run_with_cache of the same prefix
    (the original notebook's slow method), within 1e-5 — on the fast path (HF modules + sdpa +
    one attention row per layer) and on the bridge path (every hook fires; forced here by an
    extra capture)."""
    lens_ = lens if which == "llava" else next_lens
    extra = ["blocks.0.hook_mlp_out"] if path == "bridge" else None
    trace = lens_.trace(image, QUESTION, max_new_tokens=6, capture=extra, attention_dtype=torch.float32)
    inputs, _ = lens_.prepare(image, QUESTION)
    n_layers = lens_.n_layers
    for step in trace.steps:
        prefix = torch.cat([inputs.input_ids, torch.tensor([trace.token_ids[:step.index]],
                                                           dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits, cache = lens_.bridge.run_with_cache(prefix, pixel_values=inputs.pixel_values,
                                                        **inputs.extra)
        assert step.position == prefix.shape[1] - 1
        attn = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, -1] for i in range(n_layers)])
        resid = torch.stack([cache[f"blocks.{i}.hook_resid_pre"][0, -1] for i in range(n_layers)]
                            + [cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1]])
        assert step.attention.shape == (n_layers, lens_.n_heads, prefix.shape[1])
        torch.testing.assert_close(step.attention, attn, atol=1e-5, rtol=0)
        torch.testing.assert_close(step.resid, resid, atol=1e-5, rtol=0)
        torch.testing.assert_close(step.logits, logits[0, -1], atol=1e-4, rtol=0)
        if extra:
            torch.testing.assert_close(step.cache["blocks.0.hook_mlp_out"],
                                       cache["blocks.0.hook_mlp_out"][0, -1], atol=1e-5, rtol=0)
        assert step.token_id == int(logits[0, -1].argmax())


def test_attention_rows_are_distributions(lens, image):
    trace = lens.trace(image, QUESTION, max_new_tokens=4, attention_dtype=torch.float32)
    for step in trace.steps:
        sums = step.attention.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_prefill_cache_names_hold_vision_encoder_and_lm_patterns(lens, image):
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern",
             "vision_encoder.encoder_layers.0.attn.hook_pattern"]
    trace = lens.trace(image, QUESTION, max_new_tokens=2, prefill_cache=names, attention_dtype=torch.float32)
    assert set(trace.prefill) == set(names)
    n_prompt = len(trace.prompt_ids)
    assert trace.prefill["blocks.0.attn.hook_pattern"].shape == (lens.n_heads, n_prompt, n_prompt)
    vis = trace.prefill["vision_encoder.encoder_layers.0.attn.hook_pattern"]
    n_vis = (lens.config.vision_config.image_size // lens.config.vision_config.patch_size) ** 2 + 1
    assert vis.shape == (lens.config.vision_config.num_attention_heads, n_vis, n_vis)
    # the prefill's last row is step 0's row
    torch.testing.assert_close(trace.prefill["blocks.1.attn.hook_pattern"][:, -1], trace.steps[0].attention[1])


def test_step_generator_matches_trace_and_can_stop_early(lens, image):
    trace = lens.trace(image, QUESTION, max_new_tokens=5)
    steps = []
    for step in lens.step(image, QUESTION, max_new_tokens=5):
        steps.append(step)
        if len(steps) == 3:
            break
    assert [s.token_id for s in steps] == trace.token_ids[:3]
    # breaking out leaves no hook attached to the model
    assert all(not hp.fwd_hooks for hp in lens.bridge.hook_dict.values())


def test_capture_dtype_and_topk(lens, image):
    trace = lens.trace(image, QUESTION, max_new_tokens=2, dtype=torch.float16, top_k=5, keep_logits=False)
    step = trace.steps[0]
    assert step.attention.dtype == torch.float16 and step.resid.dtype == torch.float16
    assert step.logits is None and step.top_ids.shape == (5,)
    assert int(step.top_ids[0]) == step.token_id


def test_default_capture_off_records_only_what_is_asked(lens, image):
    trace = lens.trace(image, QUESTION, max_new_tokens=2, default_capture=False,
                       capture=lambda n: n == "blocks.1.hook_resid_post")
    step = trace.steps[1]
    assert step.attention is None and step.resid is None
    assert list(step.cache) == ["blocks.1.hook_resid_post"] and step.cache["blocks.1.hook_resid_post"].shape == (
        lens.d_model,)


def test_sampling_is_seeded(lens, image):
    a = lens.trace(image, QUESTION, max_new_tokens=8, do_sample=True, temperature=2.0, seed=1)
    b = lens.trace(image, QUESTION, max_new_tokens=8, do_sample=True, temperature=2.0, seed=1)
    others = {tuple(lens.trace(image, QUESTION, max_new_tokens=8, do_sample=True, temperature=2.0,
                               seed=s).token_ids) for s in range(2, 6)}
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids)}) > 1


def test_top_p_tiny_is_greedy(lens, image):
    greedy = lens.trace(image, QUESTION, max_new_tokens=6)
    nucleus = lens.trace(image, QUESTION, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=3)
    assert nucleus.token_ids == greedy.token_ids


def test_stops_at_eos_and_stop_strings(lens, image):
    greedy = lens.trace(image, QUESTION, max_new_tokens=12)
    assert len(greedy) <= 12
    forced_red = _forcing(lens, "red", lambda: lens.trace(image, QUESTION, max_new_tokens=12))
    assert forced_red.token_ids == [lens.tokenizer.convert_tokens_to_ids("red")] * 12
    stopped = _forcing(lens, "red", lambda: lens.trace(image, QUESTION, max_new_tokens=12,
                                                       stop_strings=["red"]))
    assert len(stopped) == 1 and stopped.stop_reason == "stop_string"
    forced = _forcing(lens, "</s>", lambda: lens.trace(image, QUESTION, max_new_tokens=12))
    assert forced.stop_reason == "eos" and forced.token_ids == [lens.tokenizer.eos_token_id]


def _forcing(lens, token, run):
    """Run with a TransformerLens hook on the unembedding that makes ``token`` always win."""
    tid = lens.tokenizer.convert_tokens_to_ids(token)

    def boost(logits, hook):
        logits[..., tid] += 1e4
        return logits

    with lens.bridge.hooks(fwd_hooks=[("unembed.hook_out", boost)]):
        return run()


def test_bad_sampling_arguments(lens, image):
    with pytest.raises(ValueError):
        lens.trace(image, QUESTION, max_new_tokens=0)
    with pytest.raises(ValueError):
        lens.trace(image, QUESTION, do_sample=True, temperature=0)


def test_trace_save_load_round_trip(lens, image, tmp_path):
    trace = lens.trace(image, QUESTION, max_new_tokens=3, prefill_cache=True,
                       capture=["blocks.0.hook_attn_out"])
    trace.save(tmp_path / "t")
    back = ll.Trace.load(tmp_path / "t")
    assert back.text == trace.text and back.token_ids == trace.token_ids and back.tokens == trace.tokens
    assert back.prompt_tokens == trace.prompt_tokens
    torch.testing.assert_close(back.vision_span.positions, trace.vision_span.positions)
    for a, b in zip(back.steps, trace.steps):
        torch.testing.assert_close(a.attention, b.attention)
        torch.testing.assert_close(a.resid, b.resid)
        torch.testing.assert_close(a.cache["blocks.0.hook_attn_out"], b.cache["blocks.0.hook_attn_out"])
    assert set(back.prefill) == set(trace.prefill)
    assert back.image.size == trace.image.size
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "t").iterdir())


def test_load_of_missing_trace_is_clear(tmp_path):
    with pytest.raises(ll.LlavaLensError, match="no saved trace"):
        ll.Trace.load(tmp_path)


def test_fast_path_is_used_and_leaves_the_bridge_intact(lens, image, monkeypatch):
    from llava_lens import fastpath

    calls = []
    original = fastpath.FastForward.__call__
    monkeypatch.setattr(fastpath.FastForward, "__call__",
                        lambda self, request: calls.append(1) or original(self, request))
    fast = lens.trace(image, QUESTION, max_new_tokens=4)
    assert len(calls) == 4  # prefill + 3 decode steps
    slow = lens.trace(image, QUESTION, max_new_tokens=4, fast=False, attention_dtype=torch.float32)
    fast = lens.trace(image, QUESTION, max_new_tokens=4, attention_dtype=torch.float32)
    assert len(calls) == 8
    assert fast.token_ids == slow.token_ids
    for a, b in zip(fast.steps, slow.steps):
        torch.testing.assert_close(a.attention, b.attention, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.resid, b.resid, atol=1e-6, rtol=0)
    # the bridge is whole again: its components are back in the HF model, attention is eager
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    assert isinstance(lens.hf_model.model.language_model.layers[0], GeneralizedComponent)
    assert lens.hf_model.config.text_config._attn_implementation == "eager"
    inputs, _ = lens.prepare(image, QUESTION)
    _, cache = lens.bridge.run_with_cache(inputs.input_ids, pixel_values=inputs.pixel_values)
    assert "blocks.0.attn.hook_pattern" in cache


def test_user_hooks_switch_to_the_bridge_path(lens, image):
    """A hook attached by the user fires on every step (so the fast path must stand aside)."""
    seen = []

    def record(pattern, hook):
        seen.append(pattern.shape[-2])
        return pattern

    with lens.bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", record)]):
        trace = lens.trace(image, QUESTION, max_new_tokens=4)
    prompt_len = len(trace.prompt_ids)
    assert seen == [prompt_len] + [1] * (len(trace) - 1)



def test_top_probs_are_the_softmax_of_the_logits(lens, image):
    step = lens.trace(image, QUESTION, max_new_tokens=1, top_k=3).steps[0]
    expected = torch.softmax(step.logits.double(), -1)[step.top_ids].float()
    torch.testing.assert_close(step.top_probs, expected)
    assert (step.top_probs[:-1] >= step.top_probs[1:]).all()


def test_load_with_a_device_map_matches_plain_load(lens, llava_dir, image):
    """The sharded-loading path (HF dispatch, then the bridge) gives the same trace."""
    mapped = ll.load(str(llava_dir), device_map="cpu")
    a = mapped.trace(image, QUESTION, max_new_tokens=4)
    b = lens.trace(image, QUESTION, max_new_tokens=4)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.steps[-1].attention, b.steps[-1].attention)
    with pytest.raises(ValueError, match="mutually exclusive|requires CUDA"):
        ll.load(str(llava_dir), n_devices=2)


def test_sample_top_k_one_is_greedy(lens, image):
    greedy = lens.trace(image, QUESTION, max_new_tokens=6)
    sampled = lens.trace(image, QUESTION, max_new_tokens=6, do_sample=True, temperature=3.0, sample_top_k=1, seed=0)
    stepped = [s.token_id for s in lens.step(image, QUESTION, max_new_tokens=6, do_sample=True, temperature=3.0,
                                              sample_top_k=1, seed=0)]
    assert sampled.token_ids == greedy.token_ids == stepped

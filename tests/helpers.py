"""Reference checks shared by the tracer tests: bridge vs HF, trace vs HF generate, trace vs a no-cache recompute.

Each ``check_*`` function asserts; the test modules choose the models, images and questions.
"""

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration


def hf_model(model_dir, family, attn="eager"):
    """The model directory loaded by plain HF: the independent reference (``attn``: HF attention implementation;
    sdpa is several times faster than eager at real sequence lengths)."""
    cls = LlavaForConditionalGeneration if family == "llava" else LlavaNextForConditionalGeneration
    return cls.from_pretrained(model_dir, attn_implementation=attn).eval()


def check_bridge_logits_equal_hf(lens, model_dir, family, image, question, atol=1e-4, attn="eager"):
    """The bridge's full-sequence logits equal HF's forward on the same processed inputs."""
    inputs, _ = lens.prepare(image, question)
    hf = hf_model(model_dir, family, attn)
    with torch.no_grad():
        ref = hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra).logits
        ours = lens.bridge(inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= atol


def check_greedy_equal_hf_generate(lens, model_dir, family, image, question, n, attn="eager"):
    """``lens.trace``'s greedy tokens and text equal HF ``generate``'s; returns the trace."""
    inputs, _ = lens.prepare(image, question)
    hf = hf_model(model_dir, family, attn)
    with torch.no_grad():
        out = hf.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra,
                          attention_mask=torch.ones_like(inputs.input_ids), max_new_tokens=n,
                          do_sample=False)
    expected = out[0, inputs.input_ids.shape[1]:].tolist()
    trace = lens.trace(image, question, max_new_tokens=n, attention_dtype=torch.float32)  # fp32 rows: 1e-5 checks
    assert trace.token_ids == expected
    assert trace.text == lens.tokenizer.decode(expected, skip_special_tokens=True)
    return trace


def check_steps_equal_recompute(lens, trace, image, question, extra=(), steps=None, atol=1e-5):
    """Each step of ``trace`` (or those indexed by ``steps``) equals a full ``bridge.run_with_cache`` of
    the same prefix (no KV cache).

    Compared: the attention row of every layer/head, the residual stream entering every block and
    after the last, the logits, the chosen token, and any ``extra`` hooks the trace captured.
    """
    inputs, _ = lens.prepare(image, question)
    n_layers = lens.n_layers
    wanted = {f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)}
    wanted |= {f"blocks.{i}.hook_resid_pre" for i in range(n_layers)}
    wanted |= {f"blocks.{n_layers - 1}.hook_resid_post", *extra}
    for step in (trace.steps if steps is None else [trace.steps[i] for i in steps]):
        prefix = torch.cat([inputs.input_ids, torch.tensor([trace.token_ids[:step.index]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits, cache = lens.bridge.run_with_cache(prefix, pixel_values=inputs.pixel_values, **inputs.extra,
                                                       names_filter=lambda name: name in wanted)
        assert step.position == prefix.shape[1] - 1
        attn = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, -1] for i in range(n_layers)])
        resid = torch.stack([cache[f"blocks.{i}.hook_resid_pre"][0, -1] for i in range(n_layers)]
                            + [cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1]])
        assert step.attention.shape == (n_layers, lens.n_heads, prefix.shape[1])
        torch.testing.assert_close(step.attention, attn, atol=atol, rtol=0)
        torch.testing.assert_close(step.resid, resid, atol=atol, rtol=0)
        torch.testing.assert_close(step.logits, logits[0, -1], atol=10 * atol, rtol=0)
        for name in extra:
            torch.testing.assert_close(step.cache[name], cache[name][0, -1], atol=atol, rtol=0)
        assert step.token_id == int(logits[0, -1].argmax())

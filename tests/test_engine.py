"""The one engine: both forwards agree, batches equal singles, threads, options, storage, summary."""

import threading

import pytest
import torch

import llava_lens as ll
from llava_lens import hooks
from llava_lens.errors import PromptError
from llava_lens.options import GenerateOptions, view_layers
from llava_lens.tokens import token_strings

QUESTION = "what color is the circle ?"
F32 = {"attention_dtype": torch.float32}


def _same_steps(a, b, atol=1e-5):
    assert a.token_ids == b.token_ids
    for x, y in zip(a.steps, b.steps):
        torch.testing.assert_close(x.attention, y.attention, atol=atol, rtol=0)
        torch.testing.assert_close(x.resid, y.resid, atol=atol, rtol=0)


def test_two_threads_trace_at_once(lens, image):
    """Per-forward sinks and the model lock: concurrent traces equal sequential ones."""
    expected = [lens.trace(image, q, max_new_tokens=5, **F32) for q in (QUESTION, "how many objects ?")]
    got: dict[int, ll.Trace] = {}
    errors: list[BaseException] = []

    def run(i: int, q: str) -> None:
        try:
            for _ in range(3):
                got[i] = lens.trace(image, q, max_new_tokens=5, **F32)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, q)) for i, q in enumerate((QUESTION, "how many objects ?"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        _same_steps(got[i], expected[i], atol=0)


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_bridge_batch_equals_single(which, lens, next_lens, image):
    """The bridge path steps a left-padded batch too (forced by an extra per-step capture)."""
    lens_ = lens if which == "llava" else next_lens
    questions = [QUESTION, "is there a big red square on the left ?"]
    extra = {"capture": ["blocks.0.hook_mlp_out"], **F32}
    batch = lens_.trace_batch([image, image[:30]], questions, max_new_tokens=4, **extra)
    for trace, img, q in zip(batch, [image, image[:30]], questions):
        single = lens_.trace(img, q, max_new_tokens=4, **extra)
        _same_steps(trace, single)
        for x, y in zip(trace.steps, single.steps):
            torch.testing.assert_close(x.cache["blocks.0.hook_mlp_out"], y.cache["blocks.0.hook_mlp_out"],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_summary_equals_raw_patterns_on_both_paths(which, lens, next_lens, image):
    """The prefill summary's rows and ViT means equal the raw hook captures (independent reference)."""
    lens_ = lens if which == "llava" else next_lens
    n = lens_.n_layers
    raw_names = [hooks.attn_pattern(i) for i in range(n)] + [hooks.vit_pattern(0)]
    raw = lens_.trace(image, QUESTION, max_new_tokens=2, prefill_cache=raw_names, **F32)
    fast = lens_.trace(image, QUESTION, max_new_tokens=2, prefill_cache=True, **F32)
    with lens_.bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: None)]):
        bridged = lens_.trace(image, QUESTION, max_new_tokens=2, prefill_cache=True, **F32)
    text = torch.ones(len(raw.prompt_ids), dtype=torch.bool)
    text[raw.vision_span.positions] = False
    for trace in (fast, bridged):
        s = trace.summary
        assert torch.equal(s.text_positions, text.nonzero().flatten())
        assert s.layers == view_layers(n)
        for layer in s.layers:
            torch.testing.assert_close(s.rows(layer), raw.prefill[hooks.attn_pattern(layer)][:, s.text_positions],
                                       atol=1e-5, rtol=0)
        vit = raw.prefill[hooks.vit_pattern(0)].float()
        vit = vit[0] if vit.ndim == 4 else vit  # NeXT: base tile first
        torch.testing.assert_close(s.vit_attention[0].float(), vit.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.summary.lens_top_probs, bridged.summary.lens_top_probs, atol=1e-5, rtol=0)


def test_summary_batched_equals_single(lens, image):
    batch = lens.trace_batch([image, image[:24]], [QUESTION, "how many ?"], max_new_tokens=2,
                             prefill_cache=True, **F32)
    for trace, img, q in zip(batch, [image, image[:24]], [QUESTION, "how many ?"]):
        single = lens.trace(img, q, max_new_tokens=2, prefill_cache=True, **F32).summary
        got = trace.summary
        assert torch.equal(got.text_positions, single.text_positions)
        torch.testing.assert_close(got.attention, single.attention, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.vit_attention, single.vit_attention, atol=1e-5, rtol=0)
        assert torch.equal(got.lens_top_ids, single.lens_top_ids)


def test_fp16_attention_storage_is_within_its_stated_tolerance(lens, image):
    """Default storage is fp16: within 2.5e-4 (half an fp16 step at 1) of the fp32 rows."""
    f16 = lens.trace(image, QUESTION, max_new_tokens=4)
    f32 = lens.trace(image, QUESTION, max_new_tokens=4, **F32)
    assert f16.steps[0].attention.dtype == torch.float16 and f16.steps[0].resid.dtype == torch.float32
    for a, b in zip(f16.steps, f32.steps):
        assert (a.attention.float() - b.attention).abs().max() <= 2.5e-4


def test_raw_prefill_in_a_batch_is_split_per_example(next_lens, image):
    names = [hooks.attn_pattern(0), hooks.resid_pre(1), hooks.vit_pattern(0)]
    images = [image, image[:24]]
    batch = next_lens.trace_batch(images, [QUESTION, "how many ?"], max_new_tokens=1, prefill_cache=names, **F32)
    for trace, img, q in zip(batch, images, [QUESTION, "how many ?"]):
        single = next_lens.trace(img, q, max_new_tokens=1, prefill_cache=names, **F32)
        for name in names:
            assert trace.prefill[name].shape == single.prefill[name].shape, name
            torch.testing.assert_close(trace.prefill[name], single.prefill[name], atol=1e-5, rtol=0)


def test_ids_without_a_tokenizer_entry_get_a_string(lens, image, monkeypatch):
    """Real checkpoints output ids the tokenizer lacks (llava-1.5: 32064 vs 32002): shown as <id:N>."""
    n = len(lens.tokenizer)
    assert token_strings(lens.tokenizer, [0, n + 5]) == [lens.tokenizer.convert_ids_to_tokens(0), f"<id:{n + 5}>"]
    greedy = lens.trace(image, QUESTION, max_new_tokens=2)
    missing = greedy.token_ids[0]
    original = lens.tokenizer.convert_ids_to_tokens
    monkeypatch.setattr(lens.tokenizer, "convert_ids_to_tokens",
                        lambda ids: [None if i == missing else t for i, t in zip(ids, original(ids))])
    trace = lens.trace(image, QUESTION, max_new_tokens=2)
    assert trace.tokens[0] == f"<id:{missing}>" and None not in trace.prompt_tokens


def test_context_length_bounds_generation(lens, image, monkeypatch):
    import dataclasses

    prompt_len = len(lens.trace(image, QUESTION, max_new_tokens=1).prompt_ids)
    info = lens.info()
    monkeypatch.setattr(lens, "info", lambda: dataclasses.replace(info, n_ctx=prompt_len + 3))
    trace = lens.trace(image, QUESTION, max_new_tokens=10)
    assert len(trace) == 3 and trace.stop_reason == "context"
    monkeypatch.setattr(lens, "info", lambda: dataclasses.replace(info, n_ctx=prompt_len - 1))
    with pytest.raises(PromptError, match="context"):
        lens.trace(image, QUESTION)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": torch.int8}, "floating dtype"),
    ({"attention_dtype": "int64"}, "floating dtype"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": "3"}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"do_sample": False, "temperature": 0.7}, "no effect"),
    ({"temperature": "hot"}, "temperature"),
    ({"sample_top_k": -2}, "sample_top_k"),
    ({"capture": "blocks.0.hook_nonsense"}, "unknown hook name"),
    ({"capture": ["blocks.99.hook_resid_pre"]}, "unknown hook name"),
    ({"prefill_cache": lambda name: name.startswith("nothing.")}, "matches no hook"),
    ({"layers": [99]}, "does not exist"),
])
def test_bad_options_fail_before_generation(lens, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lens.trace(image, QUESTION, max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)


def test_unknown_option_and_string_dtype(lens, image):
    with pytest.raises(TypeError, match="unknown option 'colour'"):
        lens.trace(image, QUESTION, colour="red")
    trace = lens.trace(image, QUESTION, max_new_tokens=1, dtype="bfloat16")
    assert trace.steps[0].resid.dtype == torch.bfloat16


def test_temperature_alone_turns_sampling_on(lens, image):
    options = GenerateOptions.build(temperature=0.5)
    assert options.sampling.sampling and not GenerateOptions().sampling.sampling
    a = lens.trace(image, QUESTION, max_new_tokens=8, temperature=5.0, seed=1)
    b = lens.trace(image, QUESTION, max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    assert a.token_ids == b.token_ids


def test_one_options_object_for_trace_step_and_batch(lens, image):
    options = GenerateOptions.build(max_new_tokens=3, top_k=4, **F32)
    trace = lens.trace(image, QUESTION, options=options)
    stepped = list(lens.step(image, QUESTION, options=options))
    (batched,) = lens.trace_batch([image], QUESTION, options=options)
    assert len(trace) == 3 and trace.steps[0].top_ids.shape == (4,)
    assert [s.token_id for s in stepped] == trace.token_ids == batched.token_ids


def test_saved_trace_with_a_summary_round_trips_and_edits_are_caught(lens, image, tmp_path):
    import json

    trace = lens.trace(image, QUESTION, max_new_tokens=2, prefill_cache=True)
    trace.save(tmp_path / "t")
    back = ll.Trace.load(tmp_path / "t")
    for name in back.summary.TENSORS:
        torch.testing.assert_close(getattr(back.summary, name), getattr(trace.summary, name))
    assert back.summary.layers == trace.summary.layers
    meta = json.loads((tmp_path / "t" / "trace.json").read_text())
    meta["prompt_tokens"] = meta["prompt_tokens"][:-1]
    (tmp_path / "t" / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(ll.LlavaLensError, match="corrupt trace.*prompt tokens"):
        ll.Trace.load(tmp_path / "t")
    (tmp_path / "t" / "trace.json").write_text("{not json")
    with pytest.raises(ll.LlavaLensError, match="corrupt trace"):
        ll.Trace.load(tmp_path / "t")
    (tmp_path / "t" / "trace.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ll.LlavaLensError, match="format 99"):
        ll.Trace.load(tmp_path / "t")
    data = (tmp_path / "t" / "trace.safetensors").read_bytes()
    (tmp_path / "t" / "trace.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "t" / "trace.json").write_text(json.dumps({**meta, "prompt_tokens": trace.prompt_tokens}))
    with pytest.raises(ll.LlavaLensError, match="corrupt trace"):
        ll.Trace.load(tmp_path / "t")


@pytest.mark.parametrize("fast", [True, False])
def test_mid_rows_equal_a_recompute_and_label_the_logit_lens(lens, image, fast):
    """``mid=True`` adds each block's hook_resid_mid (accumulated_resid(incl_mid=True) order)."""
    trace = lens.trace(image, QUESTION, max_new_tokens=3, mid=True, fast=fast)
    n = lens.n_layers
    inputs, _ = lens.prepare(image, QUESTION)
    for step in trace.steps:
        prefix = torch.cat([inputs.input_ids, torch.tensor([trace.token_ids[:step.index]], dtype=torch.long)], 1)
        with torch.no_grad():
            _, cache = lens.bridge.run_with_cache(prefix, pixel_values=inputs.pixel_values)
        expected = torch.stack([cache[name][0, -1] for name in hooks.resid_stack(n, mid=True)])
        assert step.resid.shape == (2 * n + 1, lens.d_model)
        torch.testing.assert_close(step.resid, expected, atol=1e-5, rtol=0)
    result = ll.logit_lens(trace, lens, k=2)
    assert result.top_ids.shape[0] == 2 * n + 1 and result.layer_labels[1] == "0_mid"
    plain = ll.logit_lens(lens.trace(image, QUESTION, max_new_tokens=3, fast=fast), lens, k=2)
    torch.testing.assert_close(result.target_probs[::2], plain.target_probs, atol=1e-5, rtol=0)


def test_hook_attached_mid_generation_fires_and_steps_stay_right(lens, image):
    """A hook attached half-way through a ``lens.step`` loop fires on the following steps (bridge path),
    the tokens stay those of an uninterrupted trace, and an abandoned generator leaves the model bridged."""
    reference = lens.trace(image, QUESTION, max_new_tokens=6, **F32)
    seen = []

    def record(pattern, hook):
        seen.append(pattern.shape[-2])

    stepper = lens.step(image, QUESTION, max_new_tokens=6, **F32)
    steps = [next(stepper), next(stepper)]
    with lens.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", record)]):
        steps += [next(stepper), next(stepper)]
    steps.append(next(stepper))
    del stepper  # abandoned before the end
    assert seen == [1, 1]  # the two forwards made while the hook was attached, one new position each
    assert [s.token_id for s in steps] == reference.token_ids[:5]
    for got, want in zip(steps, reference.steps):
        torch.testing.assert_close(got.attention, want.attention, atol=1e-5, rtol=0)
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    assert isinstance(lens.hf_model.model.language_model.layers[0], GeneralizedComponent)
    assert all(not hp.fwd_hooks for hp in lens.bridge.hook_dict.values())

"""The embedded model's tokenizer normalises like a real one; unknown words are reported, once."""

import warnings

import pytest
from transformers import AutoProcessor

from llava_lens.inputs import UnknownWordsWarning, prepare, unknown_words, warn_unknown_words
from llava_lens.loading import EMBEDDED_MODELS
from llava_lens.run import DEMO_QUESTION
from llava_lens.toy.build import word_tokenizer
from llava_lens.toy.scenes import blank_image, make_scene


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(EMBEDDED_MODELS["shapes-tiny"])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["What color is the square?", "WHAT COLOR IS THE SQUARE ?",
                                  "  what color is the   Square?", "What color is the square ?"])
def test_any_casing_and_spacing_gives_the_training_ids(processor, text):
    for tok in (processor.tokenizer, word_tokenizer()):
        assert _ids(tok, text) == _ids(tok, "what color is the square ?")
        assert tok.unk_token_id not in _ids(tok, text)


def test_shipped_tokenizer_is_the_built_one(processor):
    """The saved tokenizer files match ``word_tokenizer`` (ids of every training prompt and answer)."""
    built = word_tokenizer()
    assert processor.tokenizer.get_vocab() == built.get_vocab()
    for qa in make_scene(3).qas:
        text = f"USER: <image>\n{qa.question} ASSISTANT: {qa.answer}</s>"
        assert processor.tokenizer(text)["input_ids"] == built(text)["input_ids"]
    # The prompt's "USER:" / "ASSISTANT:" keep the ids they had before lower-casing existed.
    assert _ids(built, "USER : ASSISTANT") == [5, 6, 7]


def test_unknown_words_are_named_once_per_question(processor):
    question = "What colour is the sqaure? Is it a sqaure?"
    assert unknown_words(processor.tokenizer, question) == ["sqaure", "it"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(processor, blank_image(), question)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(msgs) == 1
    assert "'sqaure'" in msgs[0] and "'it'" in msgs[0]
    assert "the words it knows:" in msgs[0] and " circle " in msgs[0]  # the vocabulary is listed
    assert "<image>" not in msgs[0].split("knows:")[1]  # special tokens are not words


def test_known_questions_do_not_warn(processor):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        prepare(processor, blank_image(), "What shape is the red object?")
        assert warn_unknown_words(processor.tokenizer, "How many objects are there?") == []


def test_demo_photo_question_uses_known_words(processor):
    assert unknown_words(processor.tokenizer, DEMO_QUESTION) == []


def test_tokenizer_without_unk_never_warns():
    class ByteLevel:  # e.g. a GPT-2-style tokenizer: no unknown token
        unk_token_id = None

    assert unknown_words(ByteLevel(), "anything at all") == []

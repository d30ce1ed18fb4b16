import open_clip
import pytest

from sg2img.base.tokenizer import BOS, EOS, clip_tokenizer, clip_vocab_and_merges, write_clip_tokenizer_files

PROMPTS = [
    "a red circle left of a blue square",
    "Hello, World!  naïve café — 123 ",
    "",
    "photo of a 🐱 cat, 4k, trending on artstation",
    "A  B\tC  \n d",
]


def test_vocabulary_is_clips_49408_tokens():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256


@pytest.mark.parametrize("text", PROMPTS)
def test_ids_match_open_clip(text):
    ours = clip_tokenizer()(text, truncation=True, max_length=77).input_ids
    theirs = open_clip.get_tokenizer("ViT-H-14")([text])[0].tolist()
    theirs = theirs[: theirs.index(49407) + 1]  # open_clip pads with 0, SD pads with <|endoftext|>
    assert ours == theirs


def test_pads_to_77_with_endoftext():
    ids = clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_written_files_load_in_transformers(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp_path)
    loaded = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    assert loaded("a red circle").input_ids == clip_tokenizer()("a red circle").input_ids

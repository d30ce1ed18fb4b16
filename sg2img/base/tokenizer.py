"""The real CLIP BPE tokenizer, built offline from the vocabulary that ships inside ``open_clip``.

``bpe_simple_vocab_16e6.txt.gz`` holds the merges (lines 1 ... 48894 after a header line). The 49,408-token
vocabulary is, in open_clip's order: the 256 byte characters, the same with ``</w>``, the joined merges,
then ``<|startoftext|>`` and ``<|endoftext|>``. With that ``vocab.json``/``merges.txt`` pair, transformers'
``CLIPTokenizer`` gives exactly open_clip's ids, so diffusers pipelines accept it and nothing downloads.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48894, as in CLIP and open_clip
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the order defines the first 256 ids)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise RuntimeError(f"{_bpe_path()}: expected a 49,408-token vocabulary, built {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` in the format transformers' CLIPTokenizer reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer() -> CLIPTokenizer:
    """The SD1.5 tokenizer (pad with ``<|endoftext|>``, 77 tokens) from the shipped BPE vocabulary."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )

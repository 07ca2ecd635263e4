"""sdmagic's CLIP tokenizer against transformers' (slow, Python) CLIPTokenizer on the same files.

Two vocabularies: the tiny models' byte-level one (no merges), and a real BPE one trained here on
a small English corpus, as CLIP's was (byte characters, "</w>" word ends, merges by frequency).
"""

import json
import random
import time
from collections import Counter

import numpy as np
import pytest
import regex
import transformers
from transformers import AddedToken
from transformers.models.clip import tokenization_clip

from sdmagic import tokenizer as sd_tokenizer
from sdmagic.tokenizer import CLIPTokenizer, SpecialToken, write_byte_level_vocabulary

CORPUS = """
A photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus, 4k.
A painting of a fox sitting in a field at sunrise, oil on canvas, warm light, trending on artstation.
The quick brown fox jumps over the lazy dog. It's the dog's day; they're sure we've won, I'm told you'll see, he'd go.
Portrait of a young woman with red hair, studio lighting, bokeh, 85mm lens, photorealistic, masterpiece.
A castle on a hill surrounded by mountains and rivers, fantasy landscape, matte painting, by greg rutkowski.
An old man reading a book by the window, soft shadows, cinematic lighting, film grain, kodak portra 400.
A cute cat wearing a tiny hat, digital art, vibrant colors, high resolution, award winning photograph.
Cyberpunk city street at night, neon signs, rain, reflections, blade runner style, ultra wide angle.
The sun rises over the ocean and the waves crash on the rocks; seagulls fly above the lighthouse.
A bowl of fruit on a wooden table: apples, oranges, bananas and grapes, still life, dutch masters.
Café au lait, crème brûlée, naïve piñata, the señor's jalapeño; über straße.
Watercolor illustration of a forest with tall trees, mist, morning light, birds singing in the branches.
Robots and dragons, knights and wizards, ships sailing into the storm, 1920s poster, art deco, 3d render.
"""
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photo Of A CAT, Highly Detailed!!!",
    "masterpiece, best quality, (portrait:1.2), [red hair], {bokeh} -- --ar 16:9",
    "hello... world?!?! ;-) :) <3 ->> ***",
    "1234567890 3.14159 1,000,000 2024-01-31 12:30pm 85mm f/1.8",
    "it's the dog's day, they're here, we've won, i'm sure, you'll see, he'd go, don't",
    "IT'S THE DOG'S DAY, THEY'RE HERE",
    "it`s ’quoted’ 'single' \"double\" ‘curly’ “double curly”",
    "café crème brûlée naïve piñata señor jalapeño über straße",
    "日本語のテキスト 中文 한국어 русский текст ελληνικά עברית العربية हिन्दी ไทย",
    "emoji 🎉🐱‍👤👩🏽‍🚀 ❤️ 🇫🇷 flags and 🏳️‍🌈",
    "AT&amp;T &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &eacute;",
    "&lt;tag&gt; <b>bold</b> &amp; more",
    "The Mona Lisa painting wasnâ€™t in Ã©cole franÃ§aise",
    "uÌˆber cafÃ© soufflÃ©",
    "tabs\there\tand\nnewlines\n\nand   many     spaces \r\n end  ",
    "   leading and trailing   ",
    "\u00a0non\u2003breaking\u200bzero\u200dwidth\ufeffbom",
    "a<|endoftext|>b",
    "<|startoftext|>a cat<|endoftext|><|endoftext|> <|endoftext|>   dog <|startoftext|>",
    "<|ENDOFTEXT|> <|EndOfText|> <|endoftext| <|endoftext",
    "<|startoftext|>",
    "",
    " ",
    "\n\t",
    "!",
    "!!!! hello!! world! !a!",
    "a",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ÄÖÜ İstanbul ǅ ﬁ ﬂ Ⅻ ½ ² ³ ① ⓐ",
    "control\x00chars\x01\x07\x1b[31mred\x1b[0m\x7f\u0085\u2028\u2029",
    "lone \ud800 surrogate \udfff here",
    "combining e\u0301 a\u0308 n\u0303 zalgo t̶̡̢e̷͇͂x̸̛̣t̵̰̾",
    "a photo of a cat " * 30,  # far past 77 tokens: truncation
]


def _byte_encode(word: str) -> str:
    table = tokenization_clip.bytes_to_unicode()
    return "".join(table[b] for b in word.encode("utf-8"))


def _train_bpe(text: str, count: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE: `count` times, merge the most frequent adjacent pair everywhere."""
    text = regex.sub(r"\s+", " ", text).strip().lower()
    words = Counter(_byte_encode(w) for w in regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text))
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(count):
        pairs = Counter()
        for word, frequency in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += frequency
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for word in words:
            symbols, merged, i = splits[word], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def _write(folder, merges):
    """CLIP's vocabulary layout: byte chars, byte chars + "</w>", one token per merge, specials."""
    chars = list(tokenization_clip.bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def _reference(folder, **settings):
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **settings)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("bpe"), _train_bpe(CORPUS, 400))


@pytest.fixture(scope="module")
def byte_folder(tmp_path_factory):
    return write_byte_level_vocabulary(tmp_path_factory.mktemp("bytes"))


def _random_prompts(count: int, seed: int) -> list[str]:
    pieces = [
        "a", "the", "cat", "photo", "Fox", "DOG", "painting", "'s", "'t", "'re", "'ll", "it", "don", " ", "  ",
        "\t", "\n", ",", ".", "!", "!!", "?", "...", "-", "(", ")", ":1.2", "0", "7", "42", "é", "ß", "İ", "ñ",
        "日本", "ру", "🎉", "👩🏽‍🚀", "&amp;", "&lt;", "â€™", "Ã©", "<|endoftext|>", "<|startoftext|>", "<|", "|>",
        "\u0301", "\u00a0", "\x00", "\ufffd", "xxxxxxxx", "supercalifragilistic",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(count)]


def _assert_same(ours: CLIPTokenizer, reference, prompts, length=77):
    assert len(ours) == len(reference)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    for prompt in prompts:
        assert ours.tokenize(prompt) == reference.tokenize(prompt), prompt
        assert ours.encode(prompt) == reference.encode(prompt, add_special_tokens=False), prompt
    expected = reference(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    ids = ours.input_ids(prompts, length)
    assert ids.dtype == np.int32 and ids.shape == (len(prompts), length)
    np.testing.assert_array_equal(ids, np.asarray(expected))
    for prompt, row in zip(prompts, ids):
        untruncated = reference(prompt).input_ids
        assert ours.decode(row) == reference.decode(row), prompt
        assert ours.decode(untruncated[1:-1]) == reference.decode(untruncated[1:-1]), prompt


def test_bytes_to_unicode_is_openais_table():
    assert sd_tokenizer.bytes_to_unicode() == tokenization_clip.bytes_to_unicode()


def test_byte_level_vocabulary_matches_transformers(byte_folder):
    reference = transformers.CLIPTokenizer.from_pretrained(str(byte_folder))  # reads all four files
    ours = CLIPTokenizer.from_folder(byte_folder)
    assert len(ours) == 514 and reference.model_max_length == ours.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (512, 513, 513)
    _assert_same(ours, reference, PROMPTS + _random_prompts(150, seed=1))


def test_trained_bpe_matches_transformers(bpe_folder):
    ours, reference = CLIPTokenizer.from_folder(bpe_folder), _reference(bpe_folder)
    # The merges must do something, or this would only retest the byte-level case.
    assert any(len(token.removesuffix("</w>")) > 3 for token in ours.tokenize("a photograph of a painting"))
    _assert_same(ours, reference, PROMPTS + _random_prompts(300, seed=2))


def test_any_merge_order_matches_transformers(tmp_path):
    """Shuffled merges make pairs that outrank the merge that formed them: the hard case for a
    heap-driven BPE, which must still merge every occurrence of one pair before the next."""
    rng = random.Random(3)
    merges = _train_bpe(CORPUS, 300)
    rng.shuffle(merges)
    letters = "abc"
    def piece():
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 3)))
    merges += [(piece(), piece()) for _ in range(80)]  # duplicates too
    # "b c" forms "bc" while "bc b", ranked before it, waits: both "b c" in "bcbc" merge first.
    merges += [("bc", "b"), ("b", "c"), ("a", "a"), ("aa", "a"), ("a", "aa"), ("b", "b</w>")]
    folder = _write(tmp_path, list(dict.fromkeys(merges)))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges) + "not-a-pair\n\n", encoding="utf-8"
    )
    ours, reference = CLIPTokenizer.from_folder(folder), _reference(folder)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    assert ours.tokenize("bcbca") == reference.tokenize("bcbca") == ["bc", "bc", "a</w>"]
    _assert_same(ours, reference, ["bcbca", *words, *PROMPTS])


def test_merges_past_clips_limit_are_ignored(tmp_path):
    folder = _write(tmp_path, [("a", "b")])
    filler = "".join(f"zz{i} zz{i}\n" for i in range(sd_tokenizer.MAX_MERGES))  # never apply
    (folder / "merges.txt").write_text(f"#version: 0.2\n{filler}a b\n", encoding="utf-8")
    ours, reference = CLIPTokenizer.from_folder(folder), _reference(folder)
    assert ours.tokenize("abc") == reference.tokenize("abc") == ["a", "b", "c</w>"]


def test_sd2_pad_token(bpe_folder):
    """SD 2.x pads with "!" (id 0); transformers then also cuts every "!" out of the text."""
    ours = CLIPTokenizer.from_folder(bpe_folder, pad_token="!")
    reference = _reference(bpe_folder, pad_token="!")
    assert ours.pad_token_id == 0
    _assert_same(ours, reference, PROMPTS + ["wow!!! so good!", "!!a!!b! !"])


def test_special_token_flags_and_missing_specials(bpe_folder):
    ours = CLIPTokenizer.from_folder(
        bpe_folder,
        bos_token=SpecialToken("<|startoftext|>", single_word=True),
        eos_token=SpecialToken("<|endoftext|>", lstrip=True, rstrip=True),
        unk_token="<unk>",  # not in the vocabulary: gets the next id
        pad_token="<pad>",
    )
    reference = _reference(
        bpe_folder,
        bos_token=AddedToken("<|startoftext|>", single_word=True),
        eos_token=AddedToken("<|endoftext|>", lstrip=True, rstrip=True),
        unk_token="<unk>",
        pad_token="<pad>",
    )
    assert (ours.unk_token_id, ours.pad_token_id) == (len(ours) - 2, len(ours) - 1)
    prompts = [
        "a cat   <|endoftext|>   a dog", "x<|startoftext|>y", "x <|startoftext|>y", "x<|startoftext|> y",
        "<|startoftext|><|endoftext|> <|startoftext|>", "an <unk> and a <pad> here", "<unk><pad>",
    ]
    _assert_same(ours, reference, prompts + PROMPTS)


def test_special_tokens_of_letters(bpe_folder):
    """Where a special token is a word, single_word decides what is cut out whole and what is BPE'd
    (lstrip / rstrip never change CLIP's tokens: it strips each piece's whitespace anyway); where
    one special token holds another, the longer one wins."""
    ours = CLIPTokenizer.from_folder(
        bpe_folder,
        bos_token="hotdog",
        eos_token="dogs",
        unk_token=SpecialToken("cat", lstrip=True, single_word=True),
        pad_token=SpecialToken("dog", rstrip=True, single_word=True),
    )
    reference = _reference(
        bpe_folder,
        bos_token="hotdog",
        eos_token="dogs",
        unk_token=AddedToken("cat", lstrip=True, single_word=True),
        pad_token=AddedToken("dog", rstrip=True, single_word=True),
    )
    prompts = ["a cat", "a  cat sat", "acat", "cats", "the dog  ran", "dog x", "dogs", "xdog", "cat dog", "catdog",
               "a cat, a dog.", "hotdog dog dog", "cat\tdog\ncat",
               "hotdogs", "a hotdog", "hot dog", "hotdogdog", "dogs", "dogsdog", "adogs", "dogs!"]
    _assert_same(ours, reference, prompts + PROMPTS)


def test_long_prompt_is_fast_and_cache_stays_bounded(bpe_folder):
    ours = CLIPTokenizer.from_folder(bpe_folder)
    rng = random.Random(4)
    words = CORPUS.split()
    prompt = " ".join(rng.choice(words) for _ in range(4000))[:16384]
    single_word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16384))
    start = time.perf_counter()
    tokens = ours.tokenize(prompt)
    long_word = ours.tokenize(single_word)
    seconds = time.perf_counter() - start
    assert seconds < 5, f"{seconds:.2f} s"  # generous: well under one second in fact
    assert len(tokens) > 2000 and "".join(long_word).removesuffix("</w>") == single_word
    reference = _reference(bpe_folder)
    assert long_word[:400] == reference.tokenize(single_word[:2000])[:400]
    assert ours.tokenize(single_word[:2000]) == reference.tokenize(single_word[:2000])

    letters = "abcdefghijklmnopqrstuvwxyz"
    distinct = " ".join(letters[i % 26] + letters[i // 26 % 26] + letters[i // 676 % 26] + "q" for i in range(17576))
    assert sd_tokenizer.BPE_CACHE_WORDS < 17576
    ours.tokenize(distinct)
    info = ours._bpe.cache_info()
    assert info.currsize == info.maxsize == sd_tokenizer.BPE_CACHE_WORDS
    # Words too long to cache are never kept.
    before = info.currsize, info.misses
    ours.tokenize("y" * (sd_tokenizer.BPE_CACHED_WORD_CHARS + 1))
    assert (ours._bpe.cache_info().currsize, ours._bpe.cache_info().misses) == before


def test_decode_reads_bytes_and_specials(bpe_folder):
    ours, reference = CLIPTokenizer.from_folder(bpe_folder), _reference(bpe_folder)
    # A multi-byte character split across tokens, cut in half: invalid UTF-8 becomes U+FFFD.
    ids = ours.encode("日本 🎉")
    for cut in range(len(ids) + 1):
        assert ours.decode(ids[:cut]) == reference.decode(ids[:cut])
    assert ours.decode([ours.bos_token_id, *ours.encode("a cat"), ours.eos_token_id]) == "<|startoftext|>a cat <|endoftext|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.decode([len(ours) + 5])

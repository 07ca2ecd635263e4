"""sdmagic.prompt_weights: A1111's emphasis syntax, 75-token chunks and the mean-restoring weights.

The parser is checked against the examples A1111 documents (parse_prompt_attention's docstring
table) and, on random prompts, against a plain quadratic reference of the same algorithm written
here; the chunking against hand-counted cases on the tiny model's byte-level tokenizer (one token
per character, "</w>" on a word's last one, so token counts are easy to see); `emphasize` against
A1111's "Original" emphasis written in numpy; and the whole path against transformers'
CLIPTextModel on the tiny model's text-encoder weights.
"""

from __future__ import annotations

import dataclasses
import random
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdmagic import convert, prompt_weights, tiny
from sdmagic.errors import SDMagicError
from sdmagic.nets import clip
from sdmagic.prompt_weights import (
    BREAK, CHUNK_TOKENS, MAX_CHUNKS, MAX_PROMPT_CHARS, WeightedTokens, chunk_count, emphasize, parse_weights,
    to_arrays, tokenize_weighted,
)
from sdmagic.tokenizer import CLIPTokenizer, bytes_to_unicode, write_byte_level_vocabulary

L = 77


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    """The tiny model's tokenizer: every byte a token, no merges; pad = EOS as SD 1.x's."""
    with tempfile.TemporaryDirectory() as folder:
        write_byte_level_vocabulary(folder)
        return CLIPTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def tok_bang() -> CLIPTokenizer:
    """The same vocabulary padding with "!" (id 0), as SD 2.x's and SDXL's second tokenizer."""
    with tempfile.TemporaryDirectory() as folder:
        write_byte_level_vocabulary(folder)
        return CLIPTokenizer.from_folder(folder, pad_token="!")


def words(n: int, word: str = "a") -> str:
    return " ".join([word] * n)


# ----------------------------------------------------------------------------------------------
# parse_weights
# ----------------------------------------------------------------------------------------------

# A1111's parse_prompt_attention docstring, then the wiki's "Attention/emphasis" examples.
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.1 * 1.1)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a [[word]]", [("a ", 1.0), ("word", 1 / 1.1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a (word: 1.5 )", [("a ", 1.0), ("word", 1.5)]),  # spaces around the number
    ("\\(word\\)", [("(word)", 1.0)]),
    ("[(word:2)]", [("word", 2 / 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    # Unmatched closers and a weight with no open bracket are text; a lone backslash is dropped.
    ("a) b] c:1.2) d", [("a) b] c:1.2) d", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("", [("", 1.0)]),
    # BREAK: a word of its own, in capitals, the whitespace around it taken.
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), (BREAK, -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), (BREAK, -1.0), ("", 1.0)]),
    ("a break BREAKING xBREAK", [("a break BREAKING xBREAK", 1.0)]),
    ("(a:1.2) BREAK (b)", [("a", 1.2), ("", 1.0), (BREAK, -1.0), ("", 1.0), ("b", 1.1)]),
    # A1111's quirk: brackets multiply the BREAK marker too, which is then the word with weight -1.1.
    ("(a BREAK b)", [("a", 1.1), (BREAK, -1.1), ("b", 1.1)]),
    # Unclosed brackets: round ones first, then square ones, in the order opened.
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED, ids=[repr(t) for t, _ in DOCUMENTED])
def test_parse_weights_documented_examples(text, expected):
    got = parse_weights(text)
    assert got == expected  # exact floats: A1111 compares them with == when merging
    assert all(type(w) is float for _, w in got)


# A1111's re_attention and re_break, as it documents the syntax.
_REF_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
)
_REF_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def reference_parse(text: str) -> list[tuple[str, float]]:
    """The documented algorithm in its plainest form: a list of [text, weight] entries; a closing
    bracket multiplies every entry since its opening one, one by one; unclosed brackets multiply
    to the end (round, then square); then equal neighbours are merged."""
    entries: list[list] = []
    stacks: dict[str, list[int]] = {"(": [], "[": []}
    for match in _REF_ATTENTION.finditer(text):
        piece, number = match.group(0), match.group(1)
        if piece[0] == "\\":
            entries.append([piece[1:], 1.0])
            continue
        if piece in stacks:
            stacks[piece].append(len(entries))
            continue
        factor = None
        if number is not None and stacks["("]:
            factor, start = float(number), stacks["("].pop()
        elif piece == ")" and stacks["("]:
            factor, start = 1.1, stacks["("].pop()
        elif piece == "]" and stacks["["]:
            factor, start = 1 / 1.1, stacks["["].pop()
        if factor is not None:
            for entry in entries[start:]:
                entry[1] *= factor
            continue
        for i, part in enumerate(_REF_BREAK.split(piece)):
            if i:
                entries.append(["BREAK", -1])
            entries.append([part, 1.0])
    for bracket, factor in (("(", 1.1), ("[", 1 / 1.1)):
        for start in stacks[bracket]:
            for entry in entries[start:]:
                entry[1] *= factor
    if not entries:
        return [("", 1.0)]
    i = 0
    while i + 1 < len(entries):
        if entries[i][1] == entries[i + 1][1]:
            entries[i][0] += entries.pop(i + 1)[0]
        else:
            i += 1
    return [(t, w) for t, w in entries]


PIECES = ["(", "(", ")", "[", "]", ":1.5)", ": 0.5 )", ":-1)", ":0)", ":2", ":", "\\(", "\\)", "\\[", "\\]",
          "\\\\", "\\", "a", "bc", " ", "  ", "\t", ",", "BREAK", " BREAK ", "BREAKx", "1.25", "é", "\u3000"]


def test_parse_weights_equals_reference_on_random_prompts():
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 30)))
        assert parse_weights(text) == reference_parse(text), text


def test_parse_weights_equals_reference_on_long_nested_prompts():
    """Thousands of brackets (the reference takes a moment here, the parser does not)."""
    rng = random.Random(1)
    for _ in range(3):
        text = "".join(rng.choice(["(", "(", "[", ")", "]", ":1.01)", "ab", " ", "\\(", " BREAK "]) for _ in range(1500))
        assert parse_weights(text) == reference_parse(text)


def test_split_break_equals_re_split():
    rng = random.Random(2)
    alphabet = [" ", "  ", "\t", "\n", "\u3000", "BREAK", "BREAK", "B", "REAK", "x", "_", "é", "1", ","]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 14)))
        assert prompt_weights._split_break(text) == _REF_BREAK.split(text), repr(text)


@pytest.mark.parametrize("text, joined, breaks", [
    ("(" * 16384, "", 0),  # deep nesting: no recursion anywhere
    ("(" * 8192 + "a" + ")" * 8191, "a", 0),
    ("(a" * 8192, "a" * 8192, 0),  # 8192 unclosed brackets over 8192 entries: 33 M steps in A1111's loops
    ("[a(" * 5461, "a" * 5461, 0),
    ("(a)[b]" * 2730, "ab" * 2730, 0),
    (" " * 16384, " " * 16384, 0),  # A1111's BREAK pattern takes quadratic time on a whitespace run
    ("(a:" + " " * 16000, "a:" + " " * 16000, 0),
    ("BREAK " * 2730, "", 2730),
], ids=["open", "nested", "open-entries", "mixed", "alternating", "spaces", "colon-spaces", "breaks"])
def test_parse_weights_hostile_prompts(text, joined, breaks):
    """16k-character prompts parse (in milliseconds: nothing here is quadratic in Python)."""
    got = parse_weights(text)
    markers = [i for i, (t, w) in enumerate(got) if t == BREAK and w == -1]
    assert len(markers) == breaks
    assert "".join(t for i, (t, _) in enumerate(got) if i not in set(markers)) == joined


def test_parse_weights_hostile_weights_are_a1111s():
    # 8192 unclosed round brackets: entry k is multiplied by 1.1 once per bracket before it, in order.
    got = parse_weights("(a" * 8192)
    weight = 1.0
    for k, (text, w) in enumerate(got[:700]):
        weight *= 1.1
        assert (text, w) == ("a", weight), k
    assert got[-1][1] == float("inf")


def test_parse_weights_bad_weight_says_what_to_do():
    with pytest.raises(SDMagicError, match=r"':1\.2\.3\)' is not a number: write a weight like \(word:1\.3\)"):
        parse_weights("a (b:1.2.3) c")
    with pytest.raises(SDMagicError, match="not a number"):
        parse_weights("(b:.)")
    # Without an open bracket the same text is plain text, as in A1111.
    assert parse_weights("b:1.2.3)") == [("b:1.2.3)", 1.0)]


# ----------------------------------------------------------------------------------------------
# tokenize_weighted: chunks
# ----------------------------------------------------------------------------------------------


def lengths(tokens: WeightedTokens) -> list[int]:
    return [len(c) for c in tokens.chunks]


def test_byte_level_tokenizer_counts_one_token_per_character(tok):
    # What the chunk tests below rely on.
    assert len(tok.encode(words(10))) == 10 and tok.encode(",") == [tok.encode("a,")[1]]


def test_empty_prompt_is_one_empty_chunk(tok):
    tokens = tokenize_weighted("", tok)
    assert tokens.chunks == ((),) and tokens.weights == ((),) and tokens.cut is None
    assert chunk_count(tokens) == tokens.chunk_count == 1


def test_150_tokens_make_two_chunks_nothing_cut(tok):
    assert CHUNK_TOKENS == 75
    tokens = tokenize_weighted(words(150), tok)
    assert lengths(tokens) == [75, 75] and tokens.cut is None and chunk_count(tokens) == 2
    assert lengths(tokenize_weighted(words(75), tok)) == [75]
    assert lengths(tokenize_weighted(words(76), tok)) == [75, 1]


def test_comma_backtrack(tok):
    comma = tok.encode(",")[0]
    # 70 words, a comma, 10 more: the chunk fills 5 tokens after the comma, which move on.
    tokens = tokenize_weighted(words(70) + ", " + words(10, "b"), tok)
    assert lengths(tokens) == [71, 10]
    assert tokens.chunks[0][-1] == comma and tokens.chunks[1] == tuple(tok.encode(words(10, "b")))
    # The comma exactly 20 tokens before the end of a full chunk: moved; 21: not.
    assert lengths(tokenize_weighted(words(55) + ", " + words(30), tok)) == [56, 30]
    assert lengths(tokenize_weighted(words(54) + ", " + words(30), tok)) == [75, 10]
    # Only the last comma counts; a comma as the 75th token moves nothing.
    assert lengths(tokenize_weighted(words(60) + ", " + words(5) + ", " + words(20), tok)) == [67, 20]
    assert lengths(tokenize_weighted(words(74) + ", " + words(5), tok)) == [75, 5]
    # A1111's order of checks: a comma arriving at a full chunk is not a place to break, and the
    # earlier comma within 20 tokens is then not used either.
    assert lengths(tokenize_weighted(words(60) + ", " + words(14) + ", " + words(5), tok)) == [75, 6]
    # The next chunk's own comma counts from its own start.
    assert lengths(tokenize_weighted(words(75) + " " + words(70) + ", " + words(10), tok)) == [75, 71, 10]


def test_comma_backtrack_keeps_weights_with_their_tokens(tok):
    tokens = tokenize_weighted(words(70) + ", (" + words(10, "b") + ":1.5)", tok)
    assert lengths(tokens) == [71, 10]
    assert tokens.weights == ((1.0,) * 71, (1.5,) * 10)


def test_break_starts_a_new_chunk(tok):
    a, b = tok.encode("a"), tok.encode("b")
    assert tokenize_weighted("a BREAK b", tok).chunks == (tuple(a), tuple(b))
    assert tokenize_weighted("BREAK a", tok).chunks == ((), tuple(a))
    assert tokenize_weighted("a BREAK", tok).chunks == (tuple(a),)
    assert tokenize_weighted("a BREAK BREAK b", tok).chunks == (tuple(a), (), tuple(b))
    # A BREAK right after a full chunk does not add an empty one.
    assert lengths(tokenize_weighted(words(75) + " BREAK b", tok)) == [75, 1]
    # Brackets around BREAK make it the word "break" weighted -1.1 (A1111's quirk, followed).
    quirk = tokenize_weighted("(a BREAK b)", tok)
    assert quirk.chunks == (tuple(tok.encode("a") + tok.encode("BREAK") + tok.encode("b")),)
    assert quirk.weights == ((1.1, -1.1, -1.1, -1.1, -1.1, -1.1, 1.1),)


def test_weights_attach_to_tokens_and_fragments_tokenize_alone(tok):
    tokens = tokenize_weighted("a (bc de:1.5) [f]", tok)
    assert tokens.chunks == (tuple(tok.encode("a") + tok.encode("bc de") + tok.encode("f")),)
    assert tokens.weights == ((1.0, 1.5, 1.5, 1.5, 1.5, 1 / 1.1),)
    # "(ab)c" is "ab" then "c", each tokenized on its own: b ends a word there ("b</w>").
    split = tokenize_weighted("(ab)c", tok)
    assert split.chunks == (tuple(tok.encode("ab") + tok.encode("c")),)
    assert split.chunks != (tuple(tok.encode("abc")),)
    assert split.weights == ((1.1, 1.1, 1.0),)


def test_700_tokens_are_cut_to_8_chunks_with_a_note(tok):
    tokens = tokenize_weighted(words(600) + " " + words(100, "z"), tok)
    assert lengths(tokens) == [75] * MAX_CHUNKS
    assert tokens.cut.startswith("100 tokens cut: 'z z z z") and tokens.cut.endswith("…'")
    # Short enough to show whole: no ellipsis.
    assert tokenize_weighted(words(600) + " xyz", tok).cut == "3 tokens cut: 'xyz'"
    assert lengths(tokenize_weighted(words(700), tok, max_chunks=3)) == [75, 75, 75]
    assert tokenize_weighted(words(600), tok).cut is None


def test_cut_notes(tok):
    # A trailing BREAK opens no chunk: "a" and 8 empty ones, of which 1 is cut.
    tokens = tokenize_weighted("a " + "BREAK " * 9, tok)
    assert tokens.chunk_count == MAX_CHUNKS and tokens.cut == "1 empty BREAK chunk past the first 8 cut"
    assert tokenize_weighted("a " + "BREAK " * 10, tok).cut == "2 empty BREAK chunks past the first 8 cut"
    long = "(" * MAX_PROMPT_CHARS + "hidden words"
    tokens = tokenize_weighted(long, tok)
    assert tokens.chunks == ((),) and tokens.cut.startswith("12 characters past the first 16384 cut: 'hidden words'")
    assert tokenize_weighted(words(9000), tok).cut.startswith("over ")


def test_weights_that_overflow_float32_say_what_to_do(tok):
    with pytest.raises(SDMagicError, match=r"multiplies to .* write a weight like \(word:1\.5\)"):
        tokenize_weighted("(" * 1000 + "a", tok)
    # An empty fragment's weight does not matter.
    assert tokenize_weighted("a" + "(" * 1000, tok).chunks == (tuple(tok.encode("a")),)


def test_plain_prompt_gives_the_ids_of_before(tok):
    """A prompt without emphasis syntax: exactly the ids sdmagic used before weights (BOS, the
    tokens, EOS, padding: what session._tokens and transformers' tokenizer give)."""
    for prompt in ["a photo of an astronaut riding a horse on mars", "time: 12:30, red, green; blue!",
                   words(75), "", "über café ☕"]:
        ids, weights = to_arrays(tokenize_weighted(prompt, tok), (tok,), 1)
        before = [tok.bos_token_id, *tok.encode(prompt), tok.eos_token_id]
        before += [tok.pad_token_id] * (L - len(before))
        np.testing.assert_array_equal(ids[0], before)
        np.testing.assert_array_equal(ids, tok.input_ids([prompt], L))
        assert weights.dtype == np.float32 and (weights == 1).all()


# ----------------------------------------------------------------------------------------------
# to_arrays
# ----------------------------------------------------------------------------------------------


def test_to_arrays_one_tokenizer(tok):
    tokens = tokenize_weighted(words(80) + " (b:1.5)", tok)
    ids, weights = to_arrays(tokens, (tok,), 3)
    assert ids.shape == (1, 3 * L) and ids.dtype == np.int32 and weights.shape == (3 * L,) and weights.dtype == np.float32
    bos, eos, a, b = tok.bos_token_id, tok.eos_token_id, tok.encode("a")[0], tok.encode("b")[0]
    rows = ids[0].reshape(3, L)
    assert rows[0].tolist() == [bos] + [a] * 75 + [eos]
    assert rows[1].tolist() == [bos] + [a] * 5 + [b] + [eos] * 70  # EOS, then padding (= EOS here)
    assert rows[2].tolist() == [bos, eos] + [eos] * 75  # an empty chunk pads the bucket
    w = weights.reshape(3, L)
    assert w[1, 6] == np.float32(1.5) and (np.delete(w.ravel(), L + 6) == 1).all()
    with pytest.raises(ValueError, match="needs 2 chunks"):
        to_arrays(tokens, (tok,), 1)


def test_to_arrays_two_tokenizers_pad_each_with_its_own_id(tok, tok_bang):
    assert tok_bang.pad_token_id == 0 and tok.pad_token_id == tok.eos_token_id
    tokens = tokenize_weighted("(red:1.2) " + words(90, "c"), tok)
    ids, weights = to_arrays(tokens, (tok, tok_bang), 2)
    assert ids.shape == (2, 2 * L)
    first, second = ids.reshape(2, 2, L)
    np.testing.assert_array_equal(first, to_arrays(tokens, (tok,), 2)[0].reshape(2, L))
    for chunk, n in ((0, 75), (1, 18)):
        assert first[chunk, : n + 2].tolist() == second[chunk, : n + 2].tolist()  # BOS tokens EOS agree
        assert first[chunk, n + 1] == tok.eos_token_id
        assert (first[chunk, n + 2 :] == tok.eos_token_id).all() and (second[chunk, n + 2 :] == 0).all()
    assert weights[1:4].tolist() == [np.float32(1.2)] * 3 and (weights[4:] == 1).all()
    # An empty padding chunk: BOS, EOS, then each tokenizer's padding.
    third = to_arrays(tokens, (tok, tok_bang), 3)[0].reshape(2, 3, L)[:, 2]
    assert third[0].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 76
    assert third[1].tolist() == [tok.bos_token_id, tok.eos_token_id] + [0] * 75


def test_to_arrays_second_tokenizer_own_ids_where_they_align(tok, tok_bang):
    # "!" is the second tokenizer's pad token, so a special token there (id 0), as with diffusers'
    # SDXL tokenizer_2: same token count, so its own ids are used.
    tokens = tokenize_weighted("hi! (yes!:1.3)", tok)
    ids, _ = to_arrays(tokens, (tok, tok_bang), 1)
    first, second = ids
    bang_first = tok.encode("!")[0]
    assert first[3] == bang_first and second[3] == 0
    assert (first[:9] != second[:9]).sum() == 2


def test_to_arrays_second_tokenizer_falls_back_to_the_first_when_counts_differ():
    chars = list(bytes_to_unicode().values())
    vocab_tokens = [*chars, *(c + "</w>" for c in chars), "!!</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    merges = [("!", "!</w>")]
    one = CLIPTokenizer(vocab, merges)
    two = CLIPTokenizer(vocab, merges, pad_token="!")
    assert len(one.encode("hi!!")) == 3 and len(two.encode("hi!!")) == 4
    tokens = tokenize_weighted("hi!! there", one)
    ids, _ = to_arrays(tokens, (one, two), 1)
    n = tokens.token_count
    np.testing.assert_array_equal(ids[0, : n + 2], ids[1, : n + 2])  # A1111: one tokenization for both
    assert (ids[1, n + 2 :] == 0).all()


# ----------------------------------------------------------------------------------------------
# emphasize
# ----------------------------------------------------------------------------------------------


def a1111_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's EmphasisOriginal.after_transformers, one prompt and one chunk at a time (batch size
    1), chunks then concatenated along the tokens (torch.hstack), in float64."""
    batch, chunks, length, width = hidden.shape
    out = np.empty((batch, chunks * length, width))
    for b in range(batch):
        for c in range(chunks):
            z = hidden[b, c].astype(np.float64)
            multipliers = weights[b, c * length : (c + 1) * length].astype(np.float64)
            original_mean = z.mean()
            z = z * multipliers[:, None]
            new_mean = z.mean()
            out[b, c * length : (c + 1) * length] = z * (original_mean / new_mean)
    return out


def test_emphasize_equals_a1111s_formula():
    rng = np.random.default_rng(0)
    batch, chunks, width = 3, 2, 16
    hidden = (rng.normal(size=(batch, chunks, L, width)) + 0.5).astype(np.float32)
    weights = np.ones((batch, chunks * L), np.float32)
    weights[0, 3:9] = 1.4
    weights[0, L + 2 : L + 5] = 0.6
    weights[1] = rng.uniform(0.5, 1.6, chunks * L)
    weights[2, L + 10] = -1.1  # prompt 2's first chunk unweighted
    got = np.asarray(jax.jit(emphasize)(hidden, weights))
    want = a1111_emphasis(hidden, weights)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() < 2e-6 * np.abs(want).max()
    # The weights matter (the test would notice a no-op) ...
    assert np.abs(got - hidden.reshape(batch, chunks * L, width)).max() > 0.1
    # ... and an unweighted chunk is passed through bit for bit.
    np.testing.assert_array_equal(got[2, :L], hidden[2, 0])


def test_emphasize_is_exact_identity_for_unit_weights():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 3, L, 8)).astype(np.float32)
    got = jax.jit(emphasize)(hidden, np.ones((2, 3 * L), np.float32))
    np.testing.assert_array_equal(np.asarray(got), hidden.reshape(2, 3 * L, 8))
    # bfloat16 hidden states (an accelerator's compute dtype) come back as their exact float32 values.
    half = jnp.asarray(hidden, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(emphasize(half, jnp.ones((2, 3 * L)))),
                                  np.asarray(half.astype(jnp.float32)).reshape(2, 3 * L, 8))


def test_emphasize_does_not_depend_on_the_batch():
    rng = np.random.default_rng(2)
    hidden = (rng.normal(size=(2, 2, L, 8)) + 1).astype(np.float32)
    weights = rng.uniform(0.5, 1.5, (2, 2 * L)).astype(np.float32)
    both = np.asarray(jax.jit(emphasize)(hidden, weights))
    alone = np.asarray(jax.jit(emphasize)(hidden[:1], weights[:1]))
    np.testing.assert_allclose(both[:1], alone, rtol=1e-6, atol=0)
    # With one mean for the whole batch (A1111 at batch size 2) the first image would change.
    other = weights.copy()
    other[1] *= 3
    np.testing.assert_allclose(np.asarray(jax.jit(emphasize)(hidden, other))[:1], alone, rtol=1e-6, atol=0)


def test_emphasize_zero_mean_chunk_stays_finite():
    hidden = np.zeros((1, 1, L, 4), np.float32)
    hidden[0, 0, :, 0] = np.linspace(-1, 1, L)
    weights = np.full((1, L), 2.0, np.float32)
    got = np.asarray(emphasize(hidden, weights))
    assert np.isfinite(got).all()


# ----------------------------------------------------------------------------------------------
# end to end: the tiny model's text encoder against transformers + the formula
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_text():
    """The tiny model's text encoder (config, params with noisy norms and biases, so that chunk
    means are well away from 0 as in real CLIP) and its tokenizer, and transformers' CLIPTextModel
    with the same weights."""
    model = tiny.random_model("tiny")
    cfg = model.model.text
    rng = np.random.default_rng(5)

    def perturb(path, x):
        name = path[-1].key
        if name == "bias":
            return x + rng.normal(0.3, 0.1, x.shape).astype(np.float32)
        if name == "scale":
            return x + rng.normal(0, 0.2, x.shape).astype(np.float32)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, model.params["text_encoder"])
    torch_model = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(cfg), bos_token_id=model.model.tokenizer.bos_token_id,
                                               pad_token_id=model.model.tokenizer.pad_token_id))
    state = convert.flax_to_pytorch(params, diffusers_names=False)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return cfg, params, model.model.tokenizer, torch_model.eval()


@pytest.mark.parametrize("prompts", [
    ("a (red:1.3) cube on a [blue] table, " + words(70, "x") + ", (gold coins)", "plain words"),
    ("short (one)", "two chunks BREAK ((second chunk)) [[weak]]"),
], ids=["long-weighted", "break"])
def test_weighted_long_prompts_give_a1111s_embeddings(tiny_text, prompts):
    cfg, params, tokenizer, torch_model = tiny_text
    tokens = [tokenize_weighted(p, tokenizer) for p in prompts]
    chunks = max(map(chunk_count, tokens))
    assert chunks == 2 and all(t.cut is None for t in tokens)
    arrays = [to_arrays(t, (tokenizer,), chunks) for t in tokens]
    ids = np.stack([a[0] for a in arrays])  # [B, E=1, C*L]
    weights = np.stack([a[1] for a in arrays])
    assert (weights != 1).any()

    @jax.jit
    def encode(params, ids, weights):
        batch = ids.shape[0]
        hidden = clip.encode_text(params, cfg, ids[:, 0].reshape(batch * chunks, L)).last_hidden_state
        return emphasize(hidden.reshape(batch, chunks, L, -1), weights)

    got = np.asarray(encode(params, ids, weights))
    with torch.no_grad():
        hidden = torch_model(torch.from_numpy(ids[:, 0].reshape(-1, L)).long()).last_hidden_state.numpy()
    want = a1111_emphasis(hidden.reshape(len(prompts), chunks, L, -1), weights)
    assert got.shape == want.shape == (len(prompts), chunks * L, cfg.hidden_size)
    err = np.abs(got - want).max()
    assert err < 2e-5, err  # measured 2.0e-6 on values up to 4.1
    # The emphasis is visible well above that error.
    assert np.abs(want - hidden.reshape(want.shape)).max() > 100 * err

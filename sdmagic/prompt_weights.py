"""Prompts as AUTOMATIC1111's stable-diffusion-webui reads them: emphasis and long prompts.

Emphasis (A1111's `modules/prompt_parser.py`, `parse_prompt_attention`):

    (word:1.3)  weight 1.3          (word)  weight x 1.1          [word]  weight / 1.1
    nesting multiplies: ((word)) = 1.21 (as 1.1 * 1.1 in floating point), [(word:2)] = 2 / 1.1
    \\( \\) \\[ \\] \\\\  the literal characters; a lone backslash is dropped
    an unclosed ( or [ applies to the rest of the prompt; an unmatched ) or ] is plain text
    BREAK (a word of its own, in capitals) ends the current 75-token chunk

Long prompts (A1111's `modules/sd_hijack_clip.py`, `tokenize_line`): every weighted fragment is
tokenized on its own, so each token carries its fragment's weight; the tokens are cut into chunks
of 75 (the text encoder's 77 positions less BOS and EOS). When a chunk is full and a comma came
within its last 20 tokens (A1111's `comma_padding_backtrack`), the tokens after that comma move on
to the next chunk, so a phrase is not split across chunks. Each chunk is encoded on its own as
BOS + tokens + EOS + padding and the chunks' hidden states are concatenated; A1111 has no limit,
sdmagic reads at most MAX_CHUNKS chunks (600 tokens) and says what it cut.

Weights act on the text encoder's output (A1111's default "Original" emphasis,
`modules/sd_emphasis.py`): each chunk's hidden states are multiplied token by token by their
weights, then scaled back to the chunk's original mean. A1111 takes that mean over its whole batch;
here it is taken per prompt and chunk (A1111 with batch size 1), so that an image never depends on
the batch it is made in.

Host side (plain Python and numpy): `parse_weights`, `tokenize_weighted`, `chunk_count`,
`to_arrays`. Traced: `emphasize`.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .errors import SDMagicError
from .text import printable

__all__ = [
    "BREAK", "CHUNK_TOKENS", "COMMA_PADDING_BACKTRACK", "MAX_CHUNKS", "MAX_PROMPT_CHARS",
    "WeightedTokens", "chunk_count", "emphasize", "parse_weights", "to_arrays", "tokenize_weighted",
]

# Tokens per chunk: the text encoder's 77 positions less BOS and EOS (A1111's chunk_length).
CHUNK_TOKENS = 75
# At most this many chunks are read (600 tokens); A1111 reads any number, but every chunk count
# is a compiled shape here, and a prompt past 600 tokens is almost always a paste by mistake.
MAX_CHUNKS = 8
# A full chunk moves the tokens after a comma within its last this-many tokens to the next chunk
# (A1111's default `comma_padding_backtrack`).
COMMA_PADDING_BACKTRACK = 20
# Prompts are read up to this many characters (as sdmagic.session does): far more than 600 tokens
# of any real prompt, and it bounds the parser's work on a hostile one.
MAX_PROMPT_CHARS = 16384
# parse_weights' marker for BREAK: this text with this weight (A1111's ["BREAK", -1]).
BREAK = "BREAK"
# Weights are float32 on the devices (A1111's torch.asarray of the multipliers).
_FLOAT32_MAX = float(np.finfo(np.float32).max)
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# A1111's re_attention, verbatim (the version that allows spaces around a weight: `(a: 1.2 )`).
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
# A1111 splits text on re.compile(r"\s*\bBREAK\b\s*", re.S). Python's regex engine takes time
# quadratic in a long run of whitespace for that pattern (2.5 s for 16k spaces), so `_split_break`
# finds the word alone and extends it over the whitespace around it, which gives the same pieces.
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")
_SPACE = re.compile(r"\s")


def _split_break(text: str) -> list[str]:
    """re.split(r"\\s*\\bBREAK\\b\\s*", text), in time linear in len(text)."""
    if BREAK not in text:
        return [text]
    parts = []
    done = 0  # end of the previous separator
    for match in _BREAK_WORD.finditer(text):
        start, end = match.span()
        # The leftmost match starts where the whitespace run before the word starts (not before
        # the previous separator), and takes all the whitespace after it.
        while start > done and _SPACE.match(text, start - 1):
            start -= 1
        parts.append(text[done:start])
        done = _SPACES.match(text, end).end()
    parts.append(text[done:])
    return parts


def parse_weights(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention: the text as (fragment, weight) pairs, runs of equal weight
    merged, BREAK as the pair ("BREAK", -1.0). Every weight is the float A1111 computes.

    Examples (A1111's own):
        'normal text'                -> [('normal text', 1.0)]
        'an (important) word'        -> [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
        '(unbalanced'                -> [('unbalanced', 1.1)]
        '\\(literal\\]'              -> [('(literal]', 1.0)]
        '(unnecessary)(parens)'      -> [('unnecessaryparens', 1.1)]

    As in A1111, a BREAK inside brackets is multiplied too, and is then no longer a BREAK but the
    word with a negative weight. A weight that is no number (`(a:1.2.3)`) raises SDMagicError
    (A1111 fails with a ValueError).

    Cost: A1111 multiplies list entries one by one in Python (and merges with list.pop), which
    takes seconds on a 16k-character prompt of brackets. Here entries added between two bracket
    events share one multiplier (a segment), a bracket multiplies a numpy slice of segments (the
    same float64 products in the same order, so the same floats), and runs merge in one pass.
    Python's work is linear in the text; numpy's is at most brackets x segments multiplies, some
    30 million (a few tens of milliseconds) for the worst prompt of MAX_PROMPT_CHARS characters.
    Exact floats need that much: each entry's weight is a product over the brackets around it.
    """
    texts: list[str] = []  # entries as A1111's `res` holds them
    signs: list[float] = []  # 1.0, or -1.0 for a BREAK marker
    segment_of: list[int] = []  # entry -> its segment
    matches = list(_ATTENTION.finditer(text))
    # Entries added with no bracket opened or closed between them get the same multipliers in the
    # same order, so they share one. multipliers[s] starts at 1.0, as A1111's weights do.
    multipliers = np.ones(len(matches) + 1)
    segments = 0
    fresh = True  # the next entry starts a new segment
    round_brackets: list[int] = []  # the segment each open bracket starts at
    square_brackets: list[int] = []

    def add(piece: str, sign: float) -> None:
        nonlocal segments, fresh
        if fresh:
            segments += 1
            fresh = False
        texts.append(piece)
        signs.append(sign)
        segment_of.append(segments - 1)

    def multiply(start: int, multiplier: float) -> None:
        nonlocal fresh
        if start < segments:
            multipliers[start:segments] *= multiplier
        fresh = True  # entries added later do not get this multiplier

    def open_bracket() -> int:
        nonlocal fresh
        fresh = True  # entries added from now on get this bracket's multiplier, earlier ones do not
        return segments

    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan, as A1111's Python floats give them
        for match in matches:
            piece, weight = match.group(0), match.group(1)
            if piece.startswith("\\"):
                add(piece[1:], 1.0)
            elif piece == "(":
                round_brackets.append(open_bracket())
            elif piece == "[":
                square_brackets.append(open_bracket())
            elif weight is not None and round_brackets:
                try:
                    value = float(weight)
                except ValueError:
                    raise SDMagicError(
                        f"the prompt weight {printable(piece, 40)!r} is not a number: write a weight like"
                        f" (word:1.3), or \\( \\) for literal brackets"
                    ) from None
                multiply(round_brackets.pop(), value)
            elif piece == ")" and round_brackets:
                multiply(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
            elif piece == "]" and square_brackets:
                multiply(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
            else:
                for i, part in enumerate(_split_break(piece)):
                    if i > 0:
                        add(BREAK, -1.0)
                    add(part, 1.0)
        # Brackets left open apply to everything after them: round ones first, then square ones,
        # each in the order they were opened, as in A1111.
        for start in round_brackets:
            multiply(start, ROUND_BRACKET_MULTIPLIER)
        for start in square_brackets:
            multiply(start, SQUARE_BRACKET_MULTIPLIER)
    if not texts:
        return [("", 1.0)]
    # A BREAK marker's -1 times the product: negation is exact, so -(1 * a * b) == (-1 * a) * b.
    weights = [sign * float(multipliers[s]) for sign, s in zip(signs, segment_of)]
    # A1111's merge of runs of identical weights (compared with ==, to the run's first weight).
    merged: list[tuple[str, float]] = []
    run: list[str] = [texts[0]]
    run_weight = weights[0]
    for piece, weight in zip(texts[1:], weights[1:]):
        if weight == run_weight:
            run.append(piece)
        else:
            merged.append(("".join(run), run_weight))
            run, run_weight = [piece], weight
    merged.append(("".join(run), run_weight))
    return merged


@dataclass(frozen=True)
class WeightedTokens:
    """A prompt as A1111 encodes it: chunks of token ids (no BOS/EOS, at most CHUNK_TOKENS each;
    an empty prompt is one chunk with no tokens), each token's weight (float64, as A1111 computes
    it), and `cut`: None, or a note of what was cut beyond the chunks kept (how many tokens and the
    start of their text). `text` is the text that was tokenized (for the other tokenizers)."""

    chunks: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    cut: str | None = None
    text: str = ""

    @property
    def chunk_count(self) -> int:
        """Chunks the prompt needs (1 or more)."""
        return len(self.chunks)

    @property
    def token_count(self) -> int:
        """Tokens kept, over all chunks."""
        return sum(map(len, self.chunks))


def chunk_count(tokens: WeightedTokens) -> int:
    """Chunks `tokens` needs: the smallest chunk bucket its prompt fits."""
    return len(tokens.chunks)


def _comma(tokenizer) -> int | None:
    """The id of ",</w>" (A1111's comma_token), or None if the vocabulary has none."""
    return tokenizer.encode(",")[0] if tokenizer.tokenize(",") == [",</w>"] else None


def _chunk_tokens(tokenizer) -> int:
    length = int(tokenizer.model_max_length) - 2
    if length < 1:
        raise SDMagicError(
            f"the tokenizer's model_max_length is {tokenizer.model_max_length}: it leaves no room for any"
            " token between BOS and EOS; fix the model's tokenizer/tokenizer_config.json"
        )
    return length


def tokenize_weighted(text: str, tokenizer, max_chunks: int = MAX_CHUNKS) -> WeightedTokens:
    """`text` parsed (parse_weights) and tokenized in chunks as A1111's tokenize_line does, with
    sdmagic's CLIPTokenizer: each fragment tokenized on its own; a chunk holds the tokenizer's
    model_max_length - 2 tokens (75); a full chunk moves the tokens after a comma within its last
    COMMA_PADDING_BACKTRACK tokens to the next one; BREAK starts a new chunk (an empty one if the
    current chunk is empty). Chunks past `max_chunks` are cut, and `cut` says so; so is text past
    MAX_PROMPT_CHARS characters. Raises SDMagicError for a weight that is no number or whose
    float32 value is not finite (brackets nested some thousand deep)."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
    head = text[:MAX_PROMPT_CHARS]
    length = _chunk_tokens(tokenizer)
    comma = _comma(tokenizer)
    chunks: list[list[int]] = []
    weights: list[list[float]] = []
    chunk: list[int] = []
    multipliers: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, multipliers, last_comma
        chunks.append(chunk)
        weights.append(multipliers)
        chunk, multipliers, last_comma = [], [], -1

    for fragment, weight in parse_weights(head):
        if fragment == BREAK and weight == -1:
            next_chunk()
            continue
        ids = tokenizer.encode(fragment)
        if ids and not (math.isfinite(weight) and abs(weight) <= _FLOAT32_MAX):
            raise SDMagicError(
                f"a prompt weight multiplies to {weight:g} at {printable(fragment, 40)!r}: brackets nest too"
                " deeply or a weight is too large; write a weight like (word:1.5) instead"
            )
        for token in ids:
            # A1111's order of checks, kept: a comma that arrives at a full chunk takes the first
            # branch, so that chunk closes as it is, even with an earlier comma in its last 20.
            if token == comma:
                last_comma = len(chunk)
            elif (COMMA_PADDING_BACKTRACK and len(chunk) == length and last_comma != -1
                  and len(chunk) - last_comma <= COMMA_PADDING_BACKTRACK):
                split = last_comma + 1
                moved, moved_weights = chunk[split:], multipliers[split:]
                del chunk[split:], multipliers[split:]
                next_chunk()
                chunk, multipliers = moved, moved_weights
            if len(chunk) == length:
                next_chunk()
            chunk.append(token)
            multipliers.append(weight)
    if chunk or not chunks:
        next_chunk()

    cut = None
    if len(chunks) > max_chunks:
        dropped = [token for part in chunks[max_chunks:] for token in part]
        extra = len(chunks) - max_chunks
        chunks, weights = chunks[:max_chunks], weights[:max_chunks]
        over = "over " if len(head) < len(text) else ""
        if dropped:
            count = f"{over}{len(dropped)} token{'s' if len(dropped) != 1 else ''}"
            # Enough tokens to fill the 80 characters shown, never the whole (maybe huge) rest.
            shown = printable(tokenizer.decode(dropped[:160]).strip(), 80)
            if len(dropped) > 160 and not shown.endswith("…"):
                shown += "…"
            cut = f"{count} cut: {shown!r}"
        else:
            cut = f"{extra} empty BREAK chunk{'s' if extra != 1 else ''} past the first {max_chunks} cut"
    elif len(head) < len(text):
        cut = (f"{len(text) - len(head)} characters past the first {MAX_PROMPT_CHARS} cut:"
               f" {printable(text[len(head):], 80)!r}")
    return WeightedTokens(
        chunks=tuple(map(tuple, chunks)), weights=tuple(map(tuple, weights)), cut=cut, text=head,
    )


# Other tokenizers' ids for a prompt, per tokenizer (weakly held, so an old model's tokenizer is
# not kept alive) and text: SDXL tokenizes every prompt twice otherwise.
_OTHER_IDS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_OTHER_IDS_PER_TOKENIZER = 4096


def _ids_for(tokens: WeightedTokens, tokenizer) -> tuple[tuple[int, ...], ...]:
    """`tokens`' chunks in `tokenizer`'s ids. Tokenizers of one vocabulary (SDXL's two) agree but
    for their special tokens (diffusers' second SDXL tokenizer takes "!", its pad token, as a
    special one): where the prompt tokenizes to the same chunk lengths and weights, this
    tokenizer's own ids are used; otherwise the first tokenizer's, as A1111 does (one
    tokenization for both of SDXL's encoders)."""
    cache = _OTHER_IDS.setdefault(tokenizer, {})
    key = (tokens.text, len(tokens.chunks))
    if key not in cache:
        other = tokenize_weighted(tokens.text, tokenizer, max_chunks=len(tokens.chunks))
        aligned = other.weights == tokens.weights and all(map(lambda a, b: len(a) == len(b), other.chunks, tokens.chunks))
        if len(cache) >= _OTHER_IDS_PER_TOKENIZER:
            cache.clear()
        cache[key] = other.chunks if aligned else tokens.chunks
    return cache[key]


def to_arrays(tokens: WeightedTokens, tokenizers: tuple, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [E, chunks * L], weights float32 [chunks * L]) for E = len(tokenizers) text
    encoders and L = their model_max_length (77): each chunk BOS + its tokens + EOS, padded with
    each tokenizer's own pad id; chunks past the prompt's own are empty chunks (BOS, EOS,
    padding), which is how A1111 pads a shorter conditioning (with the empty prompt's encoding).
    Weights are 1.0 at BOS, EOS and padding. `tokens` come from tokenize_weighted(text,
    tokenizers[0]); the other tokenizers' ids are checked against them (see `_ids_for`)."""
    if not tokenizers:
        raise ValueError("to_arrays needs at least one tokenizer")
    if chunks < len(tokens.chunks):
        raise ValueError(f"the prompt needs {len(tokens.chunks)} chunks, more than the {chunks} asked for")
    lengths = {int(t.model_max_length) for t in tokenizers}
    if len(lengths) != 1:
        raise ValueError(f"the tokenizers disagree on the sequence length: {sorted(lengths)}")
    size = lengths.pop()
    ids = np.empty((len(tokenizers), chunks, size), dtype=np.int32)
    weights = np.ones((chunks, size), dtype=np.float32)
    for c, part in enumerate(tokens.weights):
        weights[c, 1 : 1 + len(part)] = part
    for e, tokenizer in enumerate(tokenizers):
        own = tokens.chunks if e == 0 or tokenizer is tokenizers[0] else _ids_for(tokens, tokenizer)
        ids[e] = tokenizer.pad_token_id
        ids[e, :, 0] = tokenizer.bos_token_id
        for c in range(chunks):
            part = own[c] if c < len(own) else ()
            if len(part) > size - 2:
                raise ValueError(f"chunk {c} holds {len(part)} tokens, more than the {size - 2} that fit")
            ids[e, c, 1 : 1 + len(part)] = part
            ids[e, c, 1 + len(part)] = tokenizer.eos_token_id
    return ids.reshape(len(tokenizers), chunks * size), weights.reshape(chunks * size)


def emphasize(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """A1111's "Original" emphasis (traced): hidden states [B, C, L, D] of C chunks encoded one by
    one, weights [B, C*L] -> float32 [B, C*L, D]. Each token's states are multiplied by its
    weight, then each (prompt, chunk) by its original mean over the new mean.

    A chunk whose weights are all 1 is returned exactly (bitwise) as it came: its scale is chosen
    as 1.0, not computed as mean / mean. A chunk whose weighted mean is 0 keeps its weighted
    states unscaled (A1111 would divide by zero and make the image NaN)."""
    batch, chunks, length, width = hidden.shape
    z = hidden.astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape(batch, chunks, length, 1)
    original = jnp.mean(z, axis=(2, 3), keepdims=True)
    weighted = z * w
    new = jnp.mean(weighted, axis=(2, 3), keepdims=True)
    plain = jnp.all(w == 1.0, axis=(2, 3), keepdims=True) | (new == 0.0)
    scale = jnp.where(plain, 1.0, original / jnp.where(new == 0.0, 1.0, new))
    return (weighted * scale).reshape(batch, chunks * length, width)

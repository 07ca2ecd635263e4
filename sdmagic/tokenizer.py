"""CLIP's byte-level BPE tokenizer, token for token as transformers' (slow) `CLIPTokenizer`.

The text encoders of Stable Diffusion read ids from OpenAI's CLIP vocabulary. This module turns
prompts into those ids with the same steps transformers 4.57 takes, so that a prompt means what it
meant with the diffusers pipeline, without transformers at run time:

1. Special tokens (BOS, EOS, UNK, PAD: `<|endoftext|>`, SD 2.x's "!") typed in the text are cut
   out first and kept whole, honouring their lstrip / rstrip / single_word flags.
2. Every other piece is repaired by ftfy, its whitespace runs become one space, and it is lower-cased.
3. A regular expression splits it into words: letter runs, single digits, runs of other symbols,
   and the English contractions ('s 't 're 've 'm 'll 'd).
4. Each word's UTF-8 bytes are spelt with printable characters (`bytes_to_unicode`), the last one
   marked with "</w>", and merged pairwise by BPE, lowest-ranked merge first.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
from dataclasses import dataclass
from pathlib import Path

import ftfy
import numpy as np
import regex

# transformers reads at most this many merges (CLIP's 49,408 tokens less the 256 byte tokens and
# the two specials); the rest of a longer merges.txt is ignored.
MAX_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer: the two specials, contractions, letter runs, single digits, symbol runs.
# `regex` because the standard library's `re` knows no \p{L} / \p{N}.
_WORD = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# transformers' whitespace_clean uses `regex` too, whose \s differs from `re`'s (\x1c-\x1f).
_WHITESPACE = regex.compile(r"\s+")
# transformers seeds its BPE cache with these two: a word equal to either is one token, no "</w>".
_WHOLE_WORDS = frozenset({"<|startoftext|>", "<|endoftext|>"})
# The BPE cache keeps this many words, and only words up to this many byte characters, so prompts
# of random words cannot grow it past a few megabytes; real words (and CJK runs of ~10 characters)
# still hit it, and a longer word costs one uncached merge, well under a millisecond.
BPE_CACHE_WORDS = 4096
BPE_CACHED_WORD_CHARS = 32


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (GPT-2's) table from each byte to a printable character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) are
    moved to U+0100 onwards, so a token never holds whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


@dataclass(frozen=True)
class SpecialToken:
    """A special token and how it treats the whitespace around it in a prompt (transformers'
    AddedToken flags: lstrip/rstrip eat the spaces left/right of it, single_word keeps it only
    where it stands apart from letters)."""

    content: str
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def parse_merges(text: str) -> list[tuple[str, str]]:
    """The merges of a merges.txt, in rank order, as transformers reads them: the first line (the
    "#version" header) skipped, at most MAX_MERGES lines, lines that are not a pair dropped (they
    take a rank but never apply, so dropping them keeps the order of the rest)."""
    lines = text.strip().split("\n")[1 : MAX_MERGES + 1]
    return [pair for pair in (tuple(line.split()) for line in lines) if len(pair) == 2]


class CLIPTokenizer:
    """CLIP's tokenizer over a vocabulary (token -> id) and BPE merges (in rank order).

    Special tokens are strings or `SpecialToken`s. One missing from the vocabulary gets the next
    free id, in the order bos, eos, unk, pad, as transformers adds them; `len()` counts them.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str | SpecialToken = "<|startoftext|>",
        eos_token: str | SpecialToken = "<|endoftext|>",
        pad_token: str | SpecialToken = "<|endoftext|>",
        unk_token: str | SpecialToken = "<|endoftext|>",
        model_max_length: int = 77,
        errors: str = "replace",
    ):
        self.model_max_length = int(model_max_length)
        self.errors = errors
        self._encoder = dict(vocab)
        # As transformers: where two tokens share an id, the later one decodes it.
        self._decoder = {index: token for token, index in self._encoder.items()}
        # A later duplicate of a pair takes the later rank, as transformers' dict(zip(...)).
        self._ranks = {pair: rank for rank, pair in enumerate(map(tuple, merges))}
        self._byte_chars = bytes_to_unicode()  # also the str.translate table of UTF-8 bytes read as Latin-1
        self._from_byte_chars = {char: byte for byte, char in self._byte_chars.items()}

        named = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        named = {role: SpecialToken(token) if isinstance(token, str) else token for role, token in named.items()}
        for role, token in named.items():
            if not isinstance(token, SpecialToken) or not token.content:
                raise ValueError(f"{role}_token must be a non-empty string or SpecialToken, not {token!r}")
        # Of several roles with one content, the first one's flags rule, as in transformers.
        self._specials = {}
        for token in named.values():
            self._specials.setdefault(token.content, token)
        self._added = {}  # special token -> id
        for content in self._specials:
            fresh = len(self._encoder) + sum(c not in self._encoder for c in self._added)
            self._added[content] = self._encoder.get(content, fresh)
        self._added_decoder = {index: content for content, index in self._added.items()}
        self._size = len(self._encoder.keys() | self._added.keys())
        self.bos_token, self.eos_token = named["bos"].content, named["eos"].content
        self.unk_token, self.pad_token = named["unk"].content, named["pad"].content
        self.bos_token_id, self.eos_token_id = self._added[self.bos_token], self._added[self.eos_token]
        self.unk_token_id, self.pad_token_id = self._added[self.unk_token], self._added[self.pad_token]
        # Leftmost, then longest: what transformers' trie of added tokens finds for CLIP's specials
        # and for one special holding another at its start or end (the tests try both).
        by_length = sorted(self._specials, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        self._bpe = functools.lru_cache(maxsize=BPE_CACHE_WORDS)(self._merge)

    @classmethod
    def from_folder(cls, path: str | Path, **settings) -> CLIPTokenizer:
        """The tokenizer of a folder's vocab.json and merges.txt; `settings` go to the constructor."""
        folder = Path(path)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = parse_merges((folder / "merges.txt").read_text(encoding="utf-8"))
        return cls(vocab, merges, **settings)

    def __len__(self) -> int:
        """The vocabulary's size with the special tokens it lacked (transformers' len())."""
        return self._size

    # ------------------------------------------------------------------ text -> tokens

    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text`, without BOS/EOS."""
        tokens = []
        for piece in self._split_specials(text):
            if piece in self._specials:
                tokens.append(piece)
            else:
                tokens.extend(self._tokenize_plain(piece))
        return tokens

    def encode(self, text: str) -> list[int]:
        """The ids of `text`'s tokens, without BOS/EOS; tokens outside the vocabulary are unk."""
        added, encoder, unk = self._added, self._encoder, self.unk_token_id
        return [added.get(token, encoder.get(token, unk)) for token in self.tokenize(text)]

    def input_ids(self, texts: list[str], length: int) -> np.ndarray:
        """int32 [len(texts), length]: BOS, each text's ids cut to length - 2, EOS, then pad ids —
        transformers' `tokenizer(texts, padding="max_length", max_length=length, truncation=True)`."""
        if length < 2:
            raise ValueError(f"length must leave room for BOS and EOS, got {length}")
        rows = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)
        for row, text in zip(rows, texts):
            ids = [self.bos_token_id, *self.encode(text)[: length - 2], self.eos_token_id]
            row[: len(ids)] = ids
        return rows

    def _split_specials(self, text: str) -> list[str]:
        """`text` cut around its special tokens, then transformers' stripping and single-word rules."""
        pieces = [piece for piece in self._special_pattern.split(text) if piece]
        # A port of PreTrainedTokenizer.tokenize's loop, edits of neighbours included: a later
        # piece sees what an earlier special did to it.
        for i in range(len(pieces)):
            token = self._specials.get(pieces[i])
            if token is None:
                continue
            left = pieces[i - 1] if i > 0 else None
            right = pieces[i + 1] if i < len(pieces) - 1 else None
            if token.rstrip and right:
                pieces[i + 1] = right.lstrip()
            if token.lstrip and left:
                pieces[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                pieces[i - 1] += pieces[i]
                pieces[i] = ""
            elif token.single_word and right and right[0] != " ":
                pieces[i + 1] = pieces[i] + pieces[i + 1]
                pieces[i] = ""
        return [piece for piece in pieces if piece]

    def _tokenize_plain(self, text: str) -> list[str]:
        text = _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()
        tokens = []
        for word in _WORD.findall(text):
            # ftfy has replaced lone surrogates, so every word encodes.
            word = word.encode("utf-8").decode("latin-1").translate(self._byte_chars)
            tokens.extend(self._bpe(word) if len(word) <= BPE_CACHED_WORD_CHARS else self._merge(word))
        return tokens

    def _merge(self, word: str) -> tuple[str, ...]:
        """BPE of one word (in byte characters): transformers' `bpe`, in O(n log n).

        transformers repeatedly takes the lowest-ranked pair present and merges all its
        occurrences left to right. Here the pairs wait in a heap by (rank, position) over a linked
        list of symbols; all entries of one rank are merged before the pairs they create enter the
        heap, which keeps the same order (a merge never recreates its own pair).
        """
        if word in _WHOLE_WORDS:
            return (word,)
        symbols: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        after = [*range(1, len(symbols)), -1]
        before = list(range(-1, len(symbols) - 1))
        ranks = self._ranks
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            merged = []
            while heap and heap[0][0] == rank:
                _, i = heapq.heappop(heap)
                j = after[i]
                # Stale entries: the symbol was merged away, or the pair here has changed since.
                if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                    continue
                symbols[i] += symbols[j]
                symbols[j] = None
                after[i] = after[j]
                if after[j] >= 0:
                    before[after[j]] = i
                merged.append(i)
            for i in merged:
                for left, right in ((before[i], i), (i, after[i])):
                    if left >= 0 and right >= 0 and (pair := (symbols[left], symbols[right])) in ranks:
                        heapq.heappush(heap, (ranks[pair], left))
        return tuple(symbol for symbol in symbols if symbol is not None)

    # ------------------------------------------------------------------ ids -> text

    def decode(self, ids) -> str:
        """The text of `ids` as transformers' `decode(ids)`: special tokens kept as written, "</w>"
        read as a space, bytes that are no UTF-8 decoded by `errors`, the ends stripped.

        Unlike transformers, which raises, a character outside the byte table (only a special
        token or a strange vocabulary can hold one) stands for itself."""
        text = "".join(self._decode_token(int(index)) for index in ids)
        data = bytearray()
        for char in text:
            byte = self._from_byte_chars.get(char)
            if byte is None:
                data += char.encode("utf-8", errors="replace")
            else:
                data.append(byte)
        return data.decode("utf-8", errors=self.errors).replace("</w>", " ").strip()

    def _decode_token(self, index: int) -> str:
        token = self._added_decoder.get(index, self._decoder.get(index))
        if token is None:
            raise ValueError(f"token id {index} is not in the vocabulary")
        return token


def write_byte_level_vocabulary(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write the byte-level tokenizer of sdmagic's tiny models into `folder`: a vocabulary of every
    byte character and byte character + "</w>", then <|startoftext|> and <|endoftext|>, and no
    merges, so every byte is a token. Files as transformers' CLIPTokenizer also reads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(char + "</w>" for char in chars), "<|startoftext|>", "<|endoftext|>"]
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return folder

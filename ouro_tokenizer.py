"""
The Ouro tokenizer (SmolLM2's byte-level BPE) as a tiktoken.Encoding, read from a
HuggingFace tokenizer.json, plus Ouro's ChatML chat format. No `tokenizers` import here.

tokenizer.json stores tokens as GPT-2 "byte-level" strings: every byte is shown as a
printable unicode character. We undo that mapping, rank every token by its id (ids follow
merge order, which we check), and give tiktoken a split pattern that reproduces the
pre-tokenizer Digits(individual_digits=True) followed by ByteLevel(use_regex=True).
"""
import json
import os

import tiktoken

# GPT-2's ByteLevel pattern with two changes that reproduce splitting every digit off first:
# a number is one digit (never with a leading space), and a whitespace run that ends at a
# digit ends a piece, so it is taken whole as at the end of the text.
OURO_PAT_STR = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?![^\s\p{N}])|\s+""")


def byte_level_alphabet():
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other bytes are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


class OuroEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding that drops bytes missing from the vocabulary, as HuggingFace's BPE
    does when it has no unknown token: such bytes get placeholder ids past the vocabulary,
    which never merge and are removed from encode's output."""

    def __init__(self, *args, missing_byte_ids=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.missing_byte_ids = frozenset(missing_byte_ids)

    def encode(self, text, **kwargs):
        return [i for i in super().encode(text, **kwargs) if i not in self.missing_byte_ids]

    def encode_ordinary(self, text):
        return [i for i in super().encode_ordinary(text) if i not in self.missing_byte_ids]


def ouro_tokenizer(path):
    """tiktoken encoding from path/tokenizer.json (path may also be the file itself).
    Encode text with special tokens in it via encode(text, allowed_special='all')."""
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    with open(file, encoding='utf-8') as f:
        spec = json.load(f)
    model = spec.get('model', {})
    if model.get('type') != 'BPE':
        raise ValueError(f"{file} holds a {model.get('type')!r} model, expected a byte-level 'BPE'")
    special = {t['content']: t['id'] for t in spec.get('added_tokens', [])}
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    ranks = {}
    for token, token_id in model['vocab'].items():
        if token in special:
            continue
        if any(c not in to_byte for c in token):
            raise ValueError(f"{file}: token {token!r} (id {token_id}) is not byte-level text")
        ranks[bytes(to_byte[c] for c in token)] = token_id
    # tiktoken merges the pair whose merged token has the lowest rank; HF applies merges in
    # list order. With rank = id these agree when ids grow along the merge list.
    last_id = -1
    for merge in model.get('merges', []):
        a, b = merge.split(' ') if isinstance(merge, str) else merge
        merged_id = model['vocab'][a + b]
        if merged_id <= last_id:
            raise ValueError(f"{file}: merge {a!r} + {b!r} -> id {merged_id} comes after id {last_id}; "
                             f"ids must follow merge order for tiktoken")
        last_id = merged_id
    top = max([*ranks.values(), *special.values()])
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    for i, byte in enumerate(missing):
        ranks[byte] = top + 1 + i
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) or 'ouro'
    return OuroEncoding(name=name, pat_str=OURO_PAT_STR, mergeable_ranks=ranks,
                        special_tokens=special, missing_byte_ids=[ranks[b] for b in missing])


def chat_prompt(messages, thinking=False):
    """Ouro's ChatML text for a list of {'role', 'content'} messages, ending with the
    assistant header; -Thinking models expect '<think>\\n' right after it."""
    text = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + '<|im_start|>assistant\n' + ('<think>\n' if thinking else '')


def stop_ids(enc):
    """Ids that end an Ouro reply: <|im_end|> and <|endoftext|>, where the tokenizer has them."""
    return {enc.encode_single_token(t) for t in ('<|im_end|>', '<|endoftext|>') if t in enc.special_tokens_set}

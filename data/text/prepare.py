"""
Prepare a text data set: tokenize, split 90/10, write train.bin / val.bin (uint16) + meta.pkl.

$ python data/text/prepare.py                          tiny Shakespeare, GPT-2 encoding (online)
$ python data/text/prepare.py --input=my.txt           any text file, GPT-2 encoding
$ python data/text/prepare.py --input=my.txt --tokenizer=ouro:/path/to/Ouro-1.4B
                                                       the Ouro folder's own tokenizer, for
                                                       `python train.py init_from=ouro:PATH`
$ python data/text/prepare.py --input=my.txt --tokenizer=char    one token per character (offline;
                                                       data/austen/prepare.py uses it)
GPT-2's encoding is fetched by tiktoken on first use (then cached); offline, use an Ouro
folder's tokenizer.json, which is read locally, or characters.
"""
import os
import pickle
import sys
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for ouro.py and configurator.py
from configurator import parse_args, read_text, run_script, write_all  # noqa: E402 (after the path above)
from ouro import load_encoding, tokenizer_id  # noqa: E402
SHAKESPEARE = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


class CharCodec:
    """One token per character of the data set's own alphabet (meta.pkl's itos), as nanoGPT's
    shakespeare_char: text to ids and back, for train.py's data and sample.py."""

    def __init__(self, itos):
        self.itos, self.stoi, self.n_vocab, self.stop = list(itos), {c: i for i, c in enumerate(itos)}, len(itos), set()
        self.prefix = self.stoi.get('\n', 0)  # where an empty context starts (eval.py)

    def encode(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a character of this data set's {self.n_vocab}")
        return [self.stoi[c] for c in text]

    def encode_ordinary(self, text):
        return self.encode(text)

    def decode(self, ids):
        return ''.join(self.itos[i] for i in ids)


def prepare(input_file, out_dir, tokenizer='gpt2'):
    prepare_text(read_text(input_file), out_dir, tokenizer, input_file)


def prepare_text(text, out_dir, tokenizer='gpt2', source='the text'):
    """Everything is encoded first; the three files are written under temporary names and
    renamed only once all are written, so a failure leaves the old data set whole."""
    if len(text) < 100:
        raise ValueError(f"{source} holds {len(text)} characters; need at least 100 to split 90/10")
    enc = CharCodec(sorted(set(text))) if tokenizer == 'char' else load_encoding(tokenizer)
    if enc.n_vocab > 2 ** 16:
        raise ValueError(f"the tokenizer has {enc.n_vocab} tokens; uint16 files hold ids below 65,536")
    split = int(len(text) * 0.9)
    parts = {name: np.array(enc.encode_ordinary(part), dtype=np.uint16)
             for name, part in (('train', text[:split]), ('val', text[split:]))}
    if tokenizer == 'char':
        meta = {'vocab_size': enc.n_vocab, 'tokenizer': 'char', 'itos': enc.itos}
    else:
        meta = {'vocab_size': enc.n_vocab, 'tokenizer': tokenizer_id(tokenizer), 'tokenizer_path': tokenizer}
    write_all(out_dir, {'train.bin': parts['train'].tofile, 'val.bin': parts['val'].tofile,
                        'meta.pkl': lambda f: pickle.dump(meta, f)})
    for name, ids in parts.items():
        print(f"{name}: {len(ids):,} tokens")


DEFAULTS = dict(input='', tokenizer='gpt2', out_dir=HERE)  # input '': tiny Shakespeare, downloaded once


def main(argv):
    args = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    if args['tokenizer'] not in ('gpt2', 'char') and not args['tokenizer'].startswith('ouro:'):
        raise ValueError(f"--tokenizer must be 'gpt2', 'char' or 'ouro:PATH', got {args['tokenizer']!r}")
    if not args['input']:
        args['input'] = os.path.join(HERE, 'input.txt')
        if not os.path.exists(args['input']):
            print(f"downloading {SHAKESPEARE} (offline? pass --input=FILE)")
            try:
                urllib.request.urlretrieve(SHAKESPEARE, args['input'] + '.part')
                os.replace(args['input'] + '.part', args['input'])
            except OSError as e:
                raise OSError(f"could not download {SHAKESPEARE} ({e}); offline, pass --input=FILE") from None
    elif not os.path.isfile(args['input']):
        raise FileNotFoundError(f"--input={args['input']}: {'a folder' if os.path.isdir(args['input']) else 'no such file'}, "
                                f"expected a text file")
    prepare(args['input'], args['out_dir'] or HERE, args['tokenizer'])


if __name__ == '__main__':
    run_script(main)

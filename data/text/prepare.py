"""
Prepare a text data set: tokenize, split 90/10, write train.bin / val.bin (uint16) + meta.pkl.

$ python data/text/prepare.py                          tiny Shakespeare, GPT-2 encoding (online)
$ python data/text/prepare.py --input=my.txt           any text file, GPT-2 encoding
$ python data/text/prepare.py --input=my.txt --tokenizer=ouro:/path/to/Ouro-1.4B
                                                       the Ouro folder's own tokenizer, for
                                                       `python train.py init_from=ouro:PATH`
GPT-2's encoding is fetched by tiktoken on first use (then cached); offline, use an Ouro
folder's tokenizer.json, which is read locally.
"""
import hashlib
import os
import pickle
import sys
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for ouro.py
SHAKESPEARE = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def tokenizer_id(tokenizer):
    """What meta.pkl records so train.py can refuse data made with another tokenizer."""
    if tokenizer == 'gpt2':
        return 'gpt2'
    with open(os.path.join(tokenizer.removeprefix('ouro:'), 'tokenizer.json'), 'rb') as f:
        return 'ouro:' + hashlib.sha256(f.read()).hexdigest()[:16]


def load_encoding(tokenizer):
    if tokenizer == 'gpt2':
        import tiktoken
        return tiktoken.get_encoding('gpt2')
    if tokenizer.startswith('ouro:'):
        from ouro import ouro_tokenizer
        return ouro_tokenizer(tokenizer.removeprefix('ouro:'))
    raise ValueError(f"--tokenizer must be 'gpt2' or 'ouro:PATH', got {tokenizer!r}")


def prepare(input_file, out_dir, tokenizer='gpt2'):
    with open(input_file, encoding='utf-8') as f:
        text = f.read()
    if len(text) < 100:
        raise ValueError(f"{input_file} holds {len(text)} characters; need at least 100 to split 90/10")
    enc = load_encoding(tokenizer)
    split = int(len(text) * 0.9)
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (('train', text[:split]), ('val', text[split:])):
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        ids.tofile(os.path.join(out_dir, f'{name}.bin'))
        print(f"{name}: {len(ids):,} tokens")
    meta = {'vocab_size': enc.n_vocab, 'tokenizer': tokenizer_id(tokenizer), 'tokenizer_path': tokenizer}
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)


def main(argv):
    args = dict(input=None, tokenizer='gpt2', out_dir=HERE)
    for arg in argv:
        key, _, value = arg.removeprefix('--').partition('=')
        if key not in args or not value:
            sys.exit(f"unknown or empty option {arg!r}; expected --input=FILE, --tokenizer=gpt2|ouro:PATH, --out_dir=DIR")
        args[key] = value
    if args['input'] is None:
        args['input'] = os.path.join(HERE, 'input.txt')
        if not os.path.exists(args['input']):
            print(f"downloading {SHAKESPEARE} (offline? pass --input=FILE)")
            urllib.request.urlretrieve(SHAKESPEARE, args['input'])
    elif not os.path.isfile(args['input']):
        sys.exit(f"--input={args['input']}: no such file")
    prepare(args['input'], args['out_dir'], args['tokenizer'])


if __name__ == '__main__':
    main(sys.argv[1:])

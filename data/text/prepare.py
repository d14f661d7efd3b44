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
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for ouro.py and configurator.py
from configurator import run_script, write_all  # noqa: E402 (after the path above)
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
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:  # offline: tiktoken fetches GPT-2's files on first use
            raise OSError(f"could not get GPT-2's encoding ({type(e).__name__}); tiktoken downloads it once, "
                          f"so offline use --tokenizer=ouro:PATH (an Ouro folder's tokenizer.json, read locally)") from None
    if tokenizer.startswith('ouro:'):
        from ouro import ouro_tokenizer
        path = tokenizer.removeprefix('ouro:')
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--tokenizer={tokenizer}: {path!r} is not a folder with a tokenizer.json")
        return ouro_tokenizer(path)
    raise ValueError(f"--tokenizer must be 'gpt2' or 'ouro:PATH', got {tokenizer!r}")


def prepare(input_file, out_dir, tokenizer='gpt2'):
    """Everything is read and encoded first; the three files are written under temporary
    names and renamed only once all are written, so a failure leaves the old data set whole."""
    try:
        with open(input_file, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{input_file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if len(text) < 100:
        raise ValueError(f"{input_file} holds {len(text)} characters; need at least 100 to split 90/10")
    enc = load_encoding(tokenizer)
    if enc.n_vocab > 2 ** 16:
        raise ValueError(f"the tokenizer has {enc.n_vocab} tokens; uint16 files hold ids below 65,536")
    split = int(len(text) * 0.9)
    parts = {name: np.array(enc.encode_ordinary(part), dtype=np.uint16)
             for name, part in (('train', text[:split]), ('val', text[split:]))}
    meta = {'vocab_size': enc.n_vocab, 'tokenizer': tokenizer_id(tokenizer), 'tokenizer_path': tokenizer}
    write_all(out_dir, {'train.bin': parts['train'].tofile, 'val.bin': parts['val'].tofile,
                        'meta.pkl': lambda f: pickle.dump(meta, f)})
    for name, ids in parts.items():
        print(f"{name}: {len(ids):,} tokens")


def main(argv):
    args = dict(input=None, tokenizer='gpt2', out_dir=HERE)
    for arg in argv:
        key, _, value = arg.removeprefix('--').partition('=')
        if key not in args or not value:
            raise ValueError(f"unknown or empty option {arg!r}; expected --input=FILE, --tokenizer=gpt2|ouro:PATH, "
                             f"--out_dir=DIR")
        args[key] = value
    if args['input'] is None:
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
    prepare(args['input'], args['out_dir'], args['tokenizer'])


if __name__ == '__main__':
    run_script(main)

"""
Jane Austen's three novels in this folder, as characters (82 of them): about 2.0 million
characters, nanoGPT's shakespeare_char made offline. The books are joined in the order they
were published, and the last 10% (the end of Persuasion) is the validation split.

$ python data/austen/prepare.py                  writes train.bin / val.bin (uint16) and meta.pkl here
$ python data/austen/prepare.py --out_dir=DIR    the same into DIR
$ python data/austen/prepare.py --max_chars=N    only the first N characters of each book (a quick run)
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for configurator.py
from configurator import parse_args, read_text, run_script  # noqa: E402 (after the path above)
from data.text.prepare import prepare_text  # noqa: E402
BOOKS = ('sense.txt', 'emma.txt', 'persuasion.txt')  # 1811, 1815, 1817 (Persuasion published 1818)


def austen_text(max_chars=0):
    """The three books, each cut to max_chars (0: whole), joined by a blank line."""
    books = [read_text(os.path.join(HERE, name), f"data/austen/{name}") for name in BOOKS]
    return '\n\n'.join(book[:max_chars] if max_chars else book for book in books)


def main(argv):
    args = parse_args(argv, {'out_dir': HERE, 'max_chars': 0})
    if args.get('max_chars', 0) < 0:
        raise ValueError(f"--max_chars must be >= 1 (or 0 for whole books), got {args['max_chars']}")
    prepare_text(austen_text(args.get('max_chars', 0)), args.get('out_dir') or HERE, 'char', 'the Austen text')


if __name__ == '__main__':
    run_script(main)

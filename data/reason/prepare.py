"""
A synthetic multi-step reasoning task, made offline: resolve a chain of variable
assignments. Each statement is one token ("b=a", "a=3"), so one attention step is one hop:

    c=2 b=d a=b h=1 d=7 e=c ?a 7        (a -> b -> d -> 7: three hops)

A model must follow `hops` links to answer: a 1-layer looped model makes about one hop per
loop, so accuracy grows with loops. Every problem is PROBLEM_LEN tokens, and its hop count
is written next to it (train_depth.bin: one uint8 per token), for train.py's depth objective.

$ python data/reason/prepare.py          writes train.bin / val.bin (uint16), train_depth.bin /
                                         val_depth.bin (uint8) and meta.pkl here
$ python data/reason/prepare.py --out_dir=DIR    the same into DIR
$ python data/reason/prepare.py --lm_eval        rewrites lm_eval/melt_reason.jsonl, eval.py's task:
                                         the held-out problems that train.py's table scores
"""
import json
import os
import pickle
import random
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for configurator.py
from configurator import parse_args, run_script, write_all  # noqa: E402 (after the path above)

VARIABLES = 'abcdefgh'
VALUES = '01234567'
N_STATEMENTS = 6
MAX_HOPS = 4
WORDS = ['\n'] + list(VALUES) + [f'?{v}' for v in VARIABLES] + \
        [f'{v}={w}' for v in VARIABLES for w in VARIABLES + VALUES if v != w]
STOI = {w: i for i, w in enumerate(WORDS)}
QUERY_IDS = [STOI[f'?{v}'] for v in VARIABLES]  # the answer follows these: loss is taken there
PROBLEM_LEN = 1 + N_STATEMENTS + 1 + 1  # newline, statements, query, answer


def problem(rng, hops=None):
    """(prompt words, answer word, hops): a chain of `hops` statements from the queried
    variable to a value, among distractor statements over the other variables."""
    hops = hops or rng.randint(1, MAX_HOPS)
    names = rng.sample(VARIABLES, N_STATEMENTS)
    chain, answer = names[:hops], rng.choice(VALUES)
    statements = [f'{chain[i]}={chain[i + 1]}' for i in range(hops - 1)] + [f'{chain[-1]}={answer}']
    others = names[hops:]
    for j, v in enumerate(others):  # distractors: links of other chains, or their ends
        last = j + 1 == len(others)
        statements.append(f'{v}={rng.choice(VALUES)}' if last or rng.random() < 0.5 else f'{v}={others[j + 1]}')
    rng.shuffle(statements)
    return ['\n'] + statements + [f'?{chain[0]}'], answer, hops


def encode(words):
    return [STOI[w] for w in words]


class WordCodec:
    """Text of the task's words ("a=b", "?a", "3"), separated by spaces (a newline is a
    word), to ids and back: sample.py's tokenizer for this task. Every problem starts with a
    newline: an empty context starts from one (prefix, eval.py)."""
    n_vocab, stop, prefix = len(WORDS), set(), STOI['\n']

    def encode(self, text):
        words = [w for w in text.replace('\n', ' \n ').split(' ') if w]
        unknown = [w for w in words if w not in STOI]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a word of the reasoning task (e.g. 'a=b', 'c=3', '?a')")
        return encode(words)

    def decode(self, ids):
        return ' '.join(WORDS[i] for i in ids).replace(' \n ', '\n').replace('\n ', '\n')


def eval_problems(n=1000, seed=12345):
    """Held-out problems, hops 1..MAX_HOPS equally often: (prompts (n, PROBLEM_LEN - 1), answers, hops)."""
    rng = random.Random(seed)
    rows = [problem(rng, hops=1 + i % MAX_HOPS) for i in range(n)]
    return (np.array([encode(p) for p, _, _ in rows]), np.array([STOI[a] for _, a, _ in rows]),
            np.array([h for _, _, h in rows]))


def accuracy(model, loops, n=1000, device='cpu', chunk_size=None):
    """Exact-match accuracy of the greedy answer (argmax after the query), overall and per hop
    count. MELT models run with chunk_size=1 by default, i.e. as they decode."""
    import torch
    prompts, answers, hops = eval_problems(n)
    if chunk_size is None and model.config.kv_sharing == 'melt':
        chunk_size = 1
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(prompts).to(device), loops=loops, chunk_size=chunk_size)
    correct = (logits[:, -1].argmax(-1).cpu().numpy() == answers)
    per_hop = {h: float(correct[hops == h].mean()) for h in range(1, MAX_HOPS + 1)}
    return float(correct.mean()), per_hop


def write_lm_eval_problems(folder=os.path.join(HERE, 'lm_eval')):
    """The held-out problems of accuracy() as JSONL for the harness task beside it
    (lm_eval/melt_reason.yaml): the prompt as WordCodec text, the answer word, the hops."""
    prompts, answers, hops = eval_problems()
    lines = [json.dumps({'text': WordCodec().decode(p.tolist()), 'answer': WORDS[a], 'hops': int(h)}) + '\n'
             for p, a, h in zip(prompts, answers, hops)]
    write_all(folder, {'melt_reason.jsonl': lambda f: f.write(''.join(lines).encode())})


def prepare(out_dir, n_train=200_000, n_val=5_000, seed=0):
    """Makes every file first, then writes them under temporary names and renames them only
    once all are written (configurator.write_all): a failure leaves the old data set whole."""
    rng = random.Random(seed)
    files = {}
    for split, n in (('train', n_train), ('val', n_val)):
        rows = [problem(rng) for _ in range(n)]
        files[f'{split}.bin'] = np.array([encode(p + [a]) for p, a, _ in rows], dtype=np.uint16).tofile
        depth = np.repeat(np.array([h for _, _, h in rows], dtype=np.uint8), PROBLEM_LEN)  # each token: its problem's hops
        files[f'{split}_depth.bin'] = depth.tofile
    meta = {'vocab_size': len(WORDS), 'itos': WORDS, 'stoi': STOI, 'tokenizer': 'reason',
            'loss_after': QUERY_IDS, 'row_len': PROBLEM_LEN, 'max_depth': MAX_HOPS}
    write_all(out_dir, {**files, 'meta.pkl': lambda f: pickle.dump(meta, f)})
    print(f"wrote {n_train:,} + {n_val:,} problems ({PROBLEM_LEN} tokens each, vocab {len(WORDS)}) to {out_dir}")


def main(argv):
    args = parse_args(argv, {'out_dir': HERE, 'lm_eval': False})
    if args.get('lm_eval'):
        return write_lm_eval_problems()
    prepare(args.get('out_dir') or HERE)


if __name__ == '__main__':
    run_script(main)

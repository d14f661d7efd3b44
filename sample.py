"""
Sample from a trained model and show what its KV cache holds.

$ python sample.py                                  out/distill (the main job's MELT model)
$ python sample.py --loops 8                        any loop count, e.g. 8 on a model trained with 4
$ python sample.py --cache loop                     the same weights with the LoopLM's cache, to compare
$ python sample.py --init_from=ouro:/path/to/Ouro-1.4B-Thinking --chat --thinking --start "What is 17*23?"
$ python sample.py --exit_threshold 0.9             Ouro's Q-exit: a token stops looping early
$ python sample.py --compile                        a compiled decode step (slow to compile; for long runs)

Options as --key=value or --key value.
"""
import os

import torch

from melt import MELT
from train import DTYPES, Data, check_device, load_checkpoint, parse_args, reason_task, run_script

# -----------------------------------------------------------------------------
init_from = 'out/distill'  # an out dir of train.py, or 'ouro:PATH'
start = '\n'  # the prompt, or FILE:prompt.txt
num_samples = 3
max_new_tokens = 0  # 0: up to the model's block_size
temperature = 0.8
top_k = 20
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
loops = 0  # 0: the model's own n_loops
cache = ''  # 'melt' | 'loop'; empty: as saved ('melt' for ouro:PATH)
chunk_size = 0  # MELT's prefill chunk size; 0: the model's own
chat = False  # wrap the prompt in Ouro's ChatML (ouro:PATH)
thinking = False  # with --chat: '<think>\n' after the assistant header, for -Thinking models
exit_threshold = 0.0  # Q-exit threshold q in (0, 1]; 0: run every loop
compile = False  # decode with torch.compile(model.decode_step): static shapes, CUDA graphs on GPU
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


class WordCodec:
    """The reasoning task's words ("a=b", "?a", "3"), separated by spaces; newline is a word."""

    def __init__(self, meta):
        self.itos, self.stoi = meta['itos'], meta['stoi']
        self.n_vocab, self.stop = len(self.itos), set()

    def encode(self, text):
        words = [w for w in text.replace('\n', ' \n ').split(' ') if w]
        unknown = [w for w in words if w not in self.stoi]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a word of the reasoning task (e.g. 'a=b', 'c=3', '?a')")
        return [self.stoi[w] for w in words]

    def decode(self, ids):
        return ' '.join(self.itos[i] for i in ids).replace(' \n ', '\n').replace('\n ', '\n')


class TiktokenCodec:
    def __init__(self, enc, stop=()):
        self.enc, self.n_vocab, self.stop = enc, enc.n_vocab, set(stop)

    def encode(self, text):
        return self.enc.encode(text, allowed_special='all')

    def decode(self, ids):
        return self.enc.decode(ids)


def load(cfg):
    """(model, codec) for --init_from, with the cache kind --cache asks for."""
    source = cfg['init_from']
    if source.startswith('ouro:'):
        from ouro import ouro_tokenizer, stop_ids
        path = source.removeprefix('ouro:')
        model = MELT.from_ouro(path, cache=cfg['cache'] or 'melt')
        enc = ouro_tokenizer(path)
        return model, TiktokenCodec(enc, stop_ids(enc))
    if not os.path.isdir(source):
        raise FileNotFoundError(f"no checkpoint folder {source!r}: run python train.py first, or pass --init_from")
    model, ckpt = load_checkpoint(source, 'cpu')
    model = model.as_cache(cfg['cache'] or model.config.cache)
    meta = Data(ckpt['config']['dataset'], model.config.block_size, 'cpu').meta  # the training data's tokenizer
    if 'itos' in meta:
        return model, WordCodec(meta)
    if meta['tokenizer'] == 'gpt2':
        import tiktoken
        return model, TiktokenCodec(tiktoken.get_encoding('gpt2'))
    from ouro import ouro_tokenizer, stop_ids
    enc = ouro_tokenizer(meta['tokenizer_path'].removeprefix('ouro:'))
    return model, TiktokenCodec(enc, stop_ids(enc))


def read_prompt(cfg):
    text = cfg['start']
    if text.startswith('FILE:'):
        file = text.removeprefix('FILE:')
        if not os.path.isfile(file):
            raise FileNotFoundError(f"start file {file!r} does not exist")
        try:
            with open(file, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"start file {file!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if cfg['chat']:
        from ouro import chat_prompt
        text = chat_prompt([{'role': 'user', 'content': text}], thinking=cfg['thinking'])
    return text


def check(cfg):
    for key in ('loops', 'chunk_size', 'max_new_tokens', 'top_k'):
        if cfg[key] < 0:
            raise ValueError(f"--{key} must be >= 1 (or 0 for the default), got {cfg[key]}")
    if cfg['num_samples'] < 1:
        raise ValueError(f"--num_samples must be >= 1, got {cfg['num_samples']}")
    if not 0 < cfg['temperature'] < float('inf'):
        raise ValueError(f"--temperature must be > 0 (--top_k=1 is greedy), got {cfg['temperature']}")
    if not 0 <= cfg['exit_threshold'] <= 1:
        raise ValueError(f"--exit_threshold must be in (0, 1] (or 0 for every loop), got {cfg['exit_threshold']}")
    if cfg['cache'] not in ('', 'melt', 'loop'):
        raise ValueError(f"--cache must be 'melt' or 'loop', got {cfg['cache']!r}")
    if cfg['dtype'] not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if (cfg['chat'] or cfg['thinking']) and not cfg['init_from'].startswith('ouro:'):
        raise ValueError("--chat and --thinking use Ouro's chat format: they need --init_from=ouro:PATH")
    check_device(cfg['device'])


def main(argv):
    cfg = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    check(cfg)
    torch.manual_seed(cfg['seed'])
    model, codec = load(cfg)
    if codec.n_vocab < model.config.vocab_size:
        raise ValueError(f"the tokenizer has {codec.n_vocab} tokens, fewer than the model's vocabulary of "
                         f"{model.config.vocab_size}: sampled ids past {codec.n_vocab - 1} could not be decoded")
    model.to(cfg['device'], DTYPES[cfg['dtype']]).eval()
    loops = cfg['loops'] or model.config.n_loops
    if isinstance(codec, WordCodec) and cfg['start'] == DEFAULTS['start']:
        # the reasoning task's model only answers queries: pose held-out problems instead
        prompts, answers, hops = reason_task().eval_problems(cfg['num_samples'], seed=cfg['seed'])
        prompts = [(p.tolist(), f"  (expected {codec.itos[a]}, {h} hops)") for p, a, h in zip(prompts, answers, hops)]
        new_tokens = 1
    else:
        ids = codec.encode(read_prompt(cfg))
        if not ids:
            raise ValueError("the prompt (--start) is empty: give at least one token of text")
        prompts = [(ids, '')] * cfg['num_samples']
        new_tokens = cfg['max_new_tokens'] or model.config.block_size - len(ids) + 1  # the last one is not run
    if cfg['compile'] and cfg['exit_threshold']:
        raise ValueError("--exit_threshold stops loops per token, which a compiled step cannot; drop --compile")
    step = None
    if cfg['compile']:
        cuda = cfg['device'].startswith('cuda')
        step = torch.compile(model.decode_step, mode='reduce-overhead' if cuda else 'default', fullgraph=True)
    for ids, note in prompts:
        if len(ids) + max(new_tokens, 1) - 1 > model.config.block_size:  # the last new token is not run
            raise ValueError(f"prompt of {len(ids)} tokens + {max(new_tokens, 1)} new tokens run "
                             f"{len(ids) + max(new_tokens, 1) - 1} positions, more than block_size {model.config.block_size}")
        kv = model.new_cache(1, max_tokens=len(ids) + max(new_tokens, 1) - 1, loops=loops)  # the last token is not run
        y = model.generate(torch.tensor([ids], device=cfg['device']), new_tokens, loops=loops,
                           temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                           chunk_size=cfg['chunk_size'] or None, exit_threshold=cfg['exit_threshold'] or None,
                           stop_tokens=codec.stop, cache=kv, decode_step=step)
        print(codec.decode(y[0].tolist()) + note)
        print('---------------')
    print(memory_line(model, kv, loops))
    decode_steps = kv.length - len(ids)  # one chunk per decoded token, after the prefill's chunks
    decoded = kv.loops_run[len(kv.loops_run) - decode_steps:] if decode_steps else []
    if cfg['exit_threshold'] and decoded:
        print(f"Q-exit at q={cfg['exit_threshold']}: {sum(decoded) / len(decoded):.2f} loops per decoded token "
              f"(of {loops})")
    return kv


def memory_line(model, kv, loops):
    """Bytes the cache holds, and what the LoopLM's cache would hold for the same tokens."""
    melt = model.config.cache == 'melt'
    per_token = model.config.kv_bytes_per_token(loops, kv.buffers()[0].element_size())
    looplm = per_token * (loops if melt else 1) * kv.max_tokens
    return (f"KV cache ({'MELT' if melt else 'LoopLM'}): {kv.nbytes:,} bytes for {kv.max_tokens} tokens at {loops} "
            f"loops; a LoopLM cache would hold {looplm:,} bytes ({looplm / kv.nbytes:.1f}x)")


if __name__ == '__main__':
    run_script(main)

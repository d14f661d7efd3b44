"""
Sample from a trained model and show what its KV cache holds.

$ python sample.py                                  out/distill (the main job's MELT model)
$ python sample.py --loops 8                        any loop count, e.g. 8 on a model trained with 4
$ python sample.py --kv_sharing loop                the same weights with the LoopLM's cache, to compare
$ python sample.py --init_from=ouro:/path/to/Ouro-1.4B-Thinking --chat --thinking --start "What is 17*23?"
$ python sample.py --exit_threshold 0.9             Ouro's Q-exit: a token stops looping early
$ python sample.py --compile                        decode with compiled blocks (compiles once, 10-20 s on a CPU)

Options as --key=value or --key value.
"""
import os
from contextlib import nullcontext

import torch
from torch.nn import functional as F

from checkpoints import dataset_dir, load_checkpoint, read_meta
from configurator import DTYPES, check_choice, check_device, parse_args, read_text, run_script, torch_dtype
from data.reason import prepare as reason
from data.text.prepare import CharCodec
from ouro import chat_prompt, load_encoding, load_ouro, stop_ids

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
kv_sharing = ''  # 'melt' | 'loop'; empty: as saved ('melt' for ouro:PATH)
chunk_size = 0  # MELT's prefill chunk size; 0: the model's own
chat = False  # wrap the prompt in Ouro's ChatML (ouro:PATH)
thinking = False  # with --chat: '<think>\n' after the assistant header, for -Thinking models
exit_threshold = 0.0  # Q-exit threshold q in (0, 1]; 0: run every loop
compile = False  # decode with compiled blocks (model.compile_blocks: compiled once for every layer and loop)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def positions_run(prompt_tokens, new_tokens):
    """The positions a generation runs through the model: the prompt and every new token but
    the last, which is never run."""
    return prompt_tokens + max(new_tokens, 1) - 1


def new_cache(model, batch_size, prompt_tokens, new_tokens, loops):
    """An empty cache for one generation, checked against the model's block_size."""
    n = positions_run(prompt_tokens, new_tokens)
    if n > model.config.block_size:
        raise ValueError(f"prompt of {prompt_tokens} tokens + {max(new_tokens, 1)} new tokens run {n} positions, "
                         f"more than block_size {model.config.block_size}")
    return model.new_cache(batch_size, n, loops)


@torch.no_grad()
def generate(model, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None,
             chunk_size=None, exit_threshold=None, stop_tokens=(), cache=None, decode_step=None):
    """Prefill the prompt chunk-wise into a cache, then decode one token at a time.
    top_k=1 is greedy. The cache is sized to prompt + new tokens - 1 (the last token is
    never run); pass your own empty one (new_cache) to read cache.nbytes and cache.loops_run
    afterwards. After model.compile_blocks() decoding runs compiled and the prefill eagerly
    (its shapes change with every prompt, and its large matmuls gain little from compiling).
    decode_step: a step with fixed shapes in place of the forward, e.g. model.decode_step
    replayed as one CUDA graph (bench.py --cuda_graph). Returns idx (B, T + new tokens).
    idx may also be a list of prompts of any lengths (1-D lists or tensors): it then returns
    a list of 1-D tensors, each row equal to that prompt generated alone (generate_rows)."""
    ragged = isinstance(idx, (list, tuple))  # prompts of any lengths
    if ragged:
        prompts = [torch.as_tensor(p, dtype=torch.long, device=model.lm_head.weight.device).view(-1) for p in idx]
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate needs at least one prompt, and each prompt at least one token")
        if len(prompts) == 1:  # one row: the plain path (which also has Q-exit)
            return [generate(model, prompts[0][None], max_new_tokens, loops, temperature, top_k, chunk_size,
                             exit_threshold, stop_tokens, cache, decode_step)[0]]
        B, T = len(prompts), max(len(p) for p in prompts)
    else:
        B, T = idx.shape
    exit_threshold = exit_threshold or None  # 0, like None: every loop
    if not 0 < temperature < float('inf'):
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    if exit_threshold is not None and not 0 < exit_threshold <= 1:
        raise ValueError(f"exit_threshold must be in (0, 1] (0 or None: every loop), got {exit_threshold}")
    if exit_threshold is not None and (B != 1 or decode_step is not None):
        raise ValueError(f"exit_threshold decides per token, in the eager decode, and needs batch size 1, got {B}")
    loops = model.config.n_loops if loops is None else loops
    cache = new_cache(model, B, T, max_new_tokens, loops) if cache is None else cache
    if cache.length:
        raise ValueError(f"generate needs an empty cache, this one holds {cache.length} tokens")
    needed = positions_run(T, max_new_tokens)
    if cache.max_tokens < needed:
        raise ValueError(f"the cache holds up to {cache.max_tokens} tokens, this call runs {needed} positions")
    if ragged:
        return generate_rows(model, prompts, max_new_tokens, loops, temperature, top_k, chunk_size, stop_tokens,
                             cache, decode_step or model.decode_step)
    with torch.compiler.set_stance('force_eager') if model.blocks_compiled else nullcontext():
        logits, _ = model(idx, loops=loops, chunk_size=chunk_size, cache=cache, last_only=True)
    for step in range(max_new_tokens):
        idx_next = next_token(logits[:, -1, :], temperature, top_k)
        idx = torch.cat((idx, idx_next), dim=1)
        if step == max_new_tokens - 1 or (B == 1 and idx_next.item() in stop_tokens):
            break  # nothing more to predict: don't run the model on the last token
        if decode_step is None:
            logits, _ = model(idx_next, loops=loops, cache=cache, exit_threshold=exit_threshold)
        else:
            pos = torch.tensor([cache.length], device=idx.device)
            logits = decode_step(idx_next, cache, pos, loops).clone()  # clone: a CUDA graph reuses its output
            cache.commit(1, loops)
    return idx


def generate_rows(model, prompts, max_new_tokens, loops, temperature, top_k, chunk_size, stop_tokens, cache,
                  decode_step):
    """generate for prompts of different lengths. MELT's chunk-wise prefill depends on where
    the chunk boundaries fall, so each prompt is prefilled alone, on its own chunk grid, into
    its row of the cache; then all rows decode together, row b at its own position (one
    decode_step attends to the whole buffer through a per-row mask). A row stops at its own
    stop token; the batch at max_new_tokens, or once every row has stopped."""
    with torch.compiler.set_stance('force_eager') if model.blocks_compiled else nullcontext():
        logits = torch.cat([model(p[None], loops=loops, chunk_size=chunk_size, cache=cache.row(b), last_only=True)[0]
                            for b, p in enumerate(prompts)])  # (B, 1, V)
    pos = torch.tensor([len(p) for p in prompts], device=prompts[0].device)  # each row's next position
    rows, stopped = [p.tolist() for p in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        idx_next = next_token(logits[:, -1, :], temperature, top_k)
        for b, token in enumerate(idx_next[:, 0].tolist()):
            if not stopped[b]:
                rows[b].append(token)
                stopped[b] = token in stop_tokens
        if step == max_new_tokens - 1 or all(stopped):
            break  # a stopped row decodes on with the others, and its tokens are dropped
        logits = decode_step(idx_next, cache, pos, loops).clone()  # clone: a CUDA graph reuses its output
        pos = pos + 1
    return [torch.tensor(row, device=prompts[0].device) for row in rows]


def next_token(logits, temperature, top_k):
    """One token per row (B, 1), sampled from logits (B, V) at a temperature; top_k=1 is greedy."""
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('inf')
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


class TiktokenCodec:
    """Text to ids and back. stop: the ids that end a reply; prefix: the id an empty context
    starts from (eval.py), <|endoftext|>."""
    def __init__(self, enc, stop=()):
        self.enc, self.n_vocab, self.stop = enc, enc.n_vocab, set(stop)
        self.prefix = enc.encode_single_token('<|endoftext|>') if '<|endoftext|>' in enc.special_tokens_set else 0

    def encode(self, text):
        return self.enc.encode(text, allowed_special='all')

    def decode(self, ids):
        return self.enc.decode(ids)


def load(cfg):
    """(model, codec) for --init_from, with the K/V sharing --kv_sharing asks for."""
    source = cfg['init_from']
    if source.startswith('ouro:'):
        model, tokenizer = load_ouro(source.removeprefix('ouro:'), kv_sharing=cfg['kv_sharing'] or 'melt'), source
    else:
        model, tokenizer = load_trained(source, cfg['kv_sharing'])
        if tokenizer == 'reason':
            return model, reason.WordCodec()
        if isinstance(tokenizer, list):  # a character-level data set's alphabet
            return model, CharCodec(tokenizer)
    enc = load_encoding(tokenizer)
    return model, TiktokenCodec(enc, stop_ids(enc) if tokenizer.startswith('ouro:') else ())


def load_trained(source, kv_sharing):
    """(model, the tokenizer of its data) from an out dir of train.py: 'reason', 'gpt2', 'ouro:PATH',
    or a character-level data set's alphabet (a list)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"no checkpoint folder {source!r}: run python train.py first, or pass --init_from")
    model, ckpt = load_checkpoint(source, 'cpu')
    model = model.with_kv_sharing(kv_sharing or model.config.kv_sharing)
    if 'config' not in ckpt:
        raise ValueError(f"{source}/ckpt.pt lacks 'config' (the run's settings), so its data set's tokenizer is unknown")
    folder = dataset_dir(ckpt['config']['dataset'])
    meta = read_meta(folder)  # the training data's
    if meta['tokenizer'] == 'char':
        return model, meta['itos']
    tokenizer = meta['tokenizer'] if meta['tokenizer'] == 'reason' else meta.get('tokenizer_path', meta['tokenizer'])
    if tokenizer not in ('reason', 'gpt2') and not tokenizer.startswith('ouro:'):
        raise ValueError(f"{folder}/meta.pkl names the tokenizer {tokenizer!r}; sample.py decodes "
                         f"the reasoning task's words, characters, 'gpt2' and 'ouro:PATH' (data/text/prepare.py's tokenizers)")
    return model, tokenizer


def read_prompt(cfg):
    text = cfg['start']
    if text.startswith('FILE:'):
        text = read_text(text.removeprefix('FILE:'), f"start file {text.removeprefix('FILE:')!r}")
    if cfg['chat']:
        text = chat_prompt([{'role': 'user', 'content': text}], thinking=cfg['thinking'])
    return text


def check(cfg):
    for key in ('loops', 'chunk_size', 'max_new_tokens', 'top_k'):
        if cfg[key] < 0:
            raise ValueError(f"--{key} must be >= 1 (or 0 for the default), got {cfg[key]}")
    if cfg['num_samples'] < 1:
        raise ValueError(f"--num_samples must be >= 1, got {cfg['num_samples']}")
    check_choice('kv_sharing', cfg['kv_sharing'] or 'melt', ('melt', 'loop'))  # '' keeps the model's
    check_choice('dtype', cfg['dtype'], DTYPES)
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
    model.to(cfg['device'], torch_dtype(cfg['dtype'])).eval()
    loops = cfg['loops'] or model.config.n_loops
    if isinstance(codec, reason.WordCodec) and cfg['start'] == DEFAULTS['start']:
        # the reasoning task's model only answers queries: pose held-out problems instead
        prompts, answers, hops = reason.eval_problems(cfg['num_samples'], seed=cfg['seed'])
        prompts = [(p.tolist(), f"  (expected {reason.WORDS[a]}, {h} hops)") for p, a, h in zip(prompts, answers, hops)]
        new_tokens = cfg['max_new_tokens'] or 1  # the answer is one token
    else:
        ids = codec.encode(read_prompt(cfg))
        if not ids:
            raise ValueError("the prompt (--start) is empty: give at least one token of text")
        prompts = [(ids, '')] * cfg['num_samples']
        new_tokens = cfg['max_new_tokens'] or model.config.block_size - len(ids) + 1  # the last one is not run
    if cfg['compile']:
        model.compile_blocks()
    for ids, note in prompts:
        cache = new_cache(model, 1, len(ids), new_tokens, loops)
        y = generate(model, torch.tensor([ids], device=cfg['device']), new_tokens, loops=loops,
                           temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                           chunk_size=cfg['chunk_size'] or None, exit_threshold=cfg['exit_threshold'],
                           stop_tokens=codec.stop, cache=cache)
        print(codec.decode(y[0].tolist()) + note)
        print('---------------')
    print(memory_line(model, cache, loops))
    decode_steps = cache.length - len(ids)  # one chunk per decoded token, after the prefill's chunks
    decoded = cache.loops_run[len(cache.loops_run) - decode_steps:] if decode_steps else []
    if cfg['exit_threshold'] and decoded:
        print(f"Q-exit at q={cfg['exit_threshold']}: {sum(decoded) / len(decoded):.2f} loops per decoded token "
              f"(of {loops})")
    return cache


def memory_line(model, cache, loops):
    """Bytes the cache holds, and what the LoopLM's cache would hold for the same tokens."""
    melt = model.config.kv_sharing == 'melt'
    per_token = model.config.kv_bytes_per_token(loops, cache.buffers()[0].element_size())
    looplm = per_token * (loops if melt else 1) * cache.max_tokens
    return (f"KV cache ({'MELT' if melt else 'LoopLM'}): {cache.nbytes:,} bytes for {cache.max_tokens} tokens at {loops} "
            f"loops; a LoopLM cache would hold {looplm:,} bytes ({looplm / cache.nbytes:.1f}x)")


if __name__ == '__main__':
    run_script(main)

"""
Three measurements of MELT against the LoopLM, each printed as a small table:

1. KV-cache memory, counted from a cache filled on the meta device (no weights, no compute):
   bytes per token and at a context length, for loops 1, 2, 4, 8, 16.
2. Decoding: a long prompt plus new tokens, at loops 4 and 8, MELT vs LoopLM with the same
   weights: peak resident memory (each run in its own process), tokens/s, and their ratios.
3. Training step time of MELT's chunk-wise forward for chunk sizes 1, 16, 64, 256 against
   the LoopLM's parallel step.

$ python bench.py                                   all three, on the tiny model (CPU: ~2 min)
$ python bench.py --model=ouro-1.4b --only=memory   the paper's memory figures (bf16, 32,000 tokens)
$ python bench.py --model=out/distill               a checkpoint's shape
"""
import json
import os
import subprocess
import sys
import time

import torch

from melt import MELT, MELTConfig
from train import parse_args

# -----------------------------------------------------------------------------
model = 'tiny'  # tiny | ouro-1.4b | ouro-2.6b | an out dir of train.py | ouro:PATH (its config.json)
only = ''  # '' (all) | memory | decode | train
context = 32_000  # tokens for the memory table's totals (the paper's "32K" is 32,000: 6.29 GB)
bytes_per_element = 2  # bf16, as the paper counts
prompt_tokens = 2048
new_tokens = 64
train_tokens = 256
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

OURO = dict(vocab_size=49152, block_size=65536, n_head=16, n_kv_head=16, n_embd=2048, n_hidden=5632,
            n_loops=4, rope_theta=1e6, norm_eps=1e-6)
SHAPES = {
    'tiny': dict(vocab_size=512, block_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, n_hidden=704, n_loops=4),
    'ouro-1.4b': dict(OURO, n_layer=24),
    'ouro-2.6b': dict(OURO, n_layer=48),
}


def model_shape(name):
    """MELTConfig fields of a named shape, an out dir or an Ouro folder."""
    if name in SHAPES:
        return dict(SHAPES[name])
    if name.startswith('ouro:'):
        from ouro import read_ouro_config
        return read_ouro_config(name.removeprefix('ouro:'))
    ckpt_file = os.path.join(name, 'ckpt.pt')
    if not os.path.isfile(ckpt_file):
        raise FileNotFoundError(f"--model={name}: expected tiny, ouro-1.4b, ouro-2.6b, ouro:PATH or a folder with ckpt.pt")
    return torch.load(ckpt_file, map_location='cpu', weights_only=False)['model_args']


def meta_model(shape, cache, dtype):
    with torch.device('meta'):
        return MELT(MELTConfig(**{**shape, 'cache': cache, 'block_size': 16})).to(dtype)


def memory_table(shape, context, element):
    """Fills a cache with a few tokens on the meta device and counts the bytes it holds."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[element]
    print(f"\n1. KV cache, {element}-byte elements, at {context:,} tokens (MB and GB are 10^6 and 10^9 bytes)")
    models = {cache: meta_model(shape, cache, dtype) for cache in ('melt', 'loop')}
    for cache, m in models.items():
        print(f"   weights ({'MELT' if cache == 'melt' else 'LoopLM'}): {m.get_num_params() * element / 1e9:.3f} GB")
    print(f"   {'loops':>5} {'MELT MB/token':>14} {'LoopLM MB/token':>16} {'MELT GB':>9} {'LoopLM GB':>10} {'ratio':>6}")
    rows = []
    tokens = 4
    for loops in (1, 2, 4, 8, 16):
        per_token = {}
        for cache, m in models.items():
            kv = m.new_cache(1, loops)
            m(torch.zeros(1, tokens, dtype=torch.long, device='meta'), loops=loops, cache=kv)
            per_token[cache] = kv.nbytes / tokens
        melt_b, loop_b = per_token['melt'], per_token['loop']
        rows.append((loops, melt_b, loop_b))
        print(f"   {loops:>5} {melt_b / 1e6:>14.3f} {loop_b / 1e6:>16.3f} {melt_b * context / 1e9:>9.2f} "
              f"{loop_b * context / 1e9:>10.2f} {loop_b / melt_b:>5.1f}x")
    return rows


DECODE_CHILD = r'''
import json, sys, time, torch
from melt import MELT, MELTConfig
def peak():
    return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
shape, cache, loops, prompt, new, device = json.loads(sys.argv[1])
torch.manual_seed(0)
model = MELT(MELTConfig(**{**shape, 'cache': 'melt'})).to(device).eval().as_cache(cache)
idx = torch.randint(0, shape['vocab_size'], (1, prompt), device=device)
with torch.no_grad():
    model(idx[:, :8], loops=1)  # warm up kernels outside the measurement
before = peak()
if device.startswith('cuda'):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
kv = model.new_cache(1, loops)
t0 = time.time()
out = model.generate(idx, new, loops=loops, top_k=1, chunk_size=64, cache=kv)
if device.startswith('cuda'):
    torch.cuda.synchronize()
seconds = time.time() - t0
cuda_peak = torch.cuda.max_memory_allocated() if device.startswith('cuda') else 0
print(json.dumps({'rss': peak() - before, 'cache': kv.nbytes, 'seconds': seconds, 'cuda': cuda_peak}))
'''


def decode_table(shape, prompt, new, device):
    print(f"\n2. Decoding {prompt:,} prompt + {new} new tokens, greedy, same weights; one process per run "
          f"(peak RSS grown during the run)")
    head = f"   {'loops':>5} {'cache':>6} {'KV MB':>8} {'peak RSS MB':>12} {'tokens/s':>9}"
    print(head + ('  peak CUDA MB' if device.startswith('cuda') else ''))
    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for loops in (4, 8):
        for cache in ('melt', 'loop'):
            arg = json.dumps([shape, cache, loops, prompt, new, device])
            run = subprocess.run([sys.executable, '-c', DECODE_CHILD, arg], capture_output=True, text=True, cwd=here)
            if run.returncode:
                raise RuntimeError(run.stderr[-2000:])
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r['tps'] = (prompt + new) / r['seconds']
            results[loops, cache] = r
            print(f"   {loops:>5} {cache:>6} {r['cache'] / 1e6:>8.2f} {r['rss'] / 1e6:>12.1f} {r['tps']:>9.1f}"
                  + (f"  {r['cuda'] / 1e6:>12.1f}" if device.startswith('cuda') else ''))
        m, lp = results[loops, 'melt'], results[loops, 'loop']
        print(f"   {loops:>5} {'ratio':>6} {lp['cache'] / m['cache']:>7.1f}x {lp['rss'] / max(m['rss'], 1):>11.1f}x "
              f"{m['tps'] / lp['tps']:>8.2f}x   (LoopLM / MELT memory, MELT / LoopLM speed)")
    return results


def train_table(shape, tokens, device, batch=4):
    print(f"\n3. Training step (forward + backward), batch {batch} x {tokens} tokens, {shape['n_loops']} loops")
    print(f"   {'mode':<16} {'ms/step':>9} {'vs LoopLM':>10}")
    torch.manual_seed(0)
    base = MELT(MELTConfig(**{**shape, 'cache': 'melt', 'block_size': max(tokens, 16)})).to(device)
    x = torch.randint(0, shape['vocab_size'], (batch, tokens), device=device)
    rows = []
    for name, m, chunk in [('LoopLM parallel', base.as_cache('loop'), None)] + \
                          [(f'MELT chunk {c}', base, c) for c in (1, 16, 64, 256) if c <= tokens]:
        times = []
        for _ in range(2):  # the first step warms up; the second is timed
            t0 = time.time()
            _, loss = m(x, x, chunk_size=chunk)
            loss.backward()
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        rows.append((name, times[-1]))
        print(f"   {name:<16} {times[-1] * 1000:>9.1f} {times[-1] / rows[0][1]:>9.1f}x")
    return rows


def main(argv):
    cfg = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    if cfg['only'] not in ('', 'memory', 'decode', 'train'):
        raise ValueError(f"--only must be memory, decode or train, got {cfg['only']!r}")
    if cfg['bytes_per_element'] not in (2, 4):
        raise ValueError(f"--bytes_per_element must be 2 (bf16) or 4 (fp32), got {cfg['bytes_per_element']}")
    shape = model_shape(cfg['model'])
    shape = {k: v for k, v in shape.items() if k not in ('cache', 'chunk_size', 'gate_bias_init')}
    print(f"model {cfg['model']}: {shape['n_layer']} layers, d={shape['n_embd']}, {shape['n_kv_head']} KV heads "
          f"of {shape['n_embd'] // shape['n_head']}, trained loops {shape['n_loops']}")
    if cfg['only'] in ('', 'memory'):
        memory_table(shape, cfg['context'], cfg['bytes_per_element'])
    small = shape['n_embd'] * shape['n_layer'] <= 4096 or cfg['device'].startswith('cuda')
    if cfg['only'] in ('', 'decode'):
        if small:
            need = cfg['prompt_tokens'] + cfg['new_tokens']
            decode_table({**shape, 'block_size': max(shape['block_size'], need)}, cfg['prompt_tokens'],
                         cfg['new_tokens'], cfg['device'])
        else:
            print("\n2. (decoding skipped: random weights of this size are for a GPU; use --device=cuda)")
    if cfg['only'] in ('', 'train'):
        if small:
            train_table(shape, cfg['train_tokens'], cfg['device'])
        else:
            print("\n3. (training step skipped for this size on CPU; use --device=cuda)")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

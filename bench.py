"""
What a user asks of MELT against the LoopLM, as small tables:

1. KV-cache memory, counted from a cache allocated on the meta device (no weights, no
   compute): bytes per token and at a context length, for loops 1, 2, 4, 8, 16; and how many
   sequences of that length fit in 80 GB for MELT and for the LoopLM.
2. Generation: a long prompt prefilled chunk-wise, then greedy decoding, for each model (MELT, LoopLM) and
   loop count, each run in a process of its own. Peak memory of the prefill and of the
   decode (RSS on CPU, the CUDA peak on GPU) next to weights + KV, prefill seconds and decode
   ms/token (on GPU also the bandwidth limit: bytes read per token / 4.8 TB/s).
3. Training steps of each phase (loop, transition, distill) at a real vocabulary, with and
   without activation checkpointing: time, tokens/s, TFLOP/s (MFU on a GPU), peak memory
   (bytes allocated, and RSS) and bytes per token, each in a process of its own.
4. A training step of MELT's chunk-wise forward for several chunk sizes against the
   LoopLM's parallel step: time and peak memory.
5. Compiling (--only=compile): model.compile_blocks on 24 layers x 4 loops, in a fresh
   process with an empty compile cache: seconds to the first tokens, to a generation of
   another length, compiled against eager decoding, and whether their tokens are equal.
6. train.py itself (--only=train_script): each phase at Ouro's vocabulary, with and without
   activation checkpointing, as a process of its own: its peak RSS, s/iter, first loss.
7. Batched generation (--only=batch): prompts of different lengths in one generate call at
   batch 1, 8 and 32 against one call per prompt, tokens/s, for MELT and the LoopLM.
8. A memory budget (--only=budget): the largest batch of --context-token sequences that fits
   --memory_budget GB, from peaks measured at batch 1 and 2 (then run, its peak checked),
   and the decode tokens/s at that batch: the memory MELT saves becomes batch, and batch
   becomes throughput.
9. Long prefill (--only=prefill): MELT's prefill at --prefill_contexts tokens, what it holds
   beyond the weights and the cache, and its time per token.
10. The longest context (--only=context): for MELT and the LoopLM at each loop count, the
   longest prompt whose prefill and --new_tokens decode steps fit --memory_budget GB, found by
   running it.

$ python bench.py                                   1 to 4 on the tiny model (CPU: ~5 min)
$ python bench.py --only=compile
$ python bench.py --only=train_script                 train.py's peak RSS per phase (1 thread: ~6 min)
$ python bench.py --only=batch --prompt_tokens=128 --new_tokens=16
$ python bench.py --only=generate --prompt_tokens=4096 --loops=4
$ python bench.py --only=budget --layers=2 --context=8192 --new_tokens=16 --memory_budget=2 --loops=4
$ python bench.py --model=ouro-1.4b --device=cuda --only=budget --memory_budget=80 --loops=4   (32,000 tokens)
$ python bench.py --model=mini --only=prefill --prefill_chunk=1024 --threads=1    8K, 32K, 128K tokens (~10 min)
$ python bench.py --only=context --memory_budget=0.45 --new_tokens=4 --loops=1,4,8
$ python bench.py --model=ouro-1.4b --device=cuda --only=context --memory_budget=139 --loops=4 --prefill_chunk=4096
$ python bench.py --model=ouro-1.4b --only=memory   the paper's memory figures (bf16, 32,000 tokens)
$ python bench.py --model=ouro-1.4b --device=cuda --only=generate --prompt_tokens=32000 --new_tokens=12 --cuda_graph
$ python bench.py --model=ouro-1.4b --layers=1 --only=phases --train_tokens=256   the 1.4B width, one layer, on a CPU
$ python bench.py --model=out/distill               a checkpoint's shape
"""
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

import phases
from checkpoints import read_checkpoint
from configurator import check_device, parse_args, run_script
from melt import MAX_LOOPS, MELT, MELTConfig, check_fits
from sample import generate

# -----------------------------------------------------------------------------
model = 'tiny'  # tiny | ouro-1.4b | ouro-2.6b | an out dir of train.py | ouro:PATH (its config.json)
only = ''  # '' (1 to 4) | memory | generate | train (3 and 4) | phases (3) | compile | train_script | batch (7) | budget (8)
#          | prefill (9) | context (10)
context = 32_000  # tokens for the memory table's totals (the paper's "32K" is 32,000: 6.29 GB)
bytes_per_element = 2  # bf16, as the paper counts
prompt_tokens = 2048
new_tokens = 64
prefill_chunk = 64  # the prefill's chunk size (exact for the LoopLM, MELT's trained-on grid for MELT)
loops = ''  # generation's loop counts, e.g. '4' or '1,4,8'; '' = 1,4,8
kv_sharing = 'melt,loop'  # generation's models: melt (one gated K/V per layer), loop (the LoopLM)
train_tokens = 1024
train_batch = 1
train_vocab = 49152  # the training steps' vocabulary (Ouro's), whatever the model's; 0: the model's
layers = 0  # a model of this many layers at the model's width (0: the model's own)
threads = 0  # torch threads on CPU; 0 = torch's default
compile = False  # generation: decode through compiled blocks (model.compile_blocks)
cuda_graph = False  # generation on GPU: replay model.decode_step captured as one CUDA graph (with --compile too)
memory_budget = 80.0  # GB (10^9 bytes) for --only=budget and context: the process's peak RSS on CPU, CUDA's allocated on GPU
prefill_contexts = '8192,32768,131072'  # --only=prefill's prompt lengths
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

OURO = dict(vocab_size=49152, block_size=65536, n_head=16, n_kv_head=16, n_embd=2048, n_hidden=5632,
            n_loops=4, rope_theta=1e6, norm_eps=1e-6)
SHAPES = {
    'tiny': dict(vocab_size=512, block_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, n_hidden=704, n_loops=4),
    'mini': dict(vocab_size=512, block_size=4096, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, n_hidden=176, n_loops=2),
    'ouro-1.4b': dict(OURO, n_layer=24),
    'ouro-2.6b': dict(OURO, n_layer=48),
}
HBM_BYTES_PER_S = 4.8e12  # H200
SERVING_BYTES = 80e9
COMPILE_SHAPE = dict(vocab_size=512, block_size=1024, n_layer=24, n_head=4, n_kv_head=4, n_embd=64, n_hidden=176,
                     n_loops=4)


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM)."""
    with open('/proc/self/status') as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM')][0]


def reset_peak_rss():
    """Start a new peak from what is resident now (Linux: 5 > /proc/self/clear_refs). First
    glibc gives back the heap memory already freed (malloc_trim): else a block freed before
    (RoPE's tables are made through temporaries as long as the context) would count in the
    base and then serve the cache or the prefill without adding to the peak."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return peak_rss()


def reset_peak(cuda):
    """Start a new peak, CUDA's or the RSS's; returns the bytes held now."""
    if not cuda:
        return reset_peak_rss()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def model_shape(name):
    """MELTConfig fields of a named shape, an out dir or an Ouro folder."""
    if name in SHAPES:
        return dict(SHAPES[name])
    if name.startswith('ouro:'):
        from ouro import read_ouro_config
        return read_ouro_config(name.removeprefix('ouro:'))
    if not os.path.isfile(os.path.join(name, 'ckpt.pt')):
        raise FileNotFoundError(f"--model={name}: expected tiny, ouro-1.4b, ouro-2.6b, ouro:PATH or a folder with ckpt.pt")
    return read_checkpoint(name, 'cpu')['model_args']


def build(shape, kv_sharing, device, dtype, seed=0):
    """A model of `shape` with random weights, made on `device` directly."""
    torch.manual_seed(seed)
    with torch.device(device):
        return MELT(MELTConfig(**{**shape, 'kv_sharing': kv_sharing})).to(dtype)


def weight_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def memory_table(shape, context, element):
    """Allocates caches on the meta device and counts the bytes they hold."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[element]
    print(f"\n1. KV cache, {element}-byte elements, at {context:,} tokens (MB and GB are 10^6 and 10^9 bytes)")
    shape = {**shape, 'block_size': max(shape['block_size'], context)}
    models = {kv_sharing: build(shape, kv_sharing, 'meta', dtype) for kv_sharing in ('melt', 'loop')}
    weights = {kv_sharing: weight_bytes(m) for kv_sharing, m in models.items()}
    for kv_sharing, m in models.items():
        print(f"   weights ({'MELT' if kv_sharing == 'melt' else 'LoopLM'}): {weights[kv_sharing] / 1e9:.3f} GB")
    print(f"   {'loops':>5} {'MELT MB/token':>14} {'LoopLM MB/token':>16} {'MELT GB':>9} {'LoopLM GB':>10} {'ratio':>6}"
          f"  {SERVING_BYTES / 1e9:.0f} GB holds, MELT / LoopLM")
    rows = []
    for n in (1, 2, 4, 8, 16):
        held = {k: m.new_cache(1, max_tokens=context, loops=n).nbytes for k, m in models.items()}
        fits = {k: max(0, int((SERVING_BYTES - weights[k]) // held[k])) for k in held}
        rows.append((n, held['melt'] / context, held['loop'] / context))
        print(f"   {n:>5} {held['melt'] / context / 1e6:>14.3f} {held['loop'] / context / 1e6:>16.3f} "
              f"{held['melt'] / 1e9:>9.2f} {held['loop'] / 1e9:>10.2f} {held['loop'] / held['melt']:>5.1f}x"
              f"  {fits['melt']:>4} / {fits['loop']} sequences")
    return rows


def cuda_graph_step(model, cache, loops):
    """model.decode_step captured once as a CUDA graph for this cache: each token then replays
    all its kernels with one launch (what compile's reduce-overhead mode adds, here without
    the compile). Capture before the prefill: its warm-up run writes row 0 of the cache."""
    device = cache.buffers()[0].device
    idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.decode_step(idx, cache, pos, loops)  # warm-up: kernels chosen, workspaces made
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode_step(idx, cache, pos, loops)

    def step(new_idx, cache_, new_pos, loops_):
        idx.copy_(new_idx)
        pos.copy_(new_pos)
        graph.replay()
        return logits
    return step


def measure_generate(shape, kv_sharing, loops, prompt, new, chunk, device, compiled, batch=1, tensors=False):
    """One generation run of `batch` prompts; returns what it measured (bytes and seconds).
    Run in a fresh process: a peak belongs to the process. With tensors (CPU), the prefill
    runs once more, into a new cache, under the profiler: 'prefill_tensors' is the peak of the
    bytes its tensors held beyond the weights and the cache, free of the allocator's slack."""
    cuda = device.startswith('cuda')
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build({**shape, 'block_size': max(shape['block_size'], prompt + new)}, kv_sharing, device, dtype).eval()
    idx = torch.randint(0, shape['vocab_size'], (batch, prompt), device=device)
    step = None
    if 'compile' in compiled:  # decoding through compiled blocks (the prefill stays eager, as in generate)
        model.compile_blocks()
    with torch.no_grad():  # warm up kernels (and compile, whose graphs are for the cache's size) outside the measurement
        warm_prompt = min(prompt, 2 * chunk)  # two chunks: one alone, one after it, at the prefill's shapes
        warm = model.new_cache(1, max_tokens=prompt + new - 1 if compiled else warm_prompt + 3, loops=loops)
        generate(model, idx[:1, :warm_prompt], 4, loops=loops, top_k=1, chunk_size=chunk, cache=warm)
        del warm

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def now_peak():
        sync()
        return torch.cuda.max_memory_allocated() if cuda else peak_rss()

    base = reset_peak(cuda)  # weights (and, on CPU, the process) before the cache exists
    cache = model.new_cache(batch, max_tokens=prompt + new - 1, loops=loops)
    if 'cuda_graph' in compiled:
        with torch.no_grad():
            step = cuda_graph_step(model, cache, loops)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.compiler.set_stance('force_eager') if model.blocks_compiled else nullcontext():
        logits, _ = model(idx, loops=loops, chunk_size=chunk, cache=cache, last_only=True)
    prefill_peak, prefill_s = now_peak(), time.perf_counter() - t0
    reset_peak(cuda)
    times = []
    with torch.no_grad():
        for _ in range(new - 1):
            t0 = time.perf_counter()
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
            if step is None:
                logits, _ = model(nxt, loops=loops, cache=cache)
            else:
                logits = step(nxt, cache, torch.tensor([cache.length], device=device), loops).clone()
                cache.commit(1, loops)
            sync()
            times.append(time.perf_counter() - t0)
    decode_peak = now_peak()
    times = sorted(times[1:] or times)  # the first step after the prefill may still warm up
    run = {'weights': weight_bytes(model), 'kv': cache.nbytes, 'base': base, 'prefill_peak': prefill_peak,
           'decode_peak': decode_peak, 'prefill_s': prefill_s, 'decode_ms': 1000 * times[len(times) // 2], 'cuda': cuda}
    if tensors:
        del cache
        again = model.new_cache(batch, max_tokens=prompt + new - 1, loops=loops)
        run['prefill_tensors'] = peak_allocated(torch.no_grad()(lambda: model(idx, loops=loops, chunk_size=chunk,
                                                                              cache=again, last_only=True)))
    return run


def read_bytes_per_token(shape, kv_sharing, loops, context, weights, element):
    """A decode step reads every layer's weights once per loop, the head once, and the KV
    cache: MELT's whole cache at every loop, the LoopLM's loop-t cache at loop t."""
    d, V = shape['n_embd'], shape['vocab_size']
    layer_weights = weights - 2 * V * d * element - (d + 1) * element
    kv_row = 2 * shape['n_layer'] * shape['n_kv_head'] * (d // shape['n_head']) * element
    return layer_weights * loops + V * d * element + kv_row * context * loops


def run_child(kind, *args, env=None):
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', json.dumps([kind, *args])],
                         capture_output=True, text=True, cwd=here, env={**os.environ, **(env or {})})
    last = (run.stderr.strip().splitlines() or [''])[-1]
    if run.returncode and last.startswith('error: '):  # a size or a value the child refused: its one line
        raise ValueError(f"{last.removeprefix('error: ')} (bench child {kind} {args[1:]})")
    if run.returncode:
        raise ChildProcessError(f"bench child {kind} {args[1:]} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def generate_table(shape, prompt, new, chunk, loop_counts, kv_sharings, device, compiled):
    cuda = device.startswith('cuda')
    where = 'peak CUDA memory allocated' if cuda else 'peak RSS grown past the process with its weights'
    print(f"\n2. Generation: {prompt:,}-token prompt (MELT prefills in chunks of {chunk}), then {new} greedy tokens; "
          f"{compiled.replace('_', ' ') or 'eager'} decode; one process per row; MB = 10^6 bytes; {where}")
    print(f"   {'loops':>5} {'mode':>6} {'weights':>8} {'KV':>8} {'prefill peak':>13} {'decode peak':>12} "
          f"{'beyond W+KV':>12} {'prefill s':>10} {'decode ms/token':>16}" + ('  bandwidth limit ms' if cuda else ''))
    rows = {}
    for n in loop_counts:
        for kv_sharing in kv_sharings:
            r = run_child('generate', shape, kv_sharing, n, prompt, new, chunk, device, compiled)
            # a CUDA peak counts everything allocated, weights included; an RSS peak is taken
            # from the process with its weights loaded (torch's own libraries are not ours)
            peaks = (r['prefill_peak'], r['decode_peak']) if cuda else \
                (r['prefill_peak'] - r['base'], r['decode_peak'] - r['base'])
            r['beyond'] = max(peaks) - r['kv'] - (r['weights'] if cuda else 0)
            if cuda:
                r['ratio'] = max(peaks) / (r['weights'] + r['kv'])
                r['limit_ms'] = 1000 * read_bytes_per_token(shape, kv_sharing, n, prompt, r['weights'], 2) / HBM_BYTES_PER_S
            rows[n, kv_sharing] = r
            print(f"   {n:>5} {kv_sharing:>6} {r['weights'] / 1e6:>8.1f} {r['kv'] / 1e6:>8.1f} {peaks[0] / 1e6:>13.1f} "
                  f"{peaks[1] / 1e6:>12.1f} {r['beyond'] / 1e6:>12.1f} {r['prefill_s']:>10.2f} {r['decode_ms']:>16.2f}"
                  + (f"  {r['limit_ms']:>18.2f}" if cuda else ''), flush=True)
    if cuda:
        print("   peak / (weights + KV): " + ', '.join(f"{kv_sharing} {n}: {r['ratio']:.3f}" for (n, kv_sharing), r in rows.items()))
    return rows


def peak_allocated(step):
    """Run step() under torch's profiler and return the peak of the bytes its tensors held
    at once on the CPU (the profiler's allocation events, added up in time order): the
    CPU counterpart of torch.cuda.max_memory_allocated, free of the allocator's slack."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def measure_train(shape, kv_sharing, chunk, tokens, batch, device):
    """Forward + backward in a fresh process: the peak memory the first step added (RSS or
    CUDA), on CPU the peak bytes allocated by a second (peak_allocated), and the faster of
    two more steps' seconds."""
    cuda = device.startswith('cuda')
    model = build({**shape, 'block_size': max(shape['block_size'], tokens)}, 'melt', device, torch.float32)
    model = model.with_kv_sharing(kv_sharing)
    phases.check_batch_fits(batch, tokens, model.config, model.config.n_loops, device)
    x = torch.randint(0, shape['vocab_size'], (batch, tokens), device=device)
    _, loss = model(x[:, :16], x[:, :16], chunk_size=min(chunk or 16, 16))  # load kernels
    loss.backward()
    model.zero_grad(set_to_none=False)  # gradients are allocated, as in training
    del loss, _

    def step():
        _, loss = model(x, x, chunk_size=chunk)
        loss.backward()

    base = reset_peak(cuda)
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    allocated = peak - base if cuda else peak_allocated(step)
    times = []
    for _ in range(2):  # timed apart from the first, which still sets up kernels and buffers
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {'seconds': min(times), 'peak': peak - base, 'allocated': allocated}


# what phase_loss and AdamW read of train.py's settings (its defaults; a step's cost does not depend
# on the loss weights); a real vocabulary's data has no depths, so Ouro's objective
STEP_SETTINGS = dict(objective='ouro', exit_beta=0.1, exit_weight=0.1, kd_weight=0.0, distill_beta=0.1,
                     learning_rate=3e-3, gate_lr=1e-2, weight_decay=0.0, beta1=0.9, beta2=0.95)


def measure_phase_step(shape, phase, checkpointing, tokens, batch, device):
    """One training step of a phase as train.py runs it (its phase_loss, backward, AdamW), in a
    fresh process: seconds, the peak RSS (or CUDA memory) the step adds beyond the weights,
    gradients and AdamW state, on CPU also the peak bytes its forward and backward allocate
    (peak_allocated; AdamW's own temporaries, as large as the largest weight, left out), and
    the model FLOPs per token (train.py's count)."""
    cuda = device.startswith('cuda')
    cfg = dict(STEP_SETTINGS, phase=phase, loops=shape['n_loops'], block_size=tokens,
               chunk_size=min(shape.get('chunk_size', 64), tokens))
    alpha = {'loop': 0.0, 'transition': 0.5, 'distill': 1.0}[phase]  # the transition half way: both caches
    model = build({**shape, 'block_size': tokens}, 'loop' if phase == 'loop' else 'melt', device, torch.float32)
    model.recompute_blocks = checkpointing
    teacher = build({**shape, 'block_size': tokens}, 'loop', device, torch.float32, seed=1).requires_grad_(False) \
        if phases.uses_teacher(cfg) else None
    optimizer = phases.configure_optimizers(model, cfg, 'cuda' if cuda else 'cpu')
    phases.check_batch_fits(batch, tokens, model.config, shape['n_loops'], device)
    x = torch.randint(0, shape['vocab_size'], (batch, tokens), device=device)
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()

    def forward_backward():
        with ctx:
            loss, _ = phases.phase_loss(cfg, model, teacher, (x, x, None), alpha)
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, so a step's peak is its activations

    step()  # gradients and the optimizer's state are allocated, kernels are loaded
    base = reset_peak(cuda)
    times = []
    for _ in range(2):  # the faster of two steps: one is noise on a shared machine
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    return {'seconds': seconds, 'peak': peak, 'allocated': peak if cuda else peak_allocated(forward_backward),
            'flops_per_token': phases.step_flops_per_token(cfg, model, teacher, alpha),
            'device_name': torch.cuda.get_device_name() if cuda else 'cpu'}


def phase_table(shape, tokens, batch, device):
    cuda = device.startswith('cuda')
    n = batch * tokens
    print(f"\n3. Training steps by phase: batch {batch} x {tokens} tokens, vocab {shape['vocab_size']:,}, "
          f"{shape['n_loops']} loops, MELT in chunks of {min(shape.get('chunk_size', 64), tokens)}; forward, backward "
          f"and AdamW; one process per row; peak {'CUDA memory allocated' if cuda else 'bytes allocated (forward and backward) and RSS'} "
          f"grown during the step, beyond weights, gradients and AdamW state (MB = 10^6 bytes)")
    print(f"   {'phase':<11} {'recompute':>9} {'ms/step':>9} {'tok/s':>7} {'throughput':>26} {'allocated':>10} "
          f"{'bytes/token':>12}" + ('' if cuda else f" {'RSS':>8}"))
    rows = {}
    for phase in ('loop', 'transition', 'distill'):
        for checkpointing in (False, True):
            r = run_child('phase', shape, phase, checkpointing, tokens, batch, device)
            rows[phase, checkpointing] = r
            tok_s = n / r['seconds']
            speed = phases.utilisation(r['flops_per_token'] * tok_s, device) if cuda else \
                f"{r['flops_per_token'] * tok_s / 1e12:.3f} TFLOP/s"
            print(f"   {phase:<11} {'on' if checkpointing else 'off':>9} {r['seconds'] * 1000:>9.0f} {tok_s:>7,.0f} "
                  f"{speed:>26} {r['allocated'] / 1e6:>10.1f} {r['allocated'] / n:>12,.0f}"
                  + ('' if cuda else f" {r['peak'] / 1e6:>8.1f}"), flush=True)
    return rows


# train.py's flags for table 6: the 4-layer, d=256 model at Ouro's vocabulary, 2 x 512 tokens in chunks of 64
TRAIN_SCRIPT_FLAGS = ['--n_layer=4', '--n_embd=256', '--batch_size=2', '--block_size=512', '--chunk_size=64',
                      '--loops=4', '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1',
                      '--always_save_checkpoint']


def measure_train_script(args, threads):
    """python train.py args, a process of its own: its output and its peak RSS (wait4's ru_maxrss)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        child = subprocess.Popen([sys.executable, os.path.join(here, 'train.py'), *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise ChildProcessError(f"train.py {' '.join(args)} failed:\n{err.read()[-3000:]}")
        return {'out': out.read(), 'peak': usage.ru_maxrss * 1024}  # Linux gives kilobytes


def write_random_tokens(folder, vocab_size, n_train=200_000, n_val=20_000):
    """A data set of random token ids (train.bin, val.bin, meta.pkl), for measuring only."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': vocab_size, 'tokenizer': 'random'}, f)


def train_script_table(vocab_size, threads):
    print(f"\n6. train.py itself: {' '.join(TRAIN_SCRIPT_FLAGS)}, vocab {vocab_size:,} (random tokens), "
          f"{threads} thread(s); each phase a process of its own; its peak RSS (MB = 10^6 bytes)")
    print(f"   {'phase':<11} {'recompute':>9} {'peak RSS':>9} {'s/iter':>7}  first loss")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_tokens(tmp, vocab_size)
        for checkpointing in (False, True):
            out = os.path.join(tmp, f'out{int(checkpointing)}')
            sources = {'loop': [], 'transition': [f'--init_from={out}/loop'],
                       'distill': [f'--init_from={out}/transition', f'--teacher={out}/loop']}
            for phase, source in sources.items():
                args = TRAIN_SCRIPT_FLAGS + source + [f'--phase={phase}', f'--dataset={tmp}', f'--out_dir={out}/{phase}',
                                                      f'--activation_checkpointing={checkpointing}', '--device=cpu']
                r = measure_train_script(args, threads)
                losses = re.findall(r'^iter (\d+): loss ([\d.]+).*?([\d.]+) ms/iter', r['out'], re.M)
                rows[phase, checkpointing] = r
                print(f"   {phase:<11} {'on' if checkpointing else 'off':>9} {r['peak'] / 1e6:>9,.0f} "
                      f"{min(float(ms) for _, _, ms in losses) / 1000:>7.1f}  {losses[0][1]}", flush=True)
    return rows


def measure_compile(shape, kv_sharing, device):
    """model.compile_blocks in a fresh process (its compile cache empty, see compile_table):
    seconds to the first tokens, then for a generation of another length, against eager."""
    from torch._dynamo.utils import counters
    model = build(shape, kv_sharing, device, torch.float32).eval()
    first, other = (torch.randint(0, shape['vocab_size'], (1, n), device=device) for n in (100, 37))

    def timed(prompt, new):
        t0 = time.perf_counter()
        out = generate(model, prompt, new, top_k=1)
        return out, time.perf_counter() - t0
    timed(first, 8)  # eager kernels warmed up
    eager_first, _ = timed(first, 64)
    eager_other, eager_s = timed(other, 80)
    model.compile_blocks()
    _, first_s = timed(first, 2)  # compiles, prefills (eagerly) and decodes one token
    compiled_first, _ = timed(first, 64)
    compiled_other, other_s = timed(other, 80)
    return {'first_s': first_s, 'other_s': other_s, 'eager_s': eager_s, 'graphs': counters['stats']['unique_graphs'],
            'equal': torch.equal(eager_first, compiled_first) and torch.equal(eager_other, compiled_other)}


def compile_table(device):
    shape = COMPILE_SHAPE
    print(f"\n5. Compiling: model.compile_blocks(), {shape['n_layer']} layers x {shape['n_loops']} loops, d={shape['n_embd']}; "
          f"each row a fresh process with an empty compile cache; prompts of 100 then 37 tokens, greedy")
    print(f"   {'mode':>6} {'graphs':>6} {'compile + first tokens s':>25} {'80 tokens, another length s':>28} "
          f"{'the same eager s':>17} {'tokens equal':>13}")
    rows = {}
    for kv_sharing in ('melt', 'loop'):
        with tempfile.TemporaryDirectory() as cache_dir:
            r = run_child('compile', shape, kv_sharing, device, env={'TORCHINDUCTOR_CACHE_DIR': cache_dir})
        rows[kv_sharing] = r
        print(f"   {kv_sharing:>6} {r['graphs']:>6} {r['first_s']:>25.1f} {r['other_s']:>28.1f} {r['eager_s']:>17.1f} "
              f"{'yes' if r['equal'] else 'NO':>13}", flush=True)
    return rows


def predicted_train_bytes(shape, tokens, batch):
    """A rough upper bound on a step's activations (fp32): per token, loop and layer about 24
    vectors of width d and 4 of the MLP's width; per token and loop the logits, 3 times."""
    d, loops = shape['n_embd'], shape['n_loops']
    per_token_loop = shape['n_layer'] * (24 * d + 4 * shape['n_hidden']) + 3 * shape['vocab_size']
    return 4 * batch * tokens * loops * per_token_loop


def train_table(shape, tokens, batch, device):
    cuda = device.startswith('cuda')
    print(f"\n4. Training step (forward + backward), batch {batch} x {tokens} tokens, {shape['n_loops']} loops, fp32; "
          f"one process per row; peak {'CUDA memory allocated' if cuda else 'bytes allocated and peak RSS'}, "
          f"grown during the step (MB = 10^6 bytes)")
    print(f"   {'mode':<16} {'ms/step':>9} {'vs LoopLM':>10} {'allocated':>10} {'vs LoopLM':>10}"
          + ('' if cuda else f" {'RSS':>8} {'vs LoopLM':>10}"))
    need = predicted_train_bytes(shape, tokens, batch)
    have = torch.cuda.mem_get_info()[0] if cuda else os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    if need > 0.8 * have:
        print(f"   (skipped: a step needs about {need / 1e9:.1f} GB of activations, {have / 1e9:.1f} GB is free; "
              f"try --train_tokens={tokens // 4} or --train_batch=1)")
        return []
    rows = []
    configs = [('LoopLM parallel', 'loop', None)] + [(f'MELT chunk {c}', 'melt', c) for c in (16, 64, 256, tokens)
                                                      if c <= tokens]
    for name, kv_sharing, chunk in dict.fromkeys(configs):
        r = run_child('train', shape, kv_sharing, chunk, tokens, batch, device)
        rows.append((name, r))
        first = rows[0][1]
        print(f"   {name:<16} {r['seconds'] * 1000:>9.1f} {r['seconds'] / first['seconds']:>9.2f}x "
              f"{r['allocated'] / 1e6:>10.1f} {r['allocated'] / first['allocated']:>9.2f}x"
              + ('' if cuda else f" {r['peak'] / 1e6:>8.1f} {r['peak'] / first['peak']:>9.2f}x"), flush=True)
    if not cuda:
        print("   (RSS also counts what glibc keeps of freed blocks; the many small tensors of small chunks leave "
              "more of it)")
    return rows


BATCHES = (1, 8, 32)


def batch_table(shape, prompt, new, loops, device):
    """Prompts of different lengths in one generate call (each row as if generated alone) at
    batch 1, 8 and 32, against the same prompts one call each: new tokens per second, for MELT
    and the LoopLM (random weights, greedy)."""
    print(f"\n7. Batched generation: prompts of {prompt // 2:,} to {prompt:,} tokens, {new} new tokens each, greedy, "
          f"{loops} loops; one generate call for the batch against one call per prompt")
    print(f"   {'mode':>6} {'batch':>5} {'batched tok/s':>14} {'one by one tok/s':>17} {'speed-up':>9}")
    rows = {}
    for kv_sharing in ('melt', 'loop'):
        model = build({**shape, 'block_size': max(shape['block_size'], prompt + new)}, kv_sharing, device,
                      torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        for batch in BATCHES:
            prompts = [torch.randint(0, shape['vocab_size'], (int(n),), generator=g).to(device)
                       for n in torch.linspace(prompt // 2, prompt, batch).round()]
            generate(model, prompts[:2], 2, loops=loops, top_k=1)  # kernels warmed up
            batched = seconds(lambda: generate(model, prompts, new, loops=loops, top_k=1), device)
            single = seconds(lambda: [generate(model, p[None], new, loops=loops, top_k=1) for p in prompts], device)
            rows[kv_sharing, batch] = (batch * new / batched, batch * new / single)
            print(f"   {kv_sharing:>6} {batch:>5} {rows[kv_sharing, batch][0]:>14,.0f} {rows[kv_sharing, batch][1]:>17,.0f} "
                  f"{single / batched:>8.2f}x", flush=True)
    return rows


def largest_batch(one, two, budget):
    """(batch, bytes per sequence, bytes without any) for a budget, from the peaks of batch 1
    and batch 2: a sequence costs their difference, the process holds the rest regardless."""
    per_sequence = two - one
    fixed = one - per_sequence
    return (max(0, int((budget - fixed) // per_sequence)) if per_sequence > 0 else 0), per_sequence, fixed


def budget_table(shape, context, new, chunk, loops, budget, device):
    """For MELT and the LoopLM: the largest batch of `context`-token sequences that fits
    `budget` bytes, estimated from two measured runs and then run itself (one fewer while its
    peak is over the budget), and the decode tokens/s there and at batch 1."""
    cuda, prompt = device.startswith('cuda'), context - new + 1  # the cache holds prompt + new - 1 tokens
    print(f"\n8. Memory budget {budget / 1e9:g} GB ({'CUDA memory allocated' if cuda else 'peak RSS of the process'}): "
          f"the largest batch of {context:,}-token sequences ({prompt:,}-token prompt + {new} new), {loops} loops, "
          f"one process per run; MB = 10^6 bytes")
    print(f"   {'mode':>6} {'MB/sequence':>12} {'KV MB/seq':>10} {'fixed MB':>9} {'batch':>6} {'peak GB':>8} "
          f"{'decode tok/s':>13} {'at batch 1':>11}")
    rows = {}
    for kv_sharing in ('melt', 'loop'):
        measured = {}

        def run(batch):
            if batch not in measured:
                measured[batch] = run_child('generate', shape, kv_sharing, loops, prompt, new, chunk, device, '', batch)
            r = measured[batch]
            return r, max(r['prefill_peak'], r['decode_peak'])
        (one, peak1), (_, peak2) = run(1), run(2)
        batch, per_sequence, fixed = largest_batch(peak1, peak2, budget)
        for _ in range(3):  # the estimate is linear in the batch; the run itself decides
            if batch < 1 or run(batch)[1] <= budget:
                break
            batch -= 1
        r, peak = run(batch) if batch >= 1 else (None, 0)
        fits = batch >= 1 and peak <= budget
        tok_s = batch * 1000 / r['decode_ms'] if fits else 0.0
        rows[kv_sharing] = dict(batch=batch if fits else 0, per_sequence=per_sequence, fixed=fixed, peak=peak,
                                tok_s=tok_s, tok_s_1=1000 / one['decode_ms'])
        print(f"   {kv_sharing:>6} {per_sequence / 1e6:>12.1f} {one['kv'] / 1e6:>10.1f} {fixed / 1e6:>9.1f} "
              f"{rows[kv_sharing]['batch']:>6} {peak / 1e9:>8.2f} {tok_s:>13,.0f} {rows[kv_sharing]['tok_s_1']:>11,.0f}",
              flush=True)
    if rows['loop']['tok_s']:
        print(f"   in the same budget MELT holds {rows['melt']['batch'] / rows['loop']['batch']:.1f}x the sequences and "
              f"decodes {rows['melt']['tok_s'] / rows['loop']['tok_s']:.2f}x the LoopLM's tokens/s")
    return rows


def prefill_table(shape, contexts, chunk, loops, device):
    """MELT's prefill of each context length in chunks of `chunk`, one process per row: what
    it holds beyond the weights and the cache (it must not grow with the context), and the
    time per token (attention makes it grow linearly with the context, nothing else may)."""
    cuda = device.startswith('cuda')
    print(f"\n9. Long prefill: MELT, {loops} loops, chunks of {chunk:,}; one process per row; MB = 10^6 bytes; "
          f"{'CUDA memory allocated' if cuda else 'peak RSS grown past the process with its weights'}")
    print(f"   {'context':>8} {'KV MB':>8} {'beyond W+KV MB':>15} {'x at first':>10}"
          + ('' if cuda else f" {'its tensors MB':>15} {'x at first':>10}")
          + f" {'prefill s':>10} {'us/token':>9} {'ns/token per 1K of context':>27}")
    rows = []
    for context in contexts:  # on CPU the prefill runs twice, the second under the profiler (its tensors' bytes)
        r = run_child('generate', shape, 'melt', loops, context, 3, chunk, device, '', 1, not cuda)
        beyond = r['prefill_peak'] - (r['weights'] if cuda else r['base']) - r['kv']
        rows.append(dict(context=context, beyond=beyond, **r))
        per_token = r['prefill_s'] / context
        print(f"   {context:>8,} {r['kv'] / 1e6:>8.1f} {beyond / 1e6:>15.1f} {beyond / rows[0]['beyond']:>10.2f}"
              + ('' if cuda else f" {r['prefill_tensors'] / 1e6:>15.2f} "
                                 f"{r['prefill_tensors'] / rows[0]['prefill_tensors']:>10.2f}")
              + f" {r['prefill_s']:>10.1f} {per_token * 1e6:>9.1f} {per_token * 1e9 / (context / 1024):>27.1f}",
              flush=True)
    return rows


def longest_context(peak_at, budget, guess):
    """The longest prompt (a multiple of 64 tokens) whose run peaks within `budget`, and the
    shortest tried that did not: runs from `guess`, 2% apart, up while they fit and down while
    they do not, until a fit and an overrun are one step apart (8 runs at most)."""
    step = max(64, guess // 50 // 64 * 64)
    fits, over, n = None, None, max(64, guess // 64 * 64)
    for _ in range(8):
        if peak_at(n) <= budget:
            fits = n
        else:
            over = n
        if fits and over and over - fits <= step:
            break
        n = fits + step if over is None else over - step if fits is None else (fits + over) // 2 // 64 * 64
        if n in (fits, over):
            break
    return fits, over


def context_table(shape, new, chunk, loop_counts, budget, device):
    """For MELT and the LoopLM at each loop count: the longest prompt whose prefill and `new`
    decode steps fit `budget` bytes, found by running it in fresh processes. The first guess
    is the budget left after a 1,024-token run's fixed part, divided by the KV bytes and RoPE
    rows a token adds; the runs decide."""
    cuda = device.startswith('cuda')
    print(f"\n10. Longest context in {budget / 1e9:g} GB ({'CUDA memory allocated' if cuda else 'peak RSS of the process'}): "
          f"a prompt prefilled in chunks of {chunk}, then {new} greedy tokens; one process per run; MB = 10^6 bytes")
    print(f"   {'loops':>5} {'mode':>6} {'KV KB/token':>12} {'longest prompt':>15} {'peak GB':>8} {'next tried':>11} "
          f"{'its peak GB':>12} {'x the LoopLM':>13}")
    rows, element = {}, 2 if cuda else 4
    for n in loop_counts:
        for kv_sharing in ('melt', 'loop'):
            peaks = {}

            def peak_at(tokens):
                r = run_child('generate', {**shape, 'block_size': tokens + new}, kv_sharing, n, tokens, new, chunk, device, '')
                peaks[tokens] = max(r['prefill_peak'], r['decode_peak'])
                return peaks[tokens]
            per_token = MELTConfig(**{**shape, 'kv_sharing': kv_sharing}).kv_bytes_per_token(n, element) \
                + 2 * element * shape['n_embd'] // shape['n_head']  # the cache's rows and RoPE's cos and sin
            fixed = peak_at(1024) - 1024 * per_token
            fits, over = longest_context(peak_at, budget, int((budget - fixed) // per_token))
            rows[n, kv_sharing] = dict(tokens=fits or 0, peak=peaks.get(fits, 0), over=over, over_peak=peaks.get(over, 0))
            r = rows[n, kv_sharing]
            ratio = f"{rows[n, 'melt']['tokens'] / r['tokens']:.2f}" if kv_sharing == 'loop' and r['tokens'] else ''
            print(f"   {n:>5} {kv_sharing:>6} {per_token / 1e3:>12.2f} {r['tokens']:>15,} {r['peak'] / 1e9:>8.3f} "
                  f"{over or 0:>11,} {r['over_peak'] / 1e9:>12.3f} {ratio:>13}", flush=True)
    return rows


def seconds(fn, device):
    t0 = time.perf_counter()
    fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def check(cfg):
    if cfg['only'] not in ('', 'memory', 'generate', 'train', 'phases', 'compile', 'train_script', 'batch', 'budget',
                           'prefill', 'context'):
        raise ValueError(f"--only must be memory, generate, train, phases, compile, train_script, batch, budget, prefill "
                         f"or context, got {cfg['only']!r}")
    try:
        contexts = [int(c) for c in cfg['prefill_contexts'].split(',')]
    except ValueError:
        contexts = [0]
    if min(contexts) < 1:
        raise ValueError(f"--prefill_contexts must be token counts >= 1 separated by commas, e.g. 8192,32768; "
                         f"got {cfg['prefill_contexts']!r}")
    if not cfg['memory_budget'] > 0:
        raise ValueError(f"--memory_budget must be > 0 (GB), got {cfg['memory_budget']}")
    if cfg['only'] == 'budget' and cfg['context'] <= cfg['new_tokens']:
        raise ValueError(f"--context ({cfg['context']}) must be more than --new_tokens ({cfg['new_tokens']}): "
                         f"each sequence is a prompt and its new tokens")
    for key in ('train_vocab', 'layers'):
        if cfg[key] < 0:
            raise ValueError(f"--{key} must be >= 1 (or 0 for the model's own), got {cfg[key]}")
    if cfg['bytes_per_element'] not in (2, 4):
        raise ValueError(f"--bytes_per_element must be 2 (bf16) or 4 (fp32), got {cfg['bytes_per_element']}")
    if cfg['threads'] < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 for torch's default), got {cfg['threads']}")
    for key in ('context', 'prompt_tokens', 'new_tokens', 'prefill_chunk', 'train_tokens', 'train_batch'):
        if cfg[key] < 1 + (key == 'new_tokens'):
            raise ValueError(f"--{key} must be >= {1 + (key == 'new_tokens')}, got {cfg[key]}")
    check_device(cfg['device'])  # before any child process is started with it
    if cfg['cuda_graph'] and not cfg['device'].startswith('cuda'):
        raise ValueError("--cuda_graph captures CUDA kernels; it needs --device=cuda")
    try:
        counts = [int(s) for s in cfg['loops'].split(',')] if cfg['loops'] else [1, 4, 8]
    except ValueError:
        counts = [0]
    if not 1 <= min(counts) <= max(counts) <= MAX_LOOPS:
        raise ValueError(f"--loops must be loop counts in [1, {MAX_LOOPS}] separated by commas, e.g. 1,4,8; "
                         f"got {cfg['loops']!r}")
    if not cfg['kv_sharing'] or not set(cfg['kv_sharing'].split(',')) <= {'melt', 'loop'}:
        raise ValueError(f"--kv_sharing must be melt, loop or melt,loop; got {cfg['kv_sharing']!r}")
    return counts, contexts


def main(argv):
    cfg = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    loop_counts, contexts = check(cfg)
    if cfg['threads']:  # this process and the measuring ones it starts
        os.environ['OMP_NUM_THREADS'] = str(cfg['threads'])
        torch.set_num_threads(cfg['threads'])
    shape = model_shape(cfg['model'])
    shape = {k: v for k, v in shape.items() if k not in ('kv_sharing', 'chunk_size', 'gate_bias_init')}
    if cfg['layers']:
        shape['n_layer'] = cfg['layers']
    print(f"model {cfg['model']}: {shape['n_layer']} layers, d={shape['n_embd']}, {shape['n_kv_head']} KV heads "
          f"of {shape['n_embd'] // shape['n_head']}, trained loops {shape['n_loops']}; device {cfg['device']}")
    if cfg['only'] in ('', 'memory'):
        memory_table(shape, cfg['context'], cfg['bytes_per_element'])
    small = shape['n_embd'] * shape['n_layer'] <= 4096 or cfg['device'].startswith('cuda')
    if cfg['only'] in ('', 'generate'):
        if small:
            generate_table(shape, cfg['prompt_tokens'], cfg['new_tokens'], cfg['prefill_chunk'], loop_counts,
                           cfg['kv_sharing'].split(','), cfg['device'],
                           '+'.join(mode for mode, on in (('compile', cfg['compile']), ('cuda_graph', cfg['cuda_graph']))
                                    if on))
        else:
            print("\n2. (generation skipped: random weights of this size are for a GPU; use --device=cuda)")
    if cfg['only'] in ('', 'train', 'phases'):
        if small:
            phase_table({**shape, 'vocab_size': cfg['train_vocab'] or shape['vocab_size']}, cfg['train_tokens'],
                        cfg['train_batch'], cfg['device'])
            if cfg['only'] != 'phases':
                train_table(shape, cfg['train_tokens'], cfg['train_batch'], cfg['device'])
        else:
            print("\n3. (training steps skipped for this size on CPU; use --device=cuda, or --layers=1)")
    if cfg['only'] == 'compile':
        compile_table(cfg['device'])
    if cfg['only'] == 'train_script':
        train_script_table(cfg['train_vocab'] or shape['vocab_size'], cfg['threads'] or 1)
    if cfg['only'] == 'budget':
        check_fits(cfg['memory_budget'] * 1e9, f"--memory_budget={cfg['memory_budget']:g}", cfg['device'])
        budget_table({**shape, 'block_size': max(shape['block_size'], cfg['context'])}, cfg['context'],
                     cfg['new_tokens'], cfg['prefill_chunk'], loop_counts[-1] if cfg['loops'] else shape['n_loops'],
                     cfg['memory_budget'] * 1e9, cfg['device'])
    if cfg['only'] == 'prefill':
        prefill_table(shape, contexts, cfg['prefill_chunk'], loop_counts[-1] if cfg['loops'] else shape['n_loops'],
                      cfg['device'])
    if cfg['only'] == 'context':
        check_fits(cfg['memory_budget'] * 1e9, f"--memory_budget={cfg['memory_budget']:g}", cfg['device'])
        context_table(shape, cfg['new_tokens'], cfg['prefill_chunk'], loop_counts, cfg['memory_budget'] * 1e9,
                      cfg['device'])
    if cfg['only'] == 'batch':
        batch_table(shape, cfg['prompt_tokens'], cfg['new_tokens'], loop_counts[-1] if cfg['loops'] else shape['n_loops'],
                    cfg['device'])


def child(spec):
    """`python bench.py --child JSON`: one measurement in a fresh process, printed as JSON."""
    kind, *args = json.loads(spec)
    measure = {'generate': measure_generate, 'train': measure_train, 'phase': measure_phase_step,
               'compile': measure_compile}[kind]
    try:
        print(json.dumps(measure(*args)))
    except ValueError as e:  # what cannot fit, or a value out of range: one line for the parent to pass on
        sys.exit(f"error: {e}")


if __name__ == '__main__':
    if sys.argv[1:2] == ['--child']:
        child(sys.argv[2])
    else:
        run_script(main)

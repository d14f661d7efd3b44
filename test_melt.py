"""melt.py: memory against loop count, the LoopLM and MELT against the naive reference,
the K/V sharing variants, alpha, chunk-wise training, generation."""

import math
import pathlib
import re

import pytest
import torch

import bench
import melt
import phases
import sample
import train
from conftest import (TINY, decode, hf_name, in_float64, loop_and_melt_pair, max_diff, naive,
                      naive_forward, ouro_config, tiny_model, tokens)
from melt import GATES, MELT, MELTConfig, apply_rope, rope_tables

# ----------------------------------------------------------------------------------------
# memory against loop count


@pytest.mark.parametrize('kv_sharing, gate', [('loop', 'element')] + [('melt', g) for g in GATES])
def test_cache_bytes_against_loop_count(kv_sharing, gate):
    model = tiny_model(kv_sharing, gate=gate)
    c = model.config
    ids = tokens(10)
    one_loop_bytes = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * 10 * 4  # fp32
    for loops in (1, 2, 4, 8):
        cache = model.new_cache(1, max_tokens=10, loops=loops)
        model(ids, loops=loops, cache=cache)
        expected = one_loop_bytes * (1 if kv_sharing == 'melt' else loops)
        assert cache.nbytes == expected, (loops, cache.nbytes, expected)
        assert c.kv_bytes_per_token(loops, bytes_per_element=4) * 10 == expected
        shapes = {tuple(t.shape) for t in cache.buffers()}
        one_layer = (1, c.n_kv_head, 10, c.n_embd // c.n_head)  # (B, n_kv_head, max_tokens, hs)
        assert shapes == {(c.n_layer, *one_layer) if kv_sharing == 'melt' else (loops, c.n_layer, *one_layer)}


def test_process_memory_of_prefill_and_decode_does_not_grow_with_loops():
    """Peak RSS of a 1,024-token prefill and of decoding, each run in a fresh process: MELT's
    grows by at most a tenth of the LoopLM's growth from 1 to 16 loops (the LoopLM's KV cache
    does grow: 2 MB per loop here), and what MELT holds beyond its cache stays within 2 MiB,
    for every way of sharing the K/V (GATES). Keeping every loop's normed state would add
    7.5 MiB, half of that 3.7 MiB; RSS moves by up to 0.8 MiB from run to run."""
    shape = dict(vocab_size=256, block_size=1024, n_layer=2, n_head=4, n_kv_head=4, n_embd=128, n_hidden=352, n_loops=4)
    runs = {(gate, loops): bench.run_child('generate', {**shape, 'gate': 'element' if gate == 'loop' else gate},
                                           'loop' if gate == 'loop' else 'melt', loops, 1020, 4, 64, 'cpu', '')
            for gate in ('loop',) + GATES for loops in (1, 16)}
    growth = {key: r['prefill_peak'] - r['base'] for key, r in runs.items()}
    loop_growth = growth['loop', 16] - growth['loop', 1]
    assert runs['loop', 16]['kv'] - runs['loop', 1]['kv'] == 15 * 2 * 2 * 128 * 1023 * 4
    assert loop_growth > 0.9 * (runs['loop', 16]['kv'] - runs['loop', 1]['kv'])
    for gate in GATES:
        assert runs[gate, 16]['kv'] == runs[gate, 1]['kv'] == runs['loop', 1]['kv']
        assert abs(growth[gate, 16] - growth[gate, 1]) <= 0.1 * loop_growth, (gate, growth, loop_growth)
        beyond = {loops: max(runs[gate, loops]['prefill_peak'], runs[gate, loops]['decode_peak'])
                  - runs[gate, loops]['base'] - runs[gate, loops]['kv'] for loops in (1, 16)}
        assert abs(beyond[16] - beyond[1]) <= 2 * 2**20, (gate, beyond)


def test_decode_writes_the_cache_in_place_and_the_static_step_agrees():
    for kv_sharing in ('melt', 'loop'):
        model = in_float64(tiny_model(kv_sharing))
        ids = tokens(12)
        cache = model.new_cache(1, max_tokens=12, loops=3)
        pointers = [t.data_ptr() for t in cache.buffers()]
        eager = [model(ids[:, :6], cache=cache, chunk_size=4)[0][:, -1]]
        eager += [model(ids[:, i:i + 1], cache=cache)[0][:, -1] for i in range(6, 12)]
        assert [t.data_ptr() for t in cache.buffers()] == pointers  # written in place, never reallocated
        assert cache.nbytes == model.config.kv_bytes_per_token(3, 8) * 12
        static = model.new_cache(1, max_tokens=12, loops=3)
        steps = [model(ids[:, :6], cache=static, chunk_size=4)[0][:, -1]]
        with torch.no_grad():
            for i in range(6, 12):  # decode_step attends to all 12 rows through a mask
                steps.append(model.decode_step(ids[:, i:i + 1], static, torch.tensor([i]), 3)[:, -1])
                static.commit(1, 3)
        assert max_diff(torch.stack(steps), torch.stack(eager)) < 1e-12
        for mine, theirs in zip(static.buffers(), cache.buffers()):
            assert max_diff(mine, theirs) < 1e-12


def test_lower_right_attention_equals_a_naive_softmax_and_torchs_causal_bias():
    """A chunk of T queries over S keys (the last T its own), float64: each query's softmax over
    the keys up to its own position, written as a loop; and torch's CausalBias, which the CUDA
    path runs (on a CPU torch makes its mask, so its result is checked here)."""
    from torch.nn.attention.bias import causal_lower_right
    torch.manual_seed(0)
    for T, S, kv_heads in ((2, 2, 4), (3, 7, 4), (5, 6, 2), (4, 40, 1)):
        q = torch.randn(2, 4, T, 8, dtype=torch.float64)
        k, v = (torch.randn(2, kv_heads, S, 8, dtype=torch.float64) for _ in range(2))
        out = melt.lower_right_attention(q, k, v, gqa=kv_heads < 4)
        k, v = k.repeat_interleave(4 // kv_heads, dim=1), v.repeat_interleave(4 // kv_heads, dim=1)  # head i: K/V i // group
        for i in range(T):
            seen = S - T + i + 1  # query i sits at position S - T + i
            w = torch.softmax(q[:, :, i:i + 1] @ k[:, :, :seen].transpose(-1, -2) / math.sqrt(8), dim=-1)
            assert max_diff(out[:, :, i:i + 1], w @ v[:, :, :seen]) < 1e-12, (T, S, i)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S))
        assert max_diff(out, theirs) < 1e-12, (T, S)


def test_prefill_holds_the_same_beyond_the_cache_at_four_times_the_context():
    """A prefill in chunks of 256 at 1,024 and 4,096 tokens, each in a fresh process, for MELT
    and the LoopLM: the peak of the bytes its tensors hold beyond the weights and the cache
    (the profiler's count, free of the allocator's noise) grows by less than 1.2x: MELT's is
    1.49 MB at both, where the (chunk x rows seen) mask attention once made gave 2.34 and 7.06 MB."""
    shape = dict(bench.SHAPES['mini'], block_size=4100)
    for kv_sharing in ('melt', 'loop'):
        held = {context: bench.run_child('generate', shape, kv_sharing, 2, context, 3, 256, 'cpu', '', 1, True,
                                         env={'OMP_NUM_THREADS': '1'})['prefill_tensors'] for context in (1024, 4096)}
        assert 0 < held[4096] <= 1.2 * held[1024], (kv_sharing, held)


# ----------------------------------------------------------------------------------------
# the LoopLM


def test_looplm_forward_matches_naive_reference():
    model = in_float64(tiny_model('loop'))
    ids = tokens(9)
    for loops in (1, 3):
        ref = naive(model, ids[0].tolist(), loops, [9], kv='loop')
        assert max_diff(model(ids, loops=loops)[0][0], ref) < 1e-10


def test_looplm_decode_equals_full_forward_and_chunking_is_exact():
    model = in_float64(tiny_model('loop'))
    ids = tokens(12, batch=2)
    full, _ = model(ids)
    assert max_diff(decode(model, ids, 3)[0], full) <= 1e-12
    assert max_diff(decode(model, ids, 3, prefill=5, chunk_size=2)[0], full) <= 1e-12
    for chunk_size in (1, 3, 5, 12):
        assert max_diff(model(ids, chunk_size=chunk_size)[0], full) <= 1e-12


# ----------------------------------------------------------------------------------------
# MELT


def test_melt_chunked_forward_matches_naive_reference():
    model = in_float64(tiny_model('melt'))
    ids = tokens(10)
    for chunk_size in (1, 4, 10):
        schedule = [min(chunk_size, 10 - i) for i in range(0, 10, chunk_size)]
        ref = naive(model, ids[0].tolist(), 3, schedule, kv='gated')
        assert max_diff(model(ids, chunk_size=chunk_size)[0][0], ref) < 1e-10, chunk_size
    # chunking changes MELT's result (it is an approximation of sequential decoding)
    assert max_diff(model(ids, chunk_size=1)[0], model(ids, chunk_size=10)[0]) > 1e-3


def test_melt_decode_equals_forward_with_chunk_size_1():
    model = in_float64(tiny_model('melt'))
    ids = tokens(12, batch=2)
    for loops in (1, 3, 5):
        decoded, cache = decode(model, ids, loops)
        assert max_diff(decoded, model(ids, loops=loops, chunk_size=1)[0]) <= 1e-12
        assert cache.length == 12 and cache.loops_run == [loops] * 12


def test_melt_prefill_chunked_then_decode():
    model = in_float64(tiny_model('melt'))
    ids = tokens(12)
    logits, _ = decode(model, ids, 3, prefill=8, chunk_size=4)
    assert max_diff(logits[:, :8], model(ids[:, :8], chunk_size=4)[0]) <= 1e-12
    ref = naive(model, ids[0].tolist(), 3, [4, 4, 1, 1, 1, 1], kv='gated')
    assert max_diff(logits[0], ref) < 1e-10


def test_gate_forced_open_is_last_loop_sharing():
    model = in_float64(tiny_model('melt'))
    with torch.no_grad():
        for gate in model.gate_modules():
            gate.b_z.fill_(-1e4)  # z = sigmoid(-1e4) = 0 exactly, so h = x
    ids = tokens(8)
    ref = naive(model, ids[0].tolist(), 3, [1] * 8, kv='open')
    assert max_diff(model(ids, chunk_size=1)[0][0], ref) < 1e-10
    # and it is not the full LoopLM, whose tokens see every loop's K/V of earlier tokens
    ref_loop = naive(model, ids[0].tolist(), 3, [8], kv='loop')
    assert max_diff(ref, ref_loop) > 1e-3


def melt_with_base_of(model, gate, **overrides):
    """A MELT model with `gate` and the base weights of `model` (float64)."""
    variant = in_float64(tiny_model('melt', seed=7, gate=gate, **overrides))
    missing, _ = variant.load_state_dict({k: v for k, v in model.state_dict().items() if '.kv_gate.' not in k},
                                         strict=False)
    assert all('.kv_gate.' in k for k in missing)
    return variant


@pytest.mark.parametrize('gate, bias', [('last', -1e4), ('first', 1e4)])
def test_last_and_first_loop_sharing_are_the_gate_forced_open_and_closed(gate, bias):
    model = in_float64(tiny_model('melt'))
    with torch.no_grad():
        for g in model.gate_modules():
            g.b_z.fill_(bias)  # z = sigmoid(-+1e4) = 0 or 1 exactly: h = x, or h = h_prev = x at loop 1
    variant = melt_with_base_of(model, gate)
    assert variant.gate_modules() == [] and variant.get_num_params() < model.get_num_params()
    ids = tokens(10)
    for chunk in (1, 4):
        assert max_diff(variant(ids, chunk_size=chunk)[0], model(ids, chunk_size=chunk)[0]) < 1e-12
    other = melt_with_base_of(model, 'first' if gate == 'last' else 'last')
    assert max_diff(other(ids, chunk_size=1)[0], model(ids, chunk_size=1)[0]) > 1e-3  # the two differ


@pytest.mark.parametrize('gate, kv', [('mean', 'mean'), ('ema', 'ema:0.3'), ('scalar', 'gated')])
def test_mean_ema_and_scalar_sharing_match_a_naive_per_token_loop(gate, kv):
    model = in_float64(tiny_model('melt', gate=gate, ema_z=0.3, n_loops=4))
    ids = tokens(9)
    for schedule in ([1] * 9, [4, 4, 1]):
        ref = naive(model, ids[0].tolist(), 4, schedule, kv=kv)
        out = model(ids, chunk_size=schedule[0])[0] if len(set(schedule)) == 1 else \
            decode(model, ids, 4, prefill=8, chunk_size=4)[0]
        assert max_diff(out[0], ref) < 1e-10, schedule
    if gate == 'scalar':  # one z per token and layer
        assert all(g.w_z.weight.shape == (1, TINY['n_embd']) and g.b_z.shape == (1,) for g in model.gate_modules())
    else:  # and not the same as last-loop sharing
        assert max_diff(model(ids, chunk_size=1)[0][0], naive(model, ids[0].tolist(), 4, [1] * 9, kv='open')) > 1e-3


# ----------------------------------------------------------------------------------------
# alpha (phase 1) and the two modes


def test_alpha_ends_are_the_two_models():
    loop_model, melt_model = map(in_float64, loop_and_melt_pair())
    ids = tokens(12, batch=2)
    loop_logits, _ = loop_model(ids)
    assert max_diff(melt_model(ids, alpha=0.0, chunk_size=4)[0], loop_logits) <= 1e-12
    for row in range(2):  # each end against the naive reference of its model, not against another path of ours
        assert max_diff(melt_model(ids, alpha=0.0, chunk_size=4)[0][row],
                        naive(melt_model, ids[row].tolist(), 3, [4, 4, 4], kv='loop')) < 1e-10
        assert max_diff(melt_model(ids, alpha=1.0, chunk_size=4)[0][row],
                        naive(melt_model, ids[row].tolist(), 3, [4, 4, 4], kv='gated')) < 1e-10
    middle, _ = melt_model(ids, alpha=0.5, chunk_size=4)
    assert max_diff(middle, loop_logits) > 1e-3 and max_diff(middle, melt_model(ids, chunk_size=4)[0]) > 1e-3
    # alpha decoding with a phase-1 cache keeps both K/V kinds and matches chunk_size=1
    cache = melt_model.new_cache(2, max_tokens=12, alpha=0.5)
    steps = torch.cat([melt_model(ids[:, i:i + 1], cache=cache)[0] for i in range(12)], dim=1)
    assert max_diff(steps, melt_model(ids, alpha=0.5, chunk_size=1)[0]) <= 1e-12
    assert cache.nbytes == melt_model.config.kv_bytes_per_token(bytes_per_element=8) * 2 * 12 * (1 + 3)


@pytest.mark.parametrize('alpha', [0.25, 0.75])
def test_the_blend_between_the_ends_matches_the_naive_blend(alpha):
    """Phase 1's K/V = alpha MELT + (1 - alpha) LoopLM, written out by hand in conftest.py;
    at 0.25 and 0.75 a swapped blend (alpha <-> 1 - alpha) gives other logits."""
    _, model = map(in_float64, loop_and_melt_pair())
    ids = tokens(10)
    for chunk_size, schedule in ((4, [4, 4, 2]), (1, [1] * 10)):
        ref = naive(model, ids[0].tolist(), 3, schedule, kv=f'blend:{alpha}')
        assert max_diff(model(ids, alpha=alpha, chunk_size=chunk_size)[0][0], ref) < 1e-10, chunk_size
    swapped = naive(model, ids[0].tolist(), 3, [4, 4, 2], kv=f'blend:{1 - alpha}')
    assert max_diff(model(ids, alpha=alpha, chunk_size=4)[0][0], swapped) > 1e-3
    cache = model.new_cache(1, max_tokens=10, alpha=alpha)  # decoded with a phase-1 cache: chunk 1
    steps = torch.cat([model(ids[:, i:i + 1], cache=cache)[0] for i in range(10)], dim=1)
    assert max_diff(steps[0], naive(model, ids[0].tolist(), 3, [1] * 10, kv=f'blend:{alpha}')) < 1e-10


def test_rope_tables_match_an_independent_float64_computation():
    """cos/sin of pos * theta^(-2i/hd), i < hd/2, in both halves (rotate-half), by Python's
    math in float64; the fp32 tables the model keeps are within fp32's rounding of the angle."""
    for hd, n, theta in ((8, 64, 10000.0), (64, 300, 1e6)):
        angles = torch.tensor([[pos * theta ** (-2 * (i % (hd // 2)) / hd) for i in range(hd)] for pos in range(n)],
                              dtype=torch.float64)
        cos, sin = rope_tables(hd, n, theta, dtype=torch.float64)
        assert max_diff(cos, angles.cos()) < 1e-12 and max_diff(sin, angles.sin()) < 1e-12
        cos32, sin32 = rope_tables(hd, n, theta)
        assert cos32.dtype == torch.float32 and max_diff(cos32.double(), angles.cos()) < n * 2e-7
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)  # apply_rope: pairs (i, i + hd/2) rotated by angle i
    cos, sin = rope_tables(8, 3, 10000.0, dtype=torch.float64)
    a, b, ang = x[..., :4], x[..., 4:], torch.tensor([[p * 10000.0 ** (-2 * i / 8) for i in range(4)] for p in range(3)],
                                                     dtype=torch.float64)
    rotated = torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)
    assert max_diff(apply_rope(x, (cos, sin)), rotated) < 1e-12


@pytest.mark.parametrize('kv_sharing', ['melt', 'loop'])
def test_q_exit_between_its_extremes_stops_where_the_cumulative_probability_reaches_q(kv_sharing):
    """Every loop's exit probability 0.3 (the gate's bias alone): the exit CDF after t loops is
    1 - 0.7^t = 0.3, 0.51, 0.657, so q = 0.6 stops after exactly 3 of 5 loops, in prefill and
    in decode. A check on the first loop's lambda alone, or on the current loop's, never stops."""
    model = tiny_model(kv_sharing)
    with torch.no_grad():
        model.exit_gate.weight.zero_()
        model.exit_gate.bias.fill_(math.log(0.3 / 0.7))
    ids = tokens(9)
    for q, loops in ((0.6, 3), (0.5, 2), (0.66, 4), (0.25, 1)):
        cache = model.new_cache(1, max_tokens=9, loops=5)
        model(ids[:, :6], loops=5, cache=cache, chunk_size=3, exit_threshold=q)  # prefill: two chunks
        for i in range(6, 9):
            model(ids[:, i:i + 1], loops=5, cache=cache, exit_threshold=q)
        assert cache.loops_run == [loops] * 5, (q, cache.loops_run)
    if kv_sharing == 'loop':  # an exited token's later loops hold its last computed loop's K/V (our choice)
        two = model.new_cache(1, max_tokens=9, loops=2)
        model(ids, loops=2, cache=two)  # two loops, no exit: the K/V the exited tokens computed
        cache = model.new_cache(1, max_tokens=9, loops=5)
        model(ids, loops=5, cache=cache, chunk_size=3, exit_threshold=0.5)
        for buf, ref in ((cache.k_loop, two.k_loop), (cache.v_loop, two.v_loop)):
            assert torch.allclose(buf[:2], ref, atol=1e-6) and max_diff(ref[0], ref[1]) > 1e-3
            assert all(torch.equal(buf[t], buf[1]) for t in range(2, 5))


def test_one_loop_is_the_same_in_both_modes():
    loop_model, melt_model = map(in_float64, loop_and_melt_pair())
    ids = tokens(12)
    assert max_diff(loop_model(ids, loops=1)[0], melt_model(ids, loops=1, chunk_size=1)[0]) <= 1e-12
    assert max_diff(loop_model(ids, loops=1)[0], melt_model(ids, loops=1, chunk_size=5)[0]) <= 1e-12


# ----------------------------------------------------------------------------------------
# training signals


def test_exit_distribution_hand_worked():
    lam = torch.tensor([0.5, 0.2, 0.9])  # the last loop's own lambda does not matter
    p = phases.exit_distribution(torch.logit(lam))
    expected = torch.tensor([0.5, 0.5 * 0.2, 0.5 * 0.8])
    assert torch.allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize('kv_sharing', ['melt', 'loop'])
def test_training_steps_lower_the_loss_and_reach_the_gates(kv_sharing):
    torch.manual_seed(0)
    model = MELT(MELTConfig(**{**TINY, 'kv_sharing': kv_sharing}))
    ids = tokens(33, batch=4)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = phases.configure_optimizers(model, {**train.DEFAULTS, 'learning_rate': 3e-3, 'gate_lr': 3e-2}, 'cpu')
    losses = []
    for step in range(8):
        _, loss = model(x, y, chunk_size=8)
        opt.zero_grad()
        loss.backward()
        if step == 0 and kv_sharing == 'melt':
            for gate in model.gate_modules():
                for name, p in gate.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if kv_sharing == 'melt':
        assert len(opt.param_groups) == 3 and opt.param_groups[2]['lr'] == 3e-2


# ----------------------------------------------------------------------------------------
# chunk-wise training: gradients and memory


def test_chunked_training_gradients_equal_the_naive_reference():
    """float64: gradients of MELT's chunk-wise forward (earlier chunks' K/V joined inside
    activation checkpointing) equal those of the per-token naive reference, including the
    gradients that flow from later chunks into earlier chunks' K/V."""
    model = in_float64(tiny_model('melt'))
    ids = tokens(10)
    w = torch.randn(10, TINY['vocab_size'], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = {k: p for k, p in model.named_parameters() if 'exit_gate' not in k}  # the logits don't use it
    grads = torch.autograd.grad((model(ids, chunk_size=4)[0][0] * w).sum(), list(params.values()))
    ref_weights = {hf_name(k): p for k, p in params.items()}
    ref = naive_forward(ouro_config(model), ref_weights, ids[0].tolist(), 3, [4, 4, 2], kv='gated')
    ref_grads = torch.autograd.grad((ref * w).sum(), list(params.values()))
    for name, g, r in zip(params, grads, ref_grads):
        assert max_diff(g, r) < 1e-10, name
    assert grads[list(params).index('layers.0.attn.kv_gate.u_z.weight')].abs().sum() > 0


def test_chunked_looplm_gradients_equal_the_parallel_step():
    model = in_float64(tiny_model('loop'))
    ids = tokens(12, batch=2)
    params = [p for k, p in model.named_parameters() if 'exit_gate' not in k]
    w = torch.randn(2, 12, TINY['vocab_size'], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    parallel = torch.autograd.grad((model(ids)[0] * w).sum(), params)
    chunked = torch.autograd.grad((model(ids, chunk_size=5)[0] * w).sum(), params)
    assert max(max_diff(a, b) for a, b in zip(parallel, chunked)) < 1e-12


def test_training_memory_does_not_grow_with_the_number_of_chunks():
    """Peak bytes allocated by forward + backward over 256 tokens: MELT in chunks of 8 holds
    about what one chunk of 256 holds, and both within 1.25x of the LoopLM's parallel step.
    (A copy of the past per chunk, as autograd keeps without checkpointing, is quadratic.)"""
    torch.manual_seed(0)
    config = dict(TINY, block_size=256, n_embd=64, n_hidden=96, n_head=4, n_kv_head=4)
    melt_model = MELT(MELTConfig(**config, kv_sharing='melt'))
    loop_model = melt_model.with_kv_sharing('loop')
    ids = tokens(256, batch=2)

    def step(model, chunk_size):
        return lambda: model(ids, ids, chunk_size=chunk_size)[1].backward()

    step(melt_model, 8)()  # load every kernel once
    loop_peak = bench.peak_allocated(step(loop_model, None))
    melt_peaks = {c: bench.peak_allocated(step(melt_model, c)) for c in (256, 32, 8)}
    assert melt_peaks[8] <= 1.1 * melt_peaks[256], melt_peaks
    assert max(melt_peaks.values()) <= 1.25 * loop_peak, (melt_peaks, loop_peak)


# ----------------------------------------------------------------------------------------
# generation and errors


def test_greedy_generate_matches_argmax_of_full_forward():
    for kv_sharing in ('melt', 'loop'):
        model = tiny_model(kv_sharing)
        ids = tokens(5)
        out = sample.generate(model, ids, 6, top_k=1, chunk_size=1)
        for i in range(5, 11):  # each token is the argmax of a fresh forward on what came before
            assert out[0, i] == model(out[:, :i], chunk_size=1)[0][0, -1].argmax()


def test_errors_name_the_value_and_the_limit():
    model = tiny_model('melt')
    ids = tokens(5)
    with pytest.raises(ValueError, match=r'loops must be an integer in \[1, 1024\], got 0'):
        model(ids, loops=0)
    with pytest.raises(ValueError, match=r'chunk_size must be >= 1, got 0'):
        model(ids, chunk_size=0)
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\], got 1.5'):
        model(ids, alpha=1.5)
    with pytest.raises(ValueError, match=r'alpha is for kv_sharing=.melt. models'):
        tiny_model('loop')(ids, alpha=0.5)
    with pytest.raises(ValueError, match=r'token id 64 is outside the vocabulary \[0, 64\)'):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r'token id -1 is outside the vocabulary \[0, 64\)'):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r'prompt of 5 tokens \+ 61 new tokens run 65 positions, more than block_size 64'):
        sample.generate(model, ids, 61)
    out = sample.generate(model, ids, 60)  # 64 positions: the last new token is never run
    assert out.shape == (1, 65) and torch.equal(out[:, :5], ids) and int(out.max()) < 64
    with pytest.raises(ValueError, match=r'60 cached \+ 5 new tokens must be between 1 and the max_tokens of the cache 64'):
        cache = model.new_cache(1)
        model(tokens(60), cache=cache)
        model(ids, cache=cache)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r'cache was made for batch size 2, got 1'):
        model(ids, cache=cache)
    loop_model = tiny_model('loop')
    cache = loop_model.new_cache(1, loops=3)
    with pytest.raises(ValueError, match=r'made for 3 loops, got loops=4'):
        loop_model(ids, cache=cache, loops=4)
    with pytest.raises(ValueError, match=r"kv_sharing must be 'melt' or 'loop', got 'kv'"):
        MELTConfig(kv_sharing='kv')


def test_readme_reading_order_is_melt_py_order():
    """README's "Reading order" names melt.py's definitions; each must exist, in file order."""
    import ast
    here = pathlib.Path(__file__).parent
    tree = ast.parse((here / 'melt.py').read_text())
    lines = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            lines[node.name] = node.lineno
            for inner in getattr(node, 'body', []):
                if isinstance(inner, ast.FunctionDef):
                    lines[f'{node.name}.{inner.name}'] = inner.lineno
    readme = (here / 'README.md').read_text()
    section = readme[readme.index('## Reading order'):readme.index('## The main job')]
    names = [name for row in re.findall(r'^\| (`.+?) \|', section, re.M) for name in re.findall(r'`([\w.]+)`', row)]
    assert len(names) >= 10 and all(name in lines for name in names), [n for n in names if n not in lines]
    assert [lines[n] for n in names] == sorted(lines[n] for n in names), names

"""Tests for melt.py: memory against loop count, cached decoding, chunking, alpha, the gate.

Numerical claims are checked against `naive_forward` below: a per-token, per-head
reference written from the spec in float64, sharing no code with melt.py.
"""
import json
import math
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from melt import GATES, MELT, MELTConfig, exit_distribution
from ouro import chat_prompt, ouro_tokenizer, stop_ids

TINY = dict(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
            n_hidden=48, n_loops=3, rope_theta=10000.0, chunk_size=4)


def tiny_model(cache='melt', seed=0, **overrides):
    torch.manual_seed(seed)
    model = MELT(MELTConfig(**{**TINY, 'cache': cache, **overrides}))
    with torch.no_grad():  # give every weight, norms and gates included, a visible effect
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.3 if 'kv_gate' in name else 0.15) * torch.randn_like(p))
    return model.eval()


def in_float64(model):
    """model.double(), with RoPE's tables recomputed in float64 (melt.py keeps them in fp32,
    which would bound every float64 comparison at fp32's precision)."""
    model = model.double()
    hd, theta = model.config.head_dim, model.config.rope_theta
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(model.config.block_size, dtype=torch.float64), inv_freq).repeat(1, 2)
    model.rope_cos, model.rope_sin = angles.cos(), angles.sin()
    return model


def loop_and_melt_pair(seed=0):
    """A LoopLM and a MELT model with the same base weights."""
    loop_model = tiny_model('loop', seed)
    melt_model = tiny_model('melt', seed + 1)
    missing, unexpected = melt_model.load_state_dict(loop_model.state_dict(), strict=False)
    assert all('kv_gate' in k for k in missing) and not unexpected
    return loop_model, melt_model


def tokens(n, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY['vocab_size'], (batch, n), generator=g)


# ----------------------------------------------------------------------------------------
# the independent reference

def hf_name(name):
    """Our parameter name -> Ouro's, written out here rather than taken from melt.py."""
    if name.startswith('lm_head'):
        return name
    for ours, theirs in [('.attn.', '.self_attn.'), ('attn_norm_in', 'input_layernorm'),
                         ('attn_norm_out', 'input_layernorm_2'), ('mlp_norm_in', 'post_attention_layernorm'),
                         ('mlp_norm_out', 'post_attention_layernorm_2'), ('exit_gate', 'early_exit_gate')]:
        name = name.replace(ours, theirs)
    return 'model.' + name


def ouro_config(model):
    c = model.config
    return dict(hidden_size=c.n_embd, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                num_hidden_layers=c.n_layer, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps)


def hf_weights(model):
    return {hf_name(k): v for k, v in model.state_dict().items()}


def naive(model, ids, loops, schedule, kv='gated'):
    return naive_forward(ouro_config(model), hf_weights(model), ids, loops, schedule, kv)


def naive_forward(cfg, weights, ids, loops, schedule, kv='gated'):
    """Final-loop logits (T, V) for one sequence, token by token, head by head, in float64.
    cfg: Ouro's config.json fields; weights: tensors by Ouro's names.
    schedule: the chunk sizes, in order. kv: 'gated' = MELT (one K/V row per token, final
    once its chunk is done; h^1 = x^1, then the gate), 'open' = keys/values from x but
    still one final row per token (Ouro's last-loop cache sharing), 'mean' = from the mean
    of the token's inputs x over the loops so far, 'ema:Z' = from h = Z h + (1 - Z) x, 'loop'
    = LoopLM (at loop t every token attends to the loop-t K/V of earlier tokens)."""
    W = {k: v.double() for k, v in weights.items()}
    d, nh, nkv, n_layer = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['num_hidden_layers']
    theta, eps = cfg['rope_theta'], cfg['rms_norm_eps']
    hd = d // nh

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean() + eps)

    def rope(vec, pos):  # vec: (hd,), pair i with i + hd/2
        half = hd // 2
        ang = torch.tensor([pos * theta ** (-2 * i / hd) for i in range(half)], dtype=torch.float64)
        a, b = vec[:half], vec[half:]
        return torch.cat([a * torch.cos(ang) - b * torch.sin(ang), b * torch.cos(ang) + a * torch.sin(ang)])

    def heads(vec, n):
        return [vec[i * hd:(i + 1) * hd] for i in range(n)]

    final = [[] for _ in range(n_layer)]  # per layer: (k_heads, v_heads) of finished tokens
    per_loop = [[[] for _ in range(n_layer)] for _ in range(loops)]
    out, pos = [], 0
    for size in schedule:
        states = [W['model.embed_tokens.weight'][t] for t in ids[pos:pos + size]]
        latent = [[None] * n_layer for _ in states]
        inputs = [[[] for _ in range(n_layer)] for _ in states]  # every loop's x, per token and layer
        last_kv = [None] * n_layer
        for t in range(loops):
            for l in range(n_layer):
                p = f'model.layers.{l}.'
                xs = [rms(s, W[p + 'input_layernorm.weight']) for s in states]
                for i, x in enumerate(xs):
                    h = latent[i][l]
                    inputs[i][l].append(x)
                    if kv == 'gated' and h is not None:
                        z = torch.sigmoid(W[p + 'self_attn.kv_gate.w_z.weight'] @ x
                                          + W[p + 'self_attn.kv_gate.u_z.weight'] @ h + W[p + 'self_attn.kv_gate.b_z'])
                        latent[i][l] = z * h + (1 - z) * x
                    elif kv == 'mean':
                        latent[i][l] = sum(inputs[i][l]) / len(inputs[i][l])
                    elif kv.startswith('ema:') and h is not None:
                        latent[i][l] = float(kv[4:]) * h + (1 - float(kv[4:])) * x
                    else:
                        latent[i][l] = x
                chunk_kv = []
                for i in range(size):
                    k = [rope(v, pos + i) for v in heads(W[p + 'self_attn.k_proj.weight'] @ latent[i][l], nkv)]
                    v = heads(W[p + 'self_attn.v_proj.weight'] @ latent[i][l], nkv)
                    chunk_kv.append((k, v))
                past = per_loop[t][l] if kv == 'loop' else final[l]
                attn = []
                for i, x in enumerate(xs):
                    q = [rope(v, pos + i) for v in heads(W[p + 'self_attn.q_proj.weight'] @ x, nh)]
                    seen = past + chunk_kv[:i + 1]
                    ys = []
                    for hq in range(nh):
                        g = hq // (nh // nkv)
                        scores = torch.stack([q[hq] @ k[g] for k, _ in seen]) / math.sqrt(hd)
                        w = torch.softmax(scores, dim=0)
                        ys.append(sum(wj * v[g] for wj, (_, v) in zip(w, seen)))
                    attn.append(W[p + 'self_attn.o_proj.weight'] @ torch.cat(ys))
                for i in range(size):
                    s = states[i] + rms(attn[i], W[p + 'input_layernorm_2.weight'])
                    m = rms(s, W[p + 'post_attention_layernorm.weight'])
                    m = W[p + 'mlp.down_proj.weight'] @ (torch.nn.functional.silu(W[p + 'mlp.gate_proj.weight'] @ m)
                                                         * (W[p + 'mlp.up_proj.weight'] @ m))
                    states[i] = s + rms(m, W[p + 'post_attention_layernorm_2.weight'])
                per_loop[t][l] += chunk_kv
                last_kv[l] = chunk_kv
            states = [rms(s, W['model.norm.weight']) for s in states]
        for l in range(n_layer):
            final[l] += last_kv[l]
        out += [W['lm_head.weight'] @ s for s in states]
        pos += size
    return torch.stack(out)  # float64, so gradients can be compared too


def decode(model, ids, loops, prefill=None, chunk_size=None):
    """Logits from a cache: `prefill` tokens in one call (chunked), the rest one at a time."""
    cache = model.new_cache(ids.size(0), loops=loops)
    prefill = prefill or 0
    out = []
    if prefill:
        out.append(model(ids[:, :prefill], loops=loops, cache=cache, chunk_size=chunk_size)[0])
    for i in range(prefill, ids.size(1)):
        out.append(model(ids[:, i:i + 1], loops=loops, cache=cache)[0])
    return torch.cat(out, dim=1), cache


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
# memory against loop count

@pytest.mark.parametrize('mode, gate', [('loop', 'element')] + [('melt', g) for g in GATES])
def test_cache_bytes_against_loop_count(mode, gate):
    model = tiny_model(mode, gate=gate)
    c = model.config
    ids = tokens(10)
    one_loop_bytes = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * 10 * 4  # fp32
    for loops in (1, 2, 4, 8):
        cache = model.new_cache(1, max_tokens=10, loops=loops)
        model(ids, loops=loops, cache=cache)
        expected = one_loop_bytes * (1 if mode == 'melt' else loops)
        assert cache.nbytes == expected, (loops, cache.nbytes, expected)
        assert c.kv_bytes_per_token(loops, bytes_per_element=4) * 10 == expected
        shapes = {tuple(t.shape) for t in cache.buffers()}
        one_layer = (1, c.n_kv_head, 10, c.n_embd // c.n_head)  # (B, n_kv_head, max_tokens, hs)
        assert shapes == {(c.n_layer, *one_layer) if mode == 'melt' else (loops, c.n_layer, *one_layer)}


def test_process_memory_of_prefill_and_decode_does_not_grow_with_loops():
    """Peak RSS of a 1,024-token prefill and of decoding, each run in a fresh process: MELT's
    grows by at most a tenth of the LoopLM's growth from 1 to 8 loops (the LoopLM's KV cache
    does grow: 8 MB per loop here), and what MELT holds beyond its cache stays put; for
    every way of sharing the K/V (GATES)."""
    import bench
    shape = dict(vocab_size=256, block_size=1024, n_layer=8, n_head=4, n_kv_head=4, n_embd=128, n_hidden=352, n_loops=4)
    runs = {(gate, loops): bench.run_child('generate', {**shape, 'gate': 'element' if gate == 'loop' else gate},
                                           'loop' if gate == 'loop' else 'melt', loops, 1020, 4, 64, 'cpu', False)
            for gate in ('loop',) + GATES for loops in (1, 8)}
    growth = {key: r['prefill_peak'] - r['base'] for key, r in runs.items()}
    loop_growth = growth['loop', 8] - growth['loop', 1]
    assert runs['loop', 8]['kv'] - runs['loop', 1]['kv'] == 7 * 8 * 2 * 128 * 1023 * 4
    assert loop_growth > 0.9 * (runs['loop', 8]['kv'] - runs['loop', 1]['kv'])
    for gate in GATES:
        assert runs[gate, 8]['kv'] == runs[gate, 1]['kv'] == runs['loop', 1]['kv']
        assert abs(growth[gate, 8] - growth[gate, 1]) <= 0.1 * loop_growth, (gate, growth, loop_growth)
        beyond = {loops: max(runs[gate, loops]['prefill_peak'], runs[gate, loops]['decode_peak'])
                  - runs[gate, loops]['base'] - runs[gate, loops]['kv'] for loops in (1, 8)}
        assert abs(beyond[8] - beyond[1]) <= 4 * 2**20, (gate, beyond)


def test_decode_writes_the_cache_in_place_and_the_static_step_agrees():
    for mode in ('melt', 'loop'):
        model = in_float64(tiny_model(mode))
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
    melt_logits, _ = melt_model(ids, chunk_size=4)
    assert max_diff(melt_model(ids, alpha=0.0, chunk_size=4)[0], loop_logits) <= 1e-12
    assert max_diff(melt_model(ids, alpha=1.0, chunk_size=4)[0], melt_logits) == 0
    middle, _ = melt_model(ids, alpha=0.5, chunk_size=4)
    assert max_diff(middle, loop_logits) > 1e-3 and max_diff(middle, melt_logits) > 1e-3
    # alpha decoding with a phase-1 cache keeps both K/V kinds and matches chunk_size=1
    cache = melt_model.new_cache(2, max_tokens=12, alpha=0.5)
    steps = torch.cat([melt_model(ids[:, i:i + 1], cache=cache)[0] for i in range(12)], dim=1)
    assert max_diff(steps, melt_model(ids, alpha=0.5, chunk_size=1)[0]) <= 1e-12
    assert cache.nbytes == melt_model.config.kv_bytes_per_token(bytes_per_element=8) * 2 * 12 * (1 + 3)


def test_one_loop_is_the_same_in_both_modes():
    loop_model, melt_model = map(in_float64, loop_and_melt_pair())
    ids = tokens(12)
    assert max_diff(loop_model(ids, loops=1)[0], melt_model(ids, loops=1, chunk_size=1)[0]) <= 1e-12
    assert max_diff(loop_model(ids, loops=1)[0], melt_model(ids, loops=1, chunk_size=5)[0]) <= 1e-12


# ----------------------------------------------------------------------------------------
# training signals

def test_exit_distribution_hand_worked():
    lam = torch.tensor([0.5, 0.2, 0.9])  # the last loop's own lambda does not matter
    p = exit_distribution(torch.logit(lam))
    expected = torch.tensor([0.5, 0.5 * 0.2, 0.5 * 0.8])
    assert torch.allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize('mode', ['melt', 'loop'])
def test_training_steps_lower_the_loss_and_reach_the_gates(mode):
    torch.manual_seed(0)
    model = MELT(MELTConfig(**{**TINY, 'cache': mode}))
    ids = tokens(33, batch=4)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, 3e-2, (0.9, 0.95), 'cpu')
    losses = []
    for step in range(8):
        _, loss = model(x, y, chunk_size=8)
        opt.zero_grad()
        loss.backward()
        if step == 0 and mode == 'melt':
            for gate in model.gate_modules():
                for name, p in gate.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if mode == 'melt':
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
    import bench
    torch.manual_seed(0)
    config = dict(TINY, block_size=256, n_embd=64, n_hidden=96, n_head=4, n_kv_head=4)
    melt_model = MELT(MELTConfig(**config, cache='melt'))
    loop_model = melt_model.as_cache('loop')
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
    for mode in ('melt', 'loop'):
        model = tiny_model(mode)
        ids = tokens(5)
        out = model.generate(ids, 6, top_k=1, chunk_size=1)
        for i in range(5, 11):  # each token is the argmax of a fresh forward on what came before
            assert out[0, i] == model(out[:, :i], chunk_size=1)[0][0, -1].argmax()


def test_errors_name_the_value_and_the_limit():
    model = tiny_model('melt')
    ids = tokens(5)
    with pytest.raises(ValueError, match=r'loops must be an integer >= 1, got 0'):
        model(ids, loops=0)
    with pytest.raises(ValueError, match=r'chunk_size must be >= 1, got 0'):
        model(ids, chunk_size=0)
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\], got 1.5'):
        model(ids, alpha=1.5)
    with pytest.raises(ValueError, match=r'alpha is for cache=.melt. models'):
        tiny_model('loop')(ids, alpha=0.5)
    with pytest.raises(ValueError, match=r'token id 64 is outside the vocabulary \[0, 64\)'):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r'token id -1 is outside'):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r'prompt of 5 tokens \+ 61 new tokens run 65 positions, more than block_size 64'):
        model.generate(ids, 61)
    model.generate(ids, 60)  # 64 positions: the last new token is never run
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
    with pytest.raises(ValueError, match=r"cache must be 'melt' or 'loop', got 'kv'"):
        MELTConfig(cache='kv')


# ----------------------------------------------------------------------------------------
# Ouro folders in and out

OURO_TINY = dict(model_type='ouro', architectures=['OuroForCausalLM'], hidden_size=32,
                 intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=64, rope_theta=10000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=64, total_ut_steps=4,
                 early_exit_threshold=1.0, tie_word_embeddings=False, hidden_act='silu')


def ouro_tensors(cfg, seed=0):
    """Random weights under every name of an Ouro checkpoint (spec section 6)."""
    g = torch.Generator().manual_seed(seed)
    d, f, V, hd = cfg['hidden_size'], cfg['intermediate_size'], cfg['vocab_size'], cfg['head_dim']
    q, kv = cfg['num_attention_heads'] * hd, cfg['num_key_value_heads'] * hd

    def rand(*shape, mean=0.0):
        return mean + 0.15 * torch.randn(*shape, generator=g)
    out = {'model.embed_tokens.weight': rand(V, d), 'lm_head.weight': rand(V, d),
           'model.norm.weight': rand(d, mean=1), 'model.early_exit_gate.weight': rand(1, d),
           'model.early_exit_gate.bias': rand(1)}
    for i in range(cfg['num_hidden_layers']):
        p = f'model.layers.{i}.'
        out.update({p + 'self_attn.q_proj.weight': rand(q, d), p + 'self_attn.k_proj.weight': rand(kv, d),
                    p + 'self_attn.v_proj.weight': rand(kv, d), p + 'self_attn.o_proj.weight': rand(d, q),
                    p + 'mlp.gate_proj.weight': rand(f, d), p + 'mlp.up_proj.weight': rand(f, d),
                    p + 'mlp.down_proj.weight': rand(d, f)})
        for norm in ('input_layernorm', 'input_layernorm_2', 'post_attention_layernorm', 'post_attention_layernorm_2'):
            out[p + norm + '.weight'] = rand(d, mean=1)
    return out


def write_ouro_folder(path, cfg, tensors, dtype=torch.float32, shards=1):
    """The HuggingFace layout: config.json + model.safetensors, or n shards + index."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(json.dumps({**cfg, 'torch_dtype': str(dtype).split('.')[1]}))
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
        return path
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, str(path / file), metadata={'format': 'pt'})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}))
    return path


def read_safetensors_by_hand(path):
    """Every tensor of a folder as float32, parsing the format directly: an 8-byte header
    length, a JSON header of dtype/shape/offsets, then the raw little-endian data."""
    files = [f for f in os.listdir(path) if f.endswith('.safetensors')]
    out = {}
    for file in files:
        raw = (path / file).read_bytes()
        n = struct.unpack('<Q', raw[:8])[0]
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        for name, info in header.items():
            if name == '__metadata__':
                continue
            start, end = info['data_offsets']
            if info['dtype'] == 'F32':
                values = np.frombuffer(data[start:end], dtype='<f4')
            else:
                assert info['dtype'] == 'BF16'
                values = (np.frombuffer(data[start:end], dtype='<u2').astype(np.uint32) << 16).view(np.float32)
            out[name] = torch.from_numpy(values.copy()).reshape(info['shape'])
    return out


@pytest.mark.parametrize('dtype,shards', [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 1), (torch.bfloat16, 2)])
def test_from_ouro_matches_naive_ouro_forward(tmp_path, dtype, shards):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY), dtype, shards)
    cfg, weights = json.loads((folder / 'config.json').read_text()), read_safetensors_by_hand(folder)
    ids = tokens(7)
    model = MELT.from_ouro(str(folder), cache='loop')
    assert model.lm_head.weight.dtype == dtype and model.config.n_loops == 4
    exact = in_float64(MELT.from_ouro(str(folder), cache='loop', dtype=torch.float64))
    for loops in (1, 2, 3, 4):
        ref = naive_forward(cfg, weights, ids[0].tolist(), loops, [7], kv='loop')
        assert max_diff(exact(ids, loops=loops)[0][0], ref) < 1e-10, loops
        if dtype == torch.bfloat16:  # the bf16 model computes in bf16: same answer, bf16 precision
            assert max_diff(model(ids, loops=loops)[0][0].float(), ref) < 0.1 * ref.abs().max()


def test_from_ouro_melt_starts_as_last_loop_sharing(tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY))
    model = MELT.from_ouro(str(folder))  # cache='melt': new gates, b_z = gate_bias_init
    assert model.config.cache == 'melt' and len(model.gate_modules()) == 2
    for gate in model.gate_modules():
        assert gate.w_z.weight.abs().sum() == 0 and torch.all(gate.b_z == model.config.gate_bias_init)
    with torch.no_grad():
        for gate in model.gate_modules():
            gate.b_z.fill_(-1e4)
    cfg, weights = json.loads((folder / 'config.json').read_text()), read_safetensors_by_hand(folder)
    ids = tokens(6)
    ref = naive_forward(cfg, weights, ids[0].tolist(), 4, [1] * 6, kv='open')
    assert max_diff(in_float64(model)(ids, chunk_size=1)[0][0], ref) < 1e-10


def test_from_ouro_errors(tmp_path):
    good = ouro_tensors(OURO_TINY)
    bad_shape = dict(good, **{'model.layers.1.self_attn.k_proj.weight': torch.zeros(8, 32)})
    folder = write_ouro_folder(tmp_path / 'shape', OURO_TINY, bad_shape)
    with pytest.raises(ValueError, match=r'tensor model.layers.1.self_attn.k_proj.weight .* has shape \(8, 32\), expected \(16, 32\)'):
        MELT.from_ouro(str(folder))
    lacking = {k: v for k, v in good.items() if k != 'model.norm.weight'}
    with pytest.raises(ValueError, match=r'lacks 1 tensors, e.g. \[.model.norm.weight.\]'):
        MELT.from_ouro(str(write_ouro_folder(tmp_path / 'lack', OURO_TINY, lacking)))
    extra = dict(good, **{'model.layers.0.self_attn.q_norm.weight': torch.ones(8)})
    with pytest.raises(ValueError, match=r'unexpected tensor model.layers.0.self_attn.q_norm.weight'):
        MELT.from_ouro(str(write_ouro_folder(tmp_path / 'extra', OURO_TINY, extra)))
    folder = write_ouro_folder(tmp_path / 'llama', dict(OURO_TINY, model_type='llama'), good)
    with pytest.raises(ValueError, match=r"model_type 'llama', expected 'ouro'"):
        MELT.from_ouro(str(folder))
    with pytest.raises(FileNotFoundError, match=r'no config.json in'):
        MELT.from_ouro(str(tmp_path / 'nowhere'))
    folder = write_ouro_folder(tmp_path / 'shards', OURO_TINY, good, shards=2)
    (folder / 'model-00002-of-00002.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r'lists model-00002-of-00002.safetensors, which is not in'):
        MELT.from_ouro(str(folder))
    (folder / 'model.safetensors.index.json').unlink()
    with pytest.raises(FileNotFoundError, match=r'no model.safetensors or model.safetensors.index.json'):
        MELT.from_ouro(str(folder))


@pytest.mark.parametrize('mode', ['melt', 'loop'])
def test_export_round_trips_bit_exactly(tmp_path, mode):
    model = tiny_model(mode)
    model.save_pretrained(str(tmp_path / 'out'))
    back = MELT.from_pretrained(str(tmp_path / 'out'))
    assert back.config == model.config
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = tokens(9)
    # same bits; in float64, so that BLAS summing in another order (other alignment) stays invisible
    assert max_diff(in_float64(back)(ids)[0], in_float64(model)(ids)[0]) <= 1e-12
    names = set(read_safetensors_by_hand(tmp_path / 'out'))
    assert any('self_attn.kv_gate.w_z.weight' in n for n in names) == (mode == 'melt')
    assert not list(tmp_path.glob('out/*.tmp'))
    if mode == 'loop':  # a LoopLM export is an Ouro folder again, for a reader that is not ours
        cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
        assert cfg['model_type'] == 'ouro' and cfg['melt']['cache'] == 'loop'
        ref = naive_forward(cfg, read_safetensors_by_hand(tmp_path / 'out'), ids[0].tolist(), 3, [9], kv='loop')
        loaded = in_float64(MELT.from_ouro(str(tmp_path / 'out'), cache='loop', dtype=torch.float64))
        assert max_diff(loaded(ids)[0][0], ref) < 1e-10


def test_loading_a_large_checkpoint_does_not_hold_two_copies(tmp_path):
    cfg = dict(OURO_TINY, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=8, head_dim=128, vocab_size=16384)
    zeros = {k: torch.zeros(v.shape) for k, v in ouro_tensors(cfg).items()}
    folder = write_ouro_folder(tmp_path / 'big', cfg, zeros, dtype=torch.bfloat16)
    size = (folder / 'model.safetensors').stat().st_size
    assert size > 200e6
    # peak resident memory (VmHWM; ru_maxrss would carry pytest's own peak across exec),
    # from a baseline taken after torch's one-time setup for meta tensors (~70 MB whatever
    # the model); after loading, every weight is read so that lazily mapped pages count too
    script = ("import torch; from melt import MELT\n"
              "def peak(): return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
              "with torch.device('meta'): torch.nn.Embedding(2, 2)\n"
              "before = peak()\n"
              f"m = MELT.from_ouro({str(folder)!r}, cache='loop')\n"
              "assert m.lm_head.weight.dtype == torch.bfloat16\n"
              "for p in m.parameters():\n"
              "    flat = p.detach().view(-1)\n"
              "    for i in range(0, flat.numel(), 2 ** 20): flat[i:i + 2 ** 20].sum()\n"
              "print(peak() - before)\n")
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip())
    assert 0.9 * size < grown < 1.3 * size, (grown, size)  # the weights once, not twice


# ----------------------------------------------------------------------------------------
# the Ouro tokenizer through tiktoken, against HuggingFace's tokenizers library (test-only)

def varied_lines(n_synthetic=1500, seed=0):
    """Prose and code (the source of a few standard-library modules) plus made-up lines of
    numbers, runs of spaces and tabs, accents, CJK and emoji."""
    import argparse
    import collections
    import email
    import inspect
    import random
    import textwrap
    lines = []
    for module in (argparse, collections, email, textwrap, json):
        lines += inspect.getsource(module).splitlines()
    rng = random.Random(seed)
    words = "naïve café über façade résumé 東京 北京大学 こんにちは 😀 🚀 👍🏽 Ωμέγα Привет мир".split()
    for i in range(n_synthetic):
        kind = i % 4
        if kind == 0:
            lines.append(f"pi is {rng.random() * 10:.5f}, {rng.randint(0, 10**7):,} items at ${rng.randint(1, 999)}.{rng.randint(0, 99):02d}")
        elif kind == 1:
            lines.append(" " * rng.randint(0, 6) + "\t" * rng.randint(0, 3) + rng.choice(words) + "  "
                         + str(rng.randint(0, 99999)) + " " * rng.randint(0, 4))
        elif kind == 2:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
        else:
            lines.append("x = 3.14159; y=1,000,000\n\n  z = a[12]+b['k']  # it's they're we'll I'd 1st 2nd")
    return lines


def train_hf_tokenizer(lines, folder, vocab_size=3000, full_alphabet=True):
    """A tokenizer.json in the SmolLM2 shape: specials at 0, 1, 2; Digits + ByteLevel."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    tok.train_from_iterator(lines, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / 'tokenizer.json'))
    return tok


def test_tiktoken_ids_equal_huggingface_ids(tmp_path):
    lines = varied_lines()
    hf = train_hf_tokenizer(lines[::2], tmp_path)
    enc = ouro_tokenizer(str(tmp_path))
    held_out = lines[1::2] + ['\n'.join(lines[1:200:2]), '   \t\t  \n\n\n  42  ', '1,000,000 and 3.14159']
    assert len(held_out) > 2000
    mismatched = [line for line in held_out if enc.encode(line) != hf.encode(line).ids]
    assert not mismatched, mismatched[:3]
    for line in held_out:
        assert enc.decode(enc.encode(line)) == line
    text = '<|im_start|>user\nhi<|im_end|>\n'
    assert enc.encode(text, allowed_special='all') == hf.encode(text).ids
    assert enc.encode(text, allowed_special='all')[0] == 1 and enc.n_vocab == hf.get_vocab_size()


def test_bytes_missing_from_the_vocabulary_are_dropped_like_huggingface(tmp_path):
    hf = train_hf_tokenizer(['hello world 123 abc'] * 20, tmp_path, vocab_size=100, full_alphabet=False)
    enc = ouro_tokenizer(str(tmp_path))
    for text in ['hello é world', 'zzz hello 😀', 'héllo wörld 12']:
        assert enc.encode(text) == hf.encode(text).ids
    assert enc.decode(enc.encode('hello é world')) == 'hello  world'
    assert max(enc.encode('😀 hello')) < hf.get_vocab_size()


def test_chat_format():
    text = chat_prompt([{'role': 'user', 'content': 'What is 2+2?'}], thinking=True)
    assert text == '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n'
    assert chat_prompt([{'role': 'user', 'content': 'x'}]).endswith('<|im_start|>assistant\n')


def test_stop_ids_are_im_end_and_endoftext(tmp_path):
    train_hf_tokenizer(['hello world'] * 5, tmp_path, vocab_size=300)
    assert stop_ids(ouro_tokenizer(str(tmp_path))) == {0, 2}


# ----------------------------------------------------------------------------------------
# train.py

import train  # noqa: E402

TRAIN_TINY = ['--n_embd=32', '--n_hidden=64', '--n_head=2', '--n_kv_head=2', '--batch_size=8',
              '--block_size=18', '--loops=2', '--chunk_size=3', '--log_interval=1', '--warmup_iters=0',
              '--eval_iters=2', '--device=cpu', '--dtype=float32']


@pytest.fixture(scope='module')
def reason_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reason')
    train.reason_task().prepare(str(folder), n_train=4000, n_val=300)
    return str(folder)


def run_train(capsys, *args):
    if args:
        train.main(TRAIN_TINY + list(args))
    out = capsys.readouterr().out
    losses = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r'^iter (\d+): loss ([\d.]+)', out, re.M)}
    return losses, out


@pytest.fixture(scope='module')
def looplm_dir(reason_data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('loop'))
    train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}',
                             '--max_iters=40', '--eval_interval=40', '--learning_rate=1e-2'])
    return out_dir


def fixed_val_loss(phase, model, teacher_model, data_dir):
    """The phase's loss at alpha = 1 on four fixed validation batches."""
    cfg = train.phase_config(phase, train.parse_args(TRAIN_TINY))
    data = train.Data(data_dir, cfg['block_size'], 'cpu')
    with torch.no_grad():
        return np.mean([train.phase_loss(cfg, model, teacher_model, data.batch('val', 16, seed), 1.0)[0].item()
                        for seed in range(4)])


def test_each_phase_lowers_its_loss(reason_data, looplm_dir, tmp_path, capsys):
    common = [f'--dataset={reason_data}', '--eval_interval=30', '--max_iters=30', '--always_save_checkpoint=True']
    losses, _ = run_train(capsys, *common, '--phase=loop', f'--out_dir={tmp_path}/loop', '--learning_rate=1e-2')
    assert np.mean([losses[i] for i in range(25, 30)]) < np.mean([losses[i] for i in range(5)]) - 0.3
    teacher_model, _ = train.load_checkpoint(looplm_dir, 'cpu')
    cfg = train.phase_config('transition', train.parse_args(TRAIN_TINY))
    start = train.load_model(looplm_dir, 'melt', cfg, {'vocab_size': 137})[0]  # LoopLM weights + new gates
    run_train(capsys, *common, '--phase=transition', f'--init_from={looplm_dir}', f'--out_dir={tmp_path}/transition',
              '--transition_iters=10', '--learning_rate=3e-3', '--gate_lr=3e-2')
    after_transition, _ = train.load_checkpoint(f'{tmp_path}/transition', 'cpu')
    assert fixed_val_loss('transition', after_transition, None, reason_data) < \
        fixed_val_loss('transition', start, None, reason_data) - 0.01
    _, out = run_train(capsys, *common, '--phase=distill', f'--init_from={tmp_path}/transition',
                       f'--teacher={looplm_dir}', f'--out_dir={tmp_path}/distill', '--gate_lr=3e-2', '--learning_rate=3e-3')
    after_distill, ckpt = train.load_checkpoint(f'{tmp_path}/distill', 'cpu')
    assert fixed_val_loss('distill', after_distill, teacher_model, reason_data) < \
        fixed_val_loss('distill', after_transition, teacher_model, reason_data) - 0.001
    assert re.search(r'iter 0: loss [\d.]+ \(kl [\d.]+, attn [\d.]+\)', out)
    assert ckpt['phase'] == 'distill' and ckpt['model_args']['cache'] == 'melt' and ckpt['iter_num'] == 30
    assert set(ckpt) == {'model', 'optimizer', 'model_args', 'config', 'iter_num', 'best_val_loss', 'phase'}


def test_alpha_schedule_is_linear_then_one(reason_data, looplm_dir, tmp_path, capsys):
    cfg = train.phase_config('transition', {'transition_iters': 8})
    assert [train.alpha_at(cfg, i) for i in (0, 2, 4, 8, 12)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    _, out = run_train(capsys, f'--dataset={reason_data}', '--phase=transition', f'--init_from={looplm_dir}',
                       f'--out_dir={tmp_path}', '--max_iters=6', '--eval_interval=100', '--transition_iters=4')
    logged = [float(a) for a in re.findall(r'alpha ([\d.]+)', out)]
    assert logged == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_distill_loss_is_zero_for_the_teacher_itself():
    loop_model, melt_model = loop_and_melt_pair()
    ids = tokens(12, batch=2)
    _, _, teacher_aux = loop_model(ids, return_aux=True)
    _, _, same = melt_model(ids, alpha=0.0, chunk_size=4, return_aux=True)
    _, _, melt = melt_model(ids, alpha=1.0, chunk_size=4, return_aux=True)
    assert train.kl_every_loop(same, teacher_aux).abs() < 1e-6
    assert train.attention_alignment(same, teacher_aux) < 1e-10
    assert train.kl_every_loop(melt, teacher_aux) > 1e-4 and train.attention_alignment(melt, teacher_aux) > 1e-4
    # hand-check of the KL on one distribution pair
    s, t = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    ps, pt = torch.softmax(s, -1)[0, 0], torch.softmax(t, -1)[0, 0]
    expected = (pt * (pt / ps).log()).sum()
    assert torch.isclose(train.kl_every_loop({'logits': [s]}, {'logits': [t]}), expected)


def test_depth_objective_hand_worked():
    """Loop k learns only the tokens whose problem needs at most k hops, the last loop all."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]
    exit_logits = torch.randn(2, 3, 3, generator=g)
    targets = torch.tensor([[-1, 2, 4], [1, -1, 0]])
    depth = torch.tensor([[1, 1, 3], [2, 2, 1]])
    loss, parts = train.depth_loss({'logits': logits, 'exit_logits': exit_logits}, targets, depth, 0.5)
    per_loop, ces = [], {}
    for k in range(3):  # the naive way: token by token
        terms = []
        for b in range(2):
            for t in range(3):
                if targets[b, t] < 0:
                    continue
                ce = -torch.log_softmax(logits[k][b, t], -1)[targets[b, t]]
                ces[k, b, t] = ce
                if depth[b, t] <= k + 1 or k == 2:
                    terms.append(ce)
        per_loop.append(sum(terms) / len(terms))
    bce = []
    for (b, t) in [(0, 1), (0, 2), (1, 0), (1, 2)]:
        for k in range(2):
            done = float(ces[k, b, t] - ces[2, b, t] < 0.1)
            p = torch.sigmoid(exit_logits[b, t, k])
            bce.append(-(done * torch.log(p) + (1 - done) * torch.log(1 - p)) / 2)
    exit_term = sum(bce) / 4
    assert torch.isclose(parts['exit'], exit_term, atol=1e-6)
    assert torch.isclose(loss, sum(per_loop) / 3 + 0.5 * exit_term, atol=1e-6)


def resolve(words):
    """(answer, hops) of a reasoning problem, followed link by link."""
    links = dict(w.split('=') for w in words if '=' in w)
    name, hops = [w for w in words if w.startswith('?')][0][1:], 0
    while name in links:
        name, hops = links[name], hops + 1
    return name, hops


def test_rows_hold_one_problem_and_depth_is_its_hop_count(reason_data):
    data = train.Data(reason_data, 8, 'cpu')
    itos = data.meta['itos']
    x, y, depth = data.batch('train', 64, seed=3)
    assert (x[:, 0] == itos.index('\n')).all()  # every row starts at a problem
    assert ((y >= 0).sum(1) == 1).all() and (y[:, -1] >= 0).all()  # one answer, at the query
    for row, target, d in zip(x.tolist(), y[:, -1].tolist(), depth.tolist()):
        answer, hops = resolve([itos[i] for i in row])
        assert itos[target] == answer and set(d) == {hops}
    assert sorted(set(depth[:, 0].tolist())) == [1, 2, 3, 4]


def test_the_objective_is_depth_on_the_task_and_ouro_from_ouro_or_without_depths(reason_data, tmp_path):
    def choose(*flags, folder=reason_data):
        cfg = train.phase_config('loop', train.parse_args(list(flags)))
        return train.choose_objective(cfg, train.Data(folder, 8, 'cpu'))
    assert choose() == 'depth' and choose('--objective=ouro') == 'ouro'
    assert choose('--init_from=ouro:/some/Ouro-1.4B') == 'ouro'
    plain = tmp_path / 'plain'
    plain.mkdir()
    for f in ('train.bin', 'val.bin', 'meta.pkl'):
        (plain / f).write_bytes((pathlib.Path(reason_data) / f).read_bytes())
    assert choose(folder=str(plain)) == 'ouro'
    with pytest.raises(ValueError, match=r'--objective=depth needs train_depth.bin and val_depth.bin in .*plain'):
        choose('--objective=depth', folder=str(plain))


def stop_at(monkeypatch, iter_to_stop, error):
    """Make train.phase_loss raise `error` (or return NaN, error=None) at one iteration;
    returns a dict that gets the checkpoint's bytes as they were at that moment."""
    real, seen, steps = train.phase_loss, {}, []

    def patched(cfg, model, teacher_model, batch, alpha):
        loss, parts = real(cfg, model, teacher_model, batch, alpha)
        steps.extend([None] if model.training else [])  # one training call per iteration here
        if len(steps) - 1 == iter_to_stop and model.training:
            seen['ckpt'] = open(os.path.join(cfg['out_dir'], 'ckpt.pt'), 'rb').read()
            if error is not None:
                raise error
            loss = loss * float('nan')
        return loss, parts
    monkeypatch.setattr(train, 'phase_loss', patched)
    return seen


def test_resume_gives_the_same_losses(reason_data, tmp_path, capsys, monkeypatch):
    common = [f'--dataset={reason_data}', '--phase=loop', '--eval_interval=4', '--max_iters=8']
    whole, _ = run_train(capsys, *common, f'--out_dir={tmp_path}/whole')
    stop_at(monkeypatch, 5, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        train.main(TRAIN_TINY + common + [f'--out_dir={tmp_path}/parts'])
    first, _ = run_train(capsys)  # what the interrupted run printed
    monkeypatch.undo()
    second, _ = run_train(capsys, *common, f'--out_dir={tmp_path}/parts', '--init_from=resume')
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [4, 5, 6, 7]
    assert {**first, **second} == whole and first[4] == second[4]


def test_nan_loss_stops_and_keeps_the_checkpoint(reason_data, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / 'run'
    seen = stop_at(monkeypatch, 3, None)
    with pytest.raises(FloatingPointError, match=r'loss is nan at iter 3; stopping. The last good checkpoint in .* is untouched'):
        run_train(capsys, f'--dataset={reason_data}', '--phase=loop', '--max_iters=6', '--eval_interval=2',
                  f'--out_dir={out_dir}', '--always_save_checkpoint=True')
    assert (out_dir / 'ckpt.pt').read_bytes() == seen['ckpt']
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] == 2
    assert not list(out_dir.glob('*.tmp'))


def test_bad_flags_and_mismatched_data(reason_data, looplm_dir, tmp_path):
    with pytest.raises(ValueError, match=r'unknown option --learning_rat; known: '):
        train.main(['--learning_rat=1e-3'])
    with pytest.raises(ValueError, match=r'--max_iters=ten: expected a int'):
        train.main(['--max_iters=ten'])
    with pytest.raises(ValueError, match=r'--max_iters=1.5: expected a int, got float'):
        train.main(['--max_iters', '1.5'])
    assert train.parse_args(['--compile', '--max_iters', '5', '--decay_lr=False']) == \
        {'compile': True, 'max_iters': 5, 'decay_lr': False}
    with pytest.raises(ValueError, match=r"--phase must be one of loop, transition, distill, all, got 'distil'"):
        train.main(['--phase', 'distil'])
    with pytest.raises(ValueError, match=r"--dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        train.main(['--phase=loop', '--dtype=fp8'])
    with pytest.raises(ValueError, match=r'--chunk_size must be >= 1, got 0'):
        train.main(['--phase=transition', '--chunk_size=0'])
    with pytest.raises(FileNotFoundError, match=r'no ckpt.pt in .*nowhere'):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=transition', f'--init_from={tmp_path}/nowhere'])
    with pytest.raises(FileNotFoundError, match=r'no meta.pkl in'):
        train.main(TRAIN_TINY + [f'--dataset={tmp_path}', '--phase=loop'])
    bigger = tmp_path / 'bigger'
    bigger.mkdir()
    for f in ('train.bin', 'val.bin'):
        (bigger / f).write_bytes(open(os.path.join(reason_data, f), 'rb').read())
    with open(bigger / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 500, 'tokenizer': 'gpt2'}, f)
    with pytest.raises(ValueError, match=r'has vocab_size 500, the model only 137'):
        train.main(TRAIN_TINY + [f'--dataset={bigger}', '--phase=transition', f'--init_from={looplm_dir}'])


def test_ddp_two_processes_match_one_process(reason_data, tmp_path, capsys):
    args = TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--max_iters=3', '--eval_interval=3',
                         '--gradient_accumulation_steps=2']
    train.main(args + [f'--out_dir={tmp_path}/single'])
    capsys.readouterr()
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          os.path.join(here, 'train.py')] + args + [f'--out_dir={tmp_path}/ddp'],
                         capture_output=True, text=True, cwd=here, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(f'{tmp_path}/single/ckpt.pt', weights_only=False)['model']
    ddp = torch.load(f'{tmp_path}/ddp/ckpt.pt', weights_only=False)['model']
    assert single.keys() == ddp.keys()
    # Adam divides by sqrt(v): where a gradient is ~0, the fp32 rounding of gloo's other order of
    # summation can move a weight by up to lr. So: nearly all weights equal, none off by more.
    diff = torch.cat([(single[k] - ddp[k]).abs().flatten() for k in single])
    assert (diff <= 1e-5).float().mean() > 0.999 and diff.max() <= 2 * 3 * 3e-3, diff.max()  # 3 steps of lr 3e-3
    assert any(not torch.equal(single[k], v) for k, v in MELT(MELTConfig(
        **torch.load(f'{tmp_path}/single/ckpt.pt', weights_only=False)['model_args'])).state_dict().items())


def test_distill_from_a_tiny_ouro_folder(tmp_path, capsys):
    from data.text.prepare import main as prepare_text
    folder = tmp_path / 'ouro'
    train_hf_tokenizer(varied_lines(200), folder, vocab_size=300)
    write_ouro_folder(folder, dict(OURO_TINY, vocab_size=300), ouro_tensors(dict(OURO_TINY, vocab_size=300)))
    text = tmp_path / 'text.txt'
    text.write_text('\n'.join(varied_lines(400)))
    prepare_text([f'--input={text}', f'--tokenizer=ouro:{folder}', f'--out_dir={tmp_path}/data'])
    losses, out = run_train(capsys, f'--dataset={tmp_path}/data', '--phase=distill', f'--init_from=ouro:{folder}',
                            f'--out_dir={tmp_path}/distill', '--max_iters=6', '--eval_interval=6')
    assert 'cache=melt' in out and f'from ouro:{folder}' in out and len(losses) == 6
    assert losses[5] < losses[0]
    ckpt = torch.load(f'{tmp_path}/distill/ckpt.pt', weights_only=False)
    assert ckpt['model_args']['n_embd'] == 32 and ckpt['model_args']['vocab_size'] == 300
    # data made with another tokenizer is refused
    other = tmp_path / 'other'
    train_hf_tokenizer(varied_lines(100), other, vocab_size=280)
    prepare_text([f'--input={text}', f'--tokenizer=ouro:{other}', f'--out_dir={tmp_path}/data2'])
    with pytest.raises(ValueError, match=r"was tokenized with 'ouro:[0-9a-f]+', not with .*ouro's tokenizer"):
        train.main(TRAIN_TINY + [f'--dataset={tmp_path}/data2', '--phase=distill', f'--init_from=ouro:{folder}'])


# ----------------------------------------------------------------------------------------
# sample.py and bench.py

import bench  # noqa: E402
import sample  # noqa: E402


def test_sample_greedy_equals_generate_and_reports_the_cache(looplm_dir, capsys):
    start = 'a=1 b=a c=2 ?b'
    kv = sample.main([f'--init_from={looplm_dir}', f'--start={start}', '--num_samples=1', '--top_k=1',
                      '--max_new_tokens=6', '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    model, codec = sample.load({**sample.DEFAULTS, 'init_from': looplm_dir})
    expected = model.generate(torch.tensor([codec.encode(start)]), 6, top_k=1)
    assert out.split('\n---------------')[0] == codec.decode(expected[0].tolist())
    line = re.search(r'KV cache \(LoopLM\): ([\d,]+) bytes for (\d+) tokens at (\d+) loops; '
                     r'a LoopLM cache would hold ([\d,]+) bytes', out)
    held, n_tokens, loops, looplm = (int(g.replace(',', '')) for g in line.groups())
    assert held == kv.nbytes == looplm and n_tokens == 4 + 5 and loops == model.config.n_loops
    assert held == model.config.kv_bytes_per_token(loops, 4) * n_tokens


def test_sample_loops_8_with_melt_cache(looplm_dir, capsys):
    kv = sample.main([f'--init_from={looplm_dir}', '--cache=melt', '--loops', '8', '--num_samples=2',
                      '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    assert len(re.findall(r'^\n?[a-h]=\S+ .*\?[a-h] [0-7]  \(expected [0-7], [1-4] hops\)$', out, re.M)) == 2
    held, n_tokens, looplm = (int(g.replace(',', '')) for g in re.search(
        r'KV cache \(MELT\): ([\d,]+) bytes for (\d+) tokens at 8 loops; a LoopLM cache would hold ([\d,]+)', out).groups())
    assert held == kv.nbytes and looplm == 8 * held and n_tokens == kv.length == 8
    assert kv.loops_run and set(kv.loops_run) == {8}


def test_q_exit(looplm_dir, capsys):
    for mode in ('melt', 'loop'):
        model = tiny_model(mode)
        ids = tokens(4)
        everything, some = model.new_cache(1), model.new_cache(1)
        full = model.generate(ids, 8, top_k=1, cache=everything)
        never = model.generate(ids, 8, top_k=1, exit_threshold=1.0, cache=some)  # q = 1: no early exit here
        assert torch.equal(full, never) and some.loops_run == everything.loops_run == [3] * 8
        with torch.no_grad():
            model.exit_gate.bias.fill_(100.0)  # lambda_1 = 1: every token exits after loop 1
        kv = model.new_cache(1, max_tokens=11)
        model.generate(ids, 8, top_k=1, exit_threshold=0.5, cache=kv)
        assert kv.loops_run == [3] + [1] * 7  # the prompt runs every loop; decoded tokens one
        if mode == 'loop':  # an exited token's loop-1 K/V fill its rows of loops 2 and 3
            for buf in (kv.k_loop, kv.v_loop):
                decoded = buf[:, :, :, :, 4:11]
                assert decoded.abs().sum() > 0 and torch.equal(decoded[1:], decoded[:1].expand_as(decoded[1:]))
                assert not torch.equal(buf[1, :, :, :, :4], buf[0, :, :, :, :4])  # the prompt ran every loop
    capsys.readouterr()
    kv = sample.main([f'--init_from={looplm_dir}', '--exit_threshold=1e-9', '--num_samples=1', '--max_new_tokens=5',
                      '--start=a=1 b=2 c=3 d=0 ?a', '--chunk_size=2', '--device=cpu', '--dtype=float32'])
    # q ~ 0: every decoded token stops after loop 1; the prefill's 3 chunks ran all 2 loops
    assert kv.loops_run == [2, 2, 2, 1, 1, 1, 1]
    assert re.search(r'Q-exit at q=1e-09: 1.00 loops per decoded token \(of 2\)', capsys.readouterr().out)


def test_sample_errors(looplm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'no checkpoint folder .*nothing'):
        sample.main([f'--init_from={tmp_path}/nothing'])
    with pytest.raises(ValueError, match=r"--loops must be >= 1 \(or 0 for the default\), got -1"):
        sample.main([f'--init_from={looplm_dir}', '--loops=-1', '--device=cpu', '--dtype=float32'])
    with pytest.raises(ValueError, match=r'prompt of 7 tokens \+ 40 new tokens run 46 positions, more than block_size 18'):
        sample.main([f'--init_from={looplm_dir}', '--start=a=1 b=2 c=3 d=0 e=1 f=2 ?a', '--max_new_tokens=40',
                     '--device=cpu', '--dtype=float32'])
    with pytest.raises(ValueError, match=r'prompt of 19 tokens \+ 1 new tokens run 19 positions, more than block_size 18'):
        sample.main([f'--init_from={looplm_dir}', '--start=' + 'a=1 ' * 19, '--device=cpu', '--dtype=float32'])
    with pytest.raises(FileNotFoundError, match=r"start file '.*missing.txt' does not exist"):
        sample.main([f'--init_from={looplm_dir}', f'--start=FILE:{tmp_path}/missing.txt', '--device=cpu', '--dtype=float32'])


def test_ablation_rows_switch_what_they_say():
    import ablate
    runs = {row: ablate.plan(row, 2, 'L', 'R', 8) for row in ablate.ROWS}
    flags = {row: [dict(a.removeprefix('--').split('=', 1) for a in args) for args in phases]
             for row, (phases, _) in runs.items()}
    for row in ('element', 'scalar', 'last', 'first', 'mean', 'ema'):  # both phases, chunk-wise, the row's gate
        assert [f['phase'] for f in flags[row]] == ['transition', 'distill'] and runs[row][1] == f'R/{row}/seed2/distill'
        assert all(f['gate'] == row and f['seed'] == '2' and 'chunk_size' not in f for f in flags[row])
        assert flags[row][0]['init_from'] == 'L' and flags[row][1]['init_from'] == f'R/{row}/seed2/transition'
    assert [f['phase'] for f in flags['no transition']] == ['distill'] and flags['no transition'][0]['init_from'] == 'L'
    assert [f['phase'] for f in flags['no distill']] == ['transition'] and runs['no distill'][1].endswith('transition')
    assert [f['chunk_size'] for f in flags['no chunks']] == ['8', '8']  # one chunk = the whole row
    assert all(f['teacher'] == 'L' for row, fs in flags.items() for f in fs if row != 'ouro objective')
    assert flags['ouro objective'] == [{'seed': '2', 'phase': 'loop', 'objective': 'ouro', 'out_dir': 'R/ouro_objective/seed2/loop',
                                        'log_interval': '1000000'}]


def test_no_transition_starts_distillation_from_the_looplm_with_fresh_gates(looplm_dir):
    loop_model, _ = train.load_checkpoint(looplm_dir, 'cpu')
    cfg = train.phase_config('distill', train.parse_args(TRAIN_TINY + [f'--init_from={looplm_dir}']))
    student, _ = train.load_model(cfg['init_from'], 'melt', cfg, {'vocab_size': 137})
    base = student.state_dict()
    assert all(torch.equal(base[k], v) for k, v in loop_model.state_dict().items())
    for gate in student.gate_modules():  # reset_gates' values, the same as a transition starts with
        assert not gate.w_z.weight.any() and not gate.u_z.weight.any()
        assert (gate.b_z == student.config.gate_bias_init).all()


def test_ablation_grid_end_to_end(reason_data, tmp_path, capsys):
    import ablate
    flags = TRAIN_TINY + [f'--dataset={reason_data}', '--max_iters=3', '--eval_interval=3', '--transition_iters=2']
    ablate.main([f'--out_dir={tmp_path}', '--rows=no_distill,no_chunks', '--seeds=2', f'--figure={tmp_path}/fig.png',
                 '--train_args=' + ' '.join(flags)])
    out = capsys.readouterr().out
    results = json.load(open(tmp_path / 'results.json'))
    assert list(results) == ['LoopLM', 'no distill', 'no chunks'] and list(results['no chunks']) == ['1', '2']
    for row, by_seed in results.items():
        for at in by_seed.values():
            kv = [at[str(n)]['kv_bytes'] for n in ablate.EVAL_LOOPS]
            assert kv == ([kv[0] * n for n in ablate.EVAL_LOOPS] if row == 'LoopLM' else [kv[0]] * 4), row
        accs = [[by_seed[s][str(n)]['acc'] for s in by_seed] for n in ablate.EVAL_LOOPS]
        cells = ' '.join(f"{np.mean(a):.3f} ±{(max(a) - min(a)) / 2:.3f}" for a in accs)
        assert re.search(re.escape(row) + r' +' + str(len(by_seed)) + ' +' + r' +'.join(re.escape(c) for c in cells.split(' ')), out)
    ablate.main([f'--out_dir={tmp_path}', '--replot=yes', f'--figure={tmp_path}/fig.png'])  # from results.json
    def table(text):
        return text[text.index('accuracy decoding'):].split('\n\n')[0]
    assert table(capsys.readouterr().out) == table(out)  # the same table
    assert not (tmp_path / 'no_distill' / 'seed1' / 'distill').exists()
    for seed in (1, 2):
        for phase in ('transition', 'distill'):
            ckpt = torch.load(tmp_path / 'no_chunks' / f'seed{seed}' / phase / 'ckpt.pt', weights_only=False)
            assert ckpt['config']['chunk_size'] == 18 and ckpt['config']['seed'] == seed  # TRAIN_TINY's block_size
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / 'fig.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    except ImportError:
        assert 'no figure: matplotlib is not installed' in out and not (tmp_path / 'fig.png').exists()


def test_bench_memory_table_reproduces_the_paper(capsys):
    rows = bench.memory_table(bench.model_shape('ouro-1.4b'), 32_000, 2)
    out = capsys.readouterr().out
    per_token = {loops: (melt_b, loop_b) for loops, melt_b, loop_b in rows}
    assert per_token[4] == (2 * 24 * 16 * 128 * 2, 4 * 2 * 24 * 16 * 128 * 2)
    # 80 GB serving: (80 - 3.272) GB / 6.29 GB = 12.2 MELT sequences; (80 - 2.869) / 25.17 = 3.06 LoopLM ones
    assert re.search(r'^\s+4\s+0\.197\s+0\.786\s+6\.29\s+25\.17\s+4\.0x\s+12 / 3 sequences$', out, re.M)
    assert re.search(r'^\s+8\s+0\.197\s+1\.573\s+6\.29\s+50\.33\s+8\.0x\s+12 / 1 sequences$', out, re.M)
    assert 'weights (MELT): 3.272 GB' in out and 'weights (LoopLM): 2.869 GB' in out
    assert all(melt_b == per_token[1][0] and loop_b == loops * per_token[1][1] for loops, (melt_b, loop_b) in per_token.items())


# ----------------------------------------------------------------------------------------
# user mistakes: one clear line, a non-zero exit, nothing the user had touched

def snapshot(folder):
    """Every file under folder with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def copy_dir(src, dst):
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_diverging_run_never_saves_over_the_last_good_checkpoint(reason_data, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / 'run'
    real, seen, steps = train.phase_loss, {}, []

    def nan_in_eval_after_iter_2(cfg, model, teacher_model, batch, alpha):
        loss, parts = real(cfg, model, teacher_model, batch, alpha)
        steps.extend([None] if torch.is_grad_enabled() else [])
        if not torch.is_grad_enabled() and len(steps) >= 4:  # the model has diverged: val loss is nan
            seen.setdefault('files', snapshot(out_dir))  # as they were before the bad evaluation
            loss = loss * float('nan')
        return loss, parts
    monkeypatch.setattr(train, 'phase_loss', nan_in_eval_after_iter_2)
    with pytest.raises(FloatingPointError, match=r'val loss is nan at iter 4; stopping. The last good checkpoint'):
        run_train(capsys, f'--dataset={reason_data}', '--phase=loop', '--max_iters=6', '--eval_interval=2',
                  f'--out_dir={out_dir}', '--always_save_checkpoint=True')
    assert snapshot(out_dir) == seen['files']  # byte-identical, no temporary file left
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] == 2


def test_prepare_text_leaves_the_data_set_whole_when_it_fails(tmp_path):
    from data.text.prepare import main as prepare_text
    folder = tmp_path / 'ouro'
    train_hf_tokenizer(varied_lines(100), folder, vocab_size=280)
    text = tmp_path / 'text.txt'
    text.write_text('\n'.join(varied_lines(300)))
    prepare_text([f'--input={text}', f'--tokenizer=ouro:{folder}', f'--out_dir={tmp_path}/data'])
    before = snapshot(tmp_path / 'data')
    assert set(map(str, before)) == {'train.bin', 'val.bin', 'meta.pkl'}
    with pytest.raises(FileNotFoundError, match=r'is not a folder with a tokenizer.json'):
        prepare_text([f'--input={text}', f'--tokenizer=ouro:{folder}/tokenizer.json', f'--out_dir={tmp_path}/data'])
    assert snapshot(tmp_path / 'data') == before


@pytest.mark.parametrize('where', ['teacher', 'init_from', 'other phase'])
def test_out_dir_never_replaces_a_checkpoint_the_run_reads_or_another_phase_made(where, reason_data, looplm_dir,
                                                                                 tmp_path):
    loop_dir = copy_dir(pathlib.Path(looplm_dir), tmp_path / 'loop')
    before = snapshot(loop_dir)
    args = TRAIN_TINY + [f'--dataset={reason_data}', '--max_iters=2', '--eval_interval=1', f'--out_dir={loop_dir}']
    if where == 'teacher':  # the transition would overwrite the LoopLM that distill later uses as its teacher
        args += ['--phase=distill', f'--init_from={looplm_dir}', f'--teacher={loop_dir}']
        match = r'is the --teacher this run reads'
    elif where == 'init_from':
        args += ['--phase=transition', f'--init_from={loop_dir}', f'--teacher={looplm_dir}']
        match = r'is the --init_from this run reads'
    else:
        args += ['--phase=transition', f'--init_from={looplm_dir}', f'--teacher={looplm_dir}']
        match = r"holds a checkpoint of phase 'loop', not 'transition'"
    with pytest.raises(ValueError, match=match):
        train.main(args)
    assert snapshot(loop_dir) == before


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('damage', ['truncated', 'random', 'empty', 'other shape'])
def test_a_damaged_checkpoint_is_named(damage, reason_data, looplm_dir, tmp_path):
    broken = copy_dir(pathlib.Path(looplm_dir), tmp_path / 'broken')
    good = (broken / 'ckpt.pt').read_bytes()
    if damage == 'other shape':
        ckpt = torch.load(broken / 'ckpt.pt', weights_only=False)
        ckpt['model_args']['n_embd'] = 64
        torch.save(ckpt, broken / 'ckpt.pt')
        match = r'ckpt.pt does not hold a model of its own model_args'
    else:
        data = {'truncated': good[:len(good) // 2], 'random': os.urandom(5000), 'empty': b''}[damage]
        write_bytes(broken / 'ckpt.pt', data)
        match = r'ckpt.pt is not a readable checkpoint'
    before = snapshot(broken)
    with pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=transition', f'--init_from={broken}',
                                 f'--teacher={looplm_dir}', f'--out_dir={tmp_path}/out'])
    with pytest.raises(ValueError, match=match):
        sample.main([f'--init_from={broken}', '--device=cpu', '--dtype=float32'])
    assert snapshot(broken) == before


@pytest.mark.parametrize('damage', ['meta truncated', 'meta without vocab_size', 'train.bin empty',
                                    'train.bin odd length'])
def test_a_damaged_data_set_is_named(damage, reason_data, tmp_path):
    data = copy_dir(pathlib.Path(reason_data), tmp_path / 'data')
    if damage == 'meta truncated':
        write_bytes(data / 'meta.pkl', (data / 'meta.pkl').read_bytes()[:20])
        match = r'meta.pkl is not a readable meta.pkl'
    elif damage == 'meta without vocab_size':
        write_bytes(data / 'meta.pkl', pickle.dumps({'tokenizer': 'reason'}))
        match = r"meta.pkl lacks an integer 'vocab_size'"
    elif damage == 'train.bin empty':
        write_bytes(data / 'train.bin', b'')
        match = r'train.bin has 0 tokens; block_size 18 needs more than 19'
    else:
        write_bytes(data / 'train.bin', (data / 'train.bin').read_bytes()[:-1])
        match = r'train.bin has \d+ bytes, an odd number: expected uint16 token ids'
    with pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY + [f'--dataset={data}', '--phase=loop', f'--out_dir={tmp_path}/out'])
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


@pytest.mark.parametrize('damage', ['safetensors truncated', 'integer tensor', 'config not an object',
                                    'config mistyped', 'index without weight_map', 'tokenizer malformed',
                                    'non-finite weight'])
def test_a_damaged_ouro_folder_is_named(damage, tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY))
    weights = folder / 'model.safetensors'
    if damage == 'safetensors truncated':
        write_bytes(weights, weights.read_bytes()[:1000])
        match = r'model.safetensors is not a readable safetensors file'
    elif damage in ('integer tensor', 'non-finite weight'):
        from safetensors.torch import save_file
        tensors = {k: v.float() for k, v in ouro_tensors(OURO_TINY).items()}
        if damage == 'integer tensor':
            tensors['model.norm.weight'] = tensors['model.norm.weight'].long()
            match = r'tensor model.norm.weight in .* is torch.int64, expected floating-point weights'
        else:
            tensors['model.norm.weight'][3] = float('nan')
            match = r'tensor model.norm.weight in .* holds inf or nan values'
        save_file(tensors, str(weights), metadata={'format': 'pt'})
    elif damage == 'config not an object':
        write_bytes(folder / 'config.json', b'[1, 2]')
        match = r'config.json holds a JSON list, expected an object'
    elif damage == 'config mistyped':
        write_bytes(folder / 'config.json', json.dumps(dict(OURO_TINY, hidden_size='32')).encode())
        match = r"config.json: hidden_size is '32', expected a positive integer"
    elif damage == 'index without weight_map':
        folder = write_ouro_folder(tmp_path / 'sharded', OURO_TINY, ouro_tensors(OURO_TINY), shards=2)
        write_bytes(folder / 'model.safetensors.index.json', b'{"metadata": {}}')
        match = r"model.safetensors.index.json has no 'weight_map'"
    else:
        train_hf_tokenizer(varied_lines(50), folder, vocab_size=280)
        write_bytes(folder / 'tokenizer.json', (folder / 'tokenizer.json').read_bytes()[:300])
        match = r'tokenizer.json is not valid JSON'
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        sample.main([f'--init_from=ouro:{folder}', '--device=cpu', '--dtype=float32', '--start=a'])
    assert snapshot(tmp_path) == before


def test_a_tokenizer_smaller_than_the_model_and_a_teacher_of_another_width(reason_data, looplm_dir, tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', dict(OURO_TINY, vocab_size=300),
                               ouro_tensors(dict(OURO_TINY, vocab_size=300)))
    train_hf_tokenizer(varied_lines(50), folder, vocab_size=280)
    with pytest.raises(ValueError, match=r"the tokenizer has 28\d tokens, fewer than the model's vocabulary of 300"):
        sample.main([f'--init_from=ouro:{folder}', '--device=cpu', '--dtype=float32', '--start=a'])
    wide = tmp_path / 'wide'
    train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--n_embd=64', '--max_iters=1',
                             '--eval_interval=1', f'--out_dir={wide}'])
    with pytest.raises(ValueError, match=r'the teacher .*wide and the student differ in shape: n_embd 64 vs 32'):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=distill', f'--init_from={looplm_dir}',
                                 f'--teacher={wide}', f'--out_dir={tmp_path}/distill'])
    assert not (tmp_path / 'distill' / 'ckpt.pt').exists()


@pytest.mark.parametrize('script, flag, match', [
    ('train', '--eval_interval=0', r'--eval_interval must be >= 1, got 0'),
    ('train', '--log_interval=-1', r'--log_interval must be >= 1, got -1'),
    ('train', '--eval_iters=0', r'--eval_iters must be >= 1, got 0'),
    ('train', '--max_iters=0', r'--max_iters must be >= 1, got 0'),
    ('train', '--n_layer=0', r'--n_layer must be >= 1, got 0'),
    ('train', '--n_kv_head=0', r'--n_kv_head must be >= 1, got 0'),
    ('train', '--learning_rate=0', r'--learning_rate must be > 0, got 0.0'),
    ('train', '--warmup_iters=-5', r'--warmup_iters must be >= 0, got -5'),
    ('sample', '--max_new_tokens=-1', r'--max_new_tokens must be >= 1 \(or 0 for the default\), got -1'),
    ('sample', '--num_samples=0', r'--num_samples must be >= 1, got 0'),
    ('sample', '--top_k=-3', r'--top_k must be >= 1 \(or 0 for the default\), got -3'),
    ('sample', '--exit_threshold=1.5', r'--exit_threshold must be in \(0, 1\] \(or 0 for every loop\), got 1.5'),
    ('sample', '--exit_threshold=-0.1', r'--exit_threshold must be in \(0, 1\]'),
    ('sample', '--start=', r'the prompt \(--start\) is empty'),
    ('bench', '--prompt_tokens=0', r'--prompt_tokens must be >= 1, got 0'),
    ('bench', '--train_batch=-1', r'--train_batch must be >= 1, got -1'),
    ('bench', '--threads=-2', r'--threads must be >= 1 \(or 0 for torch.s default\), got -2'),
    ('bench', '--loops=4,0', r'--loops must be loop counts >= 1'),
])
def test_values_out_of_range_are_refused(script, flag, match, reason_data, looplm_dir):
    if script == 'train':
        run = lambda: train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', flag])  # noqa: E731
    elif script == 'sample':
        run = lambda: sample.main([f'--init_from={looplm_dir}', '--device=cpu', '--dtype=float32', flag])  # noqa: E731
    else:
        run = lambda: bench.main([flag])  # noqa: E731
    with pytest.raises(ValueError, match=match):
        run()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_on_a_machine_without_it(reason_data, looplm_dir):
    match = r'--device=cuda, but this machine has no CUDA device; use --device=cpu'
    with pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY[:-2] + [f'--dataset={reason_data}', '--phase=loop', '--device=cuda'])
    with pytest.raises(ValueError, match=match):
        sample.main([f'--init_from={looplm_dir}', '--device=cuda'])
    with pytest.raises(ValueError, match=match):
        bench.main(['--device=cuda', '--only=memory'])


def test_resume_refuses_a_new_shape_and_applies_a_new_learning_rate(reason_data, tmp_path, capsys):
    out_dir = tmp_path / 'run'
    common = [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}', '--eval_interval=2', '--decay_lr=False']
    run_train(capsys, *common, '--max_iters=2', '--learning_rate=2e-3')
    before = snapshot(out_dir)
    with pytest.raises(ValueError, match=r'--n_embd=64 cannot apply on resume: the checkpoint.s model has n_embd=32'):
        train.main(TRAIN_TINY + common + ['--init_from=resume', '--max_iters=4', '--n_embd=64'])
    assert snapshot(out_dir) == before
    _, out = run_train(capsys, *common, '--init_from=resume', '--max_iters=4')  # the run's own rate, not the default
    assert re.search(r'^iter 2: loss [\d.]+ .*lr 2.00e-03', out, re.M), out
    _, out = run_train(capsys, *common, '--init_from=resume', '--max_iters=6', '--learning_rate=1e-4')
    assert re.search(r'^iter 4: loss [\d.]+ .*lr 1.00e-04', out, re.M), out


def test_disk_full_and_unwritable_out_dirs(reason_data, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / 'run'
    run_train(capsys, f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}', '--max_iters=2',
              '--eval_interval=2')
    before = snapshot(out_dir)
    real_save = torch.save
    names = []

    def full_disk(obj, f):
        names.extend(p.name for p in out_dir.glob('*.tmp'))
        real_save({'half': torch.zeros(1000)}, f)  # part of a file, then the disk is full
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    for _ in range(2):
        with pytest.raises(OSError, match=r'could not write .*ckpt.pt \(No space left on device\); the last good one'):
            train.save_checkpoint(str(out_dir), {'model': {}})
    assert snapshot(out_dir) == before  # no temporary file left, the checkpoint whole
    assert len(set(names)) == 2  # each save has a temporary name of its own: two runs cannot collide
    monkeypatch.setattr(torch, 'save', real_save)
    a_file = write_bytes(tmp_path / 'a_file', b'x')
    with pytest.raises(OSError, match=r'--out_dir=.*a_file/out is not a writable folder'):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={a_file}/out'])


@pytest.mark.parametrize('case', ['unknown tokenizer', 'missing input', 'not utf-8', 'too short', 'out_dir a file',
                                  'offline gpt2'])
def test_prepare_text_refuses_user_mistakes(case, tmp_path, monkeypatch):
    from data.text.prepare import main as prepare_text
    text = write_bytes(tmp_path / 'text.txt', ('some words of text ' * 20).encode())
    args = {'unknown tokenizer': [f'--input={text}', '--tokenizer=bert', f'--out_dir={tmp_path}/d'],
            'missing input': [f'--input={tmp_path}/nothing.txt', f'--out_dir={tmp_path}/d'],
            'not utf-8': [f'--input={write_bytes(tmp_path / "latin.txt", bytes(range(128, 256)) * 2)}',
                          f'--out_dir={tmp_path}/d'],
            'too short': [f'--input={write_bytes(tmp_path / "short.txt", b"hello")}', f'--out_dir={tmp_path}/d'],
            'out_dir a file': [f'--input={text}', f'--out_dir={text}', '--tokenizer=gpt2'],
            'offline gpt2': [f'--input={text}', f'--out_dir={tmp_path}/d']}[case]
    error, match = {'unknown tokenizer': (ValueError, r"--tokenizer must be 'gpt2' or 'ouro:PATH', got 'bert'"),
                    'missing input': (FileNotFoundError, r'--input=.*nothing.txt: no such file'),
                    'not utf-8': (ValueError, r'latin.txt is not UTF-8 text'),
                    'too short': (ValueError, r'short.txt holds 5 characters; need at least 100'),
                    'out_dir a file': (ValueError, r'--out_dir=.*text.txt is a file, not a folder'),
                    'offline gpt2': (OSError, r"could not get GPT-2's encoding .*offline use --tokenizer=ouro:PATH")}[case]
    import tiktoken

    def offline(name):
        raise ConnectionError('no network')
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)  # every case here runs as if offline
    if case == 'out_dir a file':
        monkeypatch.setattr('data.text.prepare.load_encoding', lambda tokenizer: tiktoken.Encoding(
            name='bytes', pat_str=r'.', mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}))
    before = snapshot(tmp_path)
    with pytest.raises(error, match=match):
        prepare_text(args)
    assert snapshot(tmp_path) == before


def test_the_scripts_print_one_line_and_exit_non_zero(reason_data, tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    broken = write_bytes(tmp_path / 'ckpt.pt', b'not a checkpoint')
    for argv in (['train.py', '--phase=transition', f'--init_from={tmp_path}', f'--dataset={reason_data}'],
                 ['sample.py', f'--init_from={tmp_path}'],
                 ['bench.py', '--prompt_tokens=0'],
                 ['data/text/prepare.py', f'--input={tmp_path}/none.txt']):
        run = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=here)
        assert run.returncode == 1 and 'Traceback' not in run.stderr, (argv, run.stderr)
        assert run.stderr.startswith('error: ') and run.stderr.count('\n') == 1, (argv, run.stderr)
    assert broken.read_bytes() == b'not a checkpoint'


def test_ctrl_c_exits_130_and_keeps_the_last_checkpoint(reason_data, tmp_path):
    import signal
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'train.py'] + TRAIN_TINY + [
        f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}', '--max_iters=100000',
        '--eval_interval=3', '--log_interval=1000'], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out_dir / 'ckpt.pt').exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Traceback' not in err and err.strip().count('\n') == 0, err
    assert 'interrupted' in err
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] % 3 == 0
    assert not list(out_dir.glob('*.tmp'))

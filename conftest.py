"""Shared by the tests: tiny models, the independent float64 reference (`naive_forward`),
a tiny Ouro folder, the reasoning data and a trained tiny LoopLM (fixtures)."""

import json
import math
import os
import pathlib
import re

import pytest
import torch

import train
from data.reason import prepare as reason
from melt import MELT, MELTConfig, rope_tables
TINY = dict(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
            n_hidden=48, n_loops=3, rope_theta=10000.0, chunk_size=4)


def tiny_model(kv_sharing='melt', seed=0, **overrides):
    torch.manual_seed(seed)
    model = MELT(MELTConfig(**{**TINY, 'kv_sharing': kv_sharing, **overrides}))
    with torch.no_grad():  # give every weight, norms and gates included, a visible effect
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.3 if 'kv_gate' in name else 0.15) * torch.randn_like(p))
    return model.eval()


def in_float64(model):
    """model.double(), with melt.py's RoPE tables made in float64 (the model keeps them in fp32,
    which would bound every float64 comparison at fp32's precision). melt.rope_tables itself,
    so its mistakes show in every float64 test; test_rope_tables checks it on its own."""
    model = model.double()
    c = model.config
    model.rope_cos, model.rope_sin = rope_tables(c.head_dim, c.block_size, c.rope_theta, dtype=torch.float64)
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
    = LoopLM (at loop t every token attends to the loop-t K/V of earlier tokens), 'blend:A' =
    phase 1: every row attended to is A x MELT's gated row + (1 - A) x the LoopLM's loop-t row
    from x, for past tokens and the chunk's own alike."""
    blend = float(kv[6:]) if kv.startswith('blend:') else None
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
                    if (kv == 'gated' or blend is not None) and h is not None:
                        z = torch.sigmoid(W[p + 'self_attn.kv_gate.w_z.weight'] @ x
                                          + W[p + 'self_attn.kv_gate.u_z.weight'] @ h + W[p + 'self_attn.kv_gate.b_z'])
                        latent[i][l] = z * h + (1 - z) * x
                    elif kv == 'mean':
                        latent[i][l] = sum(inputs[i][l]) / len(inputs[i][l])
                    elif kv.startswith('ema:') and h is not None:
                        latent[i][l] = float(kv[4:]) * h + (1 - float(kv[4:])) * x
                    else:
                        latent[i][l] = x
                def rows(sources):  # each token's (key heads, value heads) from its K/V source vector
                    return [([rope(v, pos + i) for v in heads(W[p + 'self_attn.k_proj.weight'] @ src, nkv)],
                             heads(W[p + 'self_attn.v_proj.weight'] @ src, nkv)) for i, src in enumerate(sources)]
                chunk_kv = rows([latent[i][l] for i in range(size)])
                chunk_x = rows(xs) if blend is not None else chunk_kv  # the LoopLM's rows, from x
                past = per_loop[t][l] if kv == 'loop' else final[l]
                attn = []
                for i, x in enumerate(xs):
                    q = [rope(v, pos + i) for v in heads(W[p + 'self_attn.q_proj.weight'] @ x, nh)]
                    seen = past + chunk_kv[:i + 1]
                    if blend is not None:  # written out: A * MELT's row + (1 - A) * the LoopLM's, per head
                        seen = [([blend * km + (1 - blend) * kl for km, kl in zip(m[0], o[0])],
                                 [blend * vm + (1 - blend) * vl for vm, vl in zip(m[1], o[1])])
                                for m, o in zip(seen, per_loop[t][l] + chunk_x[:i + 1])]
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
                per_loop[t][l] += chunk_x
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


def reference_phase_loss(cfg, model, teacher, batch, alpha):
    """train.phase_loss written out the way it was before its losses went one slice of
    tokens at a time: every loop's full logits at once, the formulas spelled out here."""
    x, y, depth = batch
    loops = cfg['loops']
    chunked = {} if cfg['phase'] == 'loop' else dict(chunk_size=cfg['chunk_size'], alpha=alpha)
    aux = model(x, loops=loops, return_aux=True, **chunked)
    logits = [s @ model.lm_head.weight.T for s in aux['states']]  # (B, T, V) for every loop
    mask = (y >= 0).to(logits[0].dtype)
    counted = mask.sum()
    ce = torch.stack([-torch.log_softmax(lg, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
                      for lg in logits], dim=-1)  # (B, T, loops)

    def kl(teacher_aux):
        t_logits = [s @ teacher.lm_head.weight.T for s in teacher_aux['states']]
        return sum((torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
                   for s, t in zip(logits, t_logits)) / loops

    if teacher is not None:
        with torch.no_grad():
            teacher_aux = teacher(x, loops=loops, return_aux=True)
    if cfg['phase'] == 'distill':
        pairs = [(s, t) for sl, tl in zip(aux['attn'], teacher_aux['attn']) for s, t in zip(sl, tl)]
        return kl(teacher_aux) + cfg['distill_beta'] * sum(((s - t) ** 2).mean() for s, t in pairs) / len(pairs)
    lam = torch.sigmoid(aux['exit_logits'])
    if cfg['objective'] == 'ouro':  # p_t = lambda_t prod_{j<t}(1 - lambda_j); the last loop takes the rest
        p = torch.stack([lam[..., t] * torch.prod(1 - lam[..., :t], -1) if t < loops - 1
                         else torch.prod(1 - lam[..., :t], -1) for t in range(loops)], dim=-1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        loss = (((p * ce).sum(-1) - cfg['exit_beta'] * entropy) * mask).sum() / counted
    else:  # depth: loop k learns the problems of at most k + 1 hops, the last loop all
        learns = [mask * (depth <= k + 1) if k < loops - 1 else mask for k in range(loops)]
        loss = sum((ce[..., k] * learns[k]).sum() / learns[k].sum().clamp_min(1) for k in range(loops)) / loops
        done = ((ce[..., :-1] - ce[..., -1:]) < 0.1).to(ce.dtype).detach()
        bce = -(done * torch.log(lam[..., :-1]) + (1 - done) * torch.log(1 - lam[..., :-1]))
        loss = loss + cfg['exit_weight'] * (bce.mean(-1) * mask).sum() / counted
    if teacher is not None:
        loss = loss + cfg['kd_weight'] * kl(teacher_aux)
    return loss


# ----------------------------------------------------------------------------------------
# Ouro folders in and out


OURO_TINY = dict(model_type='ouro', architectures=['OuroForCausalLM'], hidden_size=32,
                 intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=64, rope_theta=10000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=64, total_ut_steps=4,
                 early_exit_threshold=1.0, tie_word_embeddings=False, hidden_act='silu')


def ouro_tensors(cfg, seed=0):
    """Random weights under every name of an Ouro checkpoint (README "Real Ouro checkpoints" lists the layout)."""
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


# ----------------------------------------------------------------------------------------
# train.py


TRAIN_TINY = ['--n_embd=32', '--n_hidden=64', '--n_head=2', '--n_kv_head=2', '--batch_size=8',
              '--block_size=18', '--loops=2', '--chunk_size=3', '--log_interval=1', '--warmup_iters=0',
              '--eval_iters=2', '--device=cpu', '--dtype=float32']


@pytest.fixture(scope='session', autouse=True)
def the_checkout_is_left_as_it_was():
    """No test writes into the checkout (out/, data/, assets/): each writes under its tmp_path."""
    here = pathlib.Path(__file__).parent
    skip = {'.git', '__pycache__', '.pytest_cache', '.venv'}

    def files():
        found = {}
        for folder, subfolders, names in os.walk(here):
            subfolders[:] = [s for s in subfolders if s not in skip]
            for name in names:
                path = pathlib.Path(folder, name)
                found[str(path.relative_to(here))] = path.stat().st_mtime_ns
        return found
    before = files()
    yield
    after = files()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests wrote into the checkout: {changed[:10]}"


@pytest.fixture(scope='session')
def reason_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reason')
    reason.prepare(str(folder), n_train=4000, n_val=300)
    return str(folder)


def run_train(capsys, *args):
    if args:
        train.main(TRAIN_TINY + list(args))
    out = capsys.readouterr().out
    losses = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r'^iter (\d+): loss ([\d.]+)', out, re.M)}
    return losses, out


@pytest.fixture(scope='session')
def looplm_dir(reason_data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('loop'))
    train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}',
                             '--max_iters=40', '--eval_interval=40', '--learning_rate=1e-2'])
    return out_dir


# ----------------------------------------------------------------------------------------
# user mistakes: one clear line, a non-zero exit, nothing the user had touched


def write_bytes(path, data):
    path.write_bytes(data)
    return path

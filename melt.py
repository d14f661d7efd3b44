"""
MELT, the Memory-Efficient Looped Transformer, in one file.

A looped language model (LoopLM) applies the same stack of blocks `loops` times per token.
Its KV cache keeps one K/V per (loop, layer), so memory grows with the loops. MELT keeps ONE
K/V per layer, shared by all loops and updated by a learned element-wise gate, so the cache
is the size of a plain transformer's however many loops run.

Read it top to bottom: the config, the parts of a block (norm, RoPE, gate, attention), the
cache, then the model's forward, its looped chunk and decoding; the argument checks last.
Shapes: B batch, T tokens (of the call, or of the chunk being run), d = n_embd, nh and nkv
query and K/V heads, hs = head_dim.

References:
1) MELT: "Memory-Efficient Looped Transformer: Decoupling Compute from Memory in Looped
   Language Models", arXiv 2605.07721 (no official code).
2) Ouro / LoopLM: "Scaling Latent Reasoning via Looped Language Models", arXiv 2510.25741,
   whose blocks, norms and exit gate this file matches so its checkpoints drop in.
3) nanoGPT's model.py (the shape of this file) and gpt-fast (the cache as a data structure).
"""

import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

MAX_LOOPS = 1024  # our bound: Ouro trains 4 loops; a thousand is a hang, not a run
GATES = ('element', 'scalar', 'last', 'first', 'mean', 'ema')  # KVGate's kinds


@dataclass
class MELTConfig:
    vocab_size: int = 512
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 4  # must divide n_head (grouped K/V)
    n_embd: int = 128
    n_hidden: int = 352  # SwiGLU width
    n_loops: int = 4  # default loop count; any count >= 1 may be asked per call
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    kv_sharing: str = 'melt'  # 'melt': the loops share one gated K/V per layer; 'loop': one per loop (LoopLM)
    chunk_size: int = 64  # MELT's chunk-wise forward; 1 = exact sequential decoding
    gate: str = 'element'  # how MELT's shared K/V mix the loops: one of GATES (KVGate)
    ema_z: float = 0.5  # z of gate='ema'
    gate_bias_init: float = -4.0  # b_z: z ~ 0.02 so h ~ x, i.e. start at Ouro's last-loop sharing
    init_std: float = 0.02

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def kv_bytes_per_token(self, loops=None, bytes_per_element=2):
        """2 (K and V) * layers * kv heads * head_dim * bytes, times loops for the LoopLM."""
        per_layer = 2 * self.n_kv_head * self.head_dim * bytes_per_element
        return per_layer * self.n_layer * (1 if self.kv_sharing == 'melt' else (loops or self.n_loops))

    def __post_init__(self):
        for name in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'n_hidden'):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta!r} and {self.norm_eps!r}")
        if self.kv_sharing not in ('melt', 'loop'):
            raise ValueError(f"kv_sharing must be 'melt' or 'loop', got {self.kv_sharing!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not 0 <= self.ema_z <= 1:
            raise ValueError(f"ema_z must be in [0, 1], got {self.ema_z}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and "
                             f"n_head by n_kv_head ({self.n_kv_head})")
        if not 1 <= self.n_loops <= MAX_LOOPS:
            raise ValueError(f"n_loops must be in [1, {MAX_LOOPS}], got {self.n_loops}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# -----------------------------------------------------------------------------
# the parts of a block

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (or wider), cast back to the input dtype before the weight (as Ouro)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # x / sqrt(mean(x^2) + eps)
        return self.weight * F.rms_norm(x32, (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(head_dim, block_size, theta, dtype=torch.float32):
    """cos and sin of every position's rotation angles, (block_size, head_dim), fp32 (float64
    for the tests' reference comparisons)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share angles
    return angles.cos(), angles.sin()


def apply_rope(x, rope):
    """Rotate-half RoPE. x: (B, nh, T, hs); rope: (cos, sin), each (T, hs)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class KVGate(nn.Module):
    """What a layer's shared K/V are made from at loop t >= 2: h = z * h_prev + (1 - z) * x,
    x the attention input, h_prev the latent of loop t - 1. The kind sets z:
        'element'  z = sigmoid(x W_z + h_prev U_z + b_z), one z per channel (MELT, the paper's)
        'scalar'   the same with one z per token (W_z, U_z: d -> 1)
        'last'     z = 0, h = x: Ouro's last-loop sharing
        'first'    z = 1, h = x at loop 1
        'mean'     z = (t - 1) / t, h = the mean of x over loops 1..t
        'ema'      z = ema_z, fixed
    The last four are the paper's ablations (README "Ablations") and have no parameters."""

    def __init__(self, n_embd, kind='element', ema_z=0.5):
        super().__init__()
        self.kind, self.ema_z = kind, ema_z
        self.learned = kind in ('element', 'scalar')  # W_z, U_z, b_z: trained, and reset by reset_gates
        if self.learned:
            width = n_embd if kind == 'element' else 1
            self.w_z = nn.Linear(n_embd, width, bias=False)
            self.u_z = nn.Linear(n_embd, width, bias=False)
            self.b_z = nn.Parameter(torch.zeros(width))

    def forward(self, x, h_prev, loop):
        """x (B, T, d): this loop's attention input; h_prev: the latent of the loop before."""
        if self.learned:
            z = torch.sigmoid(self.w_z(x) + self.u_z(h_prev) + self.b_z)
        elif self.kind == 'mean':  # loop is 0-based: h_prev holds loops 1..loop
            z = loop / (loop + 1)
        else:
            z = {'last': 0.0, 'first': 1.0, 'ema': self.ema_z}[self.kind]
        return torch.lerp(x, h_prev, z)  # = z * h_prev + (1 - z) * x, in one operation


class Chunk(NamedTuple):
    """Where one chunk of T tokens sits while its loops run (MELT._run_chunk makes it)."""
    rope: tuple  # (cos, sin) of the chunk's positions, each (T, hs), or (B, 1, 1, hs) in decode_step
    mask: Optional[torch.Tensor]  # decode_step's (B, 1, 1, n_seen), True where a query may see a key; None:
    # causal, query i sees the rows up to its own position, [0, n_seen - T + i] (attend)
    rows: Union[slice, torch.Tensor]  # its rows in the cache: slice(start, start + T), or pos in decode_step
    n_seen: int  # cached rows the chunk attends to, its own included
    recompute_attention: bool  # training past the first chunk: backward recomputes the attention


class Attention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # its index: which cache rows are its own
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.kv_gate = KVGate(config.n_embd, config.gate, config.ema_z) if config.kv_sharing == 'melt' else None

    def project(self, x, h, loop, rope, melt, looplm):
        """x: this layer's normed attention input (B, T, d); h: MELT's latent, the gated
        attention input of the loop before (None at loop 1). The query always comes from x;
        MELT's keys and values from the gated latent h (melt), the LoopLM's from x (looplm);
        phase 1 makes both. Returns (q, MELT's (k, v) or None, the LoopLM's or None, h)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2), rope)  # (B, nh, T, hs)
        kv_melt = kv_loop = None
        if melt:
            h = x if h is None else self.kv_gate(x, h, loop)  # h^1 = x^1 (a guess)
            kv_melt = self.project_kv(h, rope)
        if looplm:
            kv_loop = self.project_kv(x, rope)
        return q, kv_melt, kv_loop, h

    def project_kv(self, h, rope):
        B, T, _ = h.shape
        k = self.k_proj(h).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(k, rope), v  # (B, nkv, T, hs)

    def forward(self, q, kv_melt, kv_loop, loop, chunk, cache):
        """The chunk's K/V go into its rows of the cache, then q attends to rows up to its own
        (cache.update). Returns (B, T, nh * hs), before o_proj."""
        B, _, T, _ = q.shape
        keys, values = cache.update(self.layer, loop, chunk.rows, chunk.n_seen, kv_melt, kv_loop)
        args = (q, keys, values, chunk.mask, self.n_head // self.n_kv_head)
        if chunk.recompute_attention:
            y = checkpoint(attend, *args, use_reentrant=False, preserve_rng_state=False, determinism_check="none")
        else:
            y = attend(*args)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


def attend(q, keys, values, mask, group):
    """Attention of q (B, nh, T, hs) over what cache.update returned: keys and values, each a
    list of (weight, pieces along the token axis) per kind of K/V it holds, mixed by weight.
    Grouped K/V (group > 1): query head i uses K/V head i // group, without a copy of them."""
    def mix(sources):
        joined = [(w, p[0] if len(p) == 1 else torch.cat(p, dim=2)) for w, p in sources]
        return joined[0][1] if len(joined) == 1 else sum(w * t for w, t in joined)
    k, v = mix(keys), mix(values)
    T, S, gqa = q.size(2), k.size(2), group > 1
    if mask is not None or T == 1:  # decode_step's mask, or one token that sees every row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # scale hs^-0.5
    if T == S:  # the chunk sees only itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return lower_right_attention(q, k, v, gqa)


def lower_right_attention(q, k, v, gqa=False):
    """A chunk of T queries over S keys, the last T its own: query i sees keys j <= S - T + i,
    a causal mask aligned to the lower right. No (T, S) mask is made, so a prefill holds
    O(chunk) beyond the cache at any context. On CUDA torch's CausalBias runs it on the flash
    or memory-efficient kernels. Elsewhere the mask is a view of S + T - 1 numbers u (0 up to
    S - 1, -inf after) with strides (1, 1): with the queries in reverse order, query i' sees
    key j iff u[i' + j] = 0, i.e. j <= S - 1 - i'. SDPA's kernel reads it tile by tile."""
    T, S = q.size(2), k.size(2)
    if q.device.type == 'cuda':
        from torch.nn.attention.bias import causal_lower_right  # here: importing it loads torch._dynamo (1.6 s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
    u = torch.zeros(S + T - 1, dtype=q.dtype, device=q.device)
    u[S:] = float('-inf')
    mask = u.as_strided((T, S), (1, 1))
    return F.scaled_dot_product_attention(q.flip(2), k, v, attn_mask=mask, enable_gqa=gqa).flip(2)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_hidden, bias=False)
        self.down_proj = nn.Linear(config.n_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Ouro's sandwich-norm block: each sublayer's input AND output are RMS-normed."""

    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm_in = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer)
        self.attn_norm_out = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp_norm_in = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm_out = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, h, loop, chunk, cache):
        """x (B, T, d): the residual stream; h: MELT's latent of the loop before (or None).
        Only the attention in the middle touches the cache; the two parts around it are plain
        per-token math, the same for every layer and loop (MELT.compile_blocks compiles them)."""
        q, kv_melt, kv_loop, h = self.before_attention(x, h, loop, chunk.rope, cache.holds_melt, cache.holds_looplm)
        y = self.attn(q, kv_melt, kv_loop, loop, chunk, cache)
        x, attn_out = self.after_attention(x, y)
        return x, h, attn_out

    def before_attention(self, x, h, loop, rope, melt, looplm):
        return self.attn.project(self.attn_norm_in(x), h, loop, rope, melt, looplm)

    def after_attention(self, x, y):
        attn_out = self.attn_norm_out(self.attn.o_proj(y))  # what phase 2 aligns: the sublayer's output (a guess)
        x = x + attn_out
        return x + self.mlp_norm_out(self.mlp(self.mlp_norm_in(x))), attn_out


# -----------------------------------------------------------------------------
# the cache

class Cache:
    """The rule of both caches, written once (update): at each (loop, layer) a chunk writes its
    K/V into its own rows, then attends to rows [0, n_seen). MELT writes the same rows at every
    loop, so the latest gated K/V overwrite the loop before's; the LoopLM writes that loop's
    own rows. alpha says what the cache holds: 1 MELT's K/V, 0 the LoopLM's, and in between
    (phase 1) both, attended to as alpha * KV_MELT + (1 - alpha) * KV_LoopLM, past tokens too.
    A subclass keeps the K/V (k, v per layer; k_loop, v_loop per loop and layer) and says how
    rows are put into a store and read back (put, upto)."""

    def __init__(self, alpha):
        self.alpha, self.length = alpha, 0  # length: tokens committed

    @property
    def holds_melt(self):
        return self.alpha > 0

    @property
    def holds_looplm(self):
        return self.alpha < 1

    def update(self, layer, loop, rows, n_seen, kv_melt, kv_loop):
        """kv_melt, kv_loop: the chunk's (k, v), each (B, nkv, T, hs), or None. Returns what it
        attends to: (keys, values), each [(weight, [pieces along the token axis])]."""
        stores = []  # (weight, keys, values, the chunk's (k, v))
        if kv_melt is not None:
            stores.append((self.alpha, self.k[layer], self.v[layer], kv_melt))
        if kv_loop is not None:
            stores.append((1 - self.alpha, self.k_loop[loop][layer], self.v_loop[loop][layer], kv_loop))
        for _, keys, values, (k, v) in stores:
            self.put(keys, rows, k)
            self.put(values, rows, v)
        return ([(w, self.upto(keys, n_seen)) for w, keys, _, _ in stores],
                [(w, self.upto(values, n_seen)) for w, _, values, _ in stores])


class KVCache(Cache):
    """The keys and values kept between calls, in buffers allocated once; their shapes are
    the memory story:

        MELT    k, v            (n_layer, B, nkv, max_tokens, hs)          no loop axis
        LoopLM  k_loop, v_loop  (loops, n_layer, B, nkv, max_tokens, hs)

    At the end of a chunk, commit() moves `length` past its rows, which now hold its final
    K/V. Nothing is ever concatenated or reallocated."""

    def __init__(self, config, batch_size, max_tokens, loops, alpha, device=None, dtype=None):
        super().__init__(alpha)
        self.batch_size, self.max_tokens, self.loops = batch_size, max_tokens, loops
        self.loops_run = []  # loops each committed chunk ran (fewer than asked after a Q-exit)
        shape = (config.n_layer, batch_size, config.n_kv_head, max_tokens, config.head_dim)

        def zeros(*dims):
            return torch.zeros(*dims, device=device, dtype=dtype)
        self.k, self.v = (zeros(shape), zeros(shape)) if self.holds_melt else (None, None)
        self.k_loop, self.v_loop = (zeros(loops, *shape), zeros(loops, *shape)) if self.holds_looplm else (None, None)

    def put(self, store, rows, x):
        if isinstance(rows, slice):
            store[:, :, rows] = x
        else:  # decode_step: each row's one token at its own position
            store[torch.arange(x.size(0), device=x.device), :, rows.expand(x.size(0))] = x[:, :, 0]

    def upto(self, store, n_seen):
        return [store[:, :, :n_seen]]  # one piece: the buffer's first rows, a view

    def row(self, r):
        """Row r as an empty cache of batch 1 over the same buffers: one prompt prefilled on its
        own chunk grid into its row of a batch (sample.py's generate of prompts of any length)."""
        view = copy.copy(self)
        view.batch_size, view.length, view.loops_run = 1, 0, []
        view.k, view.v = [None if t is None else t[:, r:r + 1] for t in (self.k, self.v)]
        view.k_loop, view.v_loop = [None if t is None else t[:, :, r:r + 1] for t in (self.k_loop, self.v_loop)]
        return view

    def buffers(self):
        return [t for t in (self.k, self.v, self.k_loop, self.v_loop) if t is not None]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def commit(self, n_tokens, loops_run):
        """End of a chunk: its rows now hold final K/V. A LoopLM token that exited early
        (Q-exit) has no K/V for later loops: we copy its last computed loop's K/V there, i.e.
        later tokens see Ouro's 'last loop' sharing for it (our choice)."""
        rows = slice(self.length, self.length + n_tokens)
        if self.holds_looplm and loops_run < self.loops:
            for buf in (self.k_loop, self.v_loop):
                buf[loops_run:, :, :, :, rows] = buf[loops_run - 1, :, :, :, rows]
        self.length += n_tokens
        self.loops_run.append(loops_run)


class ChunkMemory(Cache):
    """What a forward without a KVCache (training, scoring) keeps of earlier chunks: each
    chunk's final K/V as a tensor of its own, by its first row. Autograd then holds every
    token's K/V once; attention joins the pieces inside activation checkpointing, so backward
    recomputes the join instead of storing one per chunk. Gradients flow into earlier chunks'
    K/V (the paper does not say; a stop-gradient is the other choice). A later loop, or a block
    that backward recomputes (MELT.recompute_blocks), replaces the chunk's own piece."""

    def __init__(self, n_layer, loops, alpha):
        super().__init__(alpha)

        def stores():
            return [{} for _ in range(n_layer)]
        self.k, self.v = (stores(), stores()) if self.holds_melt else (None, None)
        self.k_loop, self.v_loop = ([stores() for _ in range(loops)], [stores() for _ in range(loops)]) \
            if self.holds_looplm else (None, None)

    def put(self, store, rows, x):
        store[rows.start] = x

    def upto(self, store, n_seen):
        return [x for start, x in store.items() if start < n_seen]  # in chunk order

    def commit(self, n_tokens, loops_run):  # Q-exit is for a KVCache: every loop has run here
        self.length += n_tokens


# -----------------------------------------------------------------------------
# the model

class MELT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # applied after EVERY loop
        self.exit_gate = nn.Linear(config.n_embd, 1)  # early-exit logit per loop
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        check_fits(16 * config.block_size * config.head_dim, f"RoPE's tables for block_size {config.block_size:,}",
                   torch.get_default_device())  # cos, sin and the angles they come from, fp32
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.recompute_blocks = False  # training: backward recomputes each (loop, layer) block instead of keeping its activations
        self.blocks_compiled = False  # set by compile_blocks
        self.apply(self._init_weights)
        self.reset_gates()

    def forward(self, idx, targets=None, loops=None, chunk_size=None, alpha=None, cache=None,
                return_aux=False, exit_threshold=None, last_only=False):
        """idx (B, T) token ids. Runs chunk by chunk; every chunk runs all its loops before the
        next chunk starts, so a chunk sees the FINAL K/V of earlier chunks (the paper's
        chunk-wise training; chunk_size=1 is exact decoding). With a KVCache the new tokens
        are appended to it (prefill or decode), and no gradients are recorded.
        Returns (logits of the last loop run (B, T, V), or (B, 1, V) with last_only, loss).
        With return_aux it returns only a dict for training's losses: every loop's normed
        'states' (B, T, d), 'exit_logits' (B, T, loops), 'attn' = [loop][layer] attention
        outputs, and the LM head's weight 'head'. It holds no logits: a loss makes each loop's
        from its state, a few tokens at a time, since with a large vocabulary every loop's
        logits at once are most of a training step's memory."""
        loops = self._check_loops(loops)
        if cache is None:  # lives for this call only
            cache = ChunkMemory(self.config.n_layer, loops, self._check_alpha(alpha))
        chunk_size = self._check_call(idx, targets, loops, chunk_size, alpha, cache, return_aux, exit_threshold,
                                      last_only)
        aux = {'states': [[] for _ in range(loops)],
               'attn': [[[] for _ in self.layers] for _ in range(loops)]} if return_aux else None
        outputs = []  # the last loop's normed state of each chunk
        with torch.no_grad() if isinstance(cache, KVCache) else nullcontext():
            for start in range(0, idx.size(1), chunk_size):
                x = self.embed_tokens(idx[:, start:start + chunk_size])
                x, loops_run = self._run_chunk(x, cache, loops, exit_threshold, aux, first=start == 0)
                cache.commit(x.size(1), loops_run)
                outputs = [x[:, -1:]] if last_only else outputs + [x]  # last_only holds one chunk's, not every one's
        if return_aux:
            states = [torch.cat(per_chunk, dim=1) for per_chunk in aux['states']]
            return {'states': states,
                    'exit_logits': torch.cat([self.exit_gate(s) for s in states], dim=-1),  # (B, T, loops)
                    'attn': [[torch.cat(per_chunk, dim=1) for per_chunk in per_layer] for per_layer in aux['attn']],
                    'head': self.lm_head.weight.view_as(self.lm_head.weight)}  # (V, d); a view, so DDP sees the head used
        logits = self.lm_head(outputs[-1] if last_only else torch.cat(outputs, dim=1))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def _run_chunk(self, x, cache, loops, exit_threshold=None, aux=None, pos=None, first=True):
        """All loops of one chunk x (B, T, d). Returns the last loop's normed state and the
        number of loops run; keeps nothing of earlier loops unless `aux` collects them. With
        exit_threshold q the chunk stops at the first loop where every token's cumulative exit
        probability reaches q (Ouro's Q-exit). `pos` (decode_step) fixes the shapes: the chunk
        then attends to the whole buffer through a mask. `first`: the forward's first chunk."""
        T = x.size(1)
        if pos is None:  # the chunk's tokens come after the cache's
            pos = torch.arange(cache.length, cache.length + T, device=x.device)
            rows, n_seen = slice(cache.length, cache.length + T), cache.length + T
            mask = None  # causal: query i (position pos[i]) sees keys at positions <= pos[i]
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hs)
        else:  # decode_step: each row's one token at its own position pos (B,), or pos (1,) for all
            rows, n_seen = pos, cache.max_tokens
            mask = torch.arange(n_seen, device=x.device) <= pos[:, None, None, None]  # (B, 1, 1, n_seen)
            rope = (self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None])  # (B, 1, 1, hs)
        training = torch.is_grad_enabled()
        recompute = training and self.recompute_blocks
        chunk = Chunk(rope, mask, rows, n_seen, recompute_attention=training and not first and not recompute)
        h = [None] * self.config.n_layer  # per layer: MELT's latent of the loop before
        exit_logits = []  # Q-exit: every loop's, (B, T, 1)
        for loop in range(loops):
            for layer, block in enumerate(self.layers):
                if recompute:  # activation checkpointing: keep the block's inputs, recompute the rest in backward
                    x, h[layer], attn_out = checkpoint(block, x, h[layer], loop, chunk, cache, use_reentrant=False,
                                                       preserve_rng_state=False)
                else:
                    x, h[layer], attn_out = block(x, h[layer], loop, chunk, cache)
                if aux is not None:
                    aux['attn'][loop][layer].append(attn_out)
            x = self.norm(x)  # the final norm after every loop feeds the next loop
            if aux is not None:
                aux['states'][loop].append(x)
            if exit_threshold is not None and loop < loops - 1:  # stop once every token's exit CDF reaches q
                exit_logits.append(self.exit_gate(x))
                lam = torch.sigmoid(torch.cat(exit_logits, dim=-1).float())
                if bool((1 - still_looping(lam)[..., -1] >= exit_threshold).all()):
                    break
        return x, loop + 1

    # -------------------------------------------------------------------------
    # decoding (sample.py's generate prefills with forward, then decodes token by token)

    def new_cache(self, batch_size, max_tokens=None, loops=None, alpha=None):
        """An empty KVCache for up to max_tokens tokens (default block_size), allocated now on
        the model's device and in its dtype. A LoopLM cache is made for one loop count."""
        max_tokens = self.config.block_size if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.config.block_size:
            raise ValueError(f"max_tokens must be between 1 and block_size {self.config.block_size}, got {max_tokens!r}")
        w, loops, alpha = self.lm_head.weight, self._check_loops(loops), self._check_alpha(alpha)
        shape = (self.config, batch_size, max_tokens, loops, alpha)
        check_fits(KVCache(*shape, device='meta', dtype=w.dtype).nbytes,  # its size, allocating nothing
                   f"a KV cache of {batch_size:,} x {max_tokens:,} tokens at {loops} loops", w.device)
        return KVCache(*shape, device=w.device, dtype=w.dtype)

    def decode_step(self, idx, cache, pos, loops):
        """One new token per sequence, idx (B, 1), row b at position pos[b] (pos (B,), or (1,) for
        every row), with shapes that stay the same from step to step, so torch.compile can
        capture it (gpt-fast's decode_one_token). Returns logits (B, 1, V); the caller commits
        the token (or, rows at different positions, keeps each row's position itself)."""
        x, _ = self._run_chunk(self.embed_tokens(idx), cache, loops, pos=pos)
        return self.lm_head(x)

    def compile_blocks(self, **options):
        """torch.compile the two parts of every block around its attention (regional
        compilation). They hold no cache and no per-layer value, so one compiled code serves
        every layer and every loop: compile time does not grow with n_layer x loops, and no
        cache length enters a compiled graph, so a longer generation recompiles nothing."""
        for block in self.layers:
            block.before_attention = torch.compile(block.before_attention, **options)
            block.after_attention = torch.compile(block.after_attention, **options)
        self.blocks_compiled = True
        return self

    # -------------------------------------------------------------------------
    # weights

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    @torch.no_grad()
    def reset_gates(self):
        """W_z = U_z = 0 and b_z = gate_bias_init: z starts equal for every token and channel.
        The paper does not give its init; ours starts MELT next to Ouro's last-loop sharing."""
        for gate in self.gate_modules():
            gate.w_z.weight.zero_()
            gate.u_z.weight.zero_()
            gate.b_z.fill_(self.config.gate_bias_init)

    def gate_modules(self):
        """The gates with parameters ('element', 'scalar'); none in a LoopLM."""
        gates = [block.attn.kv_gate for block in self.layers] if self.config.kv_sharing == 'melt' else []
        return [gate for gate in gates if gate.learned]

    def with_kv_sharing(self, kv_sharing):
        """The same base weights as a 'melt' or 'loop' model: a LoopLM becomes MELT with new
        gates (reset_gates), a MELT model becomes the LoopLM without its gates."""
        if kv_sharing == self.config.kv_sharing:
            return self
        config = MELTConfig(**{**self.config.__dict__, 'kv_sharing': kv_sharing})
        model = MELT(config).to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        base = {k: v for k, v in self.state_dict().items() if '.kv_gate.' not in k}
        model.load_state_dict(base, strict=kv_sharing == 'loop')  # 'melt': the gates keep reset_gates' init
        return model

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------------------
    # the argument checks

    def _check_call(self, idx, targets, loops, chunk_size, alpha, cache, return_aux, exit_threshold, last_only):
        """forward's other arguments, checked against each other and the cache; returns chunk_size."""
        B, T = idx.shape
        if exit_threshold is not None and (return_aux or not isinstance(cache, KVCache)):
            raise ValueError("exit_threshold (Q-exit) is for decoding into a KVCache, without return_aux")
        if return_aux and (targets is not None or last_only):
            raise ValueError("return_aux returns every loop's states for the caller's own losses: "
                             "it takes no targets and no last_only")
        limit, what = self.config.block_size, 'block_size'
        if isinstance(cache, KVCache):
            if alpha is not None and self._check_alpha(alpha) != cache.alpha:
                raise ValueError(f"cache was made for alpha={cache.alpha}, got alpha={alpha}")
            limit, what = cache.max_tokens, 'the max_tokens of the cache'
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, got {B}")
            if cache.holds_looplm and cache.loops != loops:
                raise ValueError(f"a LoopLM cache keeps one K/V per loop and was made for "
                                 f"{cache.loops} loops, got loops={loops}")
        if chunk_size is None:  # chunking is exact (so pointless) for the LoopLM
            chunk_size = self.config.chunk_size if cache.holds_melt else T
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if T == 0 or cache.length + T > limit:
            raise ValueError(f"{cache.length} cached + {T} new tokens must be between 1 and {what} {limit}")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            bad = idx[(idx < 0) | (idx >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return chunk_size

    def _check_loops(self, loops):
        loops = self.config.n_loops if loops is None else loops
        if not isinstance(loops, int) or not 1 <= loops <= MAX_LOOPS:
            raise ValueError(f"loops must be an integer in [1, {MAX_LOOPS}], got {loops!r}")
        return loops

    def _check_alpha(self, alpha):
        if self.config.kv_sharing == 'loop':
            if alpha not in (None, 0):
                raise ValueError(f"alpha is for kv_sharing='melt' models; a LoopLM has alpha 0, got {alpha}")
            return 0.0
        alpha = 1.0 if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        return alpha


def still_looping(lam):
    """prod_{j<=t}(1 - lambda_j) for every loop t, from the per-loop exit probabilities
    lambda (..., loops) = sigmoid(exit logits): the probability that a token loops on after loop t."""
    return torch.cumprod(1 - lam, dim=-1)


def check_fits(nbytes, what, device):
    """Refuse, before allocating it, what the device's free memory cannot hold."""
    device = torch.device(device)
    if device.type == 'cuda':
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == 'cpu' and os.path.isfile('/proc/meminfo'):
        with open('/proc/meminfo') as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:')), None)
    else:  # meta, or no way to tell
        return
    if free is not None and nbytes > free:
        raise ValueError(f"{what} would take {nbytes / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB free on {device}")

"""
MELT, the Memory-Efficient Looped Transformer, in one file.

A looped language model (LoopLM) applies the same stack of blocks T times per token. Its
KV cache keeps one K/V per (loop, layer), so memory grows with T. MELT keeps ONE K/V per
layer, shared by all loops and updated by a learned element-wise gate, so the cache is the
size of a plain transformer's however many loops run.

References:
1) MELT: "Memory-Efficient Looped Transformer: Decoupling Compute from Memory in Looped
   Language Models", arXiv 2605.07721 (no official code).
2) Ouro / LoopLM: "Scaling Latent Reasoning via Looped Language Models", arXiv 2510.25741,
   whose blocks, norms and exit gate this file matches so its checkpoints drop in.
3) nanoGPT's model.py (the shape of this file) and gpt-fast (the cache as a data structure).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (as Ouro)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim, block_size, theta):
    """cos and sin of every position's rotation angles, (block_size, head_dim), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share angles
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE. x: (B, nh, C, hs); cos, sin: (C, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class KVCache:
    """The keys and values a model keeps between calls; its shape is the memory story.

    melt[layer]        = (k, v), each (B, n_kv_head, S, hs): one row per token, no loop axis.
    loop[loop][layer]  = (k, v), the LoopLM's cache: one per (loop, layer).
    A MELT model with 0 < alpha < 1 (phase 1) keeps both. Tensors grow with the tokens held,
    so nbytes counts exactly what is in memory now.
    """

    def __init__(self, n_layer, batch_size, loops, alpha):
        self.batch_size, self.loops, self.alpha = batch_size, loops, alpha
        self.length = 0  # tokens held
        self.melt = [None] * n_layer if alpha > 0 else None
        self.loop = [[None] * n_layer for _ in range(loops)] if alpha < 1 else None
        self.pending = [None] * n_layer  # the current chunk's latest gated K/V, per layer
        self.loops_run = []  # loops each committed chunk ran (fewer than asked after a Q-exit)

    def tensors(self):
        kvs = list(self.melt or []) + [kv for per_loop in (self.loop or []) for kv in per_loop]
        return [t for kv in kvs if kv is not None for t in kv]

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def attend_melt(self, layer, k, v):
        """The chunk's gated K/V overwrite its pending row at every loop; earlier tokens'
        rows hold their final K/V. Returns what the chunk attends to at this loop."""
        self.pending[layer] = (k, v)
        if self.melt[layer] is None:
            return k, v
        k_past, v_past = self.melt[layer]
        return torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)

    def attend_loop(self, loop, layer, k, v):
        """LoopLM: at loop t the chunk appends its loop-t K/V and sees every token's loop-t K/V."""
        if self.loop[loop][layer] is not None:
            k_past, v_past = self.loop[loop][layer]
            k, v = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
        self.loop[loop][layer] = (k, v)
        return k, v

    def commit(self, n_tokens, loops_run):
        """End of a chunk: its pending MELT rows become final. A LoopLM token that exited
        early (Q-exit) has no K/V for later loops: we repeat its last computed loop's K/V
        there, i.e. later tokens see Ouro's 'last loop' sharing for it (our choice)."""
        if self.melt is not None:
            for layer, (k, v) in enumerate(self.pending):
                if self.melt[layer] is not None:
                    k = torch.cat([self.melt[layer][0], k], dim=2)
                    v = torch.cat([self.melt[layer][1], v], dim=2)
                self.melt[layer] = (k, v)
        if self.loop is not None:
            for t in range(loops_run, self.loops):
                for layer, (k_last, v_last) in enumerate(self.loop[loops_run - 1]):
                    self.attend_loop(t, layer, k_last[:, :, -n_tokens:], v_last[:, :, -n_tokens:])
        self.pending = [None] * len(self.pending)
        self.length += n_tokens
        self.loops_run.append(loops_run)


class KVGate(nn.Module):
    """MELT's gate on a layer's attention input, one value per channel (spec section 2):
    z = sigmoid(x W_z + h_prev U_z + b_z),  h = z * h_prev + (1 - z) * x."""

    def __init__(self, n_embd):
        super().__init__()
        self.w_z = nn.Linear(n_embd, n_embd, bias=False)
        self.u_z = nn.Linear(n_embd, n_embd, bias=False)
        self.b_z = nn.Parameter(torch.zeros(n_embd))

    def forward(self, x, h_prev):
        z = torch.sigmoid(self.w_z(x) + self.u_z(h_prev) + self.b_z)
        return z * h_prev + (1 - z) * x


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.kv_gate = KVGate(config.n_embd) if config.cache == 'melt' else None

    def project_kv(self, h, cos, sin):
        B, C, _ = h.shape
        k = self.k_proj(h).view(B, C, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, C, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v  # (B, nkv, C, hs)

    def forward(self, x, h_prev, cos, sin, mask, cache, layer, loop, alpha):
        """x: this layer's normed attention input (B, C, d); h_prev: the gated latent of the
        previous loop (None at loop 1). Returns the attention output and the new latent."""
        B, C, _ = x.shape
        q = self.q_proj(x).view(B, C, self.n_head, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)  # (B, nh, C, hs): the query always comes from x
        h = None
        if alpha > 0:  # MELT: keys and values from the gated latent h (h^1 = x^1, a guess)
            h = x if h_prev is None else self.kv_gate(x, h_prev)
            k_melt, v_melt = cache.attend_melt(layer, *self.project_kv(h, cos, sin))
        if alpha < 1:  # LoopLM: keys and values from x, one cache per loop
            k_loop, v_loop = cache.attend_loop(loop, layer, *self.project_kv(x, cos, sin))
        if alpha == 1:
            k, v = k_melt, v_melt
        elif alpha == 0:
            k, v = k_loop, v_loop
        else:  # phase 1: K/V = alpha * KV_MELT + (1 - alpha) * KV_LoopLM, past tokens included
            k = alpha * k_melt + (1 - alpha) * k_loop
            v = alpha * v_melt + (1 - alpha) * v_loop
        if self.n_kv_head != self.n_head:  # grouped K/V: query head i uses K/V head i // group
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale hs^-0.5
        y = y.transpose(1, 2).reshape(B, C, self.n_head * self.head_dim)
        return self.o_proj(y), h


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

    def __init__(self, config):
        super().__init__()
        self.attn_norm_in = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.attn_norm_out = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp_norm_in = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm_out = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, h_gate, cos, sin, mask, cache, layer, loop, alpha):
        a, h_gate = self.attn(self.attn_norm_in(x), h_gate, cos, sin, mask, cache, layer, loop, alpha)
        attn_out = self.attn_norm_out(a)  # what phase 2 aligns: the sublayer's output (a guess)
        x = x + attn_out
        x = x + self.mlp_norm_out(self.mlp(self.mlp_norm_in(x)))
        return x, h_gate, attn_out


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
    cache: str = 'melt'  # 'melt' (one gated K/V per layer) or 'loop' (LoopLM: one per loop)
    chunk_size: int = 64  # MELT's chunk-wise forward; 1 = exact sequential decoding
    gate_bias_init: float = -4.0  # b_z: z ~ 0.02 so h ~ x, i.e. start at Ouro's last-loop sharing
    init_std: float = 0.02

    def __post_init__(self):
        if self.cache not in ('melt', 'loop'):
            raise ValueError(f"cache must be 'melt' or 'loop', got {self.cache!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and "
                             f"n_head by n_kv_head ({self.n_kv_head})")
        for name in ('n_loops', 'chunk_size'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def kv_bytes_per_token(self, loops=None, bytes_per_element=2):
        """2 (K and V) * layers * kv heads * head_dim * bytes, times loops for the LoopLM."""
        per_layer = 2 * self.n_kv_head * self.head_dim * bytes_per_element
        return per_layer * self.n_layer * (1 if self.cache == 'melt' else (loops or self.n_loops))


def exit_distribution(exit_logits):
    """Ouro's exit distribution over loops from the per-loop gate logits (..., L):
    p_t = lambda_t * prod_{j<t}(1 - lambda_j) for t < L, and p_L = prod_{j<L}(1 - lambda_j)."""
    lam = torch.sigmoid(exit_logits.float())
    survive = torch.cumprod(1 - lam, dim=-1)  # probability of still looping after loop t
    survive_before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    lam = torch.cat([lam[..., :-1], torch.ones_like(lam[..., -1:])], dim=-1)  # last loop takes the rest
    return lam * survive_before


class MELT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)  # applied after EVERY loop
        self.exit_gate = nn.Linear(config.n_embd, 1)  # early-exit logit per loop
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        self.reset_gates()

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

    @classmethod
    def from_ouro(cls, path, cache='melt', dtype=None, **overrides):
        """Load a HuggingFace Ouro folder (or one written by save_pretrained): cache='loop' is
        exactly Ouro, cache='melt' adds new gates (reset_gates), cache=None takes what the
        folder was saved as. Keeps the checkpoint's dtype unless `dtype` says otherwise."""
        from ouro import load_ouro  # Ouro's file formats live in ouro.py
        return load_ouro(cls, path, cache, dtype, **overrides)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides):
        """Read back what save_pretrained wrote, MELT or LoopLM as it was saved."""
        return cls.from_ouro(path, cache=None, dtype=dtype, **overrides)

    def save_pretrained(self, path):
        """config.json + model.safetensors in Ouro's naming, gates under ...self_attn.kv_gate.*"""
        from ouro import save_ouro
        save_ouro(self, path)

    def as_cache(self, cache):
        """The same base weights as a 'melt' or 'loop' model: a LoopLM becomes MELT with new
        gates (reset_gates), a MELT model becomes the LoopLM without its gates."""
        if cache == self.config.cache:
            return self
        config = MELTConfig(**{**self.config.__dict__, 'cache': cache})
        model = MELT(config).to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        base = {k: v for k, v in self.state_dict().items() if '.kv_gate.' not in k}
        model.load_state_dict(base, strict=cache == 'loop')  # 'melt': the gates keep reset_gates' init
        return model

    def gate_modules(self):
        return [block.attn.kv_gate for block in self.layers if block.attn.kv_gate is not None]

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size, loops=None, alpha=None):
        loops = self._check_loops(loops)
        return KVCache(self.config.n_layer, batch_size, loops, self._check_alpha(alpha))

    def _check_loops(self, loops):
        loops = self.config.n_loops if loops is None else loops
        if not isinstance(loops, int) or loops < 1:
            raise ValueError(f"loops must be an integer >= 1, got {loops!r}")
        return loops

    def _check_alpha(self, alpha):
        if self.config.cache == 'loop':
            if alpha not in (None, 0):
                raise ValueError(f"alpha is for cache='melt' models; a LoopLM has alpha 0, got {alpha}")
            return 0.0
        alpha = 1.0 if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        return alpha

    def forward(self, idx, targets=None, loops=None, chunk_size=None, alpha=None, cache=None,
                return_aux=False, exit_threshold=None):
        """idx (B, T) token ids. Runs chunk by chunk; every chunk runs all its loops before the
        next chunk starts, so a chunk sees the FINAL K/V of earlier chunks (spec section 3).
        With a cache the new tokens are appended to it (prefill or decode).
        Returns (logits of the last loop run (B, T, V), loss); with return_aux also a dict with
        'logits' and 'exit_logits' per loop and 'attn' = [loop][layer] attention outputs."""
        B, T = idx.shape
        loops = self._check_loops(loops)
        if cache is not None:
            if alpha is not None and self._check_alpha(alpha) != cache.alpha:
                raise ValueError(f"cache was made for alpha={cache.alpha}, got alpha={alpha}")
            alpha = cache.alpha
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, got {B}")
            if cache.loop is not None and cache.loops != loops:
                raise ValueError(f"a LoopLM cache keeps one K/V per loop and was made for "
                                 f"{cache.loops} loops, got loops={loops}")
        else:
            alpha = self._check_alpha(alpha)
            cache = KVCache(self.config.n_layer, B, loops, alpha)  # lives for this call only
        if chunk_size is None:  # chunking is exact (so pointless) for the LoopLM
            chunk_size = self.config.chunk_size if alpha > 0 else T
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if T == 0 or cache.length + T > self.config.block_size:
            raise ValueError(f"{cache.length} cached + {T} new tokens must be between 1 and "
                             f"block_size {self.config.block_size}")
        if idx.device.type != 'meta' and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            bad = idx[(idx < 0) | (idx >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

        x = self.embed_tokens(idx)
        chunks = [self._run_chunk(x[:, i:i + chunk_size], cache, loops, alpha, exit_threshold)
                  for i in range(0, T, chunk_size)]
        states = [torch.cat(per_loop, dim=1) for per_loop in zip(*[c[0] for c in chunks])]
        logits = self.lm_head(states[-1])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        if not return_aux:
            return logits, loss
        aux = {
            'logits': [self.lm_head(s) for s in states[:-1]] + [logits],
            'exit_logits': torch.cat([self.exit_gate(s) for s in states], dim=-1),  # (B, T, loops)
            'attn': [[torch.cat(per_chunk, dim=1) for per_chunk in zip(*per_layer)]
                     for per_layer in zip(*[c[1] for c in chunks])],
        }
        return logits, loss, aux

    def _run_chunk(self, x, cache, loops, alpha, exit_threshold=None):
        """All loops of one chunk x (B, C, d). Returns every loop's normed state and every
        (loop, layer) attention output. With exit_threshold q the chunk stops at the first
        loop where every token's cumulative exit probability reaches q (Ouro's Q-exit)."""
        B, C, _ = x.shape
        start = cache.length
        cos, sin = self.rope_cos[start:start + C], self.rope_sin[start:start + C]
        # query i (position start + i) may see keys at positions <= start + i
        mask = None
        if C > 1:
            key_pos = torch.arange(start + C, device=x.device)
            mask = key_pos[None, :] <= (start + torch.arange(C, device=x.device))[:, None]
        h_gates = [None] * self.config.n_layer  # per layer: the gated latent h^(t-1)
        states, attn_outs = [], []
        still_looping = torch.ones(B, C, device=x.device)  # prod (1 - lambda) so far
        for loop in range(loops):
            attn_outs.append([])
            for layer, block in enumerate(self.layers):
                x, h_gates[layer], o = block(x, h_gates[layer], cos, sin, mask, cache, layer, loop, alpha)
                attn_outs[-1].append(o)
            x = self.norm(x)  # the final norm after every loop feeds the next loop
            states.append(x)
            if exit_threshold is not None and loop < loops - 1:
                still_looping = still_looping * (1 - torch.sigmoid(self.exit_gate(x).float()[..., 0]))
                if bool((1 - still_looping >= exit_threshold).all()):
                    break
        cache.commit(C, len(states))
        return states, attn_outs

    def configure_optimizers(self, weight_decay, learning_rate, gate_lr, betas, device_type):
        """AdamW with three groups: base matrices (decayed), base vectors, and the MELT gates
        (their own, larger learning rate: the paper used 8e-6 base vs 5e-4 gate)."""
        gate_ids = {id(p) for g in self.gate_modules() for p in g.parameters()}
        base = [p for p in self.parameters() if p.requires_grad and id(p) not in gate_ids]
        groups = [
            {'params': [p for p in base if p.dim() >= 2], 'weight_decay': weight_decay, 'lr': learning_rate},
            {'params': [p for p in base if p.dim() < 2], 'weight_decay': 0.0, 'lr': learning_rate},
            {'params': [p for g in self.gate_modules() for p in g.parameters() if p.requires_grad],
             'weight_decay': 0.0, 'lr': gate_lr},
        ]
        groups = [g for g in groups if g['params']]
        for g in groups:
            g['base_lr'] = g['lr']  # train.py scales every group by its schedule from here
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, loops=None, temperature=1.0, top_k=None,
                 chunk_size=None, exit_threshold=None, stop_tokens=(), cache=None):
        """Prefill the prompt chunk-wise into a cache, then decode one token at a time.
        top_k=1 is greedy. Pass your own empty cache to read cache.nbytes and
        cache.loops_run afterwards. Returns idx (B, T + new tokens)."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens = "
                             f"{T + max_new_tokens}, longer than block_size {self.config.block_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
        if exit_threshold is not None and B != 1:
            raise ValueError(f"exit_threshold decides per token and needs batch size 1, got {B}")
        cache = self.new_cache(B, loops) if cache is None else cache
        if cache.length:
            raise ValueError(f"generate needs an empty cache, this one holds {cache.length} tokens")
        logits, _ = self(idx, loops=loops, chunk_size=chunk_size, cache=cache)
        for step in range(max_new_tokens):
            logits = logits[:, -1, :].float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if step == max_new_tokens - 1 or (B == 1 and idx_next.item() in stop_tokens):
                break  # nothing more to predict: don't run the model on the last token
            logits, _ = self(idx_next, loops=loops, cache=cache, exit_threshold=exit_threshold)
        return idx

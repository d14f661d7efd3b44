"""
The recipe's three phases as functions of a model and a batch: what each phase optimizes
(phase_loss: the LoopLM's objectives, the transition's alpha, the distillation's KL and
attention alignment), the optimizer's groups (the gates at their own learning rate), and
what a step costs (FLOPs per token, the memory a batch needs). train.py runs them; bench.py
times them.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from melt import check_fits, still_looping

# -----------------------------------------------------------------------------
# losses

# the most logits a loss makes at once (per_token): 16 MiB in fp32 on the CPU; on a GPU more, since
# fewer and larger matmuls keep it busy (our choice)
LOGITS_PER_SLICE = {'cpu': 2**22, 'cuda': 2**26}


def per_token(fn, vocab_size, *tensors):
    """fn(*slices) -> (n,) per-token values for (B, T, ...) tensors, a slice of n tokens at a
    time, each inside activation checkpointing: only one slice's (n, vocab) logits exist at
    once, and backward recomputes them from the slice's states. Returns (B, T)."""
    B, T = tensors[0].shape[:2]
    flat = [t.reshape(B * T, *t.shape[2:]) for t in tensors]
    n_slices = math.ceil(B * T * vocab_size / LOGITS_PER_SLICE.get(tensors[0].device.type, 2**22))
    n = math.ceil(B * T / n_slices)
    if not torch.is_grad_enabled():
        return torch.cat([fn(*(t[i:i + n] for t in flat)) for i in range(0, B * T, n)]).view(B, T)
    return torch.cat([checkpoint(fn, *(t[i:i + n] for t in flat), use_reentrant=False, preserve_rng_state=False)
                      for i in range(0, B * T, n)]).view(B, T)


def wide(t):
    """t in fp32 for a loss, or kept in its own dtype where that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_ce(logits, targets):
    """Per-token cross entropy (n,) of logits (n, V); tokens with target -1 get a value the caller masks."""
    return F.cross_entropy(wide(logits), targets.clamp(min=0), reduction='none')


def loop_ce(aux, targets):
    """Every loop's per-token CE (B, T, loops), each loop's logits lm_head(state) made a
    slice of tokens at a time (per_token)."""
    head = aux['head']
    return torch.stack([per_token(lambda s, y: token_ce(F.linear(s, head), y), head.size(0), state, targets)
                        for state in aux['states']], dim=-1)


def exit_distribution(exit_logits):
    """Ouro's exit distribution over loops from the per-loop gate logits (..., L):
    p_t = lambda_t * prod_{j<t}(1 - lambda_j) for t < L, and p_L = prod_{j<L}(1 - lambda_j)."""
    lam = torch.sigmoid(wide(exit_logits))
    survive = still_looping(lam)  # melt.py's Q-exit uses the same product
    survive_before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    lam = torch.cat([lam[..., :-1], torch.ones_like(lam[..., -1:])], dim=-1)  # last loop takes the rest
    return lam * survive_before


def ouro_loss(aux, targets, beta):
    """Ouro's objective: sum_t p_t * CE_t - beta * H(p), averaged over the counted tokens."""
    p = exit_distribution(aux['exit_logits'])  # (B, T, loops)
    ce = loop_ce(aux, targets)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    mask = (targets >= 0).float()
    counted = mask.sum().clamp_min(1)
    per_token = (p * ce).sum(-1) - beta * entropy
    return (per_token * mask).sum() / counted, {'ce': (ce[..., -1] * mask).sum() / counted}


def depth_loss(aux, targets, depth, exit_weight):
    """Supervision by depth (our choice for the toy task, not Ouro's): loop k learns only the
    tokens whose problem needs at most k hops, the last loop learns all, so loop k is asked
    for hop k and no loop for a one-pass guess. The exit gate learns, by BCE, whether loop k
    already answers as well as the last loop (its CE within 0.1 nats), for Q-exit."""
    mask = (targets >= 0).float()
    ce = loop_ce(aux, targets)
    n = ce.size(-1)
    learns = torch.stack([mask * (depth <= k + 1) if k < n - 1 else mask for k in range(n)], dim=-1)
    loss = ((ce * learns).sum((0, 1)) / learns.sum((0, 1)).clamp_min(1)).mean()  # mean over loops
    counted = mask.sum().clamp_min(1)
    parts = {'ce': (ce[..., -1] * mask).sum() / counted}
    if n > 1:
        done = (ce[..., :-1] - ce[..., -1:]).detach() < 0.1
        exit_logits = wide(aux['exit_logits'][..., :-1])
        bce = F.binary_cross_entropy_with_logits(exit_logits, done.to(exit_logits.dtype), reduction='none')
        parts['exit'] = (bce.mean(-1) * mask).sum() / counted
        loss = loss + exit_weight * parts['exit']
    return loss, parts


def choose_objective(cfg, data):
    """--objective, or by default 'depth' where the data has depths, and Ouro's own objective
    for data without them and for training that starts from an Ouro checkpoint."""
    objective = cfg['objective'] or ('depth' if data.has_depth and not cfg['init_from'].startswith('ouro:') else 'ouro')
    if objective == 'depth' and not data.has_depth:
        raise ValueError(f"--objective=depth needs each token's hops (train_depth.bin and val_depth.bin), which "
                         f"{data.dir} does not have; data/reason/prepare.py makes such a data set")
    return objective


def objective_loss(cfg, aux, targets, depth):
    if cfg['objective'] == 'depth':
        return depth_loss(aux, targets, depth, cfg['exit_weight'])
    return ouro_loss(aux, targets, cfg['exit_beta'])


def token_kl(student_logits, teacher_logits):
    """KL(teacher || student) of the next-token distributions, per token (n,)."""
    return F.kl_div(F.log_softmax(wide(student_logits), -1), F.log_softmax(wide(teacher_logits), -1),
                    log_target=True, reduction='none').sum(-1)


def kl_every_loop(student_aux, teacher_aux):
    """KL(teacher || student), averaged over tokens and over every loop's exit (the paper
    does not say which exits; we take all). Each loop's logits, the teacher's too, are made
    a slice of tokens at a time (per_token)."""
    head, teacher_head = student_aux['head'], teacher_aux['head']
    kls = [per_token(lambda s, t: token_kl(F.linear(s, head), F.linear(t, teacher_head)), head.size(0), s, t).mean()
           for s, t in zip(student_aux['states'], teacher_aux['states'])]
    return sum(kls) / len(kls)


def attention_alignment(student_aux, teacher_aux):
    """1/(N*T) sum over layers and loops of ||o_MELT - stopgrad(o_LoopLM)||^2, the squared
    norm taken as a mean over tokens and channels (the paper's scale is not given)."""
    pairs = [(s, t) for s_loop, t_loop in zip(student_aux['attn'], teacher_aux['attn']) for s, t in zip(s_loop, t_loop)]
    return sum(F.mse_loss(wide(s), wide(t.detach())) for s, t in pairs) / len(pairs)


def alpha_at(cfg, iter_num):
    """alpha at an iteration: 0 for the LoopLM, the transition's linear ramp, 1 for distill."""
    if cfg['phase'] != 'transition':
        return 0.0 if cfg['phase'] == 'loop' else 1.0
    return min(1.0, iter_num / cfg['transition_iters']) if cfg['transition_iters'] > 0 else 1.0


def phase_loss(cfg, model, teacher_model, batch, alpha):
    """The phase's loss and its parts (for the log) on batch = (x, y, depth); teacher_model is
    None unless the phase distills (distill, or the transition with kd_weight > 0)."""
    x, y, depth = batch
    if cfg['phase'] == 'loop':
        aux = model(x, loops=cfg['loops'], return_aux=True)
        return objective_loss(cfg, aux, y, depth)
    aux = model(x, loops=cfg['loops'], chunk_size=cfg['chunk_size'], alpha=alpha, return_aux=True)
    if teacher_model is not None:
        with torch.no_grad():
            teacher_aux = teacher_model(x, loops=cfg['loops'], return_aux=True)
    if cfg['phase'] == 'distill':
        kl, align = kl_every_loop(aux, teacher_aux), attention_alignment(aux, teacher_aux)
        return kl + cfg['distill_beta'] * align, {'kl': kl, 'attn': align}
    loss, parts = objective_loss(cfg, aux, y, depth)
    parts['alpha'] = alpha
    if teacher_model is not None:  # the transition's optional KD
        parts['kd'] = kl_every_loop(aux, teacher_aux)
        loss = loss + cfg['kd_weight'] * parts['kd']
    return loss, parts


# -----------------------------------------------------------------------------
# FLOPs and utilisation (nanoGPT's estimate_mfu, for a looped model)

def mean_keys(T, chunk):
    """Keys a token's attention is handed, averaged over a row of T tokens in chunks: its own
    chunk's and every earlier chunk's rows (not halved for causality, as nanoGPT and PaLM count)."""
    return sum(min(chunk, T - start) * min(start + chunk, T) for start in range(0, T, chunk)) / T


def forward_flops_per_token(config, loops, T, chunk, melt, looplm):
    """Matmul FLOPs (2 per multiply-add) of one token's forward through every loop: each
    layer's projections (with MELT's K/V, the LoopLM's, or in phase 1 both), attention over
    mean_keys, MELT's learned gate from loop 2 on, the exit gate and the LM head (every loop's
    logits feed a loss)."""
    d, hs, nh, nkv = config.n_embd, config.head_dim, config.n_head, config.n_kv_head
    layer = (2 * d * hs * (2 * nh + 2 * nkv * (melt + looplm)) + 6 * d * config.n_hidden
             + 4 * nh * hs * mean_keys(T, chunk))
    gate = 4 * d * (d if config.gate == 'element' else 1) if melt and config.gate in ('element', 'scalar') else 0
    return loops * (config.n_layer * layer + 2 * d * (config.vocab_size + 1)) + (loops - 1) * config.n_layer * gate


def step_flops_per_token(cfg, model, teacher_model, alpha):
    """One training step's FLOPs per token: the student's forward and backward (3 forwards)
    and the teacher's forward. Recomputation (activation checkpointing, the losses' logits)
    is not counted: this is model FLOPs, as MFU is defined."""
    T, loops = cfg['block_size'], cfg['loops']
    if model.config.kv_sharing == 'loop':
        student = forward_flops_per_token(model.config, loops, T, T, False, True)
    else:
        student = forward_flops_per_token(model.config, loops, T, cfg['chunk_size'], alpha > 0, alpha < 1)
    teacher = forward_flops_per_token(teacher_model.config, loops, T, T, False, True) if teacher_model else 0
    unused = 2 * loops * 2 * model.config.n_embd if cfg['phase'] == 'distill' else 0  # no backward: distill's loss has no exit gate
    return 3 * student - unused + teacher


# dense bf16 tensor-core peak per GPU (NVIDIA's data sheets), matched in order against the device's name
PEAK_BF16_FLOPS = (('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12))


def utilisation(flops_per_s, device):
    """Achieved TFLOP/s, and on a GPU of PEAK_BF16_FLOPS the model FLOPs utilisation (MFU)."""
    achieved = f"{flops_per_s / 1e12:.3f} TFLOP/s"
    if not device.startswith('cuda'):
        return achieved
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return achieved + (f", MFU {100 * flops_per_s / peak:.1f}%" if peak else f", MFU unknown (no bf16 peak for {name})")


def uses_teacher(cfg):
    return cfg['phase'] == 'distill' or (cfg['phase'] == 'transition' and cfg['kd_weight'] > 0)


def configure_optimizers(model, cfg, device_type):
    """AdamW with three groups: base matrices (decayed), base vectors, and MELT's gates, at
    their own, larger learning rate (the paper: 8e-6 base vs 5e-4 gates at 1.4B)."""
    gate_ids = {id(p) for g in model.gate_modules() for p in g.parameters()}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [
        {'params': [p for p in base if p.dim() >= 2], 'weight_decay': cfg['weight_decay'], 'lr': cfg['learning_rate']},
        {'params': [p for p in base if p.dim() < 2], 'weight_decay': 0.0, 'lr': cfg['learning_rate']},
        {'params': [p for g in model.gate_modules() for p in g.parameters() if p.requires_grad],
         'weight_decay': 0.0, 'lr': cfg['gate_lr']},
    ]
    groups = [g for g in groups if g['params']]
    for g in groups:
        g['base_lr'] = g['lr']  # lr_scale scales every group from here
    return torch.optim.AdamW(groups, lr=cfg['learning_rate'], betas=(cfg['beta1'], cfg['beta2']),
                             fused=device_type == 'cuda')


def check_batch_fits(batch_size, block_size, config, loops, device):
    """Backward keeps at least every block's input (fp32), checkpointing or not: a batch that
    cannot fit is refused before its first step."""
    check_fits(4 * batch_size * block_size * config.n_embd * loops * config.n_layer,
               f"a micro-batch of {batch_size:,} x {block_size:,} tokens, whose backward keeps a {config.n_embd}-wide "
               f"state per token for each of {config.n_layer} x {loops} (layers x loops) blocks,", device)

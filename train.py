"""
Train a LoopLM and post-train it into MELT, in three phases (README "The main job"; the
MELT paper's chunk-wise training, transition and distillation):

  loop        the LoopLM (kv_sharing='loop'), from scratch or an Ouro folder: the values below
  transition  phase 1: MELT from the LoopLM's weights + new gates; alpha goes 0 -> 1 (config/transition.py)
  distill     phase 2: MELT student, frozen LoopLM teacher, KL + attention alignment (config/distill.py)

$ python train.py                         the main job: prepares data/reason if needed, runs
                                          loop -> transition -> distill into out/<phase>, and
                                          prints accuracy and KV bytes per token at 1, 2, 4, 8 loops
$ python train.py --phase distill         one phase (here from out/transition, teacher out/loop)
$ python train.py --phase=loop --init_from=ouro:/path/to/Ouro-1.4B --dataset=text
$ torchrun --standalone --nproc_per_node=2 train.py --phase=loop     (DDP: nccl on GPU, gloo on CPU)

Options are the module-level names below, as --key=value or --key value; a phase's config
file replaces some of them first, and says so when the phase starts (configurator.py).
"""
import gc
import math
import os
import pickle
import re
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from configurator import (DTYPES, check_choice, check_device, disk_error, is_int, parse_args, read_config_file,
                          run_script, torch_dtype, write_temporary)
from data.reason import prepare as reason
from melt import GATES, MELT, MELTConfig, check_fits, still_looping
from ouro import load_ouro, read_ouro_config

# -----------------------------------------------------------------------------
# config values: the LoopLM's; config/transition.py and config/distill.py replace some
phase = 'all'  # 'all' (the main job: loop, transition, distill) | 'loop' | 'transition' | 'distill'
out_dir = ''  # default: out/<phase>
init_from = 'scratch'  # 'scratch' | 'resume' | an out dir | 'ouro:PATH'
teacher = 'out/loop'  # the frozen LoopLM for distill (and KD in transition): an out dir or 'ouro:PATH'
dataset = 'reason'  # a folder under data/ with train.bin, val.bin, meta.pkl
eval_interval = 250
log_interval = 50
eval_iters = 10
always_save_checkpoint = False  # else only when val loss improves (best-checkpoint keeping)
seed = 1337
# data
batch_size = 192
block_size = 8  # one problem of the reasoning task per row (9 tokens: 8 in, the answer out)
gradient_accumulation_steps = 1
# model (for init_from='scratch')
n_layer = 1
n_head = 4
n_kv_head = 4
n_embd = 64
n_hidden = 176
loops = 4  # loops per token in training
chunk_size = 2  # MELT's chunk-wise forward (the paper trains chunk by chunk); 8 tokens per row = 4 chunks
gate = 'element'  # MELT's K/V sharing: element | scalar | last | first | mean | ema (melt.KVGate)
ema_z = 0.5  # the fixed z of gate='ema'
# optimizer
learning_rate = 3e-3  # base weights
gate_lr = 1e-2  # MELT's gate parameters (the paper: 8e-6 base, 5e-4 gates at 1.4B)
max_iters = 2000
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 50
decay_lr = True  # after warmup, a cosine from each group's learning rate down to min_lr_ratio of it
min_lr_ratio = 0.1
# objectives
objective = ''  # 'depth' | 'ouro'; default: 'depth' where the data has depths, 'ouro' from an Ouro checkpoint
exit_beta = 0.1  # 'ouro': expected CE over exits - exit_beta * entropy of the exit distribution
exit_weight = 0.1  # 'depth': weight of the exit gate's BCE (loop k answers as well as the last)
transition_iters = 300  # phase 1: alpha = min(1, iter / transition_iters), linear (a guess)
kd_weight = 0.0  # phase 1: optional KL(teacher || student) added to the data loss
distill_beta = 0.1  # phase 2: weight of the attention-output alignment
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype on GPU
compile = False  # torch.compile each block's two regions once, for every layer and loop (MELT.compile_blocks)
activation_checkpointing = False  # backward recomputes each (loop, layer) block: less memory, about 1/3 more compute
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
PHASES = ('loop', 'transition', 'distill')
HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')
MODEL_FLAGS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'n_hidden')  # the shape of a model from scratch


def phase_file(name):
    """The phase's config file (config/<phase>.py), or None where the values above hold."""
    path = os.path.join(HERE, 'config', f'{name}.py')
    return path if os.path.isfile(path) else None


def phase_config(name, overrides):
    """The settings of one phase: the values above, its config file's, then the command line's."""
    from_file = read_config_file(phase_file(name), DEFAULTS) if phase_file(name) else {}
    cfg = {**DEFAULTS, **from_file, **overrides, 'phase': name}
    cfg['out_dir'] = overrides.get('out_dir') or f'out/{name}'
    if cfg['init_from'].startswith('ouro:') and 'teacher' not in overrides:
        cfg['teacher'] = cfg['init_from']  # the Ouro model is its own MELT student's teacher
    for key in ('loops', 'chunk_size', 'batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval',
                'log_interval', 'eval_iters', 'max_iters') + MODEL_FLAGS:
        if cfg[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {cfg[key]}")
    for key in ('warmup_iters', 'transition_iters', 'weight_decay', 'grad_clip', 'exit_beta', 'exit_weight', 'kd_weight',
                'distill_beta'):
        if not cfg[key] >= 0:
            raise ValueError(f"--{key} must be >= 0, got {cfg[key]}")
    for key in ('learning_rate', 'gate_lr'):
        if not 0 < cfg[key] < float('inf'):
            raise ValueError(f"--{key} must be > 0, got {cfg[key]}")
    if not 0 <= cfg['min_lr_ratio'] <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {cfg['min_lr_ratio']}")
    if not 0 <= cfg['ema_z'] <= 1:
        raise ValueError(f"--ema_z must be in [0, 1], got {cfg['ema_z']}")
    check_choice('gate', cfg['gate'], GATES)
    check_choice('objective', cfg['objective'] or 'depth', ('depth', 'ouro'))  # '' is the default's
    check_choice('dtype', cfg['dtype'], DTYPES)
    check_device(cfg['device'])
    cfg['given'] = sorted(overrides)  # what the command line set, for the checks on resume
    cfg['from_file'] = sorted(set(from_file) - set(overrides))  # what the file set and no flag replaced
    return cfg


# -----------------------------------------------------------------------------
# data

def read_meta(folder):
    """A data set's meta.pkl, every field checked, each mistake one line that names the file,
    the field, its value and what was expected, and the command that remakes the data set. A
    data set of the reasoning task must be the current version of it, its depth files included."""
    file = os.path.join(folder, 'meta.pkl')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no meta.pkl in {folder}: prepare the data set first ({remake_command(folder, {})})")
    try:
        with open(file, 'rb') as f:
            meta = pickle.load(f)
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds of errors
        raise ValueError(f"{file} is not a readable meta.pkl ({type(e).__name__}: {str(e)[:100]}); "
                         f"remake the data set: {remake_command(folder, {})}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a {type(meta).__name__}, expected the dict a prepare script writes; "
                         f"remake the data set: {remake_command(folder, {})}")

    def field(name, ok, expected, default=None):
        if name not in meta and default is None:
            raise ValueError(f"{file} lacks {name!r} ({expected}); remake the data set: {remake_command(folder, meta)}")
        value = meta.get(name, default)
        if not ok(value):
            raise ValueError(f"{file}: {name} is {repr(value)[:80]}, expected {expected}; "
                             f"remake the data set: {remake_command(folder, meta)}")
        return value
    vocab = field('vocab_size', lambda v: is_int(v) and 1 <= v <= 2 ** 16, 'an integer in [1, 65536] (uint16 ids)')
    field('tokenizer', lambda v: isinstance(v, str) and v != '' and (not v.startswith('ouro:') or
                                                                    re.fullmatch('ouro:[0-9a-f]{16}', v)),
          "the tokenizer's name ('ouro:' and 16 hex digits of its tokenizer.json, for an Ouro tokenizer)")
    field('row_len', lambda v: is_int(v) and v >= 1, 'an integer >= 1 (tokens per problem)', default=1)
    field('loss_after', lambda v: isinstance(v, (list, tuple)) and all(is_int(i) and 0 <= i < vocab for i in v),
          f'a list of token ids below vocab_size {vocab}', default=[])
    if 'tokenizer_path' in meta or meta['tokenizer'].startswith('ouro:'):  # sample.py decodes with it
        field('tokenizer_path', lambda v: v == 'gpt2' or isinstance(v, str) and v.startswith('ouro:'),
              "'gpt2' or 'ouro:PATH'")
    if meta['tokenizer'] == 'reason':  # the reasoning task, as data/reason/prepare.py makes it now
        field('itos', lambda v: v == reason.WORDS, f"the task's {len(reason.WORDS)} words of data/reason/prepare.py")
        field('row_len', lambda v: v == reason.PROBLEM_LEN, f'{reason.PROBLEM_LEN}, the tokens of one problem')
        field('max_depth', lambda v: v == reason.MAX_HOPS, f'{reason.MAX_HOPS}, the most hops of a problem')
    elif 'max_depth' in meta:
        field('max_depth', lambda v: is_int(v) and 1 <= v <= 255, 'an integer in [1, 255] (uint8 depths)')
    return meta


def remake_command(folder, meta):
    """The command that remakes the data set in `folder`."""
    if meta.get('tokenizer') == 'reason' or os.path.basename(os.path.normpath(folder)) == 'reason':
        return f"python data/reason/prepare.py --out_dir={folder}"
    return f"python data/text/prepare.py --input=FILE --out_dir={folder}"


class Data:
    """nanoGPT's memmapped uint16 token files. Batch k of iteration i is drawn from a
    generator seeded by (seed, i, k), so a resumed run sees the same data in the same order,
    and DDP rank r takes the micro-batches a single process would take at r, r + world, ..."""

    def __init__(self, dataset, block_size, device):
        self.dir = dataset if os.path.isdir(dataset) else os.path.join(DATA_DIR, dataset)
        self.meta = read_meta(self.dir)
        self.block_size, self.device = block_size, device
        # tasks may name tokens after which the target counts (the answers); else every token
        self.loss_after = torch.tensor(self.meta.get('loss_after', []), dtype=torch.long)
        self.row_len = self.meta.get('row_len', 1)  # rows start where a problem starts (1: anywhere)
        self.has_depth = 'max_depth' in self.meta  # each token's hops, in {split}_depth.bin

    def check(self):
        """Every file the run will read, whole: both splits, their depth files where the data
        set has depths, and no token id past the vocabulary. Half a data set is refused, never
        trained on as something else."""
        for split in ('train', 'val'):
            top = int(self.tokens(split).max())  # tokens() has checked there are more than a block's
            if top >= self.meta['vocab_size']:
                raise ValueError(f"{os.path.join(self.dir, split + '.bin')} holds token id {top}, not below "
                                 f"meta.pkl's vocab_size {self.meta['vocab_size']}; remake the data set: "
                                 f"{remake_command(self.dir, self.meta)}")
            deepest = int(self.depths(split).max()) if self.has_depth else 0
            if deepest > self.meta.get('max_depth', 0):
                raise ValueError(f"{os.path.join(self.dir, split + '_depth.bin')} holds depth {deepest}, "
                                 f"above meta.pkl's max_depth {self.meta['max_depth']}; remake the data set: "
                                 f"{remake_command(self.dir, self.meta)}")

    def tokens(self, split):
        """The split's tokens, memory-mapped; checked to be uint16 ids, enough for a block."""
        file = os.path.join(self.dir, f'{split}.bin')
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {split}.bin in {self.dir}: prepare the data set first")
        size = os.path.getsize(file)
        if size % 2:
            raise ValueError(f"{file} has {size} bytes, an odd number: expected uint16 token ids (2 bytes each)")
        if size // 2 <= self.block_size + 1:
            raise ValueError(f"{file} has {size // 2} tokens; block_size {self.block_size} needs more than "
                             f"{self.block_size + 1}")
        return np.memmap(file, dtype=np.uint16, mode='r')

    def depths(self, split):
        """The split's depth file: for every token, the hops of the problem it belongs to."""
        file = os.path.join(self.dir, f'{split}_depth.bin')
        if not os.path.isfile(file) or os.path.getsize(file) != os.path.getsize(os.path.join(self.dir, f'{split}.bin')) // 2:
            raise ValueError(f"{file} {'must hold' if os.path.isfile(file) else 'is missing; the data set needs'} one byte "
                             f"per token of {split}.bin (its hops); remake the data set: {remake_command(self.dir, self.meta)}")
        return np.memmap(file, dtype=np.uint8, mode='r')

    def batch(self, split, batch_size, seed):
        """(x, y, depth) of batch_size rows; y is -1 where no loss is taken; depth (the hops of
        each target's problem) is None for data without a depth file."""
        data = self.tokens(split)
        g = torch.Generator().manual_seed(seed)
        ix = (torch.randint((len(data) - self.block_size - 1) // self.row_len, (batch_size,), generator=g)
              * self.row_len).tolist()

        def rows(tokens, offset):
            return torch.stack([torch.from_numpy(tokens[i + offset:i + offset + self.block_size].astype(np.int64))
                                for i in ix]).to(self.device)
        x, y = rows(data, 0), rows(data, 1)
        if len(self.loss_after):
            y = torch.where(torch.isin(x, self.loss_after.to(x.device)), y, -1)
        return x, y, rows(self.depths(split), 1) if self.has_depth else None


def batch_seed(seed, iter_num, micro_step, split='train'):
    return (seed * 1_000_003 + iter_num * 1009 + micro_step) * 2 + (split == 'val')


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


# -----------------------------------------------------------------------------
# models and checkpoints

def strip_compile_prefix(state):
    return {k.removeprefix('_orig_mod.'): v for k, v in state.items()}


def state_dict_problem(model, state):
    """The first way `state` does not fit `model`, in words (None if it fits): load_state_dict's
    own message is many lines."""
    want = model.state_dict()
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing or extra:
        return f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} not the model's (e.g. {extra[:2]})"
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != want[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"{name} is {shape}, expected {tuple(want[name].shape)}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds NaN or inf"
    return None


def load_checkpoint(path, device):
    file = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no ckpt.pt in {path!r}: train that phase first (e.g. python train.py --phase=loop)")
    try:
        ckpt = torch.load(file, map_location=device, weights_only=False, mmap=True)  # pages read when used
    except Exception as e:  # truncated, empty or not a checkpoint: torch.load raises many kinds
        raise ValueError(f"{file} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        raise ValueError(f"{file} is not a checkpoint of train.py: it lacks 'model' or 'model_args'")
    for key, ok, expected in (('model', lambda v: isinstance(v, dict), "a dict of tensors (a state_dict)"),
                              ('model_args', lambda v: isinstance(v, dict), 'a dict of MELTConfig fields'),
                              ('phase', lambda v: v in PHASES, f"one of {', '.join(PHASES)}"),
                              ('config', lambda v: isinstance(v, dict) and isinstance(v.get('dataset'), str),
                               "the run's settings, a dict with its 'dataset'")):
        if key in ckpt and not ok(ckpt[key]):
            raise ValueError(f"{file}: {key} is {repr(ckpt[key])[:80]}, expected {expected}")
    args = dict(ckpt['model_args'])
    if 'cache' in args:  # a checkpoint of an older train.py, from before the field was named kv_sharing
        args['kv_sharing'] = args.pop('cache')
    unknown = sorted(set(args) - {f.name for f in fields(MELTConfig)})
    if unknown:
        raise ValueError(f"{file}: model_args sets {unknown}, which are not MELTConfig fields")
    try:
        config = MELTConfig(**args)
    except ValueError as e:
        raise ValueError(f"{file}: model_args: {e}") from None
    if 'phase' in ckpt and (ckpt['phase'] == 'loop') != (config.kv_sharing == 'loop'):
        raise ValueError(f"{file} says phase {ckpt['phase']!r} but holds a kv_sharing={config.kv_sharing!r} model; "
                         f"phase 'loop' makes LoopLMs, the others MELT models")
    model = MELT(config)
    state = strip_compile_prefix(ckpt['model'])
    problem = state_dict_problem(model, state)
    if problem:
        raise ValueError(f"{file} does not hold a model of its own model_args: {problem}")
    model.load_state_dict(state)
    return model, ckpt


def check_batch_fits(batch_size, block_size, config, loops, device):
    """Backward keeps at least every block's input (fp32), checkpointing or not: a batch that
    cannot fit is refused before its first step."""
    check_fits(4 * batch_size * block_size * config.n_embd * loops * config.n_layer,
               f"a micro-batch of {batch_size:,} x {block_size:,} tokens, whose backward keeps a {config.n_embd}-wide "
               f"state per token for each of {config.n_layer} x {loops} (layers x loops) blocks,", device)


def uses_teacher(cfg):
    return cfg['phase'] == 'distill' or (cfg['phase'] == 'transition' and cfg['kd_weight'] > 0)


def load_model(source, kv_sharing, cfg, meta):
    """A model from 'scratch', an out dir, or 'ouro:PATH', with the given K/V sharing. A LoopLM
    source for a MELT model keeps its weights and gets new gates (reset_gates' init)."""
    if source == 'scratch':
        config = MELTConfig(vocab_size=meta['vocab_size'], block_size=cfg['block_size'], n_layer=cfg['n_layer'],
                            n_head=cfg['n_head'], n_kv_head=cfg['n_kv_head'], n_embd=cfg['n_embd'],
                            n_hidden=cfg['n_hidden'], n_loops=cfg['loops'], kv_sharing=kv_sharing,
                            chunk_size=cfg['chunk_size'], gate=cfg['gate'], ema_z=cfg['ema_z'])
        with torch.device('meta'):  # its size first, allocating nothing: from 1 and 2 layers, as the layers are alike
            one, two = (MELT(replace(config, n_layer=n)).get_num_params() for n in (1, 2))
        params = one + (config.n_layer - 1) * (two - one)
        check_fits(4 * params, f"a model of {params:,} parameters (fp32)", 'cpu')
        return MELT(config), None
    if source.startswith('ouro:'):
        path = source.removeprefix('ouro:')
        read_ouro_config(path)  # a clear error for a folder that is not Ouro's, before anything else
        if not os.path.isfile(os.path.join(path, 'tokenizer.json')):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}: the Ouro folder's tokenizer names its data")
        wanted = meta.get('tokenizer', '')
        from data.text.prepare import tokenizer_id
        if wanted != tokenizer_id(source):
            raise ValueError(f"data set {cfg['dataset']!r} was tokenized with {wanted!r}, not with {path}'s tokenizer: "
                             f"run python data/text/prepare.py --input=FILE --tokenizer={source}")
        gate = dict(gate=cfg['gate'], ema_z=cfg['ema_z']) if kv_sharing == 'melt' else {}
        return load_ouro(path, kv_sharing=kv_sharing, dtype=torch.float32, chunk_size=cfg['chunk_size'], **gate), None
    model, ckpt = load_checkpoint(source, 'cpu')
    if model.config.kv_sharing == 'melt' and kv_sharing == 'loop':
        raise ValueError(f"{source} holds a MELT model; the LoopLM phase and the teacher need a LoopLM or Ouro checkpoint")
    if model.config.kv_sharing == 'loop' and kv_sharing == 'melt':  # a new MELT model: its gates are this run's
        model.config.chunk_size, model.config.gate, model.config.ema_z = cfg['chunk_size'], cfg['gate'], cfg['ema_z']
    for key in ('gate', 'ema_z'):
        if model.config.kv_sharing == 'melt' and key in cfg['given'] and cfg[key] != getattr(model.config, key):
            raise ValueError(f"{source} holds a MELT model with {key}={getattr(model.config, key)!r}; "
                             f"--{key}={cfg[key]} applies only when MELT starts from a LoopLM")
    return model.with_kv_sharing(kv_sharing), ckpt


def save_checkpoint(out_dir, state):
    """torch.save to a temporary file of this run's own, then os.replace: an interrupted or
    failed save (disk full) keeps the old checkpoint and leaves no temporary file behind."""
    tmp = None
    try:
        tmp, final = write_temporary(out_dir, 'ckpt.pt', lambda f: torch.save(state, f))
        os.replace(tmp, final)
    except BaseException as e:  # Ctrl-C included
        if tmp and os.path.exists(tmp):  # written, not yet renamed
            os.unlink(tmp)
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C or SIGTERM inside torch.save: its zip
            raise e.__context__ from None                   # writer then fails on the way out
        if isinstance(e, OSError):
            raise OSError(f"could not write {out_dir}/ckpt.pt ({disk_error(e)}); the last good one is untouched") from None
        raise


def check_out_dir(cfg):
    """Before any training: the out dir is writable, and writing there loses nothing the run
    reads or another phase made (unless this run resumes that very checkpoint)."""
    out_dir = os.path.realpath(cfg['out_dir'])
    if cfg['init_from'] != 'resume':
        for role in ('init_from', 'teacher') if uses_teacher(cfg) else ('init_from',):
            source = cfg[role].removeprefix('ouro:')
            if source and source != 'scratch' and os.path.realpath(source) == out_dir:
                raise ValueError(f"--out_dir={cfg['out_dir']} is the --{role} this run reads; its checkpoint "
                                 f"would be overwritten: pick another --out_dir")
        existing = os.path.join(out_dir, 'ckpt.pt')
        if os.path.isfile(existing):
            try:
                phase = torch.load(existing, map_location='cpu', weights_only=False, mmap=True).get('phase')
            except Exception:
                phase = None
            if phase != cfg['phase']:
                raise ValueError(f"{existing} holds a checkpoint of phase {phase!r}, not {cfg['phase']!r}: "
                                 f"pick another --out_dir, or remove it yourself")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix='.write-test-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"--out_dir={cfg['out_dir']} is not a writable folder ({e.strerror or e})") from None


def check_resume(cfg, ckpt):
    """On resume the checkpoint must be this phase's, with what resuming reads, and the
    model's shape comes from it: a shape flag that says otherwise is refused rather than
    ignored. Learning rates are the command line's if it gives them, else the resumed run's
    own (never the defaults)."""
    file = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if 'phase' not in ckpt:
        raise ValueError(f"{file} lacks 'phase' (a checkpoint of an older train.py), so it cannot be resumed: "
                         f"start the phase from it with --init_from={cfg['out_dir']} and another --out_dir")
    if ckpt['phase'] != cfg['phase']:
        raise ValueError(f"{file} holds a {ckpt['phase']!r} checkpoint; --init_from=resume continues the same "
                         f"phase: run --phase={ckpt['phase']} --init_from=resume, or start phase {cfg['phase']!r} "
                         f"--init_from={cfg['out_dir']} with another --out_dir")
    for key, ok, expected in (('optimizer', lambda v: isinstance(v, dict), "the optimizer's state_dict"),
                              ('iter_num', lambda v: is_int(v) and v >= 0, 'an integer >= 0'),
                              ('best_val_loss', lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                               'a number'),
                              ('config', lambda v: isinstance(v, dict), "the run's settings, a dict")):
        if not ok(ckpt.get(key)):
            raise ValueError(f"{file}: {key} is {repr(ckpt.get(key))[:80]}, expected {expected}; it cannot be resumed")
    for flag in sorted(set(cfg['given']) & set(MODEL_FLAGS)):
        if cfg[flag] != ckpt['model_args'][flag]:
            raise ValueError(f"--{flag}={cfg[flag]} cannot apply on resume: the checkpoint's model has "
                             f"{flag}={ckpt['model_args'][flag]}")
    for key in ('learning_rate', 'gate_lr'):
        if key not in cfg['given'] and key in ckpt.get('config', {}):
            cfg[key] = ckpt['config'][key]


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


# -----------------------------------------------------------------------------

def train(cfg):
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = 0, 1
    device = cfg['device']
    if ddp:
        init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if device.startswith('cuda'):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        if cfg['gradient_accumulation_steps'] % world:
            raise ValueError(f"--gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must divide by "
                             f"the {world} DDP processes")
    master = rank == 0
    accum = cfg['gradient_accumulation_steps'] // world
    torch.manual_seed(cfg['seed'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ptdtype = torch_dtype(cfg['dtype'])
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
    if master:
        check_out_dir(cfg)
    data = Data(cfg['dataset'], cfg['block_size'], device)
    data.check()
    cfg['objective'] = choose_objective(cfg, data)

    resume = cfg['init_from'] == 'resume'
    model, ckpt = load_model(cfg['out_dir'] if resume else cfg['init_from'],
                             'loop' if cfg['phase'] == 'loop' else 'melt', cfg, data.meta)
    if resume:
        check_resume(cfg, ckpt)
    if model.config.vocab_size < data.meta['vocab_size']:
        raise ValueError(f"{data.dir} has vocab_size {data.meta['vocab_size']}, "
                         f"the model only {model.config.vocab_size}")
    if model.config.block_size < cfg['block_size']:
        raise ValueError(f"--block_size={cfg['block_size']} exceeds the model's block_size {model.config.block_size}")
    check_batch_fits(cfg['batch_size'], cfg['block_size'], model.config, cfg['loops'], device)
    model.to(device)
    teacher_model = None
    if uses_teacher(cfg):
        teacher_model = load_model(cfg['teacher'], 'loop', cfg, data.meta)[0]
        student, teacher = model.config, teacher_model.config
        shape = ('vocab_size',) + MODEL_FLAGS
        if any(getattr(student, k) != getattr(teacher, k) for k in shape):
            raise ValueError(f"the teacher {cfg['teacher']} and the student differ in shape: "
                             + ', '.join(f"{k} {getattr(teacher, k)} vs {getattr(student, k)}" for k in shape
                                         if getattr(student, k) != getattr(teacher, k)))
        teacher_model.to(device).eval().requires_grad_(False)
    optimizer = configure_optimizers(model, cfg, device_type)
    iter_num, best_val_loss = 0, float('inf')
    if resume:
        base_lrs = [g['base_lr'] for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg['out_dir']}/ckpt.pt: its optimizer state does not fit this model's "
                             f"parameters ({str(e)[:120]}); it cannot be resumed") from None
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group['base_lr'] = base_lr  # this run's learning rates, not the saved ones
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    del ckpt  # the loaded checkpoint's weights and optimizer state are not kept beside the model's own
    scaler = torch.amp.GradScaler(enabled=(cfg['dtype'] == 'float16'))
    raw_model = model
    raw_model.recompute_blocks = cfg['activation_checkpointing']
    if cfg['compile']:  # regional: one compiled code for every (loop, layer), the teacher's too
        for m in (raw_model, teacher_model):
            if m is not None:
                m.compile_blocks()
    if ddp:
        # at alpha = 0 the gates take no part, hence find_unused_parameters for the MELT phases
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None,
                    find_unused_parameters=cfg['phase'] != 'loop')

    def lr_scale(it):  # linear warmup, then cosine down to min_lr_ratio
        if it < cfg['warmup_iters']:
            return (it + 1) / (cfg['warmup_iters'] + 1)
        if not cfg['decay_lr']:
            return 1.0
        progress = min(1.0, (it - cfg['warmup_iters']) / max(1, cfg['max_iters'] - cfg['warmup_iters']))
        low = cfg['min_lr_ratio']
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def estimate_val_loss():
        model.eval()
        losses = []
        for k in range(cfg['eval_iters']):
            batch = data.batch('val', cfg['batch_size'], batch_seed(cfg['seed'], 0, k, 'val'))
            with ctx:  # the transition is judged at alpha = 1: the MELT model it is making
                alpha = 0.0 if cfg['phase'] == 'loop' else 1.0
                losses.append(phase_loss(cfg, raw_model, teacher_model, batch, alpha)[0].item())
        model.train()
        return sum(losses) / len(losses)

    def checkpoint():
        return {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                'model_args': asdict(raw_model.config), 'config': cfg, 'iter_num': iter_num,
                'best_val_loss': best_val_loss, 'phase': cfg['phase']}

    tokens_per_iter = cfg['gradient_accumulation_steps'] * cfg['batch_size'] * cfg['block_size']
    if master:
        from_file = ', '.join(f"{k}={cfg[k]!r}" for k in cfg['from_file'])
        print(f"phase {cfg['phase']}: {raw_model.get_num_params():,} parameters, kv_sharing={raw_model.config.kv_sharing}, "
              f"loops={cfg['loops']}, objective={cfg['objective']}, {tokens_per_iter:,} tokens/iter, "
              f"from {cfg['init_from']} -> {cfg['out_dir']}" + (f"\n  config/{cfg['phase']}.py: {from_file}" if from_file else ''))
    t0 = time.time()
    while True:
        for group in optimizer.param_groups:
            group['lr'] = group['base_lr'] * lr_scale(iter_num)
        if (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']) and master and iter_num > 0:
            val_loss = estimate_val_loss()
            print(f"iter {iter_num}: val loss {val_loss:.4f}")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"val loss is {val_loss} at iter {iter_num}; stopping. The last good "
                                         f"checkpoint in {cfg['out_dir']} is untouched.")
            if val_loss < best_val_loss or cfg['always_save_checkpoint']:
                best_val_loss = min(best_val_loss, val_loss)
                save_checkpoint(cfg['out_dir'], checkpoint())
                print(f"saved {cfg['out_dir']}/ckpt.pt")
        if iter_num >= cfg['max_iters']:
            break
        parts_sum = {}
        for micro in range(accum):
            batch = data.batch('train', cfg['batch_size'], batch_seed(cfg['seed'], iter_num, rank * accum + micro))
            if ddp:  # only the last micro-step syncs gradients
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                loss, parts = phase_loss(cfg, model, teacher_model, batch, alpha_at(cfg, iter_num))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iter {iter_num}; stopping. The last good "
                                         f"checkpoint in {cfg['out_dir']} is untouched.")
            scaler.scale(loss / accum).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / accum
            parts_sum['loss'] = parts_sum.get('loss', 0.0) + loss.item() / accum
        if cfg['grad_clip'] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % cfg['log_interval'] == 0 and master:
            dt = time.time() - t0
            steps = 1 if iter_num == 0 else cfg['log_interval']
            extra = ', '.join(f"{k} {v:.4f}" for k, v in parts_sum.items() if k != 'loss')
            tok_s = tokens_per_iter * steps / dt
            flops_s = step_flops_per_token(cfg, raw_model, teacher_model, alpha_at(cfg, iter_num)) * tok_s / world
            print(f"iter {iter_num}: loss {parts_sum['loss']:.6f} ({extra}), lr {optimizer.param_groups[0]['lr']:.2e}, "
                  f"{dt * 1000 / steps:.1f} ms/iter, {tok_s:,.0f} tok/s, {utilisation(flops_s, device)}", flush=True)
            t0 = time.time()
        iter_num += 1
    if ddp:  # every rank waits for the master's last save, and the DDP wrapper (with its gradient
        torch.distributed.barrier()  # reducer) goes before the process group: else gloo's threads
        del model                    # can outlive them and abort the process at exit
        gc.collect()
        destroy_process_group()
    return raw_model



# -----------------------------------------------------------------------------
# the main job

def prepare_reason_task(folder):
    """data/reason, made (again) unless it holds the current task's data, whole."""
    try:
        Data(folder, 1, 'cpu').check()
    except (ValueError, OSError):
        reason.prepare(folder)


def final_table(loop_model, melt_model, device, eval_loops=(1, 2, 4, 8)):
    """Accuracy on held-out problems and KV-cache bytes per token (fp32 as trained, and bf16)."""
    rows = []
    for name, model in (('LoopLM', loop_model), ('MELT', melt_model)):
        model.to(device).eval()
        for n in eval_loops:
            acc, per_hop = reason.accuracy(model, n, device=device)
            rows.append((name, n, acc, per_hop, model.config.kv_bytes_per_token(n, 4)))
    hops = sorted(rows[0][3])
    print(f"\n{'model':<7} {'loops':>5} {'accuracy':>8}  " + ' '.join(f'{h}-hop'.rjust(6) for h in hops)
          + f"  {'KV bytes/token':>14}")
    for name, n, acc, per_hop, kv in rows:
        print(f"{name:<7} {n:>5} {acc:>8.3f}  " + ' '.join(f'{per_hop[h]:6.3f}' for h in hops) + f"  {kv:>14,}")
    return rows


def main(argv):
    overrides = parse_args(argv, DEFAULTS)
    if overrides.get('phase', 'all') not in PHASES + ('all',):
        raise ValueError(f"--phase must be one of {', '.join(PHASES + ('all',))}, got {overrides['phase']!r}")
    if overrides.get('phase', 'all') != 'all':
        return train(phase_config(overrides['phase'], overrides))
    if overrides.get('dataset', 'reason') != 'reason':
        raise ValueError("the main job (--phase=all) runs on data/reason; pick a --phase for other data")
    if 'out_dir' in overrides:
        raise ValueError("--out_dir is per phase; the main job writes out/loop, out/transition, out/distill")
    prepare_reason_task(os.path.join(DATA_DIR, 'reason'))
    t0 = time.time()
    configs = [phase_config(name, overrides) for name in PHASES]  # every flag checked before any training
    for cfg in configs:
        train(cfg)
    device = overrides.get('device', DEFAULTS['device'])
    loop_model, _ = load_checkpoint('out/loop', device)
    melt_model, _ = load_checkpoint('out/distill', device)
    final_table(loop_model, melt_model, device)
    print(f"\nmain job done in {time.time() - t0:.0f} s")


if __name__ == '__main__':
    run_script(main)

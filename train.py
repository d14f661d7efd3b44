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
$ python train.py config/austen.py        the main job on text (data/austen, characters): the three
                                          phases and a 1-loop baseline into out/austen-<phase>, then
                                          validation CE and bits per character at 1, 2, 4, 8 loops
$ python train.py --phase=loop --init_from=ouro:/path/to/Ouro-1.4B --dataset=text
$ torchrun --standalone --nproc_per_node=2 train.py --phase=loop     (DDP: nccl on GPU, gloo on CPU)

Options are the module-level names below, as --key=value or --key value; a phase's config
file replaces some of them first, and says so when the phase starts (configurator.py).
"""
import gc
import math
import os
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (DATA_DIR, PHASES, Data, batch_seed, dataset_dir, load_checkpoint, mean_ce, prepare_data_set,
                         save_checkpoint)
from configurator import DTYPES, check_choice, check_device, is_int, parse_args, read_config_file, run_script, torch_dtype
from data.reason import prepare as reason
from melt import GATES, MELT, MELTConfig, check_fits
from ouro import load_ouro, read_ouro_config, tokenizer_id
from phases import (alpha_at, check_batch_fits, choose_objective, configure_optimizers, phase_loss,
                    step_flops_per_token, uses_teacher, utilisation)

# -----------------------------------------------------------------------------
# config values: the LoopLM's; config/transition.py and config/distill.py replace some
phase = 'all'  # 'all' (the main job: loop, transition, distill) | 'loop' | 'transition' | 'distill'
recipe = ''  # the main job on other data (config/<recipe>.py sets it): config/<recipe>/<phase>.py replace config/<phase>.py
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
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FLAGS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'n_hidden')  # the shape of a model from scratch


def phase_file(name, recipe=''):
    """The phase's config file (config/<phase>.py, or config/<recipe>/<phase>.py), or None
    where the values above hold."""
    folder = os.path.join(HERE, 'config', recipe)
    if recipe and not os.path.isdir(folder):
        raise ValueError(f"--recipe={recipe!r}: no folder config/{recipe}/ with its phases' config files")
    path = os.path.join(folder, f'{name}.py')
    return path if os.path.isfile(path) else None


def recipe_chain(name, recipe):
    """A recipe's out dir for a phase, and where that phase starts from: out/<recipe>-<phase>,
    the transition from the LoopLM's, distill from the transition's with the LoopLM as teacher."""
    run = lambda phase: f'out/{recipe}-{phase}'  # noqa: E731
    return {'out_dir': run(name), 'init_from': {'transition': run('loop'), 'distill': run('transition')}.get(name, 'scratch'),
            'teacher': run('loop')}


def phase_config(name, overrides):
    """The settings of one phase: the values above, its config file's, then the command line's."""
    recipe = overrides.get('recipe', '')
    file = phase_file(name, recipe)
    from_file = read_config_file(file, DEFAULTS) if file else {}
    chain = recipe_chain(name, recipe) if recipe else {}
    cfg = {**DEFAULTS, **chain, **from_file, **overrides, 'phase': name}
    cfg['out_dir'] = overrides.get('out_dir') or chain.get('out_dir') or f'out/{name}'
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
    cfg['kv_sharing'] = 'loop' if name == 'loop' else 'melt'  # the LoopLM phase trains a LoopLM, the others MELT
    cfg['eval_alpha'] = 0.0 if name == 'loop' else 1.0  # the transition is judged at alpha = 1: the MELT model it makes
    cfg['given'] = sorted(overrides)  # what the command line set, for the checks on resume
    cfg['from_file'] = sorted(set(from_file) - set(overrides))  # what the file set and no flag replaced
    return cfg


# -----------------------------------------------------------------------------
# what a phase starts from

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


# -----------------------------------------------------------------------------
# the training run, step by step

class Process(NamedTuple):
    """Where this process trains: its rank among the DDP processes (0 of 1 without DDP)."""
    ddp: bool
    rank: int
    world: int
    device: str
    device_type: str  # 'cuda' or 'cpu'
    ctx: AbstractContextManager  # autocast on a GPU, nothing on the CPU
    accum: int  # this process's micro-steps per iteration


def start_process(cfg):
    """DDP's process group under torchrun (nccl on GPU, gloo on CPU), the seed, the autocast."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world, device = 0, 1, cfg['device']
    if ddp:
        init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if device.startswith('cuda'):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        if cfg['gradient_accumulation_steps'] % world:
            raise ValueError(f"--gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must divide by "
                             f"the {world} DDP processes")
    torch.manual_seed(cfg['seed'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type,
                                                                         dtype=torch_dtype(cfg['dtype']))
    return Process(ddp, rank, world, device, device_type, ctx, cfg['gradient_accumulation_steps'] // world)


def models(cfg, data, device):
    """The model this phase trains (from scratch, a checkpoint, Ouro, or its own checkpoint on
    resume), checked against the data and the batch; the frozen teacher where the phase has one;
    and the checkpoint the model came from (None from scratch or Ouro)."""
    resume = cfg['init_from'] == 'resume'
    model, ckpt = load_model(cfg['out_dir'] if resume else cfg['init_from'], cfg['kv_sharing'], cfg, data.meta)
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
    return model, teacher_model, ckpt


def optimizer_state(cfg, model, ckpt, device_type):
    """AdamW, and where the run starts: (optimizer, iter_num, best_val_loss), the resumed
    run's on resume (with this run's learning rates)."""
    optimizer = configure_optimizers(model, cfg, device_type)
    if ckpt is None or cfg['init_from'] != 'resume':
        return optimizer, 0, float('inf')
    base_lrs = [g['base_lr'] for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg['out_dir']}/ckpt.pt: its optimizer state does not fit this model's "
                         f"parameters ({str(e)[:120]}); it cannot be resumed") from None
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group['base_lr'] = base_lr  # this run's learning rates, not the saved ones
    return optimizer, ckpt['iter_num'], ckpt['best_val_loss']


def lr_scale(cfg, it):
    """Linear warmup, then a cosine down to min_lr_ratio."""
    if it < cfg['warmup_iters']:
        return (it + 1) / (cfg['warmup_iters'] + 1)
    if not cfg['decay_lr']:
        return 1.0
    progress = min(1.0, (it - cfg['warmup_iters']) / max(1, cfg['max_iters'] - cfg['warmup_iters']))
    low = cfg['min_lr_ratio']
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_val_loss(cfg, model, teacher_model, data, ctx):
    """The mean loss over eval_iters fixed validation batches, at the phase's eval_alpha."""
    model.eval()
    losses = []
    for batch in data.val_batches(cfg['batch_size'], cfg['eval_iters'], cfg['seed']):
        with ctx:
            losses.append(phase_loss(cfg, model, teacher_model, batch, cfg['eval_alpha'])[0].item())
    model.train()
    return sum(losses) / len(losses)


def evaluate_and_save(cfg, model, optimizer, teacher_model, data, ctx, iter_num, best_val_loss):
    """The validation loss, and a checkpoint when it improves (or always_save_checkpoint);
    a loss that is not finite stops the run with the last good checkpoint untouched.
    Returns the best validation loss so far."""
    val_loss = estimate_val_loss(cfg, model, teacher_model, data, ctx)
    print(f"iter {iter_num}: val loss {val_loss:.4f}")
    if not math.isfinite(val_loss):
        raise FloatingPointError(f"val loss is {val_loss} at iter {iter_num}; stopping. The last good "
                                 f"checkpoint in {cfg['out_dir']} is untouched.")
    if val_loss < best_val_loss or cfg['always_save_checkpoint']:
        best_val_loss = min(best_val_loss, val_loss)
        save_checkpoint(cfg['out_dir'], {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                         'model_args': asdict(model.config), 'config': cfg, 'iter_num': iter_num,
                                         'best_val_loss': best_val_loss, 'phase': cfg['phase']})
        print(f"saved {cfg['out_dir']}/ckpt.pt")
    return best_val_loss


def train_step(cfg, model, raw_model, teacher_model, optimizer, scaler, data, proc, iter_num):
    """One iteration: accum micro-batches forward and backward (DDP syncs the last one's
    gradients), then clipping and the optimizer step. Returns the loss and its parts, averaged."""
    parts_sum = {}
    for micro in range(proc.accum):
        batch = data.batch('train', cfg['batch_size'], batch_seed(cfg['seed'], iter_num, proc.rank * proc.accum + micro))
        if proc.ddp:  # only the last micro-step syncs gradients
            model.require_backward_grad_sync = micro == proc.accum - 1
        with proc.ctx:
            loss, parts = phase_loss(cfg, model, teacher_model, batch, alpha_at(cfg, iter_num))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iter {iter_num}; stopping. The last good "
                                     f"checkpoint in {cfg['out_dir']} is untouched.")
        scaler.scale(loss / proc.accum).backward()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / proc.accum
        parts_sum['loss'] = parts_sum.get('loss', 0.0) + loss.item() / proc.accum
    if cfg['grad_clip'] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg['grad_clip'])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return parts_sum


def tokens_per_iter(cfg):
    return cfg['gradient_accumulation_steps'] * cfg['batch_size'] * cfg['block_size']


def log_line(cfg, raw_model, teacher_model, optimizer, proc, iter_num, parts, seconds):
    """The loss and its parts, the learning rate, ms/iter, tokens/s and TFLOP/s (MFU on a GPU)."""
    steps = 1 if iter_num == 0 else cfg['log_interval']
    tok_s = tokens_per_iter(cfg) * steps / seconds
    flops_s = step_flops_per_token(cfg, raw_model, teacher_model, alpha_at(cfg, iter_num)) * tok_s / proc.world
    extra = ', '.join(f"{k} {v:.4f}" for k, v in parts.items() if k != 'loss')
    return (f"iter {iter_num}: loss {parts['loss']:.6f} ({extra}), lr {optimizer.param_groups[0]['lr']:.2e}, "
            f"{seconds * 1000 / steps:.1f} ms/iter, {tok_s:,.0f} tok/s, {utilisation(flops_s, proc.device)}")


def train(cfg):
    """One phase, as cfg (phase_config) says; returns the trained model."""
    proc = start_process(cfg)
    master = proc.rank == 0
    if master:
        check_out_dir(cfg)
    data = Data(cfg['dataset'], cfg['block_size'], proc.device)
    data.check()
    cfg['objective'] = choose_objective(cfg, data)
    raw_model, teacher_model, ckpt = models(cfg, data, proc.device)
    optimizer, iter_num, best_val_loss = optimizer_state(cfg, raw_model, ckpt, proc.device_type)
    del ckpt  # the loaded checkpoint's weights and optimizer state are not kept beside the model's own
    scaler = torch.amp.GradScaler(enabled=(cfg['dtype'] == 'float16'))
    raw_model.recompute_blocks = cfg['activation_checkpointing']
    if cfg['compile']:  # regional: one compiled code for every (loop, layer), the teacher's too
        for m in (raw_model, teacher_model):
            if m is not None:
                m.compile_blocks()
    model = raw_model  # at alpha = 0 the gates take no part, hence find_unused_parameters for MELT
    if proc.ddp:
        model = DDP(raw_model, device_ids=[int(os.environ['LOCAL_RANK'])] if proc.device_type == 'cuda' else None,
                    find_unused_parameters=cfg['kv_sharing'] == 'melt')
    if master:
        print(start_line(cfg, raw_model))
    t0 = time.time()
    while True:
        for group in optimizer.param_groups:
            group['lr'] = group['base_lr'] * lr_scale(cfg, iter_num)
        if (iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']) and master and iter_num > 0:
            best_val_loss = evaluate_and_save(cfg, raw_model, optimizer, teacher_model, data, proc.ctx, iter_num,
                                              best_val_loss)
        if iter_num >= cfg['max_iters']:
            break
        parts = train_step(cfg, model, raw_model, teacher_model, optimizer, scaler, data, proc, iter_num)
        if iter_num % cfg['log_interval'] == 0 and master:
            print(log_line(cfg, raw_model, teacher_model, optimizer, proc, iter_num, parts, time.time() - t0), flush=True)
            t0 = time.time()
        iter_num += 1
    if proc.ddp:  # every rank waits for the master's last save, and the DDP wrapper (with its gradient
        torch.distributed.barrier()  # reducer) goes before the process group: else gloo's threads
        del model                    # can outlive them and abort the process at exit
        gc.collect()
        destroy_process_group()
    return raw_model


def start_line(cfg, model):
    from_file = ', '.join(f"{k}={cfg[k]!r}" for k in cfg['from_file'])
    return (f"phase {cfg['phase']}: {model.get_num_params():,} parameters, kv_sharing={model.config.kv_sharing}, "
            f"loops={cfg['loops']}, objective={cfg['objective']}, {tokens_per_iter(cfg):,} tokens/iter, "
            f"from {cfg['init_from']} -> {cfg['out_dir']}" + (f"\n  config/{cfg['recipe'] + '/' if cfg['recipe'] else ''}{cfg['phase']}.py: {from_file}" if from_file else ''))


# -----------------------------------------------------------------------------
# the main job

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


def text_table(runs, data, cfg):
    """Validation cross-entropy (nats per token) and bits per token of each (name, model, loop
    counts) on eval_iters fixed batches of the val split. MELT runs as it decodes (chunk 1);
    its CE on the chunk grid it trained on is the last column (the LoopLM's chunking is exact)."""
    batches = data.val_batches(cfg['batch_size'], cfg['eval_iters'], cfg['seed'])
    print(f"\n{'model':<15} {'loops':>5} {'val CE':>7} {'bits/char':>9}  {'KV bytes/token':>14}  "
          f"CE in chunks of {cfg['chunk_size']}")
    rows = []
    for name, model, loop_counts in runs:
        melt = model.config.kv_sharing == 'melt'
        for n in loop_counts:
            ce = mean_ce(model, batches, n, 1 if melt else None)
            rows.append((name, n, ce, ce / math.log(2), model.config.kv_bytes_per_token(n, 4)))
            print(f"{name:<15} {n:>5} {ce:>7.3f} {ce / math.log(2):>9.3f}  {rows[-1][4]:>14,}"
                  + (f"  {mean_ce(model, batches, n, cfg['chunk_size']):>7.3f}" if melt else ''))
    return rows


def recipe_job(overrides):
    """The main job on a recipe's data (config/<recipe>.py): the data set made where missing,
    the three phases, the LoopLM's shape and steps trained at 1 loop (does looping pay?), then
    text_table: the LoopLM and MELT at 1, 2, 4, 8 loops, the baseline at 1."""
    base = {**overrides, 'loops': 1, 'out_dir': f"out/{overrides['recipe']}-base"}
    configs = [phase_config(name, overrides) for name in PHASES] + [phase_config('loop', base)]  # all checked first
    prepare_data_set(dataset_dir(configs[0]['dataset']))
    t0 = time.time()
    for cfg in configs:
        train(cfg)
    device = configs[0]['device']
    loop_model, melt_model, base_model = (load_checkpoint(configs[i]['out_dir'], device)[0] for i in (0, 2, 3))
    data = Data(configs[0]['dataset'], configs[0]['block_size'], device)
    rows = text_table([('LoopLM', loop_model, (1, 2, 4, 8)), ('MELT', melt_model, (1, 2, 4, 8)),
                       ('1-loop baseline', base_model, (1,))], data, configs[0])
    print(f"\nmain job done in {time.time() - t0:.0f} s")
    return rows


def main(argv):
    overrides = parse_args(argv, DEFAULTS)
    if overrides.get('phase', 'all') not in PHASES + ('all',):
        raise ValueError(f"--phase must be one of {', '.join(PHASES + ('all',))}, got {overrides['phase']!r}")
    if overrides.get('phase', 'all') != 'all':
        return train(phase_config(overrides['phase'], overrides))
    if overrides.get('recipe'):
        return recipe_job(overrides)
    if overrides.get('dataset', 'reason') != 'reason':
        raise ValueError("the main job (--phase=all) runs on data/reason, or on a recipe's data "
                         "(python train.py config/austen.py); pick a --phase for other data")
    if 'out_dir' in overrides:
        raise ValueError("--out_dir is per phase; the main job writes out/loop, out/transition, out/distill")
    prepare_data_set(os.path.join(DATA_DIR, 'reason'))
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

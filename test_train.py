"""train.py (phases, objectives, resume, DDP) and ablate.py."""

import importlib.util
import json
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ablate
import checkpoints
import phases
import train
import bench
from conftest import (OURO_TINY, TRAIN_TINY, in_float64, loop_and_melt_pair, max_diff, reference_phase_loss,
                      ouro_tensors, run_train, tiny_model, tokens, train_hf_tokenizer, varied_lines,
                      write_ouro_folder)
from melt import MELT, MELTConfig

# ----------------------------------------------------------------------------------------
# train.py


def fixed_val_loss(phase, model, teacher_model, data_dir):
    """The phase's loss at alpha = 1 on four fixed validation batches."""
    cfg = train.phase_config(phase, train.parse_args(TRAIN_TINY, train.DEFAULTS))
    data = checkpoints.Data(data_dir, cfg['block_size'], 'cpu')
    with torch.no_grad():
        return np.mean([phases.phase_loss(cfg, model, teacher_model, data.batch('val', 16, seed), 1.0)[0].item()
                        for seed in range(4)])


def test_each_phase_lowers_its_loss(reason_data, looplm_dir, tmp_path, capsys):
    common = [f'--dataset={reason_data}', '--eval_interval=30', '--max_iters=30', '--always_save_checkpoint=True']
    losses, _ = run_train(capsys, *common, '--phase=loop', f'--out_dir={tmp_path}/loop', '--learning_rate=1e-2')
    assert np.mean([losses[i] for i in range(25, 30)]) < np.mean([losses[i] for i in range(5)]) - 0.3
    teacher_model, _ = checkpoints.load_checkpoint(looplm_dir, 'cpu')
    cfg = train.phase_config('transition', train.parse_args(TRAIN_TINY, train.DEFAULTS))
    start = train.load_model(looplm_dir, 'melt', cfg, {'vocab_size': 137})[0]  # LoopLM weights + new gates
    run_train(capsys, *common, '--phase=transition', f'--init_from={looplm_dir}', f'--out_dir={tmp_path}/transition',
              '--transition_iters=10', '--learning_rate=3e-3', '--gate_lr=3e-2')
    after_transition, _ = checkpoints.load_checkpoint(f'{tmp_path}/transition', 'cpu')
    assert fixed_val_loss('transition', after_transition, None, reason_data) < \
        fixed_val_loss('transition', start, None, reason_data) - 0.01
    _, out = run_train(capsys, *common, '--phase=distill', f'--init_from={tmp_path}/transition',
                       f'--teacher={looplm_dir}', f'--out_dir={tmp_path}/distill', '--gate_lr=3e-2', '--learning_rate=3e-3')
    after_distill, ckpt = checkpoints.load_checkpoint(f'{tmp_path}/distill', 'cpu')
    assert fixed_val_loss('distill', after_distill, teacher_model, reason_data) < \
        fixed_val_loss('distill', after_transition, teacher_model, reason_data) - 0.001
    assert re.search(r'iter 0: loss [\d.]+ \(kl [\d.]+, attn [\d.]+\)', out)
    assert ckpt['phase'] == 'distill' and ckpt['model_args']['kv_sharing'] == 'melt' and ckpt['iter_num'] == 30
    assert set(ckpt) == {'model', 'optimizer', 'model_args', 'config', 'iter_num', 'best_val_loss', 'phase'}


def test_alpha_and_learning_rate_schedules(reason_data, looplm_dir, tmp_path, capsys):
    """alpha: linear, then 1. The learning rate: warmup (it + 1) / (warmup + 1), then a cosine
    from 1 to min_lr_ratio over the rest, by hand: lr x 0.1 + 0.9 x (1 + cos(pi p)) / 2."""
    cfg = train.phase_config('transition', {'transition_iters': 8})
    assert [phases.alpha_at(cfg, i) for i in (0, 2, 4, 8, 12)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    _, out = run_train(capsys, f'--dataset={reason_data}', '--phase=transition', f'--init_from={looplm_dir}',
                       f'--out_dir={tmp_path}', '--max_iters=6', '--eval_interval=100', '--transition_iters=4',
                       '--warmup_iters=2', '--learning_rate=1e-2', '--min_lr_ratio=0.1')
    logged = [float(a) for a in re.findall(r'alpha ([\d.]+)', out)]
    assert logged == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    by_hand = [1 / 3, 2 / 3] + [0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2 for p in (0, 0.25, 0.5, 0.75)]
    assert re.findall(r', lr ([\d.e+-]+),', out) == [f'{1e-2 * f:.2e}' for f in by_hand]


def test_distill_loss_is_zero_for_the_teacher_itself():
    loop_model, melt_model = loop_and_melt_pair()
    ids = tokens(12, batch=2)
    teacher_aux = loop_model(ids, return_aux=True)
    same = melt_model(ids, alpha=0.0, chunk_size=4, return_aux=True)
    melt = melt_model(ids, alpha=1.0, chunk_size=4, return_aux=True)
    assert phases.kl_every_loop(same, teacher_aux).abs() < 1e-6
    assert phases.attention_alignment(same, teacher_aux) < 1e-10
    assert phases.kl_every_loop(melt, teacher_aux) > 1e-4 and phases.attention_alignment(melt, teacher_aux) > 1e-4
    # hand-check of the KL on one distribution pair: states (1, 1, 2) through an identity head
    s, t, head = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]]), torch.eye(2)
    ps, pt = torch.softmax(s, -1)[0, 0], torch.softmax(t, -1)[0, 0]
    expected = (pt * (pt / ps).log()).sum()
    assert torch.isclose(phases.kl_every_loop({'states': [s], 'head': head}, {'states': [t], 'head': head}), expected)


def float64_phase(phase, objective='ouro', **overrides):
    """(cfg, student, teacher, batch, alpha) for one phase's loss on tiny float64 models."""
    cfg = train.phase_config(phase, {'loops': 3, 'chunk_size': 4, **overrides})
    cfg['objective'] = objective
    loop_model, melt_model = loop_and_melt_pair()
    student = in_float64(loop_model if phase == 'loop' else melt_model).train()
    teacher = in_float64(tiny_model('loop')).requires_grad_(False) if phases.uses_teacher(cfg) else None
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 64, (2, 13), generator=g)
    y = torch.where(torch.rand(2, 13, generator=g) < 0.3, -1, torch.randint(0, 64, (2, 13), generator=g))
    return cfg, student, teacher, (x, y, torch.randint(1, 4, (2, 13), generator=g)), 0.4


@pytest.mark.parametrize('phase, objective, overrides', [('loop', 'ouro', {}), ('loop', 'depth', {}),
                                                         ('transition', 'depth', {'kd_weight': 0.5}),
                                                         ('distill', 'ouro', {})])
def test_losses_made_a_slice_at_a_time_equal_every_loops_full_logits(monkeypatch, phase, objective, overrides):
    """Each loop's logits are made from its state 5 tokens at a time (26 tokens: 6 slices, the
    last shorter) and recomputed in backward: the loss and every gradient equal the old way,
    every loop's full logits at once (conftest.reference_phase_loss), in float64."""
    monkeypatch.setattr(phases, 'LOGITS_PER_SLICE', {'cpu': 5 * 64})
    cfg, student, teacher, batch, alpha = float64_phase(phase, objective, **overrides)
    params = [p for p in student.parameters() if p.requires_grad]
    loss, _ = phases.phase_loss(cfg, student, teacher, batch, alpha)
    ref = reference_phase_loss(cfg, student, teacher, batch, alpha)
    assert abs(loss.item() - ref.item()) < 1e-12 and loss.item() > 1e-3
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert sum(g is not None for g in grads) == sum(g is not None for g in ref_grads) > len(params) // 2
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None) and (g is None or max_diff(g, r) < 1e-12)


@pytest.mark.parametrize('phase, alpha', [('loop', 0.0), ('transition', 0.4), ('distill', 1.0)])
def test_activation_checkpointing_gives_the_same_gradients(phase, alpha):
    """MELT.recompute_blocks: backward recomputes every (loop, layer) block, ChunkMemory's
    earlier chunks included (13 tokens in chunks of 4); gradients equal (float64)."""
    cfg, student, teacher, batch, _ = float64_phase(phase, kd_weight=0.5)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = {}
    for recompute in (False, True):
        student.recompute_blocks = recompute
        loss, _ = phases.phase_loss(cfg, student, teacher, batch, alpha)
        grads[recompute] = torch.autograd.grad(loss, params, allow_unused=True)
    assert sum(g is not None for g in grads[True]) > len(params) // 2
    for plain, recomputed in zip(grads[False], grads[True]):
        assert (plain is None) == (recomputed is None)
        assert plain is None or max_diff(plain, recomputed) < 1e-12


def test_mean_keys_hand_worked():
    assert phases.mean_keys(13, 4) == (4 * 4 + 4 * 8 + 4 * 12 + 1 * 13) / 13  # chunks of 4, 4, 4, 1 tokens
    assert phases.mean_keys(5, 1) == (1 + 2 + 3 + 4 + 5) / 5  # exact decoding: causal
    assert phases.mean_keys(13, 13) == phases.mean_keys(13, 20) == 13  # one chunk: the whole row


@pytest.mark.parametrize('phase, alpha', [('loop', 0.0), ('transition', 0.0), ('transition', 0.4), ('distill', 1.0)])
def test_step_flops_equal_the_matmuls_a_step_runs(phase, alpha):
    """step_flops_per_token against torch's FlopCounterMode over a real forward + backward (the
    reference path, which makes each loop's logits once): every matmul, MELT's gate and both
    caches' K/V in phase 1 included. The counter does not see the CPU's fused attention, whose
    part (mean_keys, hand-checked above) is taken out."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg, student, teacher, batch, _ = float64_phase(phase, kd_weight=0.5, block_size=13)
    with FlopCounterMode(display=False) as counter:
        reference_phase_loss(cfg, student, teacher, batch, alpha).backward()
    c, tokens_run = student.config, batch[0].numel()

    def attention(chunk):
        return cfg['loops'] * c.n_layer * 4 * c.n_head * c.head_dim * phases.mean_keys(13, chunk)
    student_attention = attention(13 if phase == 'loop' else cfg['chunk_size'])
    expected = tokens_run * (phases.step_flops_per_token(cfg, student, teacher, alpha)
                             - 3 * student_attention - (attention(13) if teacher else 0))
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
    assert phases.step_flops_per_token(cfg, student, teacher, alpha) > 3 * student_attention > 0


def test_utilisation_against_the_gpus_peak(monkeypatch):
    assert phases.utilisation(1.5e12, 'cpu') == '1.500 TFLOP/s'
    for name, mfu in (('NVIDIA H200', '50.0%'), ('NVIDIA A100-SXM4-80GB', '158.5%'), ('NVIDIA H100 PCIe', '65.4%')):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device, name=name: name)
        assert phases.utilisation(494.5e12, 'cuda') == f'494.500 TFLOP/s, MFU {mfu}'
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: 'Some GPU')
    assert phases.utilisation(1e12, 'cuda').endswith('MFU unknown (no bf16 peak for Some GPU)')


def step_peak(model, teacher, cfg, batch, alpha):
    """Peak bytes a forward + backward of the phase's loss allocates (torch's profiler)."""
    def step():
        loss, _ = phases.phase_loss(cfg, model, teacher, batch, alpha)
        loss.backward()
    step()  # gradients allocated, as in training
    return bench.peak_allocated(step)


def test_a_steps_memory_holds_no_loops_full_vocabulary_logits():
    """A distill step with a 32,768-token vocabulary: one loop's full logits in fp32 are 8 MB
    here, and from 1 to 8 loops the step's peak grows by less than that (before, it held
    every loop's logits, log-probabilities and KL terms, the teacher's too, at once)."""
    shape = dict(vocab_size=32768, block_size=32, n_layer=1, n_head=4, n_kv_head=4, n_embd=32, n_hidden=48)
    torch.manual_seed(0)
    student = MELT(MELTConfig(**shape, kv_sharing='melt')).train()
    teacher = MELT(MELTConfig(**shape, kv_sharing='loop')).requires_grad_(False)
    x = torch.randint(0, 32768, (2, 32))
    peaks = {}
    for loops in (1, 8):
        cfg = {**train.phase_config('distill', {'loops': loops, 'chunk_size': 8}), 'objective': 'ouro'}
        peaks[loops] = step_peak(student, teacher, cfg, (x, x, None), 1.0)
    one_loop_logits = 2 * 32 * 32768 * 4
    assert peaks[8] - peaks[1] < one_loop_logits, (peaks, one_loop_logits)


def test_activation_checkpointing_holds_less():
    """With a small vocabulary a step's memory is the blocks' activations: recomputing the
    blocks in backward keeps well under half of them."""
    shape = dict(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=64, n_hidden=176)
    torch.manual_seed(0)
    model = MELT(MELTConfig(**shape, kv_sharing='melt')).train()
    cfg = {**train.phase_config('transition', {'loops': 4, 'chunk_size': 16}), 'objective': 'ouro'}
    x = torch.randint(0, 64, (4, 64))
    peaks = {}
    for recompute in (False, True):
        model.recompute_blocks = recompute
        peaks[recompute] = step_peak(model, None, cfg, (x, x, None), 0.5)
    assert peaks[True] < 0.5 * peaks[False], peaks


def test_depth_objective_hand_worked():
    """Loop k learns only the tokens whose problem needs at most k hops, the last loop all."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]
    exit_logits = torch.randn(2, 3, 3, generator=g)
    targets = torch.tensor([[-1, 2, 4], [1, -1, 0]])
    depth = torch.tensor([[1, 1, 3], [2, 2, 1]])
    aux = {'states': logits, 'head': torch.eye(5), 'exit_logits': exit_logits}  # an identity head: states are logits
    loss, parts = phases.depth_loss(aux, targets, depth, 0.5)
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
    data = checkpoints.Data(reason_data, 8, 'cpu')
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
        cfg = train.phase_config('loop', train.parse_args(list(flags), train.DEFAULTS))
        return phases.choose_objective(cfg, checkpoints.Data(folder, 8, 'cpu'))
    assert choose() == 'depth' and choose('--objective=ouro') == 'ouro'
    assert choose('--init_from=ouro:/some/Ouro-1.4B') == 'ouro'
    plain = tmp_path / 'plain'  # the same tokens as a data set of another kind: no depths
    plain.mkdir()
    for f in ('train.bin', 'val.bin'):
        (plain / f).write_bytes((pathlib.Path(reason_data) / f).read_bytes())
    with open(plain / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 137, 'tokenizer': 'words'}, f)
    assert choose(folder=str(plain)) == 'ouro'
    with pytest.raises(ValueError, match=r"--objective=depth needs each token's hops .*which .*plain does not have"):
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


@pytest.mark.parametrize('argv, error, match', [
    (['--learning_rat=1e-3'], ValueError, r'unknown option --learning_rat; known: '),
    (['--max_iters=ten'], ValueError, r'--max_iters=ten: expected an integer'),
    (['--max_iters', '1.5'], ValueError, r'--max_iters=1.5: expected an integer, got float'),
    (['--phase', 'distil'], ValueError, r"--phase must be one of loop, transition, distill, all, got 'distil'"),
    (['--phase=loop', '--dtype=fp8'], ValueError, r"--dtype must be one of float32, bfloat16, float16, got 'fp8'"),
    (['--phase=transition', '--chunk_size=0'], ValueError, r'--chunk_size must be >= 1, got 0'),
    (['--phase=loop', 'nowhere.py'], FileNotFoundError, r"config file 'nowhere.py' does not exist"),
    (['--phase=loop', 'config'], ValueError, r"expected --key=value or a config file \(.py\), got 'config'"),
    (['--phase=transition', '--gate=foo'], ValueError, r"--gate must be one of element, scalar, last, first, mean, ema, got 'foo'"),
    (['--phase=loop', '--objective=bar'], ValueError, r"--objective must be one of depth, ouro, got 'bar'"),
    (['--phase=transition', '--ema_z=2'], ValueError, r'--ema_z must be in \[0, 1\], got 2.0'),
    (['--phase=loop', '--min_lr_ratio=-0.5'], ValueError, r'--min_lr_ratio must be in \[0, 1\], got -0.5'),
])
def test_bad_flags(argv, error, match):
    with pytest.raises(error, match=match):
        train.main(argv)


def test_config_files_set_values_in_plain_sight(tmp_path, capsys, reason_data, looplm_dir):
    """The values at the top of train.py are the LoopLM's; a phase's config file replaces some,
    flags replace those, and the phase says what its file set."""
    assert train.parse_args(['--compile', '--max_iters', '5', '--decay_lr=False'], train.DEFAULTS) == \
        {'compile': True, 'max_iters': 5, 'decay_lr': False}
    loop = train.phase_config('loop', {})
    assert all(loop[k] == v for k, v in train.DEFAULTS.items() if k not in ('phase', 'out_dir')) and loop['from_file'] == []
    distill = train.phase_config('distill', {'max_iters': 7})
    changed = sorted(k for k, v in train.DEFAULTS.items() if distill[k] != v and k not in ('phase', 'out_dir'))
    assert changed == ['gate_lr', 'init_from', 'learning_rate', 'max_iters'] and distill['max_iters'] == 7
    assert distill['from_file'] == ['gate_lr', 'init_from', 'learning_rate']  # what the file set and no flag replaced
    mine = tmp_path / 'mine.py'
    mine.write_text("eval_iters = 3\nlearning_rate = 2e-3  # a comment\n")
    assert train.parse_args([str(mine), '--eval_iters=4'], train.DEFAULTS) == {'eval_iters': 4, 'learning_rate': 2e-3}
    mine.write_text("learning_rat = 2e-3\n")
    with pytest.raises(ValueError, match=r"mine.py sets 'learning_rat', which is not an option"):
        train.parse_args([str(mine)], train.DEFAULTS)
    mine.write_text("max_iters = 'ten'\n")
    with pytest.raises(ValueError, match=r'--max_iters=ten: expected an integer'):
        train.parse_args([str(mine)], train.DEFAULTS)
    _, out = run_train(capsys, f'--dataset={reason_data}', '--phase=distill', f'--init_from={looplm_dir}',
                       f'--teacher={looplm_dir}', f'--out_dir={tmp_path}/d', '--max_iters=1', '--eval_interval=1')
    assert "\n  config/distill.py: gate_lr=0.005, learning_rate=0.0005\n" in out


def test_mismatched_data(reason_data, looplm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'no ckpt.pt in .*nowhere'):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=transition', f'--init_from={tmp_path}/nowhere',
                                 f'--out_dir={tmp_path}/out'])
    with pytest.raises(FileNotFoundError, match=rf'no meta.pkl in {tmp_path}: prepare the data set first'):
        train.main(TRAIN_TINY + [f'--dataset={tmp_path}', '--phase=loop', f'--out_dir={tmp_path}/out'])
    bigger = tmp_path / 'bigger'
    bigger.mkdir()
    for f in ('train.bin', 'val.bin'):
        (bigger / f).write_bytes(open(os.path.join(reason_data, f), 'rb').read())
    with open(bigger / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 500, 'tokenizer': 'gpt2'}, f)
    with pytest.raises(ValueError, match=r'has vocab_size 500, the model only 137'):
        train.main(TRAIN_TINY + [f'--dataset={bigger}', '--phase=transition', f'--init_from={looplm_dir}',
                                 f'--out_dir={tmp_path}/out'])


@pytest.mark.parametrize('phase', ['loop', 'transition'])
def test_ddp_two_processes_match_one_process(phase, reason_data, looplm_dir, tmp_path, capsys):
    """The LoopLM phase (every parameter used), and a MELT phase, where DDP looks for unused
    parameters (the gates at alpha = 0) and the losses apply the LM head that forward hands back."""
    source = [] if phase == 'loop' else [f'--init_from={looplm_dir}', '--transition_iters=2']
    args = TRAIN_TINY + source + [f'--dataset={reason_data}', f'--phase={phase}', '--max_iters=3', '--eval_interval=3',
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
    top_lr = 3e-3 if phase == 'loop' else 1e-2  # the transition's gates learn at gate_lr 1e-2
    assert (diff <= 1e-5).float().mean() > 0.999 and diff.max() <= 2 * 3 * top_lr, diff.max()  # 3 steps
    # the weights did train: against the run's own start (train.py's seed, then the same model), every
    # tensor moved, by at most 3 Adam steps of its learning rate (a start of other weights would be further)
    cfg = train.phase_config(phase, train.parse_args(args, train.DEFAULTS))
    torch.manual_seed(cfg['seed'])
    start = train.load_model(cfg['init_from'], phase == 'loop' and 'loop' or 'melt', cfg, {'vocab_size': 137})[0].state_dict()
    moved = {k: (single[k] - start[k]).abs().max().item() for k in single}
    assert all(0 < m <= 3 * top_lr * 1.01 for m in moved.values()), moved


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
    assert 'kv_sharing=melt' in out and f'from ouro:{folder}' in out and len(losses) == 6
    assert losses[5] < losses[0]
    ckpt = torch.load(f'{tmp_path}/distill/ckpt.pt', weights_only=False)
    assert ckpt['model_args']['n_embd'] == 32 and ckpt['model_args']['vocab_size'] == 300
    # data made with another tokenizer is refused
    other = tmp_path / 'other'
    train_hf_tokenizer(varied_lines(100), other, vocab_size=280)
    prepare_text([f'--input={text}', f'--tokenizer=ouro:{other}', f'--out_dir={tmp_path}/data2'])
    with pytest.raises(ValueError, match=r"was tokenized with 'ouro:[0-9a-f]+', not with .*ouro's tokenizer"):
        train.main(TRAIN_TINY + [f'--dataset={tmp_path}/data2', '--phase=distill', f'--init_from=ouro:{folder}',
                                 f'--out_dir={tmp_path}/out'])


# ----------------------------------------------------------------------------------------
# ablate.py

def test_ablation_rows_switch_what_they_say():
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
    shorter = ablate.plan('element', 1, 'L', 'R', 8, ['--max_iters=5'], {'distill': ['--max_iters=9']})[0]
    assert shorter[0][0] == '--max_iters=5' and shorter[1][:2] == ['--max_iters=9', '--max_iters=5']  # train_args win


def test_ablation_on_text_scores_each_row_by_its_validation_ce(tmp_path, capsys, monkeypatch):
    """python ablate.py --recipe=austen on a slice of the books, tiny: the recipe's config and its
    rows' phase settings reach every run, and each row's CE equals its model decoding the val
    batches token by token through a KVCache (another code path than the chunk-1 forward)."""
    from data.austen.prepare import main as prepare_austen
    prepare_austen([f'--out_dir={tmp_path}/austen', '--max_chars=20000'])
    monkeypatch.chdir(tmp_path)
    assert 'ouro objective' not in ablate.parse(['--recipe=austen'])['rows'] and len(ablate.parse(['--recipe=austen'])['rows']) == 9
    flags = TRAIN_TINY + [f'--dataset={tmp_path}/austen', '--max_iters=3', '--eval_interval=3']
    ablate.main(['--recipe=austen', '--out_dir=grid', '--rows=first,no_transition', '--seeds=1', '--figure=fig.png',
                 '--train_args=' + ' '.join(flags)])
    out = capsys.readouterr().out
    transition = checkpoints.read_checkpoint('grid/first/seed1/transition', 'cpu')['config']
    assert transition['recipe'] == 'austen' and transition['transition_iters'] == 60 and transition['max_iters'] == 3
    assert transition['gate'] == 'first' and transition['n_embd'] == 32  # config/austen.py, then the row, then train_args
    results = json.load(open('grid/results.json'))
    assert list(results) == ['LoopLM', 'first', 'no transition'] and (tmp_path / 'fig.png').is_file()
    data = checkpoints.Data(f'{tmp_path}/austen', 18, 'cpu')
    batches = data.val_batches(8, ablate.TEXT_EVAL_BATCHES, 1337)
    model, _ = checkpoints.load_checkpoint('grid/first/seed1/distill', 'cpu')
    for n in (1, 4):
        decoded = []
        for x, y, _ in batches:
            cache, logits = model.new_cache(8, 18, n), []
            with torch.no_grad():
                for t in range(18):
                    logits.append(model(x[:, t:t + 1], loops=n, cache=cache)[0])
            decoded.append(torch.nn.functional.cross_entropy(torch.cat(logits, 1).flatten(0, 1), y.flatten()).item())
        assert abs(results['first']['1'][str(n)]['ce'] - sum(decoded) / len(decoded)) < 1e-5, n
    ce = [results['first']['1'][str(n)]['ce'] for n in ablate.EVAL_LOOPS]
    bits = out[out.index('bits per character'):]
    assert re.search(r'first +1 +' + r' +'.join(f'{c:.3f} ±0.000' for c in ce), out)
    assert re.search(r'first +1 +' + r' +'.join(f'{c / math.log(2):.3f} ±0.000' for c in ce), bits)


def test_no_transition_starts_distillation_from_the_looplm_with_fresh_gates(looplm_dir):
    loop_model, _ = checkpoints.load_checkpoint(looplm_dir, 'cpu')
    cfg = train.phase_config('distill', train.parse_args(TRAIN_TINY + [f'--init_from={looplm_dir}'], train.DEFAULTS))
    student, _ = train.load_model(cfg['init_from'], 'melt', cfg, {'vocab_size': 137})
    base = student.state_dict()
    assert all(torch.equal(base[k], v) for k, v in loop_model.state_dict().items())
    for gate in student.gate_modules():  # reset_gates' values, the same as a transition starts with
        assert not gate.w_z.weight.any() and not gate.u_z.weight.any()
        assert (gate.b_z == student.config.gate_bias_init).all()


def test_ablation_grid_end_to_end(reason_data, tmp_path, capsys, monkeypatch):
    """From another folder than the project's, with relative paths: every run trains where the
    user meant (tmp_path/grid), and the grid finds its checkpoints there."""
    monkeypatch.chdir(tmp_path)
    flags = TRAIN_TINY + [f'--dataset={reason_data}', '--max_iters=3', '--eval_interval=3', '--transition_iters=2']
    ablate.main(['--out_dir=grid', '--rows=no_distill,no_chunks', '--seeds=2', '--figure=fig.png',
                 '--train_args=' + ' '.join(flags)])
    out = capsys.readouterr().out
    assert (tmp_path / 'grid' / 'no_chunks' / 'seed2' / 'distill' / 'ckpt.pt').is_file()
    tmp_path = tmp_path / 'grid'
    results = json.load(open(tmp_path / 'results.json'))
    assert list(results) == ['LoopLM', 'no distill', 'no chunks'] and list(results['no chunks']) == ['1', '2']
    for row, by_seed in results.items():
        for at in by_seed.values():
            kv = [at[str(n)]['kv_bytes'] for n in ablate.EVAL_LOOPS]
            assert kv == ([kv[0] * n for n in ablate.EVAL_LOOPS] if row == 'LoopLM' else [kv[0]] * 4), row
        accs = [[by_seed[s][str(n)]['acc'] for s in by_seed] for n in ablate.EVAL_LOOPS]
        cells = ' '.join(f"{np.mean(a):.3f} ±{(max(a) - min(a)) / 2:.3f}" for a in accs)
        assert re.search(re.escape(row) + r' +' + str(len(by_seed)) + ' +' + r' +'.join(re.escape(c) for c in cells.split(' ')), out)
    ablate.main([f'--out_dir={tmp_path}', '--replot', f'--figure={tmp_path}/fig.png'])  # from results.json

    def table(text):
        return text[text.index('accuracy decoding'):].split('\n\n')[0]
    assert table(capsys.readouterr().out) == table(out)  # the same table
    assert not (tmp_path / 'no_distill' / 'seed1' / 'distill').exists()
    for seed in (1, 2):
        for phase in ('transition', 'distill'):
            ckpt = torch.load(tmp_path / 'no_chunks' / f'seed{seed}' / phase / 'ckpt.pt', weights_only=False)
            assert ckpt['config']['chunk_size'] == 18 and ckpt['config']['seed'] == seed  # TRAIN_TINY's block_size
    if importlib.util.find_spec('matplotlib'):
        png = (tmp_path / 'fig.png').read_bytes()  # a PNG of two panels, drawn (width and height from IHDR)
        assert png[:8] == b'\x89PNG\r\n\x1a\n' and int.from_bytes(png[16:20], 'big') > 2 * int.from_bytes(png[20:24], 'big') / 1.5
        assert len(png) > 20_000
    else:
        assert 'no figure: matplotlib is not installed' in out and not (tmp_path / 'fig.png').exists()


# ----------------------------------------------------------------------------------------
# the main job on text: data/austen, characters, config/austen.py


def test_characters_of_the_austen_books_split_90_10_and_decode_back(tmp_path):
    from data.austen.prepare import BOOKS, austen_text
    from data.austen.prepare import main as prepare_austen
    from data.text.prepare import CharCodec
    prepare_austen([f'--out_dir={tmp_path}', '--max_chars=3000'])
    meta = checkpoints.read_meta(str(tmp_path))
    text = '\n\n'.join((pathlib.Path(__file__).parent / 'data' / 'austen' / b).read_text()[:3000] for b in BOOKS)
    assert austen_text(3000) == text and meta['tokenizer'] == 'char' and meta['itos'] == sorted(set(text))
    codec = CharCodec(meta['itos'])
    train_ids = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16).tolist()
    val_ids = np.fromfile(tmp_path / 'val.bin', dtype=np.uint16).tolist()
    split = int(len(text) * 0.9)
    assert codec.decode(train_ids) == text[:split] and codec.decode(val_ids) == text[split:]
    assert [meta['itos'].index(c) for c in 'Emma'] == codec.encode('Emma')
    with pytest.raises(ValueError, match=r"'\$' is not a character of this data set's"):
        codec.encode('$5')
    meta['itos'] = meta['itos'][:-1]  # one character short of vocab_size
    (tmp_path / 'meta.pkl').write_bytes(pickle.dumps(meta))
    with pytest.raises(ValueError, match=rf"itos is .*expected {meta['vocab_size']} distinct characters"):
        checkpoints.read_meta(str(tmp_path))


def test_the_austen_recipe_runs_offline_through_every_phase_and_its_table_is_measured(tmp_path, monkeypatch, capsys):
    """python train.py config/austen.py on a slice of the books, tiny: the three phases and the
    1-loop baseline into out/austen-*, and the table's CE equals MELT decoding token by token
    (a KVCache, another code path than the chunk-1 forward) and the LoopLM's full forward."""
    from data.austen.prepare import main as prepare_austen
    prepare_austen([f'--out_dir={tmp_path}/austen', '--max_chars=20000'])
    monkeypatch.chdir(tmp_path)  # out/ is relative to the working directory
    rows = train.main([str(pathlib.Path(__file__).parent / 'config' / 'austen.py'), f'--dataset={tmp_path}/austen',
                       '--max_iters=6', '--eval_interval=3', '--eval_iters=1', '--batch_size=4', '--block_size=16',
                       '--n_embd=32', '--n_hidden=48', '--chunk_size=4', '--loops=2', '--log_interval=3',
                       '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    for phase in ('loop', 'transition', 'distill', 'base'):
        assert (tmp_path / 'out' / f'austen-{phase}' / 'ckpt.pt').is_file()
    assert 'config/austen/distill.py' in out and 'loops=1' in out  # the recipe's phase files; the baseline
    assert [(name, n) for name, n, *_ in rows] == [('LoopLM', n) for n in (1, 2, 4, 8)] + \
        [('MELT', n) for n in (1, 2, 4, 8)] + [('1-loop baseline', 1)]
    kv = {(name, n): b for name, n, _, _, b in rows}
    assert kv['MELT', 8] == kv['MELT', 1] == kv['LoopLM', 1] and kv['LoopLM', 8] == 8 * kv['LoopLM', 1]
    data = checkpoints.Data(f'{tmp_path}/austen', 16, 'cpu')
    x, y, _ = data.batch('val', 4, checkpoints.batch_seed(1337, 0, 0, 'val'))
    ce = {(name, n): c for name, n, c, _, _ in rows}
    melt, _ = checkpoints.load_checkpoint('out/austen-distill', 'cpu')
    looplm, _ = checkpoints.load_checkpoint('out/austen-loop', 'cpu')
    for n in (1, 4):
        cache, logits = melt.new_cache(4, 16, n), []
        with torch.no_grad():
            for t in range(16):
                logits.append(melt(x[:, t:t + 1], loops=n, cache=cache)[0])
            decoded = torch.nn.functional.cross_entropy(torch.cat(logits, 1).flatten(0, 1), y.flatten()).item()
            full = looplm(x, targets=y, loops=n)[1].item()
        assert abs(ce['MELT', n] - decoded) < 1e-5 and abs(ce['LoopLM', n] - full) < 1e-6, n
    assert all(abs(bits - c / math.log(2)) < 1e-12 for _, _, c, bits, _ in rows)
    import sample  # and sample.py writes text from it: greedy, what generate gives
    capsys.readouterr()
    sample.main(['--init_from=out/austen-distill', '--loops=8', '--num_samples=1', '--max_new_tokens=12', '--top_k=1',
                 '--start=Emma', '--device=cpu', '--dtype=float32'])
    text = capsys.readouterr().out.split('\n---------------')[0]
    model, codec = sample.load({'init_from': 'out/austen-distill', 'kv_sharing': ''})
    expected = sample.generate(model, torch.tensor([codec.encode('Emma')]), 12, loops=8, top_k=1)[0]
    assert text == codec.decode(expected.tolist()) and len(text) == 16 and text.startswith('Emma')


def test_a_recipe_must_have_its_folder(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(train, 'prepare_data_set', made.append)
    with pytest.raises(ValueError, match=r"--recipe='nothing': no folder config/nothing/ with its phases' config files"):
        train.main(['--recipe=nothing', f'--out_dir={tmp_path}/o'])
    assert made == []  # refused before any data set is made

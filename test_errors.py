"""User mistakes: one clear line, a non-zero exit, and nothing the user had is touched."""

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest
import torch

import bench
import sample
import train
from conftest import (OURO_TINY, TRAIN_TINY, ouro_tensors, run_train, train_hf_tokenizer,
                      varied_lines, write_bytes, write_ouro_folder)

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
    ('sample', '--kv_sharing=both', r"--kv_sharing must be one of melt, loop, got 'both'"),
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


def test_ctrl_c_inside_torch_save_is_a_ctrl_c(tmp_path, monkeypatch):
    """A Ctrl-C in the middle of torch.save's zip writer comes out of it as a RuntimeError (the
    writer fails on its way out); the save must still end as a KeyboardInterrupt, with the
    last checkpoint whole and no temporary file."""
    train.save_checkpoint(str(tmp_path), {'iter_num': 3})
    before = (tmp_path / 'ckpt.pt').read_bytes()

    def interrupted_save(obj, f):
        f.write(b'partial')
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2116544 vs 2116496")
    monkeypatch.setattr(torch, 'save', interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path), {'iter_num': 6})
    assert (tmp_path / 'ckpt.pt').read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']

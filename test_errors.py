"""User mistakes: one clear line, a non-zero exit, and nothing the user had is touched."""

import contextlib
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
import checkpoints
import sample
import train
from conftest import (OURO_TINY, TRAIN_TINY, ouro_tensors, run_train, train_hf_tokenizer,
                      varied_lines, write_bytes, write_ouro_folder)

# ----------------------------------------------------------------------------------------
# user mistakes: one clear line, a non-zero exit, nothing the user had touched


def snapshot(folder):
    """Every file under folder with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@contextlib.contextmanager
def unchanged(*folders):
    """Every file under the folders byte-identical after the block (a refused command's promise)."""
    folders = [pathlib.Path(f) for f in folders]
    before = [snapshot(f) for f in folders]
    yield
    assert [snapshot(f) for f in folders] == before


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
    with pytest.raises(FileNotFoundError, match=rf"'{folder}/tokenizer.json' is not a folder with a tokenizer.json"):
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
        match = r"meta.pkl lacks 'vocab_size' \(an integer in \[1, 65536\].*remake the data set: python data/reason/prepare.py --out_dir="
    elif damage == 'train.bin empty':
        write_bytes(data / 'train.bin', b'')
        match = r'train.bin has 0 tokens; block_size 18 needs more than 19'
    else:
        write_bytes(data / 'train.bin', (data / 'train.bin').read_bytes()[:-1])
        match = r'train.bin has \d+ bytes, an odd number: expected uint16 token ids'
    with unchanged(tmp_path), pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY + [f'--dataset={data}', '--phase=loop', f'--out_dir={tmp_path}/out'])


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
        match = r'tokenizer.json is not valid JSON: line \d+, column \d+: .*fix it, or fetch the file again'
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        sample.main([f'--init_from=ouro:{folder}', '--device=cpu', '--dtype=float32', '--start=a'])
    assert snapshot(tmp_path) == before


def test_a_tokenizer_smaller_than_the_model_and_a_teacher_of_another_width(reason_data, looplm_dir, tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', dict(OURO_TINY, vocab_size=300),
                               ouro_tensors(dict(OURO_TINY, vocab_size=300)))
    train_hf_tokenizer(varied_lines(50), folder, vocab_size=280)
    with unchanged(tmp_path), pytest.raises(ValueError, match=r"the tokenizer has 28\d tokens, fewer than the model's vocabulary of 300"):
        sample.main([f'--init_from=ouro:{folder}', '--device=cpu', '--dtype=float32', '--start=a'])
    wide = tmp_path / 'wide'
    train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--n_embd=64', '--max_iters=1',
                             '--eval_interval=1', f'--out_dir={wide}'])
    with unchanged(tmp_path, looplm_dir), \
            pytest.raises(ValueError, match=r'the teacher .*wide and the student differ in shape: n_embd 64 vs 32'):
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
    ('sample', '--exit_threshold=1.5', r'exit_threshold must be in \(0, 1\] \(0 or None: every loop\), got 1.5'),
    ('sample', '--exit_threshold=-0.1', r'exit_threshold must be in \(0, 1\] \(0 or None: every loop\), got -0.1'),
    ('sample', '--temperature=0', r'temperature must be > 0 \(use top_k=1 for greedy\), got 0.0'),
    ('sample', '--start=', r'the prompt \(--start\) is empty'),
    ('bench', '--prompt_tokens=0', r'--prompt_tokens must be >= 1, got 0'),
    ('bench', '--train_batch=-1', r'--train_batch must be >= 1, got -1'),
    ('bench', '--threads=-2', r'--threads must be >= 1 \(or 0 for torch.s default\), got -2'),
    ('bench', '--loops=4,0', r"--loops must be loop counts in \[1, 1024\] separated by commas, e.g. 1,4,8; got '4,0'"),
    ('bench', '--memory_budget=0', r'--memory_budget must be > 0 \(GB\), got 0.0'),
    ('bench', '--prefill_contexts=8k', r"--prefill_contexts must be token counts >= 1 separated by commas, e.g. "
                                       r"8192,32768; got '8k'"),
])
def test_values_out_of_range_are_refused(script, flag, match, reason_data, looplm_dir, tmp_path):
    if script == 'train':
        run = lambda: train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={tmp_path}/out',  # noqa: E731
                                               flag])
    elif script == 'sample':
        run = lambda: sample.main([f'--init_from={looplm_dir}', '--device=cpu', '--dtype=float32', flag])  # noqa: E731
    else:
        run = lambda: bench.main([flag])  # noqa: E731
    with unchanged(reason_data, looplm_dir, tmp_path), pytest.raises(ValueError, match=match):
        run()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_on_a_machine_without_it(reason_data, looplm_dir, tmp_path):
    match = r'--device=cuda, but this machine has no CUDA device; use --device=cpu'
    with unchanged(reason_data, looplm_dir, tmp_path), pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY[:-2] + [f'--dataset={reason_data}', '--phase=loop', '--device=cuda', f'--out_dir={tmp_path}/o'])
    with unchanged(reason_data, looplm_dir, tmp_path), pytest.raises(ValueError, match=match):
        sample.main([f'--init_from={looplm_dir}', '--device=cuda'])
    with unchanged(reason_data, looplm_dir, tmp_path), pytest.raises(ValueError, match=match):
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
        with pytest.raises(OSError, match=r'could not write .*ckpt.pt \(disk full\); the last good one'):
            checkpoints.save_checkpoint(str(out_dir), {'model': {}})
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
    error, match = {'unknown tokenizer': (ValueError, r"--tokenizer must be 'gpt2', 'char' or 'ouro:PATH', got 'bert'"),
                    'missing input': (FileNotFoundError, r'--input=.*nothing.txt: no such file'),
                    'not utf-8': (ValueError, r'latin.txt is not UTF-8 text'),
                    'too short': (ValueError, r'short.txt holds 5 characters; need at least 100'),
                    'out_dir a file': (ValueError, r'.*text.txt is a file, not a folder'),
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
    for argv, says in (
            (['train.py', '--phase=transition', f'--init_from={tmp_path}', f'--dataset={reason_data}'],
             rf"{tmp_path}/ckpt.pt is not a readable checkpoint"),
            (['sample.py', f'--init_from={tmp_path}'], rf"{tmp_path}/ckpt.pt is not a readable checkpoint"),
            (['bench.py', '--prompt_tokens=0'], r"--prompt_tokens must be >= 1, got 0"),
            (['bench.py', '--device=tpu'], r"--device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
            # a child process refuses what cannot fit: its one line, not its traceback
            (['bench.py', '--only=phases', '--device=cpu', '--train_batch=100000000', '--train_vocab=64'],
             r"a micro-batch of 100,000,000 x 1,024 tokens, .* would take [\d,.]+ GB, more than the [\d,.]+ GB free "
             r"on cpu \(bench child phase"),
            (['data/text/prepare.py', f'--input={tmp_path}/none.txt'], rf"--input={tmp_path}/none.txt: no such file")):
        run = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=here)
        assert run.returncode == 1 and 'Traceback' not in run.stderr, (argv, run.stderr)
        assert run.stderr.startswith('error: ') and run.stderr.count('\n') == 1, (argv, run.stderr)
        assert re.match('error: ' + says, run.stderr), (argv, run.stderr)
    assert broken.read_bytes() == b'not a checkpoint'


def test_ctrl_c_exits_130_and_keeps_the_last_checkpoint(reason_data, tmp_path):
    import signal
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = tmp_path / 'run'
    inherited = signal.getsignal(signal.SIGINT)  # what the child would inherit from this process
    # a terminal starts train.py with Ctrl-C at its default, whatever the process running the tests has set
    proc = subprocess.Popen([sys.executable, 'train.py'] + TRAIN_TINY + [
        f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}', '--max_iters=100000',
        '--eval_interval=3', '--log_interval=1000'], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out_dir / 'ckpt.pt').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not (out_dir / 'ckpt.pt').exists():  # say why, rather than interrupt a run that never started
        proc.kill()
        pytest.fail(f"train.py wrote no checkpoint (exit {proc.wait()}): {proc.communicate()[1][-2000:]}")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        with open(f'/proc/{proc.pid}/status') as f:
            masks = ' '.join(line.strip() for line in f if line.startswith(('SigBlk', 'SigIgn', 'SigCgt')))
        proc.kill()
        pytest.fail(f"train.py still running 60 s after Ctrl-C (the tests' SIGINT handler: {inherited}; "
                    f"the child's {masks}): {proc.communicate()[1][-2000:]}")
    assert proc.returncode == 130 and 'Traceback' not in err and err.strip().count('\n') == 0, err
    assert 'interrupted' in err
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] % 3 == 0
    assert not list(out_dir.glob('*.tmp'))


def test_ctrl_c_inside_torch_save_is_a_ctrl_c(tmp_path, monkeypatch):
    """A Ctrl-C in the middle of torch.save's zip writer comes out of it as a RuntimeError (the
    writer fails on its way out); the save must still end as a KeyboardInterrupt, with the
    last checkpoint whole and no temporary file."""
    checkpoints.save_checkpoint(str(tmp_path), {'iter_num': 3})
    before = (tmp_path / 'ckpt.pt').read_bytes()

    def interrupted_save(obj, f):
        f.write(b'partial')
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2116544 vs 2116496")
    monkeypatch.setattr(torch, 'save', interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(str(tmp_path), {'iter_num': 6})
    assert (tmp_path / 'ckpt.pt').read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


# ----------------------------------------------------------------------------------------
# every file a script reads is checked before it is used


MISSING = object()


@pytest.mark.parametrize('field, value, match', [
    ('vocab_size', '137', r"vocab_size is '137', expected an integer in \[1, 65536\]"),
    ('vocab_size', 0, r"vocab_size is 0, expected an integer in \[1, 65536\]"),
    ('vocab_size', 70_000, r"vocab_size is 70000, expected an integer in \[1, 65536\]"),
    ('vocab_size', MISSING, r"lacks 'vocab_size' \(an integer"),
    ('tokenizer', MISSING, r"lacks 'tokenizer'"),
    ('row_len', 0, r"row_len is 0, expected an integer >= 1"),
    ('row_len', 4, r"row_len is 4, expected 9, the tokens of one problem"),
    ('loss_after', [3, 500], r"loss_after is \[3, 500\], expected a list of token ids below vocab_size 137"),
    ('loss_after', 'abc', r"loss_after is 'abc', expected a list of token ids"),
    ('itos', ['x'] * 137, r"itos is \['x', .*expected the task's 137 words of data/reason/prepare.py"),
    ('max_depth', 3, r"max_depth is 3, expected 4, the most hops"),
    ('tokenizer_path', 7, r"tokenizer_path is 7, expected 'gpt2' or 'ouro:PATH'"),
])
def test_every_field_of_meta_pkl_is_checked(field, value, match, reason_data, tmp_path):
    """One line naming meta.pkl, the field, its value, what was expected, and the command that
    remakes the data set; nothing is written."""
    data = copy_dir(pathlib.Path(reason_data), tmp_path / 'data')
    meta = pickle.loads((data / 'meta.pkl').read_bytes())
    if value is MISSING:
        del meta[field]
    else:
        meta[field] = value
    write_bytes(data / 'meta.pkl', pickle.dumps(meta))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r'meta.pkl.*' + match + r'.*remake the data set: python data/'):
        train.main(TRAIN_TINY + [f'--dataset={data}', '--phase=loop', f'--out_dir={tmp_path}/out'])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('damage', ['val_depth.bin missing', 'train_depth.bin of another length', 'a depth above max_depth',
                                    'made by an older version', 'a token id past the vocabulary'])
def test_half_or_stale_data_is_refused_with_the_command_that_remakes_it(damage, reason_data, tmp_path):
    """Half a data set never selects another behaviour (Ouro's objective, before, for missing
    depth files), and an older version of the task is not trained on."""
    data = copy_dir(pathlib.Path(reason_data), tmp_path / 'data')
    if damage == 'val_depth.bin missing':
        (data / 'val_depth.bin').unlink()
        match = r'val_depth.bin is missing; the data set needs one byte per token of val.bin'
    elif damage == 'train_depth.bin of another length':
        write_bytes(data / 'train_depth.bin', (data / 'train_depth.bin').read_bytes()[:-9])
        match = r'train_depth.bin must hold one byte per token of train.bin'
    elif damage == 'a depth above max_depth':
        depths = bytearray((data / 'val_depth.bin').read_bytes())
        depths[5] = 9
        write_bytes(data / 'val_depth.bin', bytes(depths))
        match = r"val_depth.bin holds depth 9, above meta.pkl's max_depth 4"
    elif damage == 'made by an older version':  # the task had other words and 8-token problems
        meta = pickle.loads((data / 'meta.pkl').read_bytes())
        meta.update(itos=meta['itos'][:-1] + ['h=0'], row_len=8)
        write_bytes(data / 'meta.pkl', pickle.dumps(meta))
        match = r"meta.pkl: itos is .*expected the task's 137 words"
    else:
        tokens = bytearray((data / 'val.bin').read_bytes())
        tokens[10:12] = (200).to_bytes(2, 'little')
        write_bytes(data / 'val.bin', bytes(tokens))
        match = r"val.bin holds token id 200, not below meta.pkl's vocab_size 137"
    before = snapshot(tmp_path)
    for objective in ([], ['--objective=ouro']):
        with pytest.raises(ValueError, match=match + rf'.*remake the data set: python data/reason/prepare.py --out_dir={data}'):
            train.main(TRAIN_TINY + [f'--dataset={data}', '--phase=loop', f'--out_dir={tmp_path}/out'] + objective)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('script', ['train', 'sample', 'bench'])
@pytest.mark.parametrize('content, match', [
    (b"max_iters = 5\nx = 1 / 0\n", r"my.py, line 2: ZeroDivisionError: division by zero"),
    (b"max_iters = 5\n\nmax_iters 6\n", r"my.py, line 3: invalid syntax"),
    (b"max_iters = 5\nseed = 1  # caf\xe9\n", r"my.py, line 2: not UTF-8 text \(byte 29"),
    (b"max_iters = 5\nseed = 1\x00\n", r"my.py, line 2: source code string cannot contain null bytes"),
    (b"max_iters = 5\n\nraise SystemExit(3)\n", r"my.py, line 3: SystemExit: 3"),
    (b"compile = 'yes'\n", r"my.py: --compile=yes: expected True or False"),
])
def test_a_config_file_that_is_not_python_or_raises_is_named_with_its_line(script, content, match, tmp_path):
    config = write_bytes(tmp_path / 'my.py', content)
    main = {'train': train.main, 'sample': sample.main, 'bench': bench.main}[script]
    with pytest.raises(ValueError, match=r'config file .*' + match):
        main([str(config)] + (['--phase=loop', f'--out_dir={tmp_path}/out'] if script == 'train' else []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['my.py']


def test_a_config_file_may_import_define_helpers_and_start_with_a_byte_order_mark(tmp_path):
    """nanoGPT's configs import modules to compute values: those names are not settings."""
    from configurator import parse_args
    config = write_bytes(tmp_path / 'my.py', b"\xef\xbb\xbfimport math\n\n\ndef lr(e):\n    return 10 ** e\n\n\n"
                                             b"learning_rate = lr(-3)\nmax_iters = math.ceil(4.5)\n")
    assert parse_args([str(config)], train.DEFAULTS) == {'learning_rate': 1e-3, 'max_iters': 5}


@pytest.mark.parametrize('damage', ['loops out of range', 'melt not an object', 'melt sets an unknown field',
                                    'melt out of range', 'RoPE tables too large', 'added token not an object',
                                    'merge not two tokens', 'merge of a token not in the vocabulary',
                                    'vocabulary id not an integer'])
def test_every_field_of_an_ouro_folder_is_checked(damage, tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY))
    train_hf_tokenizer(varied_lines(50), folder, vocab_size=280)
    config = json.loads((folder / 'config.json').read_text())
    tokenizer = json.loads((folder / 'tokenizer.json').read_text())
    config_change, match = {
        'loops out of range': ({'total_ut_steps': 10 ** 9}, r"config.json: n_loops must be in \[1, 1024\], got 1000000000"),
        'melt not an object': ({'melt': [1]}, r"config.json: melt is \[1\], expected an object of MELT's settings"),
        'melt sets an unknown field': ({'melt': {'chunk': 4}}, r"config.json: melt sets \['chunk'\], expected only"),
        'melt out of range': ({'melt': {'chunk_size': 0}}, r"config.json: chunk_size must be >= 1, got 0"),
        'RoPE tables too large': ({'max_position_embeddings': 2 ** 36},
                                  r"RoPE's tables for max_position_embeddings 68,719,476,736 \(config.json\) would take"),
    }.get(damage, ({}, None))
    config.update(config_change)
    if damage == 'added token not an object':
        tokenizer['added_tokens'].append(7)
        match = r"tokenizer.json: added_tokens holds 7, expected objects with a 'content' string and an integer 'id'"
    elif damage == 'merge not two tokens':
        tokenizer['model']['merges'][0] = 'a b c'
        match = r"tokenizer.json: merge 'a b c' is not two tokens whose join is in model.vocab"
    elif damage == 'merge of a token not in the vocabulary':
        tokenizer['model']['merges'][0] = ['zzz', 'qqq']
        match = r"tokenizer.json: merge \['zzz', 'qqq'\] is not two tokens"
    elif damage == 'vocabulary id not an integer':
        tokenizer['model']['vocab']['a'] = 'seven'
        match = r"tokenizer.json: model.vocab gives 'a' the id 'seven', expected an integer"
    write_bytes(folder / 'config.json', json.dumps(config).encode())
    write_bytes(folder / 'tokenizer.json', json.dumps(tokenizer).encode())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        sample.main([f'--init_from=ouro:{folder}', '--device=cpu', '--dtype=float32', '--start=a'])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('damage', ['not an object', 'an unknown row', 'a seed not a number', 'a loop count missing',
                                    'an accuracy above 1', 'no kv_bytes', 'not JSON'])
def test_every_field_of_results_json_is_checked(damage, tmp_path):
    import ablate
    at = {'acc': 0.5, 'per_hop': {'1': 1.0}, 'kv_bytes': 512}
    results = {'LoopLM': {'0': {str(n): dict(at) for n in ablate.EVAL_LOOPS}},
               'element': {'1': {str(n): dict(at) for n in ablate.EVAL_LOOPS}}}
    text, match = None, {
        'not an object': r"results.json: the top level is \[\], expected an object of rows",
        'an unknown row': r"results.json: a row is 'elemental', expected one of LoopLM, element",
        'a seed not a number': r"results.json: element is \{'one'.*expected an object of seeds \(integers\)",
        'a loop count missing': r"results.json: element/1 is .*expected the loop counts 1, 2, 4, 8",
        'an accuracy above 1': r"results.json: element/1/4 is \{'acc': 1.5.*expected \{'acc': a number in \[0, 1\]",
        'no kv_bytes': r"results.json: element/1/8 is \{'acc': 0.5, 'per_hop'.*'kv_bytes': an integer > 0",
        'not JSON': r"results.json is not valid JSON: line 1, column 13",
    }[damage]
    if damage == 'not an object':
        results = []
    elif damage == 'an unknown row':
        results['elemental'] = results.pop('element')
    elif damage == 'a seed not a number':
        results['element'] = {'one': results['element']['1']}
    elif damage == 'a loop count missing':
        del results['element']['1']['2']
    elif damage == 'an accuracy above 1':
        results['element']['1']['4']['acc'] = 1.5
    elif damage == 'no kv_bytes':
        del results['element']['1']['8']['kv_bytes']
    else:
        text = '{"LoopLM": {0: 1}}'
    write_bytes(tmp_path / 'results.json', (text or json.dumps(results)).encode())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match + r'.*run python ablate.py again'):
        ablate.main(['--replot', f'--out_dir={tmp_path}', f'--figure={tmp_path}/fig.png'])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('damage', ['phase unknown', 'model_args not a dict', 'resumed as another phase',
                                    'iter_num not a number', 'optimizer of another model', 'a size below 1',
                                    'phase and K/V sharing disagree', 'a weight of another shape', 'a weight of NaN'])
def test_every_field_of_a_checkpoint_is_checked(damage, reason_data, looplm_dir, tmp_path):
    out_dir = copy_dir(pathlib.Path(looplm_dir), tmp_path / 'run')
    ckpt = torch.load(out_dir / 'ckpt.pt', weights_only=False)
    phase = 'loop'
    if damage == 'phase unknown':
        ckpt['phase'] = 'warmup'
        match = r"ckpt.pt: phase is 'warmup', expected one of loop, transition, distill"
    elif damage == 'model_args not a dict':
        ckpt['model_args'] = [1, 2]
        match = r"ckpt.pt: model_args is \[1, 2\], expected a dict of MELTConfig fields"
    elif damage == 'resumed as another phase':
        phase = 'transition'
        match = (r"ckpt.pt holds a 'loop' checkpoint; --init_from=resume continues the same phase: run --phase=loop "
                 r"--init_from=resume")
    elif damage == 'iter_num not a number':
        ckpt['iter_num'] = '40'
        match = r"ckpt.pt: iter_num is '40', expected an integer >= 0; it cannot be resumed"
    elif damage == 'a size below 1':
        ckpt['model_args']['n_embd'] = -4
        match = r"ckpt.pt: model_args: n_embd must be an integer >= 1, got -4"
    elif damage == 'phase and K/V sharing disagree':
        ckpt['phase'] = 'distill'
        phase = 'distill'
        match = r"ckpt.pt says phase 'distill' but holds a kv_sharing='loop' model"
    elif damage == 'a weight of another shape':  # torch's message is many lines: one, naming the tensor
        ckpt['model']['embed_tokens.weight'] = ckpt['model']['embed_tokens.weight'][:1]
        match = r"ckpt.pt does not hold a model of its own model_args: embed_tokens.weight is \(1, 32\), expected \(137, 32\)$"
    elif damage == 'a weight of NaN':
        ckpt['model']['embed_tokens.weight'][3, 4] = float('nan')
        match = r"ckpt.pt does not hold a model of its own model_args: embed_tokens.weight holds NaN or inf"
    else:
        ckpt['optimizer']['param_groups'] = ckpt['optimizer']['param_groups'][:1]
        match = r"ckpt.pt: its optimizer state does not fit this model's parameters"
    torch.save(ckpt, out_dir / 'ckpt.pt')
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', f'--phase={phase}', '--init_from=resume',
                                 f'--out_dir={out_dir}', '--max_iters=60'])
    assert snapshot(tmp_path) == before


def test_sizes_that_cannot_fit_are_refused_before_they_are_allocated(reason_data, looplm_dir, tmp_path):
    from melt import MELT, MELTConfig
    fixture_files = snapshot(pathlib.Path(looplm_dir))
    model = MELT(MELTConfig(kv_sharing='loop', block_size=4096, n_layer=2, n_embd=64))
    with pytest.raises(ValueError, match=r"a KV cache of 4,096 x 4,096 tokens at 1000 loops would take 17,179.9 GB, "
                                         r"more than the [\d,.]+ GB free on cpu"):
        model.new_cache(4096, loops=1000)
    # 16 bytes x 2^36 positions x head_dim 32 = 2^45 bytes
    with pytest.raises(ValueError, match=r"RoPE's tables for block_size 68,719,476,736 would take 35,184.4 GB"):
        MELT(MELTConfig(block_size=2 ** 36))
    with pytest.raises(ValueError, match=r"model of [\d,]+ parameters \(fp32\) would take [\d,.]+ GB, more than"):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--n_embd=65536', '--n_head=2',
                                 '--n_layer=64', f'--out_dir={tmp_path}/out'])
    # the size from 1 and 2 layers: a million layers are never built, not even on the meta device
    with pytest.raises(ValueError, match=r"model of [\d,]+ parameters \(fp32\) would take [\d,.]+ GB, more than"):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--n_layer=1000000', f'--out_dir={tmp_path}/out'])
    with pytest.raises(ValueError, match=r"a micro-batch of 1,000,000,000 x 18 tokens, whose backward keeps a 32-wide state "
                                         r"per token for each of 1 x 2 \(layers x loops\) blocks, would take 4,608.0 GB"):
        train.main(TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', '--batch_size=1000000000',
                                 f'--out_dir={tmp_path}/out'])
    assert not any(tmp_path.rglob('*.pt')) and snapshot(pathlib.Path(looplm_dir)) == fixture_files
    with pytest.raises(ValueError, match=r"loops must be an integer in \[1, 1024\], got 5000"):
        sample.main([f'--init_from={looplm_dir}', '--loops=5000', '--device=cpu', '--dtype=float32'])


def mount_tmpfs(folder, size_kb):
    """A tmpfs of size_kb at folder (root on Linux), or False where mounting is refused."""
    folder.mkdir(parents=True)
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_kb}k', 'tmpfs', str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize('case', ['full disk', 'read-only folder'])
def test_prepare_reason_on_a_full_or_read_only_folder_keeps_the_old_data_set(case, tmp_path):
    """data/reason/prepare.py writes every file to a temporary name and renames them all at the
    end: one error line, and the old data set byte-identical. On a tmpfs where root can mount
    one; elsewhere a folder under a file, which no write can reach."""
    from data.reason import prepare as reason
    here = os.path.dirname(os.path.abspath(__file__))
    folder = tmp_path / 'data'
    mounted = mount_tmpfs(folder, 64)
    try:
        if mounted:
            reason.prepare(str(folder), n_train=50, n_val=10)  # the old data set, a few KB
            if case == 'read-only folder':
                subprocess.run(['mount', '-o', 'remount,ro', str(folder)], check=True)
            why = 'disk full' if case == 'full disk' else 'Read-only file system'
        else:
            folder = write_bytes(tmp_path / 'a_file', b'x') / 'data'
            why = 'Not a directory'
        before = snapshot(tmp_path)
        run = subprocess.run([sys.executable, 'data/reason/prepare.py', f'--out_dir={folder}'], capture_output=True,
                             text=True, cwd=here)
        assert run.returncode == 1 and 'Traceback' not in run.stderr and run.stderr.count('\n') == 1, run.stderr
        assert re.match(rf"error: could not write {folder}.* \({why}\); the old files are as they were", run.stderr)
        assert snapshot(tmp_path) == before
    finally:
        if mounted:
            subprocess.run(['umount', str(tmp_path / 'data')], check=True)


TERM_IN_SAVE = '''
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
import configurator, train
real_save, saves = torch.save, []
def save(obj, f):  # the second save: part of a file, then SIGTERM, to this process or to torchrun's agent
    saves.append(1)
    if len(saves) < 2:
        return real_save(obj, f)
    f.write(b'part of a checkpoint')
    os.kill(os.getpid() if {target!r} == 'self' else os.getppid(), signal.SIGTERM)
    time.sleep(30)
torch.save = save
configurator.run_script(train.main)
'''


@pytest.mark.parametrize('under', ['one process', 'torchrun, 2 gloo ranks'])
def test_sigterm_during_a_save_exits_143_with_the_last_checkpoint_whole(under, reason_data, tmp_path):
    """What a cluster scheduler sends: one line, exit 143, the checkpoint of the save before
    whole and no temporary file, on every rank (torchrun forwards the signal to each)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = write_bytes(tmp_path / 'term_in_save.py', TERM_IN_SAVE.format(
        root=here, target='self' if under == 'one process' else 'parent').encode())
    out_dir, logs = tmp_path / 'run', tmp_path / 'logs'
    args = TRAIN_TINY + [f'--dataset={reason_data}', '--phase=loop', f'--out_dir={out_dir}', '--max_iters=1000',
                         '--eval_interval=3', '--log_interval=1000', '--always_save_checkpoint']
    launcher = [] if under == 'one process' else ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                                   f'--log-dir={logs}', '--redirects=3']
    extra = [] if under == 'one process' else ['--gradient_accumulation_steps=2']
    run = subprocess.run([sys.executable, *launcher, str(script), *args, *extra], capture_output=True, text=True,
                         cwd=here, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    errors = [run.stderr] if under == 'one process' else [p.read_text() for p in sorted(logs.rglob('stderr.log'))]
    assert len(errors) == (1 if under == 'one process' else 2) and run.returncode != 0
    for err in errors:
        assert err.strip() == 'terminated (SIGTERM): files already written (checkpoints too) stay as they were', err
    if under == 'one process':
        assert run.returncode == 143
    assert torch.load(out_dir / 'ckpt.pt', weights_only=False)['iter_num'] == 3
    assert sorted(p.name for p in out_dir.iterdir()) == ['ckpt.pt']

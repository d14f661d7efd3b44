"""sample.py and bench.py."""

import re

import pytest
import torch

import bench
import sample
from conftest import in_float64, tiny_model, tokens

# ----------------------------------------------------------------------------------------
# sample.py and bench.py


@pytest.mark.parametrize('kv_sharing', ['melt', 'loop'])
def test_prompts_of_different_lengths_each_equal_that_prompt_generated_alone(kv_sharing):
    """Greedy, in float64: prompts of 5, 9, 3 and 12 tokens fall differently on the prefill's
    chunk grid of 4; each row of one batched call equals that prompt generated alone, at 1 and
    3 loops, and a row stops at its own stop token while the others go on."""
    model = in_float64(tiny_model(kv_sharing)).eval()
    prompts = [tokens(n, seed=n)[0] for n in (5, 9, 3, 12)]
    for loops in (1, 3):
        alone = [sample.generate(model, p[None], 8, loops=loops, top_k=1, chunk_size=4)[0] for p in prompts]
        rows = sample.generate(model, [p.tolist() for p in prompts], 8, loops=loops, top_k=1, chunk_size=4)
        assert [r.tolist() for r in rows] == [a.tolist() for a in alone], loops
    news = [a[len(p):].tolist() for p, a in zip(prompts, alone)]
    assert len({tuple(n) for n in news}) == 4 and max(len(set(n)) for n in news) >= 4  # rows differ, and vary
    b = max(range(4), key=lambda i: len(set(news[i])))  # the row whose tokens vary most stops early
    stop = next(t for i, t in enumerate(news[b]) if i >= 1 and t not in news[b][:i])
    expected = []
    for p, a in zip(prompts, alone):
        new = a[len(p):].tolist()
        expected.append(p.tolist() + (new[:new.index(stop) + 1] if stop in new else new))
    rows = sample.generate(model, prompts, 8, loops=3, top_k=1, chunk_size=4, stop_tokens={stop})
    assert [r.tolist() for r in rows] == expected
    assert len(prompts[b]) + 2 <= len(rows[b]) < len(alone[b])


def test_sample_greedy_equals_generate_and_reports_the_cache(looplm_dir, capsys):
    start = 'a=1 b=a c=2 ?b'
    cache = sample.main([f'--init_from={looplm_dir}', f'--start={start}', '--num_samples=1', '--top_k=1',
                      '--max_new_tokens=6', '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    model, codec = sample.load({**sample.DEFAULTS, 'init_from': looplm_dir})
    expected = sample.generate(model, torch.tensor([codec.encode(start)]), 6, top_k=1)
    assert out.split('\n---------------')[0] == codec.decode(expected[0].tolist())
    line = re.search(r'KV cache \(LoopLM\): ([\d,]+) bytes for (\d+) tokens at (\d+) loops; '
                     r'a LoopLM cache would hold ([\d,]+) bytes', out)
    held, n_tokens, loops, looplm = (int(g.replace(',', '')) for g in line.groups())
    assert held == cache.nbytes == looplm and n_tokens == 4 + 5 and loops == model.config.n_loops
    assert held == model.config.kv_bytes_per_token(loops, 4) * n_tokens


def test_sample_loops_8_with_melt_cache(looplm_dir, capsys):
    cache = sample.main([f'--init_from={looplm_dir}', '--kv_sharing=melt', '--loops', '8', '--num_samples=2',
                      '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    assert len(re.findall(r'^\n?[a-h]=\S+ .*\?[a-h] [0-7]  \(expected [0-7], [1-4] hops\)$', out, re.M)) == 2
    held, n_tokens, looplm = (int(g.replace(',', '')) for g in re.search(
        r'KV cache \(MELT\): ([\d,]+) bytes for (\d+) tokens at 8 loops; a LoopLM cache would hold ([\d,]+)', out).groups())
    assert held == cache.nbytes and looplm == 8 * held and n_tokens == cache.length == 8
    assert cache.loops_run and set(cache.loops_run) == {8}


def test_q_exit(looplm_dir, capsys):
    for kv_sharing in ('melt', 'loop'):
        model = tiny_model(kv_sharing)
        ids = tokens(4)
        everything, some = model.new_cache(1), model.new_cache(1)
        full = sample.generate(model, ids, 8, top_k=1, cache=everything)
        never = sample.generate(model, ids, 8, top_k=1, exit_threshold=1.0, cache=some)  # q = 1: no early exit here
        assert torch.equal(full, never) and some.loops_run == everything.loops_run == [3] * 8
        with torch.no_grad():
            model.exit_gate.bias.fill_(100.0)  # lambda_1 = 1: every token exits after loop 1
        cache = model.new_cache(1, max_tokens=11)
        sample.generate(model, ids, 8, top_k=1, exit_threshold=0.5, cache=cache)
        assert cache.loops_run == [3] + [1] * 7  # the prompt runs every loop; decoded tokens one
        if kv_sharing == 'loop':  # an exited token's loop-1 K/V fill its rows of loops 2 and 3
            for buf in (cache.k_loop, cache.v_loop):
                decoded = buf[:, :, :, :, 4:11]
                assert decoded.abs().sum() > 0 and torch.equal(decoded[1:], decoded[:1].expand_as(decoded[1:]))
                assert not torch.equal(buf[1, :, :, :, :4], buf[0, :, :, :, :4])  # the prompt ran every loop
    capsys.readouterr()
    cache = sample.main([f'--init_from={looplm_dir}', '--exit_threshold=1e-9', '--num_samples=1', '--max_new_tokens=5',
                      '--start=a=1 b=2 c=3 d=0 ?a', '--chunk_size=2', '--device=cpu', '--dtype=float32'])
    # q ~ 0: every decoded token stops after loop 1; the prefill's 3 chunks ran all 2 loops
    assert cache.loops_run == [2, 2, 2, 1, 1, 1, 1]
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


def test_no_script_stands_on_train_py_and_every_function_fits_on_a_screen():
    """sample.py, eval.py, bench.py and ablate.py load models through checkpoints.py, not train.py
    (an import anywhere in them, a function's too); no function outside the tests is over 60 lines."""
    import ast
    import pathlib
    here = pathlib.Path(__file__).parent
    sources = [p for pattern in ('*.py', 'data/*/*.py', 'tools/*.py', 'config/*.py') for p in here.glob(pattern)
               if not p.name.startswith(('test_', 'conftest'))]
    assert {'sample.py', 'eval.py', 'bench.py', 'ablate.py', 'melt.py', 'train.py'} <= {p.name for p in sources}
    for path in sources:
        tree = ast.parse(path.read_text())
        if path.name in ('sample.py', 'eval.py', 'bench.py', 'ablate.py'):
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert 'train' not in imported, path.name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, (path.name, node.name)


def test_bench_budget_table_takes_the_largest_batch_whose_measured_peak_fits(monkeypatch, capsys):
    """A sequence costs the difference of the batch-1 and batch-2 peaks; the batch is the
    budget over that, and one fewer while the batch's own run peaks over the budget. The
    measurements here are made up (peak = 200 MB + batch x 10 MB for MELT, 40 MB for the
    LoopLM, 5 MB more from batch 80 up), so every figure is worked by hand."""
    assert bench.largest_batch(210e6, 220e6, 1000e6) == (80, 10e6, 200e6)
    assert bench.largest_batch(300e6, 300e6, 1000e6)[0] == 0  # no growth measured: no batch claimed
    runs = []

    def fake_child(kind, shape, kv_sharing, loops, prompt, new, chunk, device, compiled, batch):
        runs.append((kv_sharing, batch))
        per = {'melt': 10e6, 'loop': 40e6}[kv_sharing]
        peak = 200e6 + batch * per + (5e6 if batch >= 80 else 0)
        return {'prefill_peak': peak, 'decode_peak': peak - 1, 'decode_ms': 10 + 0.1 * batch, 'kv': per - 2e6}
    monkeypatch.setattr(bench, 'run_child', fake_child)
    rows = bench.budget_table(bench.SHAPES['tiny'], 2048, 8, 64, 4, 1000e6, 'cpu')
    assert runs == [('melt', 1), ('melt', 2), ('melt', 80), ('melt', 79), ('loop', 1), ('loop', 2), ('loop', 20)]
    assert rows['melt']['batch'] == 79 and rows['loop']['batch'] == 20  # 200 + 790 MB and 200 + 800 MB fit 1 GB
    assert rows['melt']['tok_s'] == pytest.approx(79 * 1000 / 17.9) and rows['loop']['tok_s'] == pytest.approx(20 * 1000 / 12)
    out = capsys.readouterr().out
    assert re.search(r'^\s+melt\s+10\.0\s+8\.0\s+200\.0\s+79\s+0\.99\s+4,413\s+99$', out, re.M)
    assert 'MELT holds 4.0x the sequences and decodes 2.65x the LoopLM' in out
    with pytest.raises(ValueError, match=r'--memory_budget=1e\+06 would take 1,000,000.0 GB, more than the .* GB free on cpu'):
        bench.main(['--only=budget', '--memory_budget=1e6', '--device=cpu'])
    with pytest.raises(ValueError, match=r'--context \(16\) must be more than --new_tokens \(16\)'):
        bench.main(['--only=budget', '--context=16', '--new_tokens=16'])

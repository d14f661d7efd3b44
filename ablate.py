"""
The ablation grid: MELT's design choices, trained and measured on the reasoning task
(README "Ablations"). From one shared LoopLM (the main job's settings), every row runs the
post-training phases it keeps, once per seed, then decodes the held-out problems as
deployed (chunk size 1) at 1, 2, 4 and 8 loops.

$ python ablate.py                      10 rows x 2 seeds, 2 runs at a time (one thread each),
                                        into out/ablate; prints the table, writes the figure
$ python ablate.py --seeds=3 --jobs=1 --rows=element,last
$ python ablate.py --replot              the table and figure again from out/ablate/results.json

The figure (accuracy against loops per row, KV bytes against loops) needs matplotlib, an
optional package: pip install matplotlib. Without it the table is still printed.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from configurator import given, parse_args, read_json, run_script

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_LOOPS = (1, 2, 4, 8)
# name: (--gate, what the row leaves out)
ROWS = {
    'element': ('element', None),  # MELT as the paper trains it
    'scalar': ('scalar', None),
    'last': ('last', None),
    'first': ('first', None),
    'mean': ('mean', None),
    'ema': ('ema', None),
    'no transition': ('element', 'transition'),  # phase 2 straight from the LoopLM and fresh gates
    'no distill': ('element', 'distill'),  # phase 1 only
    'no chunks': ('element', 'chunks'),  # both phases with one chunk = the whole row
    'ouro objective': (None, 'depth'),  # not MELT: the LoopLM itself, trained with Ouro's objective
}
DEFAULTS = dict(seeds=2, jobs=2, rows=','.join(ROWS), out_dir='out/ablate', figure=os.path.join(HERE, 'assets', 'ablation.png'),
                train_args='',  # flags added to every train.py run, e.g. --train_args="--max_iters=100"
                replot=False)  # the table and figure again from out_dir's results.json, without training


def plan(row, seed, loop_dir, root, block_size, train_args=()):
    """The train.py runs of one (row, seed), in order, and the folder of the model to evaluate."""
    gate, without = ROWS[row]
    where = os.path.join(root, row.replace(' ', '_'), f'seed{seed}')
    if without == 'depth':
        return [[*train_args, f'--seed={seed}', '--phase=loop', '--objective=ouro', f'--out_dir={where}/loop',
                 '--log_interval=1000000']], f'{where}/loop'
    common = [*train_args, f'--seed={seed}', f'--gate={gate}', f'--teacher={loop_dir}', '--log_interval=1000000']
    if without == 'chunks':
        common.append(f'--chunk_size={block_size}')
    transition = ['--phase=transition', f'--init_from={loop_dir}', f'--out_dir={where}/transition']
    distill = ['--phase=distill', f'--init_from={where}/transition', f'--out_dir={where}/distill']
    if without == 'transition':
        return [common + ['--phase=distill', f'--init_from={loop_dir}', f'--out_dir={where}/distill']], f'{where}/distill'
    if without == 'distill':
        return [common + transition], f'{where}/transition'
    return [common + transition, common + distill], f'{where}/distill'


def train_py(args, threads):
    """One train.py run in its own process, limited to `threads` CPU threads."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    run = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), *args], env=env,  # in the user's folder
                         capture_output=True, text=True)
    if run.returncode:
        raise ChildProcessError(f"train.py {' '.join(args)} failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")


def evaluate(folder):
    """Accuracy (overall and per hop) at every EVAL_LOOPS count, decoding with chunk size 1."""
    import torch
    from data.reason import prepare as reason
    from checkpoints import load_checkpoint
    torch.set_num_threads(2)
    model, _ = load_checkpoint(folder, 'cpu')
    out = {}
    for n in EVAL_LOOPS:
        acc, per_hop = reason.accuracy(model.eval(), n, chunk_size=1)
        out[n] = {'acc': acc, 'per_hop': per_hop, 'kv_bytes': model.config.kv_bytes_per_token(n, 4)}
    return out


def table(results, seeds):
    """One line per row: the mean over seeds and, after +-, half their range, at each loop count."""
    lines = [f"{'row':<14} {'seeds':>5}  " + '  '.join(f'{n} loop{"s" if n > 1 else " "}'.rjust(12) for n in EVAL_LOOPS)
             + '   KV bytes/token at 1 / 8 loops']
    for row, by_seed in results.items():
        cells = []
        for n in EVAL_LOOPS:
            accs = [by_seed[s][n]['acc'] for s in by_seed]
            cells.append(f"{sum(accs) / len(accs):.3f} ±{(max(accs) - min(accs)) / 2:.3f}".rjust(12))
        first = next(iter(by_seed.values()))
        kv = f"{first[EVAL_LOOPS[0]]['kv_bytes']:,} / {first[EVAL_LOOPS[-1]]['kv_bytes']:,}"
        lines.append(f"{row:<14} {len(by_seed):>5}  " + '  '.join(cells) + f"   {kv}")
    return '\n'.join(lines)


def figure(results, path):
    """Accuracy against loops per row (the seeds' range as error bars), and KV bytes against
    loops for the LoopLM and MELT. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [2, 1]})
    colors = iter(plt.get_cmap('tab10').colors)
    for row, by_seed in results.items():
        accs = [[by_seed[s][n]['acc'] for s in by_seed] for n in EVAL_LOOPS]
        mean = [sum(a) / len(a) for a in accs]
        err = [[m - min(a) for m, a in zip(mean, accs)], [max(a) - m for m, a in zip(mean, accs)]]
        looplm = ROWS.get(row, (None,))[0] is None  # the shared LoopLM and the one of Ouro's objective
        style = dict(color='black', linestyle='--' if row == 'LoopLM' else ':') if looplm else dict(color=next(colors))
        left.errorbar(EVAL_LOOPS, mean, yerr=err, marker='o', capsize=3, label=row, **style)
    left.set(xscale='log', xticks=EVAL_LOOPS, xticklabels=EVAL_LOOPS, xlabel='loops at decoding',
             ylabel='accuracy (1,000 held-out problems)', title='MELT rows and the LoopLMs (black), trained at 4 loops')
    left.legend(fontsize=8, ncol=2)
    kv = {row: [results[row][next(iter(results[row]))][n]['kv_bytes'] for n in EVAL_LOOPS]
          for row in ('LoopLM', 'element') if row in results}
    for row, values in kv.items():
        right.plot(EVAL_LOOPS, values, marker='o', label='MELT (every row)' if row == 'element' else row)
    right.set(xscale='log', xticks=EVAL_LOOPS, xticklabels=EVAL_LOOPS, xlabel='loops', ylabel='KV bytes per token (fp32)',
              title='KV cache per token')
    right.legend()
    for ax in (left, right):
        ax.minorticks_off()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def parse(argv):
    cfg = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    for key in ('seeds', 'jobs'):
        if cfg[key] < 1:
            raise ValueError(f"--{key} must be an integer >= 1, got {cfg[key]!r}")
    cfg['rows'] = [r.replace('_', ' ') for r in cfg['rows'].split(',')]
    unknown = [r for r in cfg['rows'] if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; rows are {', '.join(r.replace(' ', '_') for r in ROWS)}")
    for key in ('out_dir', 'figure'):  # against the user's folder, once, before any run starts
        cfg[key] = os.path.abspath(cfg[key])
    if os.path.exists(cfg['out_dir']) and not os.path.isdir(cfg['out_dir']):
        raise ValueError(f"--out_dir={cfg['out_dir']} is a file, expected a folder for the runs and results.json")
    if os.path.isdir(cfg['figure']):
        raise ValueError(f"--figure={cfg['figure']} is a folder, expected a .png file to write")
    return cfg


def read_results(file):
    """results.json as ablate.py wrote it: {row: {seed: {loops: {'acc', 'per_hop', 'kv_bytes'}}}},
    every field checked, one line naming the file, the field and what was expected."""
    saved = read_json(file, 'run python ablate.py again to remake it')

    def check(ok, where, value, expected):
        if not ok:
            raise ValueError(f"{file}: {where} is {repr(value)[:60]}, expected {expected}; run python ablate.py "
                             f"again to remake it")
    check(isinstance(saved, dict) and saved, 'the top level', saved, 'an object of rows')
    results = {}
    for row, by_seed in saved.items():
        check(row in ROWS or row == 'LoopLM', 'a row', row, f"one of LoopLM, {', '.join(ROWS)}")
        check(isinstance(by_seed, dict) and by_seed and all(s.isdigit() for s in by_seed), row, by_seed,
              'an object of seeds (integers) to results')
        for seed, by_n in by_seed.items():
            where = f'{row}/{seed}'
            check(isinstance(by_n, dict) and sorted(by_n) == sorted(map(str, EVAL_LOOPS)), where, by_n,
                  f"the loop counts {', '.join(map(str, EVAL_LOOPS))}")
            for n, at in by_n.items():
                check(isinstance(at, dict) and isinstance(at.get('acc'), (int, float)) and 0 <= at['acc'] <= 1
                      and isinstance(at.get('kv_bytes'), int) and at['kv_bytes'] > 0
                      and isinstance(at.get('per_hop'), dict), f'{where}/{n}', at,
                      "{'acc': a number in [0, 1], 'per_hop': {...}, 'kv_bytes': an integer > 0}")
            results.setdefault(row, {})[int(seed)] = {int(n): at for n, at in by_n.items()}
    return results


def report(results, cfg):
    print("\naccuracy decoding with chunk size 1 (mean over seeds ± half their range), 1,000 held-out problems\n"
          + table(results, cfg['seeds']))
    if figure(results, cfg['figure']):
        print(f"\nwrote {os.path.relpath(cfg['figure'])}")
    else:
        print("\nno figure: matplotlib is not installed (pip install matplotlib)")


def main(argv):
    cfg = parse(argv)
    if cfg['replot']:
        file = os.path.join(cfg['out_dir'], 'results.json')
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} {'is a folder' if os.path.isdir(file) else 'does not exist'}, expected "
                                    f"the results of a run: run python ablate.py first")
        return report(read_results(file), cfg)
    from checkpoints import DATA_DIR, prepare_data_set, read_checkpoint  # after the flags: torch takes a while
    train_args = cfg['train_args'].split()
    t0 = time.time()
    if given(train_args, 'dataset') in (None, 'reason'):  # the task, made if missing; other folders are the user's
        prepare_data_set(os.path.join(DATA_DIR, 'reason'))
    loop_dir = os.path.join(cfg['out_dir'], 'loop')
    if not os.path.isfile(os.path.join(loop_dir, 'ckpt.pt')):
        print(f"training the shared LoopLM into {loop_dir}", flush=True)
        train_py([*train_args, '--phase=loop', f'--out_dir={loop_dir}', '--log_interval=1000000'], threads=2)
    block_size = read_checkpoint(loop_dir, 'cpu')['config']['block_size']  # the rows the runs train on, the LoopLM's
    runs = [(row, seed) for row in cfg['rows'] for seed in range(1, cfg['seeds'] + 1)]

    def run(row_seed):
        phases, folder = plan(*row_seed, loop_dir, cfg['out_dir'], block_size, train_args)
        started = time.time()
        for args in phases:
            train_py(args, threads=1)
        print(f"  {row_seed[0]}, seed {row_seed[1]}: trained in {time.time() - started:.0f} s", flush=True)
        return folder

    print(f"{len(runs)} runs, {cfg['jobs']} at a time", flush=True)
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        folders = dict(zip(runs, pool.map(run, runs)))
    results = {'LoopLM': {0: evaluate(loop_dir)}}
    for (row, seed), folder in folders.items():
        results.setdefault(row, {})[seed] = evaluate(folder)
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    report(results, cfg)
    print(f"\nablation grid done in {time.time() - t0:.0f} s")


if __name__ == '__main__':
    run_script(main)

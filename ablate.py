"""
The ablation grid: MELT's design choices, trained and measured on the reasoning task or on
text (README "Ablations"). From one shared LoopLM (the main job's settings), every row runs
the post-training phases it keeps, once per seed, then is scored as deployed (chunk size 1)
at 1, 2, 4 and 8 loops: accuracy on the held-out problems, or, on text, validation
cross-entropy and bits per character.

$ python ablate.py                      10 rows x 2 seeds, 2 runs at a time (one thread each),
                                        into out/ablate; prints the table, writes the figure
$ python ablate.py --recipe=austen      the grid on Jane Austen's characters (config/austen.py),
                                        into out/ablate-austen and assets/ablation-austen.png
$ python ablate.py --seeds=3 --jobs=1 --rows=element,last
$ python ablate.py --replot              the table and figure again from out/ablate/results.json

The figure (the score against loops per row, KV bytes against loops) needs matplotlib, an
optional package: pip install matplotlib. Without it the table is still printed.
"""
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from configurator import given, parse_args, read_json, run_script, write_all

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
# --recipe=NAME: the grid on a recipe's data (config/NAME.py sets the model and the LoopLM's
# steps; the rows' phases are shortened so that 9 rows x 2 seeds fit 40 minutes on 2 cores, our
# choice). There the LoopLM itself is trained with Ouro's objective, so that row is left out.
RECIPES = {'austen': {'dataset': 'austen', 'transition': ['--max_iters=80', '--transition_iters=60'],
                      'distill': ['--max_iters=120']}}
TEXT_EVAL_BATCHES = 8  # val batches a text row is scored on: 8 x 32 x 64 = 16,384 characters for austen
DEFAULTS = dict(seeds=2, jobs=2, rows='',  # default: every row (a recipe's: all but ouro objective)
                recipe='', out_dir='',  # default: out/ablate, or out/ablate-<recipe>
                figure='',  # default: assets/ablation.png, or assets/ablation-<recipe>.png
                train_args='',  # flags added to every train.py run, e.g. --train_args="--max_iters=100"
                replot=False)  # the table and figure again from out_dir's results.json, without training


def plan(row, seed, loop_dir, root, block_size, train_args=(), phase_args=None):
    """The train.py runs of one (row, seed), in order, and the folder of the model to evaluate.
    phase_args: {phase: flags} put before train_args (a recipe's shorter phases)."""
    gate, without = ROWS[row]
    where = os.path.join(root, row.replace(' ', '_'), f'seed{seed}')

    def run(phase, *flags):
        return [*(phase_args or {}).get(phase, ()), *train_args, f'--seed={seed}', f'--phase={phase}', *flags,
                '--log_interval=1000000']
    if without == 'depth':
        return [run('loop', '--objective=ouro', f'--out_dir={where}/loop')], f'{where}/loop'
    common = [f'--gate={gate}', f'--teacher={loop_dir}'] + ([f'--chunk_size={block_size}'] if without == 'chunks' else [])
    transition = run('transition', *common, f'--init_from={loop_dir}', f'--out_dir={where}/transition')
    distill = run('distill', *common, f'--init_from={where}/transition', f'--out_dir={where}/distill')
    if without == 'transition':
        return [run('distill', *common, f'--init_from={loop_dir}', f'--out_dir={where}/distill')], f'{where}/distill'
    if without == 'distill':
        return [transition], f'{where}/transition'
    return [transition, distill], f'{where}/distill'


def train_py(args, threads):
    """One train.py run in its own process, limited to `threads` CPU threads."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    run = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), *args], env=env,  # in the user's folder
                         capture_output=True, text=True)
    if run.returncode:
        raise ChildProcessError(f"train.py {' '.join(args)} failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")


def evaluate(folder, text_batches=None):
    """At every EVAL_LOOPS count, decoding with chunk size 1: accuracy (overall and per hop) on
    the reasoning task, or, given text_batches, the validation cross-entropy on them."""
    import torch
    from data.reason import prepare as reason
    from checkpoints import load_checkpoint, mean_ce
    torch.set_num_threads(2)
    model, _ = load_checkpoint(folder, 'cpu')
    out = {}
    for n in EVAL_LOOPS:
        kv = model.config.kv_bytes_per_token(n, 4)
        if text_batches is None:
            acc, per_hop = reason.accuracy(model.eval(), n, chunk_size=1)
            out[n] = {'acc': acc, 'per_hop': per_hop, 'kv_bytes': kv}
        else:  # the LoopLM's chunking is exact, so it runs whole
            out[n] = {'ce': mean_ce(model, text_batches, n, 1 if model.config.kv_sharing == 'melt' else None), 'kv_bytes': kv}
    return out


def score_of(results):
    """'acc' (the reasoning task) or 'ce' (text): what the results hold."""
    return 'ce' if 'ce' in next(iter(next(iter(results.values())).values()))[EVAL_LOOPS[0]] else 'acc'


def table(results, scale=1.0):
    """One line per row: the mean over seeds and, after +-, half their range, at each loop
    count, of its score (times scale: bits = nats / ln 2)."""
    key = score_of(results)
    lines = [f"{'row':<14} {'seeds':>5}  " + '  '.join(f'{n} loop{"s" if n > 1 else " "}'.rjust(12) for n in EVAL_LOOPS)
             + '   KV bytes/token at 1 / 8 loops']
    for row, by_seed in results.items():
        cells = []
        for n in EVAL_LOOPS:
            values = [by_seed[s][n][key] * scale for s in by_seed]
            cells.append(f"{sum(values) / len(values):.3f} ±{(max(values) - min(values)) / 2:.3f}".rjust(12))
        first = next(iter(by_seed.values()))
        kv = f"{first[EVAL_LOOPS[0]]['kv_bytes']:,} / {first[EVAL_LOOPS[-1]]['kv_bytes']:,}"
        lines.append(f"{row:<14} {len(by_seed):>5}  " + '  '.join(cells) + f"   {kv}")
    return '\n'.join(lines)


def figure(results, path):
    """The score (accuracy or CE) against loops per row, the seeds' range as error bars, and KV
    bytes against loops for the LoopLM and MELT. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [2, 1]})
    colors = iter(plt.get_cmap('tab10').colors)
    key = score_of(results)
    for row, by_seed in results.items():
        values = [[by_seed[s][n][key] for s in by_seed] for n in EVAL_LOOPS]
        mean = [sum(a) / len(a) for a in values]
        err = [[m - min(a) for m, a in zip(mean, values)], [max(a) - m for m, a in zip(mean, values)]]
        looplm = ROWS.get(row, (None,))[0] is None  # the shared LoopLM and the one of Ouro's objective
        style = dict(color='black', linestyle='--' if row == 'LoopLM' else ':') if looplm else dict(color=next(colors))
        left.errorbar(EVAL_LOOPS, mean, yerr=err, marker='o', capsize=3, label=row, **style)
    left.set(xscale='log', xticks=EVAL_LOOPS, xticklabels=EVAL_LOOPS, xlabel='loops at decoding',
             ylabel='accuracy (1,000 held-out problems)' if key == 'acc' else 'validation CE (nats per character)',
             title='MELT rows and the LoopLMs (black), trained at 4 loops')
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
    recipe = cfg['recipe']
    if recipe and recipe not in RECIPES:
        raise ValueError(f"--recipe={recipe!r}: the grid knows the recipes {', '.join(RECIPES)} (their rows' phases "
                         f"are set in ablate.py's RECIPES)")
    suffix = f'-{recipe}' if recipe else ''
    cfg['out_dir'] = cfg['out_dir'] or f'out/ablate{suffix}'
    cfg['figure'] = cfg['figure'] or os.path.join(HERE, 'assets', f'ablation{suffix}.png')
    cfg['rows'] = [r.replace('_', ' ') for r in cfg['rows'].split(',')] if cfg['rows'] else \
        [r for r in ROWS if not (recipe and r == 'ouro objective')]
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
    or {'ce', 'kv_bytes'} on text, every field checked, one line naming the file, the field and
    what was expected."""
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
                check(isinstance(at, dict) and isinstance(at.get('kv_bytes'), int) and at['kv_bytes'] > 0
                      and (isinstance(at.get('acc'), (int, float)) and 0 <= at['acc'] <= 1 and isinstance(at.get('per_hop'), dict)
                           or isinstance(at.get('ce'), (int, float)) and 0 <= at['ce'] < float('inf')),
                      f'{where}/{n}', at, "{'acc': a number in [0, 1], 'per_hop': {...}, 'kv_bytes': an integer > 0}, "
                      "or on text {'ce': a number >= 0, 'kv_bytes': ...}")
            results.setdefault(row, {})[int(seed)] = {int(n): at for n, at in by_n.items()}
    return results


def report(results, cfg):
    if score_of(results) == 'acc':
        print("\naccuracy decoding with chunk size 1 (mean over seeds ± half their range), 1,000 held-out problems\n"
              + table(results))
    else:
        print("\nvalidation cross-entropy in nats per character, decoding with chunk size 1 (mean over seeds ± half "
              "their range)\n" + table(results) + "\n\nthe same in bits per character\n" + table(results, 1 / math.log(2)))
    if figure(results, cfg['figure']):
        print(f"\nwrote {os.path.relpath(cfg['figure'])}")
    else:
        print("\nno figure: matplotlib is not installed (pip install matplotlib)")


def train_rows(cfg, train_args, phase_args):
    """The shared LoopLM (once: kept in out_dir/loop), then every (row, seed) run, `jobs` at a
    time. Returns the LoopLM's folder and {(row, seed): the folder of the model to score}."""
    from checkpoints import read_checkpoint
    loop_dir = os.path.join(cfg['out_dir'], 'loop')
    if not os.path.isfile(os.path.join(loop_dir, 'ckpt.pt')):
        print(f"training the shared LoopLM into {loop_dir}", flush=True)
        train_py([*train_args, '--phase=loop', f'--out_dir={loop_dir}', '--log_interval=1000000'], threads=2)
    block_size = read_checkpoint(loop_dir, 'cpu')['config']['block_size']  # the rows the runs train on, the LoopLM's
    runs = [(row, seed) for row in cfg['rows'] for seed in range(1, cfg['seeds'] + 1)]

    def run(row_seed):
        phases, folder = plan(*row_seed, loop_dir, cfg['out_dir'], block_size, train_args, phase_args)
        started = time.time()
        for args in phases:
            train_py(args, threads=1)
        print(f"  {row_seed[0]}, seed {row_seed[1]}: trained in {time.time() - started:.0f} s", flush=True)
        return folder

    print(f"{len(runs)} runs, {cfg['jobs']} at a time", flush=True)
    with ThreadPoolExecutor(cfg['jobs']) as pool:
        return loop_dir, dict(zip(runs, pool.map(run, runs)))


def main(argv):
    cfg = parse(argv)
    file = os.path.join(cfg['out_dir'], 'results.json')
    if cfg['replot']:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} {'is a folder' if os.path.isdir(file) else 'does not exist'}, expected "
                                    f"the results of a run: run python ablate.py first")
        return report(read_results(file), cfg)
    from checkpoints import DATA_DIR, Data, prepare_data_set, read_checkpoint  # after the flags: torch takes a while
    recipe = RECIPES.get(cfg['recipe'], {})
    train_args = ([os.path.join(HERE, 'config', f"{cfg['recipe']}.py")] if recipe else []) + cfg['train_args'].split()
    t0 = time.time()
    if given(train_args, 'dataset') in (None, recipe.get('dataset', 'reason')):  # ours, made if missing; other folders are the user's
        prepare_data_set(os.path.join(DATA_DIR, recipe.get('dataset', 'reason')))
    loop_dir, folders = train_rows(cfg, train_args, recipe)
    text_batches = None
    if recipe:  # the LoopLM's data, rows, batch size and seed: the batches the main job's table starts with
        run = read_checkpoint(loop_dir, 'cpu')['config']
        text_batches = Data(run['dataset'], run['block_size'], 'cpu').val_batches(run['batch_size'], TEXT_EVAL_BATCHES,
                                                                                   run['seed'])
    results = {'LoopLM': {0: evaluate(loop_dir, text_batches)}}
    for (row, seed), folder in folders.items():
        results.setdefault(row, {})[seed] = evaluate(folder, text_batches)
    write_all(cfg['out_dir'], {'results.json': lambda f: f.write(json.dumps(results, indent=1).encode())})
    report(results, cfg)
    print(f"\nablation grid done in {time.time() - t0:.0f} s")


if __name__ == '__main__':
    run_script(main)

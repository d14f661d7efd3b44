"""
Evaluate a model with EleutherAI's lm-evaluation-harness, the way the Ouro and looped-LM
projects do. The harness is optional: pip install -r requirements-eval.txt

$ python eval.py --chunk_size=1                       out/distill on the shipped task melt_reason (offline):
                                                      train.py's accuracy table, through the harness
$ python eval.py --init_from=out/loop --loops=8       the LoopLM of the main job, at 8 loops
$ python eval.py --init_from=ouro:/path/to/Ouro-1.4B --tasks=gsm8k --loops=4     any harness task (its data is downloaded)
$ python eval.py --init_from=ouro:/path/to/Ouro-1.4B-Thinking --tasks=gsm8k --chat --thinking

It prints the harness's table, then the KV cache's bytes per token and the loops run per
token (fewer than --loops with --exit_threshold). Options as --key=value or --key value.
"""
import logging
import os
import time

import torch
import torch.nn.functional as F

from configurator import DTYPES, check_choice, check_device, parse_args, run_script, torch_dtype
from data.reason import prepare as reason
from ouro import chat_prompt
from sample import generate, load, new_cache

try:
    from lm_eval.api.model import LM
except ImportError:  # eval.py's model class needs the harness; main() says how to install it
    LM = object

# -----------------------------------------------------------------------------
init_from = 'out/distill'  # an out dir of train.py, or 'ouro:PATH'
tasks = 'melt_reason'  # harness task names, comma-separated; melt_reason ships in data/reason/lm_eval
include_path = ''  # folders of your own task YAMLs, comma-separated (the harness's --include_path)
loops = 0  # 0: the model's own n_loops
kv_sharing = ''  # 'melt' | 'loop'; empty: as saved ('melt' for ouro:PATH)
chunk_size = 0  # MELT's prefill chunk size; 0: the model's own (train.py's table scores MELT at 1, as it decodes)
exit_threshold = 0.0  # Q-exit threshold q in (0, 1]; 0: every loop. Requests then run one at a time
batch_size = 8  # requests per forward / per generate call
max_gen_toks = 256  # generate_until's length when a task sets none
num_fewshot = -1  # -1: each task's own
limit = 0  # 0: every problem; N: the first N of each task
chat = False  # Ouro's ChatML around every prompt (the harness's apply_chat_template)
thinking = False  # with --chat: '<think>\n' after the assistant header, for -Thinking models
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
TASKS_DIR = reason.HERE + '/lm_eval'


class MELTEval(LM):
    """A MELT or LoopLM model as the harness's LM: it scores and generates token ids, the
    codec turns text into ids and back (sample.py's codecs)."""

    def __init__(self, model, codec, loops, chunk_size=None, exit_threshold=None, batch_size=8,
                 max_gen_toks=256, thinking=False):
        super().__init__()
        self.model, self.codec, self.loops, self.chunk_size = model, codec, loops, chunk_size
        self.exit_threshold, self.batch_size, self.max_gen_toks = exit_threshold or None, batch_size, max_gen_toks
        self.thinking, self.tokens_run, self.loops_run = thinking, 0, 0  # over the whole evaluation
        self._device = model.lm_head.weight.device

    # --- scoring: loglikelihood and loglikelihood_rolling

    def loglikelihood(self, requests):
        pairs = []
        for context, continuation in (r.args for r in requests):
            spaces = len(context) - len(context.rstrip(' '))  # a context's trailing spaces belong to the continuation
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole, head = self.codec.encode(context + continuation), self.codec.encode(context)
            pairs.append(([self.codec.prefix] + head if not head else head, whole[len(head):]))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.codec.encode(text), self.codec.prefix, self.model.config.block_size, context_len=1)]
            out.append(sum(logprob for logprob, _ in self.score(windows)))
        return out

    def score(self, pairs):
        """(log-probability of the continuation, whether greedy decoding gives it) for every
        (context ids, continuation ids). Rows of a batch are padded on the right: every
        position sees only those before it, and MELT's chunk grid starts at 0 in every row,
        so padding changes no row's scores."""
        n = self.model.config.block_size
        longest = max(len(continuation) for _, continuation in pairs)
        if longest > n:
            raise ValueError(f"a continuation of {longest} tokens is longer than the model's block_size {n}")
        rows = [(context + continuation)[-(n + 1):][:-1] for context, continuation in pairs]  # cut from the left
        order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))  # similar lengths together
        out = [None] * len(pairs)
        step = 1 if self.exit_threshold else self.batch_size  # Q-exit decides per row, in a cache
        for start in range(0, len(order), step):
            batch = order[start:start + step]
            T = max(len(rows[i]) for i in batch)
            x = torch.tensor([rows[i] + [0] * (T - len(rows[i])) for i in batch], device=self._device)
            logits = self.forward(x)
            for b, i in enumerate(batch):  # only the continuation's logits, in at least fp32
                target = pairs[i][1]
                lp = logits[b, len(rows[i]) - len(target):len(rows[i])]
                lp = F.log_softmax(lp.to(torch.promote_types(lp.dtype, torch.float32)), dim=-1)
                ids = torch.tensor(target, device=self._device)
                out[i] = (lp.gather(-1, ids[:, None]).sum().item(), bool((lp.argmax(-1) == ids).all()))
        return out

    @torch.no_grad()
    def forward(self, x):
        if not self.exit_threshold:
            self.count(x.numel(), self.loops)
            return self.model(x, loops=self.loops, chunk_size=self.chunk_size)[0]
        T, melt = x.size(1), self.model.config.kv_sharing == 'melt'
        cache = self.model.new_cache(1, T, self.loops)
        logits = self.model(x, loops=self.loops, chunk_size=self.chunk_size, cache=cache,
                            exit_threshold=self.exit_threshold)[0]
        chunk = self.chunk_size or (self.model.config.chunk_size if melt else T)  # forward's default
        for start, loops_run in zip(range(0, T, chunk), cache.loops_run):
            self.count(min(chunk, T - start), loops_run)
        return logits

    def count(self, n_tokens, loops_run):
        self.tokens_run, self.loops_run = self.tokens_run + n_tokens, self.loops_run + n_tokens * loops_run

    # --- generation

    def generate_until(self, requests):
        out = [None] * len(requests)
        by_kwargs = {}  # one generate call per batch of requests that ask for the same thing
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            by_kwargs.setdefault(repr(sorted(kwargs.items())), []).append(i)
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop('until', None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(kwargs.pop('max_gen_toks', self.max_gen_toks), self.model.config.block_size)
            temperature = float(kwargs.get('temperature', 1.0))  # as in HF's generate; 0 is greedy
            sampled = kwargs.get('do_sample', False) and temperature > 0
            temperature, top_k = (temperature, None) if sampled else (1.0, 1)  # else greedy
            step = 1 if self.exit_threshold else self.batch_size
            for start in range(0, len(indices), step):
                batch = indices[start:start + step]
                prompts = [self.prompt_ids(requests[i].args[0], new) for i in batch]
                rows = self.generate(prompts, new, temperature, top_k)
                for i, prompt, row in zip(batch, prompts, rows):
                    ids = row[len(prompt):].tolist()
                    text = self.codec.decode(ids[:-1] if ids and ids[-1] in self.codec.stop else ids)
                    for stop in until:  # the harness's stop strings: cut at the first
                        text = text.split(stop)[0]
                    out[i] = text
        return out

    def prompt_ids(self, context, new):
        """The context's ids, cut from the left so that prompt + new tokens fit block_size."""
        ids = self.codec.encode(context) or [self.codec.prefix]
        return ids[-(self.model.config.block_size - new + 1):]

    def generate(self, prompts, new, temperature, top_k):
        cache = new_cache(self.model, len(prompts), max(map(len, prompts)), new, self.loops)
        rows = generate(self.model, prompts, new, loops=self.loops, temperature=temperature, top_k=top_k,
                        chunk_size=self.chunk_size, exit_threshold=self.exit_threshold,
                        stop_tokens=self.codec.stop, cache=cache)
        if not self.exit_threshold:
            self.count(sum(len(row) - 1 for row in rows), self.loops)  # the last token is never run
            return rows
        decoded = cache.length - len(prompts[0])  # Q-exit: one row, one chunk per decoded token
        self.count(len(prompts[0]), self.loops)  # the prefill runs every loop
        for loops_run in cache.loops_run[len(cache.loops_run) - decoded:] if decoded else []:
            self.count(1, loops_run)
        return rows

    # --- chat: Ouro's ChatML (the harness calls these with --apply_chat_template)

    @property
    def tokenizer_name(self):
        return 'ouro-chatml'

    def chat_template(self, chat_template=False):
        return 'chatml' if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return chat_prompt(chat_history, thinking=self.thinking, generation_prompt=add_generation_prompt)


def check(cfg):
    for key in ('loops', 'chunk_size', 'limit'):
        if cfg[key] < 0:
            raise ValueError(f"--{key} must be >= 1 (or 0 for the default), got {cfg[key]}")
    for key in ('batch_size', 'max_gen_toks'):
        if cfg[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {cfg[key]}")
    if not 0 <= cfg['exit_threshold'] <= 1:
        raise ValueError(f"--exit_threshold must be in (0, 1] (0: every loop), got {cfg['exit_threshold']}")
    if not cfg['tasks'].strip(', '):
        raise ValueError("--tasks is empty: name at least one harness task, e.g. --tasks=melt_reason")
    check_choice('kv_sharing', cfg['kv_sharing'] or 'melt', ('melt', 'loop'))
    check_choice('dtype', cfg['dtype'], DTYPES)
    if (cfg['chat'] or cfg['thinking']) and not cfg['init_from'].startswith('ouro:'):
        raise ValueError("--chat and --thinking use Ouro's chat format: they need --init_from=ouro:PATH")
    check_device(cfg['device'])


def task_manager(names, include_path=''):
    """The harness's tasks with the shipped melt_reason (and include_path's) among them;
    names checked first."""
    from lm_eval.tasks import TaskManager
    paths = [TASKS_DIR] + [p for p in include_path.split(',') if p]
    for path in paths[1:]:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--include_path: {path!r} is not a folder (of task YAML files)")
    manager = TaskManager(include_path=paths, include_defaults=False)  # ours alone: fast
    if not all(name in manager.all_tasks for name in names):  # index the harness's own too (seconds)
        manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: {unknown[0]!r} is not a task, group or tag of the harness "
                         f"(`lm-eval ls tasks` lists them; the shipped task is melt_reason)")
    return manager


def evaluate(lm, cfg, names, manager):
    """The harness's results dict for the named tasks."""
    from lm_eval import simple_evaluate
    # the harness warns about every task that reads its data with a function, as melt_reason does
    logging.getLogger('lm_eval.api.task').addFilter(lambda record: 'Custom kwargs' not in record.getMessage())
    return simple_evaluate(model=lm, tasks=names, task_manager=manager,
                           num_fewshot=None if cfg['num_fewshot'] < 0 else cfg['num_fewshot'],
                           limit=cfg['limit'] or None, apply_chat_template=cfg['chat'],
                           random_seed=cfg['seed'], torch_random_seed=cfg['seed'], log_samples=False,
                           verbosity='ERROR')


def main(argv):
    cfg = {**DEFAULTS, **parse_args(argv, DEFAULTS)}
    check(cfg)
    if LM is object:
        raise ImportError("eval.py needs EleutherAI's lm-evaluation-harness: pip install -r requirements-eval.txt")
    from lm_eval.utils import make_table
    names = [name.strip() for name in cfg['tasks'].split(',') if name.strip()]
    manager = task_manager(names, cfg['include_path'])
    torch.manual_seed(cfg['seed'])
    model, codec = load(cfg)
    model.to(cfg['device'], torch_dtype(cfg['dtype'])).eval()
    loops = cfg['loops'] or model.config.n_loops
    lm = MELTEval(model, codec, loops, cfg['chunk_size'] or None, cfg['exit_threshold'], cfg['batch_size'],
                  cfg['max_gen_toks'], cfg['thinking'])
    t0 = time.time()
    results = evaluate(lm, cfg, names, manager)
    print(make_table(results))  # a group's row comes first, then its tasks'
    kind = 'MELT' if model.config.kv_sharing == 'melt' else 'LoopLM'
    per_token = model.config.kv_bytes_per_token(loops, model.lm_head.weight.element_size())
    loops_run = lm.loops_run / max(lm.tokens_run, 1)
    print(f"{kind} at {loops} loops: KV cache {per_token:,} bytes per token ({cfg['dtype']}); "
          f"{loops_run:.2f} loops run per token; {time.time() - t0:.0f} s")
    return results


if __name__ == '__main__':
    run_script(main)

"""
Does the suite notice a plausible mistake? Each mutation below is a one-line bug an edit could
introduce into melt.py, phases.py, train.py, sample.py or eval.py (eval.py's need lm-eval installed). This script applies them one at a time to a copy of the
checkout (never to the checkout itself) and runs the tests that should catch it.

$ python tools/mutate.py            all of them (about 15 minutes on 2 cores)
$ python tools/mutate.py blend rope  only those whose name contains a word given

A mutation is 'caught' when at least one test fails; the table says which test failed first.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_TESTS = ['test_melt.py', 'test_ouro.py', 'test_scripts.py']
TRAIN_TESTS = ['test_train.py']
EVAL_TESTS = ['test_eval.py']

# (name, file, the line's text as it is, as the bug writes it, the tests to run)
MUTATIONS = [
    ("the gate ignores h (U_z h times 0)", 'melt.py',
     "z = torch.sigmoid(self.w_z(x) + self.u_z(h_prev) + self.b_z)",
     "z = torch.sigmoid(self.w_z(x) + 0 * self.u_z(h_prev) + self.b_z)", MODEL_TESTS),
    ("the gate's blend reversed (z weighs x)", 'melt.py',
     "return torch.lerp(x, h_prev, z)", "return torch.lerp(h_prev, x, z)", MODEL_TESTS),
    ("phase 1's blend: MELT's K/V weighed 1 - alpha, not alpha", 'melt.py',
     "stores.append((self.alpha, self.k[layer], self.v[layer], kv_melt))",
     "stores.append((1 - self.alpha, self.k[layer], self.v[layer], kv_melt))", MODEL_TESTS),
    ("RoPE: odd positions get the even position's angle", 'melt.py',
     "angles = torch.outer(torch.arange(block_size, dtype=dtype), inv_freq)",
     "angles = torch.outer(torch.arange(block_size, dtype=dtype) // 2 * 2, inv_freq)", MODEL_TESTS),
    ("the final norm only after the last loop, not between loops", 'melt.py',
     "x = self.norm(x)  # the final norm after every loop feeds the next loop",
     "x = self.norm(x) if loop == loops - 1 else x", MODEL_TESTS),
    ("the mask lets a query see the next token of its chunk", 'melt.py',
     "u[S:] = float('-inf')", "u[S + 1:] = float('-inf')", MODEL_TESTS),
    ("chunk boundaries: a chunk forgets the chunk before it (training)", 'melt.py',
     "return [x for start, x in store.items() if start < n_seen]  # in chunk order",
     "return [x for start, x in store.items() if start < n_seen][-1:]  # in chunk order", MODEL_TESTS),
    ("cache rows: an exited LoopLM token's later loops get its first loop's K/V", 'melt.py',
     "buf[loops_run:, :, :, :, rows] = buf[loops_run - 1, :, :, :, rows]",
     "buf[loops_run:, :, :, :, rows] = buf[0, :, :, :, rows]", MODEL_TESTS),
    ("the LoopLM writes every loop's K/V into loop 0's rows", 'melt.py',
     "stores.append((1 - self.alpha, self.k_loop[loop][layer], self.v_loop[loop][layer], kv_loop))",
     "stores.append((1 - self.alpha, self.k_loop[0][layer], self.v_loop[0][layer], kv_loop))", MODEL_TESTS),
    ("Q-exit on the first loop's probability, not the cumulative one", 'melt.py',
     "if bool((1 - still_looping(lam)[..., -1] >= exit_threshold).all()):",
     "if bool((1 - still_looping(lam)[..., 0] >= exit_threshold).all()):", MODEL_TESTS),
    ("Q-exit on the current loop's probability alone", 'melt.py',
     "if bool((1 - still_looping(lam)[..., -1] >= exit_threshold).all()):",
     "if bool((lam[..., -1] >= exit_threshold).all()):", MODEL_TESTS),
    ("activation checkpointing off in attend", 'melt.py',
     "if chunk.recompute_attention:", "if False:", MODEL_TESTS),
    ("every loop's normed state kept during inference", 'melt.py',
     "x = self.norm(x)  # the final norm after every loop feeds the next loop",
     "x = self.norm(x); self.__dict__.setdefault('kept', []).append(x)", MODEL_TESTS),
    ("every other loop's normed state kept (half that leak)", 'melt.py',
     "x = self.norm(x)  # the final norm after every loop feeds the next loop",
     "x = self.norm(x); loop % 2 and self.__dict__.setdefault('kept', []).append(x)", MODEL_TESTS),
    ("the KL's direction reversed: KL(student || teacher)", 'phases.py',
     "return F.kl_div(F.log_softmax(wide(student_logits), -1), F.log_softmax(wide(teacher_logits), -1),",
     "return F.kl_div(F.log_softmax(wide(teacher_logits), -1), F.log_softmax(wide(student_logits), -1),", TRAIN_TESTS),
    ("the alignment's stop-gradient on the student, not the target", 'phases.py',
     "return sum(F.mse_loss(wide(s), wide(t.detach())) for s, t in pairs) / len(pairs)",
     "return sum(F.mse_loss(wide(s.detach()), wide(t)) for s, t in pairs) / len(pairs)", TRAIN_TESTS),
    ("the exit distribution: the last loop does not take the rest", 'phases.py',
     "lam = torch.cat([lam[..., :-1], torch.ones_like(lam[..., -1:])], dim=-1)  # last loop takes the rest",
     "lam = lam", TRAIN_TESTS),
    ("the depth mask: loop k learns problems of fewer than k hops", 'phases.py',
     "learns = torch.stack([mask * (depth <= k + 1) if k < n - 1 else mask for k in range(n)], dim=-1)",
     "learns = torch.stack([mask * (depth <= k) if k < n - 1 else mask for k in range(n)], dim=-1)", TRAIN_TESTS),
    ("the LR schedule: a linear decay instead of the cosine", 'train.py',
     "return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))",
     "return low + (1 - low) * (1 - progress)", TRAIN_TESTS),
    ("the LR schedule: no warmup", 'train.py',
     "return (it + 1) / (cfg['warmup_iters'] + 1)", "return 1.0", TRAIN_TESTS),
    ("the transition's alpha ramp ends at half", 'phases.py',
     "return min(1.0, iter_num / cfg['transition_iters']) if cfg['transition_iters'] > 0 else 1.0",
     "return min(1.0, iter_num / cfg['transition_iters'] / 2) if cfg['transition_iters'] > 0 else 1.0", TRAIN_TESTS),
    ("ragged generation: every row decodes at the longest prompt's position", 'sample.py',
     "pos = torch.tensor([len(p) for p in prompts], device=prompts[0].device)",
     "pos = torch.tensor([max(map(len, prompts))] * len(prompts), device=prompts[0].device)", MODEL_TESTS),
    ("eval: a batch padded on the left, scored as if on the right", 'eval.py',
     "x = torch.tensor([rows[i] + [0] * (T - len(rows[i])) for i in batch], device=self._device)",
     "x = torch.tensor([[0] * (T - len(rows[i])) + rows[i] for i in batch], device=self._device)", EVAL_TESTS),
    ("eval: the context's trailing spaces left in the context", 'eval.py',
     "context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation",
     "context, continuation = context, continuation", EVAL_TESTS),
    ("eval: generate_until ignores the task's until strings", 'eval.py',
     "text = text.split(stop)[0]", "text = text", EVAL_TESTS),
]


def copy_checkout(dst):
    files = subprocess.run(['git', 'ls-files'], cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(HERE, f), os.path.join(dst, f))


def run(name, file, old, new, tests, work):
    path = os.path.join(work, file)
    original = open(path).read()
    if original.count(old) != 1:
        return 'NOT APPLIED', f"{old!r} is in {file} {original.count(old)} times, expected once", 0
    with open(path, 'w') as f:
        f.write(original.replace(old, new))
    try:
        t = time.time()
        out = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                             cwd=work, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        failed = re.search(r'^(FAILED|ERROR) (\S+)', out.stdout, re.M)
        return ('caught' if out.returncode else 'MISSED'), failed.group(2) if failed else '', time.time() - t
    finally:
        with open(path, 'w') as f:
            f.write(original)


def main(words):
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    with tempfile.TemporaryDirectory() as work:
        copy_checkout(work)
        print(f"| bug introduced | file | caught by (first failing test) | s |\n|---|---|---|---|")
        missed = 0
        for name, file, old, new, tests in chosen:
            verdict, by, seconds = run(name, file, old, new, tests, work)
            missed += verdict != 'caught'
            print(f"| {name} | {file} | {verdict}: {by} | {seconds:.0f} |", flush=True)
    print(f"\n{len(chosen) - missed} of {len(chosen)} caught")
    return missed


if __name__ == '__main__':
    sys.exit(1 if main(sys.argv[1:]) else 0)

"""eval.py: the lm-evaluation-harness model. Its scores against the float64 reference, its
generations against generate alone, and the shipped task against a direct accuracy."""

import json
import types

import numpy as np
import pytest
import torch

from conftest import TINY, in_float64, naive, tiny_model
from data.reason import prepare as reason
from ouro import chat_prompt

pytest.importorskip('lm_eval', reason='eval.py needs the harness: pip install -r requirements-eval.txt')
import eval as ev  # noqa: E402 (after the skip)

ALPHABET = 'abcdefghijklmnopqrstuvwxyz .,!?' + ''.join(chr(c) for c in range(ord('A'), ord('A') + 33))
assert len(ALPHABET) == TINY['vocab_size']


class CharCodec:
    """One id per character: scores and generations are the model's, position for position."""
    n_vocab, stop, prefix = len(ALPHABET), set(), ALPHABET.index('.')

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return ''.join(ALPHABET[i] for i in ids)


def requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


def harness_model(kv_sharing, loops=2, **kw):
    return ev.MELTEval(in_float64(tiny_model(kv_sharing)), CharCodec(), loops, **kw)


def log_probs(model, ids, loops, chunk):
    """Every position's log-probabilities of the next token, by the naive reference."""
    schedule = [min(chunk, len(ids) - s) for s in range(0, len(ids), chunk)]
    return torch.log_softmax(naive(model, ids, loops, schedule, 'gated' if model.config.kv_sharing == 'melt'
                                   else 'loop'), dim=-1)


@pytest.mark.parametrize('kv_sharing', ['loop', 'melt'])
def test_loglikelihood_of_a_batch_equals_the_reference_of_each_request_alone(kv_sharing):
    lm = harness_model(kv_sharing, chunk_size=3, batch_size=3)
    pairs = [('hello there', ' world'), ('a', 'bc'), ('the quick brown fox jumps', ' over'), ('', 'abc'),
             ('one two ', 'three')]  # a context's trailing space moves to the continuation
    got = lm.loglikelihood(requests(*pairs))
    codec = CharCodec()
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        context, continuation = context.rstrip(' '), continuation.rjust(len(continuation) + len(context) - len(context.rstrip(' ')))
        ids = (codec.encode(context) or [codec.prefix]) + codec.encode(continuation)
        n = len(codec.encode(continuation))
        lp = log_probs(lm.model, ids[:-1], 2, 3)[-n:]
        target = torch.tensor(ids[-n:])
        assert abs(logprob - lp.gather(-1, target[:, None]).sum().item()) < 1e-9
        assert greedy == bool((lp.argmax(-1) == target).all())


@pytest.mark.parametrize('kv_sharing', ['loop', 'melt'])
def test_loglikelihood_rolling_predicts_each_token_once_the_last_window_with_full_context(kv_sharing):
    lm = harness_model(kv_sharing, chunk_size=4)
    n = TINY['block_size']
    text = ''.join(ALPHABET[(7 * i * i + 3 * i) % 31] for i in range(n + 36))  # 100 characters, block 64
    ids = CharCodec().encode(text)
    first = log_probs(lm.model, [CharCodec.prefix] + ids[:n - 1], 2, 4).gather(-1, torch.tensor(ids[:n])[:, None])
    last = log_probs(lm.model, ids[35:99], 2, 4)[-36:].gather(-1, torch.tensor(ids[64:])[:, None])
    (got,) = lm.loglikelihood_rolling(requests((text,)))
    assert abs(got - (first.sum() + last.sum()).item()) < 1e-9
    (short,) = lm.loglikelihood_rolling(requests((text[:10],)))
    alone = log_probs(lm.model, [CharCodec.prefix] + ids[:9], 2, 4).gather(-1, torch.tensor(ids[:10])[:, None])
    assert abs(short - alone.sum().item()) < 1e-9


@pytest.mark.parametrize('kv_sharing', ['loop', 'melt'])
def test_generate_until_in_batches_equals_each_prompt_generated_alone_and_cut_at_until(kv_sharing):
    lm = harness_model(kv_sharing, chunk_size=4, batch_size=2)
    contexts = ['hello there', 'a', 'the quick brown fox', 'abc', 'what now?']
    alone = []
    for context in contexts:
        ids = torch.tensor([CharCodec().encode(context)])
        alone.append(CharCodec().decode(ev.generate(lm.model, ids, 12, loops=2, top_k=1, chunk_size=4)[0, ids.size(1):].tolist()))
    cut = {'until': [alone[0][4], alone[2][6]], 'max_gen_toks': 12}  # characters the greedy text reaches
    asks = [(contexts[0], cut), (contexts[1], {'until': 'zz', 'max_gen_toks': 5}), (contexts[2], cut),
            (contexts[3], cut), (contexts[4], {'max_gen_toks': 7})]
    got = lm.generate_until(requests(*asks))
    for (context, kwargs), text, want in zip(asks, got, alone):
        want = want[:kwargs['max_gen_toks']]
        until = kwargs.get('until', [])
        for stop in [until] if isinstance(until, str) else until:
            want = want.split(stop)[0]
        assert text == want
    assert len(got[0]) <= 4 and len(got[2]) <= 6 and len(got[4]) == 7  # cut, cut, and not cut
    assert lm.tokens_run > 0 and lm.loops_run == 2 * lm.tokens_run


def test_generate_until_samples_when_the_task_asks_and_is_greedy_at_temperature_0():
    lm = harness_model('melt')
    ids = torch.tensor([CharCodec().encode('hello')])
    expected = {}
    for temperature, top_k in ((0.7, None), (1.0, 1)):
        torch.manual_seed(5)
        expected[temperature] = CharCodec().decode(ev.generate(lm.model, ids, 10, loops=2, temperature=temperature,
                                                               top_k=top_k)[0, 5:].tolist())
    for kwargs, want in (({'do_sample': True, 'temperature': 0.7}, expected[0.7]),
                         ({'do_sample': True, 'temperature': 0.0}, expected[1.0]), ({'do_sample': False}, expected[1.0])):
        torch.manual_seed(5)
        assert lm.generate_until(requests(('hello', {**kwargs, 'max_gen_toks': 10}))) == [want], kwargs
    assert expected[0.7] != expected[1.0]


def test_q_exit_counts_the_loops_each_decoded_token_ran():
    lm = harness_model('melt', loops=3, exit_threshold=0.5)
    with torch.no_grad():  # every token's exit probability after loop 1 is ~1: decoded tokens run 1 loop
        lm.model.exit_gate.bias.fill_(50.0)
    (text,) = lm.generate_until(requests(('hello', {'max_gen_toks': 4})))
    assert len(text) == 4
    # the prefill runs every loop (5 tokens x 3); the 3 decoded tokens that ran exit after loop 1
    assert (lm.tokens_run, lm.loops_run) == (5 + 3, 5 * 3 + 3 * 1)


def test_chat_template_is_ouro_chatml():
    lm = harness_model('melt', thinking=True)
    history = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
    assert lm.apply_chat_template(history) == ('<|im_start|>system\nBe brief.<|im_end|>\n'
                                              '<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n')
    assert lm.apply_chat_template(history, add_generation_prompt=False) == chat_prompt(history)[:-len('<|im_start|>assistant\n')]


def test_the_shipped_task_is_the_held_out_problems_of_train_pys_table():
    prompts, answers, hops = reason.eval_problems()
    with open(f'{ev.TASKS_DIR}/melt_reason.jsonl', encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    assert [reason.WordCodec().encode(r['text']) for r in rows] == prompts.tolist()
    assert [reason.STOI[r['answer']] for r in rows] == answers.tolist() and [r['hops'] for r in rows] == hops.tolist()


@pytest.mark.parametrize('kv_sharing', ['loop', 'melt'])
def test_the_harness_on_the_shipped_task_equals_the_direct_accuracy(looplm_dir, kv_sharing, capsys):
    """eval.py end to end (task YAML, harness, ragged generate) against a batched forward
    without a cache, the way train.py's table scores (MELT one token at a time)."""
    limit, loops = 30, 2
    results = ev.main([f'--init_from={looplm_dir}', f'--kv_sharing={kv_sharing}', f'--limit={limit}',
                       f'--loops={loops}', '--chunk_size=1', '--batch_size=7'])
    model, _ = ev.load({'init_from': looplm_dir, 'kv_sharing': kv_sharing})
    prompts, answers, hops = reason.eval_problems()
    correct = []
    for h in range(1, reason.MAX_HOPS + 1):
        rows = np.where(hops == h)[0][:limit]  # the harness's --limit: the first problems of each subtask
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(prompts[rows]), loops=loops, chunk_size=1)
        hit = logits[:, -1].argmax(-1).numpy() == answers[rows]
        assert results['results'][f'melt_reason::melt_reason_{h}hop']['exact_match,none'] == hit.mean(), h
        correct += hit.tolist()
    assert results['groups']['melt_reason']['exact_match,none'] == pytest.approx(np.mean(correct), abs=1e-12)
    out = capsys.readouterr().out
    assert f"at {loops} loops: KV cache" in out and f"{float(loops):.2f} loops run per token" in out


def test_without_the_harness_eval_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(ev, 'LM', object)
    with pytest.raises(ImportError, match=r'pip install -r requirements-eval.txt'):
        ev.main([])


@pytest.mark.parametrize('flag,message', [
    ('--tasks=nosuchtask', r"--tasks: 'nosuchtask' is not a task, group or tag of the harness"),
    ('--tasks=,', r'--tasks is empty'),
    ('--batch_size=0', r'--batch_size must be >= 1, got 0'),
    ('--exit_threshold=2', r'--exit_threshold must be in \(0, 1\]'),
    ('--chat', r"--chat and --thinking use Ouro's chat format: they need --init_from=ouro:PATH"),
    ('--init_from=nowhere', r"no checkpoint folder 'nowhere'"),
    ('--include_path=/no/such/folder', r"--include_path: '/no/such/folder' is not a folder \(of task YAML files\)"),
])
def test_eval_refuses_bad_flags_in_one_line(flag, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ev.main([flag])


def test_an_ouro_folder_in_chat_format_on_a_task_of_ones_own(tmp_path, monkeypatch, capsys):
    """--init_from=ouro:PATH --chat --include_path: a multiple-choice task (the harness's
    loglikelihood requests) on a tiny Ouro folder; every request the harness sends is ChatML,
    its score equals the naive Ouro forward's, and the harness's accuracy is the argmax of
    those scores."""
    from conftest import OURO_TINY, naive_forward, ouro_tensors, train_hf_tokenizer, varied_lines, write_ouro_folder
    from ouro import ouro_tokenizer
    from test_ouro import read_safetensors_by_hand
    folder = tmp_path / 'ouro'
    cfg = dict(OURO_TINY, vocab_size=300, max_position_embeddings=256)  # every request fits: none is cut
    train_hf_tokenizer(varied_lines(200), folder, vocab_size=300)
    write_ouro_folder(folder, cfg, ouro_tensors(cfg))
    lines = [' '.join(line.split()[:5]) for line in varied_lines(200) if len(line.split()) >= 3][:40]
    docs = [{'q': lines[i], 'choices': [' '.join(lines[i + k].split()[:k // 10]) for k in (10, 20, 30)], 'label': i % 3}
            for i in range(4)]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'tiny_mc.yaml').write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/docs.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    seen = []
    real = ev.MELTEval.loglikelihood

    def recorded(self, requests):
        out = real(self, requests)
        seen.extend(zip([r.args for r in requests], out))
        return out
    monkeypatch.setattr(ev.MELTEval, 'loglikelihood', recorded)
    results = ev.main([f'--init_from=ouro:{folder}', f'--include_path={tmp_path}/tasks', '--tasks=tiny_mc', '--chat',
                       '--kv_sharing=loop', '--loops=2', '--batch_size=4', '--dtype=float32'])
    enc, weights = ouro_tokenizer(str(folder)), read_safetensors_by_hand(folder)
    assert len(seen) == 12
    for (context, continuation), (logprob, _) in seen:
        assert context.startswith('<|im_start|>user\n') and context.endswith('<|im_start|>assistant\n')
        head = enc.encode(context, allowed_special='all')
        ids = enc.encode(context + continuation, allowed_special='all')
        lp = torch.log_softmax(naive_forward(cfg, weights, ids[:-1], 2, [len(ids) - 1], kv='loop'), -1)
        assert abs(logprob - sum(lp[t - 1, ids[t]].item() for t in range(len(head), len(ids)))) < 1e-4
    scores = {}
    for (context, continuation), (logprob, _) in seen:
        scores.setdefault(context, []).append((continuation, logprob))
    hits = []
    for d in docs:
        (choices,) = [v for k, v in scores.items() if d['q'] in k]
        best = max(choices, key=lambda c: c[1])[0]
        hits.append(best.strip() == d['choices'][d['label']])
    assert results['results']['tiny_mc']['acc,none'] == pytest.approx(np.mean(hits))
    assert 'LoopLM at 2 loops: KV cache' in capsys.readouterr().out

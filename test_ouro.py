"""ouro.py: Ouro folders in and out, and Ouro's tokenizer as a tiktoken.Encoding."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (OURO_TINY, in_float64, max_diff, naive, naive_forward, ouro_tensors, tiny_model,
                      tokens, train_hf_tokenizer, varied_lines, write_ouro_folder)
from ouro import load_ouro, save_ouro
from ouro import chat_prompt, ouro_tokenizer, stop_ids
from sample import generate

# ----------------------------------------------------------------------------------------
# Ouro folders in and out


def read_safetensors_by_hand(path):
    """Every tensor of a folder as float32, parsing the format directly: an 8-byte header
    length, a JSON header of dtype/shape/offsets, then the raw little-endian data."""
    files = [f for f in os.listdir(path) if f.endswith('.safetensors')]
    out = {}
    for file in files:
        raw = (path / file).read_bytes()
        n = struct.unpack('<Q', raw[:8])[0]
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        for name, info in header.items():
            if name == '__metadata__':
                continue
            start, end = info['data_offsets']
            if info['dtype'] == 'F32':
                values = np.frombuffer(data[start:end], dtype='<f4')
            else:
                assert info['dtype'] == 'BF16'
                values = (np.frombuffer(data[start:end], dtype='<u2').astype(np.uint32) << 16).view(np.float32)
            out[name] = torch.from_numpy(values.copy()).reshape(info['shape'])
    return out


@pytest.mark.parametrize('dtype,shards', [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 1), (torch.bfloat16, 2)])
def test_from_ouro_matches_naive_ouro_forward(tmp_path, dtype, shards):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY), dtype, shards)
    cfg, weights = json.loads((folder / 'config.json').read_text()), read_safetensors_by_hand(folder)
    ids = tokens(7)
    model = load_ouro(str(folder), kv_sharing='loop')
    assert model.lm_head.weight.dtype == dtype and model.config.n_loops == 4
    exact = in_float64(load_ouro(str(folder), kv_sharing='loop', dtype=torch.float64))
    for loops in (1, 2, 3, 4):
        ref = naive_forward(cfg, weights, ids[0].tolist(), loops, [7], kv='loop')
        assert max_diff(exact(ids, loops=loops)[0][0], ref) < 1e-10, loops
        if dtype == torch.bfloat16:  # the bf16 model computes in bf16: same answer, bf16 precision
            assert max_diff(model(ids, loops=loops)[0][0].float(), ref) < 0.1 * ref.abs().max()
        else:  # fp32 as loaded, its own fp32 RoPE tables included
            assert max_diff(model(ids, loops=loops)[0][0].double(), ref) < 1e-4 * ref.abs().max(), loops


def greedy_by_reference(step, ids, new):
    """Greedy tokens, each from a full recompute of the sequence so far: no cache at all."""
    ids = list(ids)
    for _ in range(new):
        ids.append(int(step(ids)[-1].argmax()))
    return ids


def test_batched_generation_of_an_ouro_folder_equals_the_reference_for_each_row_alone(tmp_path):
    """Prompts of 3, 8 and 5 tokens in one call (Ouro's own HF code corrupts every row but the
    longest here): each row's greedy tokens equal those of the naive Ouro forward, run on the
    folder's weights for that row alone; and MELT's rows equal its naive reference, chunk 1
    prefill (decoding's own grid)."""
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY))
    cfg, weights = json.loads((folder / 'config.json').read_text()), read_safetensors_by_hand(folder)
    prompts = [tokens(n, seed=n)[0].tolist() for n in (3, 8, 5)]
    looplm = in_float64(load_ouro(str(folder), kv_sharing='loop', dtype=torch.float64))
    for loops in (2, 4):
        rows = generate(looplm, prompts, 6, loops=loops, top_k=1)
        for p, row in zip(prompts, rows):
            step = lambda ids: naive_forward(cfg, weights, ids, loops, [len(ids)], kv='loop')
            assert row.tolist() == greedy_by_reference(step, p, 6), (loops, len(p))
    melt = in_float64(load_ouro(str(folder), kv_sharing='melt', dtype=torch.float64))
    with torch.no_grad():
        for gate in melt.gate_modules():
            gate.b_z.fill_(0.5)  # a gate that blends, so MELT differs from last-loop sharing
    rows = generate(melt, prompts, 6, loops=4, top_k=1, chunk_size=1)
    for p, row in zip(prompts, rows):
        step = lambda ids: naive(melt, ids, 4, [1] * len(ids))
        assert row.tolist() == greedy_by_reference(step, p, 6), len(p)
    assert len({tuple(r[len(p):].tolist()) for p, r in zip(prompts, rows)}) == 3  # the rows differ


def test_from_ouro_melt_starts_as_last_loop_sharing(tmp_path):
    folder = write_ouro_folder(tmp_path / 'ouro', OURO_TINY, ouro_tensors(OURO_TINY))
    model = load_ouro(str(folder))  # kv_sharing='melt': new gates, b_z = gate_bias_init
    assert model.config.kv_sharing == 'melt' and len(model.gate_modules()) == 2
    for gate in model.gate_modules():
        assert gate.w_z.weight.abs().sum() == 0 and torch.all(gate.b_z == model.config.gate_bias_init)
    with torch.no_grad():
        for gate in model.gate_modules():
            gate.b_z.fill_(-1e4)
    cfg, weights = json.loads((folder / 'config.json').read_text()), read_safetensors_by_hand(folder)
    ids = tokens(6)
    ref = naive_forward(cfg, weights, ids[0].tolist(), 4, [1] * 6, kv='open')
    assert max_diff(in_float64(model)(ids, chunk_size=1)[0][0], ref) < 1e-10


def test_from_ouro_errors(tmp_path):
    good = ouro_tensors(OURO_TINY)
    bad_shape = dict(good, **{'model.layers.1.self_attn.k_proj.weight': torch.zeros(8, 32)})
    folder = write_ouro_folder(tmp_path / 'shape', OURO_TINY, bad_shape)
    with pytest.raises(ValueError, match=r'tensor model.layers.1.self_attn.k_proj.weight .* has shape \(8, 32\), expected \(16, 32\)'):
        load_ouro(str(folder))
    lacking = {k: v for k, v in good.items() if k != 'model.norm.weight'}
    with pytest.raises(ValueError, match=r'lacks 1 tensors, e.g. \[.model.norm.weight.\]'):
        load_ouro(str(write_ouro_folder(tmp_path / 'lack', OURO_TINY, lacking)))
    extra = dict(good, **{'model.layers.0.self_attn.q_norm.weight': torch.ones(8)})
    with pytest.raises(ValueError, match=r'unexpected tensor model.layers.0.self_attn.q_norm.weight'):
        load_ouro(str(write_ouro_folder(tmp_path / 'extra', OURO_TINY, extra)))
    folder = write_ouro_folder(tmp_path / 'llama', dict(OURO_TINY, model_type='llama'), good)
    with pytest.raises(ValueError, match=r"model_type 'llama', expected 'ouro'"):
        load_ouro(str(folder))
    with pytest.raises(FileNotFoundError, match=r"no config.json in '.*nowhere': expected a HuggingFace Ouro folder"):
        load_ouro(str(tmp_path / 'nowhere'))
    folder = write_ouro_folder(tmp_path / 'shards', OURO_TINY, good, shards=2)
    (folder / 'model-00002-of-00002.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match=r'lists model-00002-of-00002.safetensors, which is not in'):
        load_ouro(str(folder))
    (folder / 'model.safetensors.index.json').unlink()
    with pytest.raises(FileNotFoundError, match=r'no model.safetensors or model.safetensors.index.json'):
        load_ouro(str(folder))


@pytest.mark.parametrize('kv_sharing', ['melt', 'loop'])
def test_export_round_trips_bit_exactly(tmp_path, kv_sharing):
    model = tiny_model(kv_sharing)
    save_ouro(model, str(tmp_path / 'out'))
    back = load_ouro(str(tmp_path / 'out'), kv_sharing=None)
    assert back.config == model.config
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = tokens(9)
    # same bits; in float64, so that BLAS summing in another order (other alignment) stays invisible
    assert max_diff(in_float64(back)(ids)[0], in_float64(model)(ids)[0]) <= 1e-12
    names = set(read_safetensors_by_hand(tmp_path / 'out'))
    assert any('self_attn.kv_gate.w_z.weight' in n for n in names) == (kv_sharing == 'melt')
    assert not list(tmp_path.glob('out/*.tmp'))
    if kv_sharing == 'loop':  # a LoopLM export is an Ouro folder again, for a reader that is not ours
        cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
        assert cfg['model_type'] == 'ouro' and cfg['melt']['kv_sharing'] == 'loop'
        ref = naive_forward(cfg, read_safetensors_by_hand(tmp_path / 'out'), ids[0].tolist(), 3, [9], kv='loop')
        loaded = in_float64(load_ouro(str(tmp_path / 'out'), kv_sharing='loop', dtype=torch.float64))
        assert max_diff(loaded(ids)[0][0], ref) < 1e-10


def test_loading_a_large_checkpoint_does_not_hold_two_copies(tmp_path):
    cfg = dict(OURO_TINY, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=8, head_dim=128, vocab_size=16384)
    zeros = {k: torch.zeros(v.shape) for k, v in ouro_tensors(cfg).items()}
    folder = write_ouro_folder(tmp_path / 'big', cfg, zeros, dtype=torch.bfloat16)
    size = (folder / 'model.safetensors').stat().st_size
    assert size > 200e6
    # peak resident memory (VmHWM; ru_maxrss would carry pytest's own peak across exec),
    # from a baseline taken after torch's one-time setup for meta tensors (~70 MB whatever
    # the model); after loading, every weight is read so that lazily mapped pages count too
    script = ("import torch; from ouro import load_ouro; from bench import peak_rss\n"
              "with torch.device('meta'): torch.nn.Embedding(2, 2)\n"
              "before = peak_rss()\n"
              f"m = load_ouro({str(folder)!r}, kv_sharing='loop')\n"
              "assert m.lm_head.weight.dtype == torch.bfloat16\n"
              "for p in m.parameters():\n"
              "    flat = p.detach().view(-1)\n"
              "    for i in range(0, flat.numel(), 2 ** 20): flat[i:i + 2 ** 20].sum()\n"
              "print(peak_rss() - before)\n")
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip())
    assert 0.9 * size < grown < 1.3 * size, (grown, size)  # the weights once, not twice


# ----------------------------------------------------------------------------------------
# the Ouro tokenizer through tiktoken, against HuggingFace's tokenizers library (test-only)


def test_tiktoken_ids_equal_huggingface_ids(tmp_path):
    lines = varied_lines()
    hf = train_hf_tokenizer(lines[::2], tmp_path)
    enc = ouro_tokenizer(str(tmp_path))
    held_out = lines[1::2] + ['\n'.join(lines[1:200:2]), '   \t\t  \n\n\n  42  ', '1,000,000 and 3.14159']
    assert len(held_out) > 2000
    mismatched = [line for line in held_out if enc.encode(line) != hf.encode(line).ids]
    assert not mismatched, mismatched[:3]
    for line in held_out:
        assert enc.decode(enc.encode(line)) == line
    text = '<|im_start|>user\nhi<|im_end|>\n'
    assert enc.encode(text, allowed_special='all') == hf.encode(text).ids
    assert enc.encode(text, allowed_special='all')[0] == 1 and enc.n_vocab == hf.get_vocab_size()


def test_bytes_missing_from_the_vocabulary_are_dropped_like_huggingface(tmp_path):
    hf = train_hf_tokenizer(['hello world 123 abc'] * 20, tmp_path, vocab_size=100, full_alphabet=False)
    enc = ouro_tokenizer(str(tmp_path))
    for text in ['hello é world', 'zzz hello 😀', 'héllo wörld 12']:
        assert enc.encode(text) == hf.encode(text).ids
    assert enc.decode(enc.encode('hello é world')) == 'hello  world'
    assert max(enc.encode('😀 hello')) < hf.get_vocab_size()


def test_chat_format():
    text = chat_prompt([{'role': 'user', 'content': 'What is 2+2?'}], thinking=True)
    assert text == '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n'
    assert chat_prompt([{'role': 'user', 'content': 'x'}]).endswith('<|im_start|>assistant\n')


def test_stop_ids_are_im_end_and_endoftext(tmp_path):
    train_hf_tokenizer(['hello world'] * 5, tmp_path, vocab_size=300)
    assert stop_ids(ouro_tokenizer(str(tmp_path))) == {0, 2}


def test_files_of_the_older_field_name_still_load(tmp_path):
    """Checkpoints and exports written before `cache` was renamed `kv_sharing` load as saved."""
    import checkpoints
    model = tiny_model('melt')
    save_ouro(model, str(tmp_path / 'export'))
    config = json.loads((tmp_path / 'export' / 'config.json').read_text())
    config['melt']['cache'] = config['melt'].pop('kv_sharing')
    (tmp_path / 'export' / 'config.json').write_text(json.dumps(config))
    assert load_ouro(str(tmp_path / 'export'), kv_sharing=None).config == model.config
    args = {**model.config.__dict__}
    args['cache'] = args.pop('kv_sharing')
    (tmp_path / 'run').mkdir()
    torch.save({'model': model.state_dict(), 'model_args': args}, tmp_path / 'run' / 'ckpt.pt')
    back, _ = checkpoints.load_checkpoint(str(tmp_path / 'run'), 'cpu')
    assert back.config == model.config and back.gate_modules()

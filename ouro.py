"""
Ouro's file formats: the HuggingFace checkpoint folder (config.json + safetensors weights)
in and out of a MELT model, and the Ouro tokenizer (SmolLM2's byte-level BPE, read from
tokenizer.json) as a tiktoken.Encoding, plus Ouro's ChatML chat format.
load_ouro and save_ouro convert; melt.py knows nothing of files. No `tokenizers` import here.
"""
import hashlib
import json
import os

import tiktoken
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import renamed_fields
from configurator import is_int, read_json
from melt import MELT, MELTConfig, check_fits, rope_tables

FETCH_AGAIN = 'fix it, or fetch the file again'  # what to do about a damaged file of an Ouro folder

# Ouro's HuggingFace names differ from ours in a few module names; everything else is the same.
OURO_MODULE_NAMES = {
    'attn': 'self_attn',
    'attn_norm_in': 'input_layernorm',  # Ouro's sandwich norms, in block order
    'attn_norm_out': 'input_layernorm_2',
    'mlp_norm_in': 'post_attention_layernorm',
    'mlp_norm_out': 'post_attention_layernorm_2',
    'exit_gate': 'early_exit_gate',
}
# config.json field -> MELTConfig field
OURO_CONFIG_FIELDS = {
    'vocab_size': 'vocab_size', 'max_position_embeddings': 'block_size',
    'num_hidden_layers': 'n_layer', 'num_attention_heads': 'n_head',
    'num_key_value_heads': 'n_kv_head', 'hidden_size': 'n_embd',
    'intermediate_size': 'n_hidden', 'total_ut_steps': 'n_loops',
    'rope_theta': 'rope_theta', 'rms_norm_eps': 'norm_eps',
}


def ouro_name(name):
    """Our parameter name -> the name in an Ouro checkpoint, e.g.
    layers.3.attn_norm_out.weight -> model.layers.3.input_layernorm_2.weight. MELT's gate
    tensors become model.layers.{i}.self_attn.kv_gate.{w_z.weight, u_z.weight, b_z}."""
    parts = [OURO_MODULE_NAMES.get(part, part) for part in name.split('.')]
    return '.'.join(parts) if parts[0] == 'lm_head' else 'model.' + '.'.join(parts)


def read_ouro_config(path):
    """MELTConfig fields from an Ouro (or our exported) config.json."""
    file = os.path.join(path, 'config.json')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path!r}: expected a HuggingFace Ouro folder")
    hf = read_json(file, FETCH_AGAIN)
    if not isinstance(hf, dict):
        raise ValueError(f"{file} holds a JSON {type(hf).__name__}, expected an object of Ouro's settings")
    if hf.get('model_type') != 'ouro':
        raise ValueError(f"{file} has model_type {hf.get('model_type')!r}, expected 'ouro'")
    missing = [k for k in OURO_CONFIG_FIELDS if k not in hf]
    if missing:
        raise ValueError(f"{file} lacks the Ouro fields {missing}")
    if hf.get('tie_word_embeddings', False) is not False:
        raise ValueError(f"{file}: tie_word_embeddings is {hf['tie_word_embeddings']!r}, expected false (Ouro's LM "
                         f"head is untied)")
    fields = {ours: hf[theirs] for theirs, ours in OURO_CONFIG_FIELDS.items()}
    for theirs, ours in OURO_CONFIG_FIELDS.items():
        number = (int, float) if ours in ('rope_theta', 'norm_eps') else int
        if isinstance(hf[theirs], bool) or not isinstance(hf[theirs], number) or hf[theirs] <= 0:
            raise ValueError(f"{file}: {theirs} is {hf[theirs]!r}, expected a positive "
                             f"{'number' if number != int else 'integer'}")
    head_dim = hf.get('head_dim', hf['hidden_size'] // hf['num_attention_heads'])
    if head_dim * hf['num_attention_heads'] != hf['hidden_size']:
        raise ValueError(f"{file}: head_dim {head_dim} * heads {hf['num_attention_heads']} "
                         f"!= hidden_size {hf['hidden_size']}, which this model needs")
    ours = hf.get('melt', {})  # save_ouro adds kv_sharing, chunk_size, gate...; Ouro ignores it
    if not isinstance(ours, dict):
        raise ValueError(f"{file}: melt is {repr(ours)[:80]}, expected an object of MELT's settings (save_ouro's)")
    ours = renamed_fields(ours)
    known = set(MELTConfig.__dataclass_fields__) - set(OURO_CONFIG_FIELDS.values())
    if set(ours) - known:
        raise ValueError(f"{file}: melt sets {sorted(set(ours) - known)}, expected only {sorted(known)}")
    fields.update(ours)
    try:
        MELTConfig(**fields)
    except ValueError as e:  # out of range: too many loops, heads that do not divide, an unknown gate...
        raise ValueError(f"{file}: {e}") from None
    return fields


def ouro_tensor_files(path):
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = os.path.join(path, 'model.safetensors'), os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        spec = read_json(index, FETCH_AGAIN)
        weight_map = spec.get('weight_map') if isinstance(spec, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} lists {shard}, which is not in {path!r}")
        return [os.path.join(path, shard) for shard in shards]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def load_ouro(path, kv_sharing='melt', dtype=None, **overrides):
    """A MELT model from a HuggingFace Ouro folder, or from one save_ouro wrote:
    kv_sharing='loop' is exactly Ouro, 'melt' adds new gates (reset_gates' init), None takes
    what the folder was saved as. Tensors are read one by one from the memory-mapped files
    into a model built on the meta device, so the weights are never held twice. Keeps the
    checkpoint's dtype unless `dtype` says otherwise; `overrides` are MELTConfig fields."""
    fields = read_ouro_config(path)
    fields.update(kv_sharing=kv_sharing or fields.get('kv_sharing', 'loop'), **overrides)
    config = MELTConfig(**fields)
    with torch.device('meta'):
        model = MELT(config)
    expected = {ouro_name(k): (k, p.shape) for k, p in model.state_dict().items()}
    state = {}
    for file in ouro_tensor_files(path):
        try:
            reader = safe_open(file, framework='pt')
        except Exception as e:  # truncated or not safetensors: the reader raises its own error type
            raise ValueError(f"{file} is not a readable safetensors file ({str(e)[:200]})") from None
        with reader as f:
            for name in f.keys():
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name} in {file} for kv_sharing={config.kv_sharing!r}")
                ours, shape = expected[name]
                tensor = f.get_tensor(name)
                if tensor.shape != shape:
                    raise ValueError(f"tensor {name} in {file} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(shape)} from config.json")
                if not tensor.is_floating_point():
                    raise ValueError(f"tensor {name} in {file} is {tensor.dtype}, expected floating-point weights")
                if not torch.isfinite(torch.stack(torch.aminmax(tensor))).all():  # nan or inf show in min or max
                    raise ValueError(f"tensor {name} in {file} holds inf or nan values")
                state[ours] = tensor if dtype is None else tensor.to(dtype)
    gate_keys = {k for k in model.state_dict() if '.kv_gate.' in k}
    new_gates = gate_keys - state.keys()
    missing = sorted(ouro_name(k) for k in model.state_dict() if k not in state and k not in gate_keys)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if new_gates and new_gates != gate_keys:
        raise ValueError(f"{path} has only some gate tensors; lacks e.g. {ouro_name(sorted(new_gates)[0])}")
    like = state['embed_tokens.weight']
    for k in new_gates:  # MELT's new parameters, filled in by reset_gates below
        state[k] = torch.empty(expected[ouro_name(k)][1], dtype=like.dtype)
    model.load_state_dict(state, assign=True)
    check_fits(16 * config.block_size * config.head_dim, f"RoPE's tables for max_position_embeddings "
               f"{config.block_size:,} (config.json)", 'cpu')
    cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    if new_gates:
        model.reset_gates()
    return model


def save_ouro(model, path):
    """Write config.json + model.safetensors in Ouro's naming (gates under
    model.layers.{i}.self_attn.kv_gate.*). Each file is written to a temporary name and
    then renamed, so an interrupted save leaves the previous files whole."""
    c = model.config
    os.makedirs(path, exist_ok=True)
    hf = {theirs: getattr(c, ours) for theirs, ours in OURO_CONFIG_FIELDS.items()}
    hf.update(model_type='ouro', architectures=['OuroForCausalLM'], head_dim=c.head_dim,
              hidden_act='silu', tie_word_embeddings=False, early_exit_threshold=1.0,
              torch_dtype=str(model.lm_head.weight.dtype).removeprefix('torch.'))
    hf['melt'] = {'kv_sharing': c.kv_sharing, 'chunk_size': c.chunk_size, 'gate': c.gate, 'ema_z': c.ema_z,
                  'gate_bias_init': c.gate_bias_init}
    tensors = {ouro_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(path, 'model.safetensors.tmp'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json.tmp'), 'w') as f:
        json.dump(hf, f, indent=2)
    os.replace(os.path.join(path, 'model.safetensors.tmp'), os.path.join(path, 'model.safetensors'))
    os.replace(os.path.join(path, 'config.json.tmp'), os.path.join(path, 'config.json'))


# -----------------------------------------------------------------------------
# the tokenizer
#
# tokenizer.json stores tokens as GPT-2 "byte-level" strings: every byte is shown as a
# printable unicode character. We undo that mapping, rank every token by its id (ids follow
# merge order, which we check), and give tiktoken a split pattern that reproduces the
# pre-tokenizer Digits(individual_digits=True) followed by ByteLevel(use_regex=True).

# GPT-2's ByteLevel pattern with two changes that reproduce splitting every digit off first:
# a number is one digit (never with a leading space), and a whitespace run that ends at a
# digit ends a piece, so it is taken whole as at the end of the text.
OURO_PAT_STR = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?![^\s\p{N}])|\s+""")


def byte_level_alphabet():
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other bytes are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


class OuroEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding that drops bytes missing from the vocabulary, as HuggingFace's BPE
    does when it has no unknown token: such bytes get placeholder ids past the vocabulary,
    which never merge and are removed from encode's output."""

    def __init__(self, *args, missing_byte_ids=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.missing_byte_ids = frozenset(missing_byte_ids)

    def encode(self, text, **kwargs):
        return [i for i in super().encode(text, **kwargs) if i not in self.missing_byte_ids]

    def encode_ordinary(self, text):
        return [i for i in super().encode_ordinary(text) if i not in self.missing_byte_ids]


def ouro_tokenizer(path):
    """tiktoken encoding from path/tokenizer.json (path may also be the file itself).
    Encode text with special tokens in it via encode(text, allowed_special='all')."""
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    spec = read_json(file, FETCH_AGAIN)
    model = spec.get('model') if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get('type') != 'BPE':
        raise ValueError(f"{file} holds no byte-level 'BPE' model (its 'model' is {str(model)[:60]!r})")
    if not isinstance(model.get('vocab'), dict):
        raise ValueError(f"{file}: model.vocab is {str(model.get('vocab'))[:60]!r}, expected an object of tokens to ids")
    if not isinstance(spec.get('added_tokens', []), list):
        raise ValueError(f"{file}: added_tokens is {str(spec['added_tokens'])[:60]!r}, expected a list")
    def is_id(v):
        return is_int(v) and 0 <= v < 2 ** 20
    for t in spec.get('added_tokens', []):
        if not isinstance(t, dict) or not isinstance(t.get('content'), str) or not is_id(t.get('id')):
            raise ValueError(f"{file}: added_tokens holds {repr(t)[:80]}, expected objects with a 'content' string "
                             f"and an integer 'id'")
    special = {t['content']: t['id'] for t in spec.get('added_tokens', [])}
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    ranks = {}
    for token, token_id in model['vocab'].items():
        if not is_id(token_id):
            raise ValueError(f"{file}: model.vocab gives {token!r} the id {token_id!r}, expected an integer in [0, 2^20)")
        if token in special:
            continue
        if any(c not in to_byte for c in token):
            raise ValueError(f"{file}: token {token!r} (id {token_id}) is not byte-level text")
        ranks[bytes(to_byte[c] for c in token)] = token_id
    if not isinstance(model.get('merges', []), list):
        raise ValueError(f"{file}: model.merges is {repr(model.get('merges'))[:60]}, expected a list")
    # tiktoken merges the pair whose merged token has the lowest rank; HF applies merges in
    # list order. With rank = id these agree when ids grow along the merge list.
    last_id = -1
    for merge in model.get('merges', []):
        pair = merge.split(' ') if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair) \
                or pair[0] + pair[1] not in model['vocab']:
            raise ValueError(f"{file}: merge {repr(merge)[:60]} is not two tokens whose join is in model.vocab")
        a, b = pair
        merged_id = model['vocab'][a + b]
        if merged_id <= last_id:
            raise ValueError(f"{file}: merge {a!r} + {b!r} -> id {merged_id} comes after id {last_id}; "
                             f"ids must follow merge order for tiktoken")
        last_id = merged_id
    top = max([*ranks.values(), *special.values()])
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    for i, byte in enumerate(missing):
        ranks[byte] = top + 1 + i
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) or 'ouro'
    return OuroEncoding(name=name, pat_str=OURO_PAT_STR, mergeable_ranks=ranks,
                        special_tokens=special, missing_byte_ids=[ranks[b] for b in missing])


def chat_prompt(messages, thinking=False, generation_prompt=True):
    """Ouro's ChatML text for a list of {'role', 'content'} messages, ending with the
    assistant header (unless generation_prompt=False); -Thinking models expect '<think>\\n'
    right after it."""
    text = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if not generation_prompt:
        return text
    return text + '<|im_start|>assistant\n' + ('<think>\n' if thinking else '')


def stop_ids(enc):
    """Ids that end an Ouro reply: <|im_end|> and <|endoftext|>, where the tokenizer has them."""
    return {enc.encode_single_token(t) for t in ('<|im_end|>', '<|endoftext|>') if t in enc.special_tokens_set}


def tokenizer_id(tokenizer):
    """What meta.pkl records of the tokenizer a data set was made with ('gpt2' or 'ouro:PATH'),
    so train.py can refuse data made with another one."""
    if tokenizer == 'gpt2':
        return 'gpt2'
    with open(os.path.join(tokenizer.removeprefix('ouro:'), 'tokenizer.json'), 'rb') as f:
        return 'ouro:' + hashlib.sha256(f.read()).hexdigest()[:16]


def load_encoding(tokenizer):
    """The tokenizer a data set is made with: GPT-2's (tiktoken, fetched once) or an Ouro folder's."""
    if tokenizer == 'gpt2':
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:  # offline: tiktoken fetches GPT-2's files on first use
            raise OSError(f"could not get GPT-2's encoding ({type(e).__name__}); tiktoken downloads it once, "
                          f"so offline use --tokenizer=ouro:PATH (an Ouro folder's tokenizer.json, read locally)") from None
    if tokenizer.startswith('ouro:'):
        path = tokenizer.removeprefix('ouro:')
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--tokenizer={tokenizer}: {path!r} is not a folder with a tokenizer.json")
        return ouro_tokenizer(path)
    raise ValueError(f"--tokenizer must be 'gpt2' or 'ouro:PATH', got {tokenizer!r}")

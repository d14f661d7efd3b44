"""
What train.py writes and reads on disk, in one place: data sets (meta.pkl and the token
files it describes) and checkpoints (ckpt.pt), with the names of fields renamed since, so
older files still load. sample.py, bench.py and ablate.py load models from here, not from
train.py. Every mistake in a file is one line naming the file, the field and what was expected.
"""
import importlib.util
import os
import pickle
import re
from dataclasses import fields

import numpy as np
import torch

from configurator import disk_error, is_int, write_temporary
from data.reason import prepare as reason
from melt import MELT, MELTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data')
PHASES = ('loop', 'transition', 'distill')  # what a checkpoint's 'phase' may be (train.py's phases)
RENAMED = {'cache': 'kv_sharing'}  # MELTConfig fields renamed since: old name -> new name


def renamed_fields(args):
    """MELTConfig fields as saved (a checkpoint's model_args, an export's config.json), with
    the names of older versions replaced by today's."""
    return {RENAMED.get(k, k): v for k, v in args.items()}


# -----------------------------------------------------------------------------
# data sets

def dataset_dir(dataset):
    """--dataset: a folder, or the name of one under data/."""
    return dataset if os.path.isdir(dataset) else os.path.join(DATA_DIR, dataset)


def read_meta(folder):
    """A data set's meta.pkl, every field checked, each mistake one line that names the file,
    the field, its value and what was expected, and the command that remakes the data set. A
    data set of the reasoning task must be the current version of it, its depth files included."""
    file = os.path.join(folder, 'meta.pkl')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no meta.pkl in {folder}: prepare the data set first ({remake_command(folder, {})})")
    try:
        with open(file, 'rb') as f:
            meta = pickle.load(f)
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds of errors
        raise ValueError(f"{file} is not a readable meta.pkl ({type(e).__name__}: {str(e)[:100]}); "
                         f"remake the data set: {remake_command(folder, {})}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a {type(meta).__name__}, expected the dict a prepare script writes; "
                         f"remake the data set: {remake_command(folder, {})}")

    def field(name, ok, expected, default=None):
        if name not in meta and default is None:
            raise ValueError(f"{file} lacks {name!r} ({expected}); remake the data set: {remake_command(folder, meta)}")
        value = meta.get(name, default)
        if not ok(value):
            raise ValueError(f"{file}: {name} is {repr(value)[:80]}, expected {expected}; "
                             f"remake the data set: {remake_command(folder, meta)}")
        return value
    vocab = field('vocab_size', lambda v: is_int(v) and 1 <= v <= 2 ** 16, 'an integer in [1, 65536] (uint16 ids)')
    field('tokenizer', lambda v: isinstance(v, str) and v != '' and (not v.startswith('ouro:') or
                                                                    re.fullmatch('ouro:[0-9a-f]{16}', v)),
          "the tokenizer's name ('ouro:' and 16 hex digits of its tokenizer.json, for an Ouro tokenizer)")
    field('row_len', lambda v: is_int(v) and v >= 1, 'an integer >= 1 (tokens per problem)', default=1)
    field('loss_after', lambda v: isinstance(v, (list, tuple)) and all(is_int(i) and 0 <= i < vocab for i in v),
          f'a list of token ids below vocab_size {vocab}', default=[])
    if 'tokenizer_path' in meta or meta['tokenizer'].startswith('ouro:'):  # sample.py decodes with it
        field('tokenizer_path', lambda v: v == 'gpt2' or isinstance(v, str) and v.startswith('ouro:'),
              "'gpt2' or 'ouro:PATH'")
    if meta['tokenizer'] == 'reason':  # the reasoning task, as data/reason/prepare.py makes it now
        field('itos', lambda v: v == reason.WORDS, f"the task's {len(reason.WORDS)} words of data/reason/prepare.py")
        field('row_len', lambda v: v == reason.PROBLEM_LEN, f'{reason.PROBLEM_LEN}, the tokens of one problem')
        field('max_depth', lambda v: v == reason.MAX_HOPS, f'{reason.MAX_HOPS}, the most hops of a problem')
    elif meta['tokenizer'] == 'char':  # data/text/prepare.py --tokenizer=char: the characters themselves
        field('itos', lambda v: isinstance(v, list) and len(v) == vocab and len(set(v)) == vocab and
              all(isinstance(c, str) and len(c) == 1 for c in v), f'{vocab} distinct characters (vocab_size)')
    elif 'max_depth' in meta:
        field('max_depth', lambda v: is_int(v) and 1 <= v <= 255, 'an integer in [1, 255] (uint8 depths)')
    return meta


def remake_command(folder, meta):
    """The command that remakes the data set in `folder`."""
    name = os.path.basename(os.path.normpath(folder))
    if meta.get('tokenizer') == 'reason' or name == 'reason':
        return f"python data/reason/prepare.py --out_dir={folder}"
    if name != 'text' and os.path.isfile(os.path.join(DATA_DIR, name, 'prepare.py')):  # data/austen
        return f"python data/{name}/prepare.py --out_dir={folder}"
    return f"python data/text/prepare.py --input=FILE --out_dir={folder}"


class Data:
    """nanoGPT's memmapped uint16 token files. Batch k of iteration i is drawn from a
    generator seeded by (seed, i, k), so a resumed run sees the same data in the same order,
    and DDP rank r takes the micro-batches a single process would take at r, r + world, ..."""

    def __init__(self, dataset, block_size, device):
        self.dir = dataset_dir(dataset)
        self.meta = read_meta(self.dir)
        self.block_size, self.device = block_size, device
        # tasks may name tokens after which the target counts (the answers); else every token
        self.loss_after = torch.tensor(self.meta.get('loss_after', []), dtype=torch.long)
        self.row_len = self.meta.get('row_len', 1)  # rows start where a problem starts (1: anywhere)
        self.has_depth = 'max_depth' in self.meta  # each token's hops, in {split}_depth.bin

    def check(self):
        """Every file the run will read, whole: both splits, their depth files where the data
        set has depths, and no token id past the vocabulary. Half a data set is refused, never
        trained on as something else."""
        for split in ('train', 'val'):
            top = int(self.tokens(split).max())  # tokens() has checked there are more than a block's
            if top >= self.meta['vocab_size']:
                raise ValueError(f"{os.path.join(self.dir, split + '.bin')} holds token id {top}, not below "
                                 f"meta.pkl's vocab_size {self.meta['vocab_size']}; remake the data set: "
                                 f"{remake_command(self.dir, self.meta)}")
            deepest = int(self.depths(split).max()) if self.has_depth else 0
            if deepest > self.meta.get('max_depth', 0):
                raise ValueError(f"{os.path.join(self.dir, split + '_depth.bin')} holds depth {deepest}, "
                                 f"above meta.pkl's max_depth {self.meta['max_depth']}; remake the data set: "
                                 f"{remake_command(self.dir, self.meta)}")

    def tokens(self, split):
        """The split's tokens, memory-mapped; checked to be uint16 ids, enough for a block."""
        file = os.path.join(self.dir, f'{split}.bin')
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {split}.bin in {self.dir}: prepare the data set first")
        size = os.path.getsize(file)
        if size % 2:
            raise ValueError(f"{file} has {size} bytes, an odd number: expected uint16 token ids (2 bytes each)")
        if size // 2 <= self.block_size + 1:
            raise ValueError(f"{file} has {size // 2} tokens; block_size {self.block_size} needs more than "
                             f"{self.block_size + 1}")
        return np.memmap(file, dtype=np.uint16, mode='r')

    def depths(self, split):
        """The split's depth file: for every token, the hops of the problem it belongs to."""
        file = os.path.join(self.dir, f'{split}_depth.bin')
        if not os.path.isfile(file) or os.path.getsize(file) != os.path.getsize(os.path.join(self.dir, f'{split}.bin')) // 2:
            raise ValueError(f"{file} {'must hold' if os.path.isfile(file) else 'is missing; the data set needs'} one byte "
                             f"per token of {split}.bin (its hops); remake the data set: {remake_command(self.dir, self.meta)}")
        return np.memmap(file, dtype=np.uint8, mode='r')

    def batch(self, split, batch_size, seed):
        """(x, y, depth) of batch_size rows; y is -1 where no loss is taken; depth (the hops of
        each target's problem) is None for data without a depth file."""
        data = self.tokens(split)
        g = torch.Generator().manual_seed(seed)
        ix = (torch.randint((len(data) - self.block_size - 1) // self.row_len, (batch_size,), generator=g)
              * self.row_len).tolist()

        def rows(tokens, offset):
            return torch.stack([torch.from_numpy(tokens[i + offset:i + offset + self.block_size].astype(np.int64))
                                for i in ix]).to(self.device)
        x, y = rows(data, 0), rows(data, 1)
        if len(self.loss_after):
            y = torch.where(torch.isin(x, self.loss_after.to(x.device)), y, -1)
        return x, y, rows(self.depths(split), 1) if self.has_depth else None

    def val_batches(self, batch_size, n, seed):
        """The n fixed validation batches a run of this seed scores on (batch_seed's)."""
        return [self.batch('val', batch_size, batch_seed(seed, 0, k, 'val')) for k in range(n)]


def batch_seed(seed, iter_num, micro_step, split='train'):
    """The seed of one micro-batch (Data.batch): the same batches in the same order on resume."""
    return (seed * 1_000_003 + iter_num * 1009 + micro_step) * 2 + (split == 'val')


def mean_ce(model, batches, loops, chunk_size=None):
    """The model's mean cross-entropy (nats per target) over batches of (x, y, _) in eval mode:
    a text model's validation loss (train.py's text table, ablate.py on text)."""
    model.eval()
    with torch.no_grad():
        return sum(model(x, targets=y, loops=loops, chunk_size=chunk_size)[1].item() for x, y, _ in batches) / len(batches)


def prepare_data_set(folder):
    """A data set whose folder has its own prepare.py (data/reason, data/austen), made (again)
    by it unless the folder holds the current data, whole."""
    try:
        Data(folder, 1, 'cpu').check()
    except (ValueError, OSError):
        script = os.path.join(folder, 'prepare.py')
        if not os.path.isfile(script):
            raise
        spec = importlib.util.spec_from_file_location('prepare', script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main([f'--out_dir={folder}'])


# -----------------------------------------------------------------------------
# checkpoints

def strip_compile_prefix(state):
    return {k.removeprefix('_orig_mod.'): v for k, v in state.items()}


def state_dict_problem(model, state):
    """The first way `state` does not fit `model`, in words (None if it fits): load_state_dict's
    own message is many lines."""
    want = model.state_dict()
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing or extra:
        return f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} not the model's (e.g. {extra[:2]})"
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != want[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"{name} is {shape}, expected {tuple(want[name].shape)}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} holds NaN or inf"
    return None


def read_checkpoint(path, device):
    """path/ckpt.pt as train.py saved it, every field it has checked; its model_args with
    today's field names. No model is made: bench.py reads a checkpoint's shape from here."""
    file = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no ckpt.pt in {path!r}: train that phase first (e.g. python train.py --phase=loop)")
    try:
        ckpt = torch.load(file, map_location=device, weights_only=False, mmap=True)  # pages read when used
    except Exception as e:  # truncated, empty or not a checkpoint: torch.load raises many kinds
        raise ValueError(f"{file} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        raise ValueError(f"{file} is not a checkpoint of train.py: it lacks 'model' or 'model_args'")
    for key, ok, expected in (('model', lambda v: isinstance(v, dict), "a dict of tensors (a state_dict)"),
                              ('model_args', lambda v: isinstance(v, dict), 'a dict of MELTConfig fields'),
                              ('phase', lambda v: v in PHASES, f"one of {', '.join(PHASES)}"),
                              ('config', lambda v: isinstance(v, dict) and isinstance(v.get('dataset'), str),
                               "the run's settings, a dict with its 'dataset'")):
        if key in ckpt and not ok(ckpt[key]):
            raise ValueError(f"{file}: {key} is {repr(ckpt[key])[:80]}, expected {expected}")
    ckpt['model_args'] = args = renamed_fields(ckpt['model_args'])
    unknown = sorted(set(args) - {f.name for f in fields(MELTConfig)})
    if unknown:
        raise ValueError(f"{file}: model_args sets {unknown}, which are not MELTConfig fields")
    try:
        config = MELTConfig(**args)
    except ValueError as e:
        raise ValueError(f"{file}: model_args: {e}") from None
    if 'phase' in ckpt and (ckpt['phase'] == 'loop') != (config.kv_sharing == 'loop'):
        raise ValueError(f"{file} says phase {ckpt['phase']!r} but holds a kv_sharing={config.kv_sharing!r} model; "
                         f"phase 'loop' makes LoopLMs, the others MELT models")
    return ckpt


def load_checkpoint(path, device):
    """(the model of path/ckpt.pt, the checkpoint): its weights checked against its model_args."""
    ckpt = read_checkpoint(path, device)
    file = os.path.join(path, 'ckpt.pt')
    model = MELT(MELTConfig(**ckpt['model_args']))
    state = strip_compile_prefix(ckpt['model'])
    problem = state_dict_problem(model, state)
    if problem:
        raise ValueError(f"{file} does not hold a model of its own model_args: {problem}")
    model.load_state_dict(state)
    return model, ckpt


def save_checkpoint(out_dir, state):
    """torch.save to a temporary file of this run's own, then os.replace: an interrupted or
    failed save (disk full) keeps the old checkpoint and leaves no temporary file behind."""
    tmp = None
    try:
        tmp, final = write_temporary(out_dir, 'ckpt.pt', lambda f: torch.save(state, f))
        os.replace(tmp, final)
    except BaseException as e:  # Ctrl-C included
        if tmp and os.path.exists(tmp):  # written, not yet renamed
            os.unlink(tmp)
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C or SIGTERM inside torch.save: its zip
            raise e.__context__ from None                   # writer then fails on the way out
        if isinstance(e, OSError):
            raise OSError(f"could not write {out_dir}/ckpt.pt ({disk_error(e)}); the last good one is untouched") from None
        raise

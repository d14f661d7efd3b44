"""
The command line of train.py, sample.py and bench.py, in one place (nanoGPT's
configurator.py, as a module), and run_script, which every script (ablate.py and the
prepare scripts too) runs under. Options are the names at the top of the script, given as
--key=value or --key value (a bare --flag means True) and typed like their defaults; a
config file (a .py file of `key = value` lines, e.g. config/distill.py) sets some of them
first, in plain sight. Imports no torch, so a prepare script starts at once.
"""
import ast
import errno
import json
import os
import re
import signal
import sys
import tempfile
import traceback
import types

DTYPES = ('float32', 'bfloat16', 'float16')


def torch_dtype(name):
    import torch
    return getattr(torch, name)


KINDS = {int: 'an integer', float: 'a number', bool: 'True or False', str: 'a string'}


def is_int(v):
    """An int that is not a bool (JSON's and pickle's True would pass isinstance(v, int))."""
    return isinstance(v, int) and not isinstance(v, bool)


def read_text(file, what=None, remedy=None):
    """A UTF-8 text file's text; one line naming the file (or `what`) if it is missing or not
    UTF-8, and `remedy` (what to do) where one is given."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{what or file} does not exist")
    try:
        with open(file, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what or file} is not UTF-8 text (byte {e.start}: {e.reason})"
                         + (f"; {remedy}" if remedy else '')) from None


def read_json(file, remedy):
    """A JSON file's value; one line naming the file, where it breaks, and `remedy` (what to do)."""
    text = read_text(file, remedy=remedy)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg.lower()}; {remedy}") from None


def typed(key, value, default):
    """value (a string, or a config file's Python value) as the type of the default."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}={value}: expected {KINDS[type(default)]}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ValueError(f"--{key}={value!r}: expected {KINDS[type(default)]}, got {type(value).__name__}")
    return value


def read_config_file(path, defaults):
    """The `key = value` settings of a config file, each checked like a flag. A file that is
    not UTF-8, not Python, or raises is one line naming the file and the line."""
    if os.path.isdir(path):
        raise ValueError(f"config file {path!r} is a folder, expected a .py file of `key = value` lines")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        code = compile(raw.decode('utf-8-sig'), path, 'exec')  # -sig: a byte-order mark is UTF-8 too
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise ValueError(f"config file {path}, line {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except SyntaxError as e:  # a null byte has no lineno
        line = e.lineno or raw[:raw.find(b'\0')].count(b'\n') + 1
        raise ValueError(f"config file {path}, line {line}: {e.msg}, not a Python `key = value` line") from None
    settings = {}
    try:
        exec(code, {}, settings)
    except (Exception, SystemExit) as e:  # the file's own code raised: name its line, not ours
        line = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path][-1:]
        raise ValueError(f"config file {path}, line {line[0] if line else '?'}: {type(e).__name__}: {e}") from None
    # a config may import a module or define a helper for its values (nanoGPT's do): those are not settings
    settings = {k: v for k, v in settings.items() if not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    for key in settings:
        if key not in defaults:
            raise ValueError(f"{path} sets {key!r}, which is not an option; known: {', '.join(sorted(defaults))}")
    try:
        return {key: typed(key, value, defaults[key]) for key, value in settings.items()}
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None


def parse_args(argv, defaults):
    """{key: value} of what argv sets: config files (paths ending in .py) and --key=value
    flags, in order; unknown keys are an error."""
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            if not arg.endswith('.py'):
                raise ValueError(f"expected --key=value or a config file (.py), got {arg!r}")
            overrides.update(read_config_file(arg, defaults))
            i += 1
            continue
        key, eq, value = arg[2:].partition('=')
        if key not in defaults:
            raise ValueError(f"unknown option --{key}; known: {', '.join(sorted(defaults))}")
        if not eq and isinstance(defaults[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith('--')):
            value = 'True'  # a bare boolean flag
        elif not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        overrides[key] = typed(key, value, defaults[key])
        i += 1
    return overrides


def given(argv, key):
    """The value argv gives --key (its last --key=value or --key value), or None: for a script
    that hands argv on to another one, whose options it does not know."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f'--{key}='):
            value = arg.split('=', 1)[1]
        elif arg == f'--{key}' and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"--{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_device(device):
    import torch
    if not re.fullmatch(r'cpu|mps|cuda(:\d+)?', device):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"--device={device}, but this machine has no CUDA device; use --device=cpu")
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device={device}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"--device={device}, but this torch has no MPS (Apple GPU) device; use --device=cpu")


def write_temporary(out_dir, name, write):
    """write(f) into a new temporary file next to `name`; returns (temporary, final) paths."""
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, os.path.join(out_dir, name)


def write_all(out_dir, writers):
    """{name: write(f)} into out_dir, all or nothing: every file goes to a temporary name first
    and is renamed only once all are written, so a full disk, a read-only folder, Ctrl-C or
    SIGTERM leave the old files as they were and no temporary file."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file, not a folder: give a folder to write the data set in")
    written, current = [], out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name, write in writers.items():
            current = os.path.join(out_dir, name)
            written.append(write_temporary(out_dir, name, write))
    except BaseException as e:
        for tmp, _ in written:
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f"could not write {current} ({disk_error(e)}); the old files are as they were") from None
        raise
    for tmp, final in written:
        os.replace(tmp, final)


def disk_error(e):
    """An OSError from writing a file, in words: numpy's tofile says a full disk as 'N requested
    and M written', without errno."""
    if e.errno == errno.ENOSPC or 'requested and' in str(e):
        return 'disk full'
    return e.strerror or str(e)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler, or torchrun for each rank, sends), raised where the
    program is, so it unwinds as Ctrl-C does: temporary files removed, the last checkpoint whole."""


terminated = False  # a SIGTERM has arrived


def terminate(signum, frame):
    global terminated
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; a second must not interrupt the cleanup
    terminated = True
    raise Terminated


def run_script(main, errors=(ValueError, OSError, FloatingPointError)):
    """main(sys.argv[1:]) as a script: a user's mistake ends in one line and exit status 1,
    Ctrl-C in one line and 130, SIGTERM in one line and 143, never in a traceback. After a
    SIGTERM, whatever the unwinding raises (a DDP rank whose peer has gone) ends the same way."""
    signal.signal(signal.SIGTERM, terminate)
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt as e:
        stopped(e)
    except Exception as e:
        if terminated:
            stopped(Terminated())
        if isinstance(e, errors):  # OSError: missing files, full disk, read-only dirs
            sys.exit(f"error: {e}")
        raise


def stopped(e):
    what = 'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'
    print(f"\n{what}: files already written (checkpoints too) stay as they were", file=sys.stderr)
    sys.exit(143 if isinstance(e, Terminated) else 130)

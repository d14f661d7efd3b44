"""
The command line of train.py, sample.py and bench.py, in one place (nanoGPT's
configurator.py, as a module), and run_script, which every script (ablate.py too) runs under. Options are the names at the top of the script, given as
--key=value or --key value (a bare --flag means True) and typed like their defaults; a
config file (a .py file of `key = value` lines, e.g. config/distill.py) sets some of them
first, in plain sight.
"""
import ast
import os
import sys

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def typed(key, value, default):
    """value (a string, or a config file's Python value) as the type of the default."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}={value}: expected a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ValueError(f"--{key}={value!r}: expected a {type(default).__name__}, got {type(value).__name__}")
    return value


def read_config_file(path, defaults):
    """The `key = value` settings of a config file, each checked like a flag."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    settings = {}
    with open(path) as f:
        exec(f.read(), {}, settings)
    for key in settings:
        if key not in defaults:
            raise ValueError(f"{path} sets {key!r}, which is not an option; known: {', '.join(sorted(defaults))}")
    return {key: typed(key, value, defaults[key]) for key, value in settings.items()}


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


def check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"--{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_device(device):
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"--device={device}, but this machine has no CUDA device; use --device=cpu")
    if not device.startswith(('cuda', 'cpu', 'mps')):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def run_script(main):
    """main(sys.argv[1:]) as a script: a user's mistake ends in one line and exit status 1,
    Ctrl-C in one line and 130, never in a traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: missing files, full disk, read-only dirs
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted: files already written (checkpoints too) stay as they were", file=sys.stderr)
        sys.exit(130)

"""
The command line: `--key=value` overrides of a script's defaults, `--help`, the
device and the dtype, a batch's copy to the device, and how a mistake of the
user's is reported.

Every script keeps its settings in one commented dict of defaults, and
parse_args overrides them from argv. Each value is checked against the type of
its default, so a typo in a key or a value fails at once instead of silently
training the wrong model.

A mistake of the user's (a key, a value, a file, a row, a device) raises
UserError wherever the input is checked. It is a ValueError, so library
callers and tests catch it like any other; only a script's entry point,
run_script, turns it into one line `error: ...` and exit status 2. Every other
exception is a bug of ours and keeps its traceback.
"""

import ast
import inspect
import sys
import types

import torch

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")


class UserError(ValueError):
    """A mistake in the user's input; its message names the key, or the file and line, and what to do."""


def run_script(main, argv=None):
    """A script's entry point: main(argv) (default sys.argv[1:]); a UserError ends it with one line on stderr,
    `error: ...`, and exit status 2, Ctrl-C with exit status 130 (train_loop has saved a checkpoint by then)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:   # its args: what train_loop saved
        print(' '.join(['interrupted', *map(str, interrupt.args)]), file=sys.stderr)
        sys.exit(130)


def convert(key, text, default):
    """Turn the string `text` into the type of `default` (bool, int, float, str or None)."""
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise UserError(f"--{key}={text}: expected true/false/1/0")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected {type(default).__name__}") from None
    if default is None or isinstance(default, str):
        return text
    raise TypeError(f"default of {key} has unsupported type {type(default).__name__}")


def parse_args(defaults, argv=None):
    """Return a copy of `defaults` overridden by `--key=value` items of argv (default sys.argv[1:]).

    --help (or -h) prints the commented defaults (print_help) and exits with status 0.
    """
    argv = sys.argv[1:] if argv is None else argv
    if '--help' in argv or '-h' in argv:
        print_help(defaults)
        sys.exit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r}: expected --key=value (--help lists the keys)")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise UserError(f"unknown config key {key!r}; known keys: {', '.join(defaults)}")
        config[key] = convert(key, text, defaults[key])
    return config


def print_help(defaults):
    """The docstring of the module that defines the dict `defaults`, then that dict's source lines, comments and all."""
    modules = [module for module in (sys.modules['__main__'], *list(sys.modules.values()))
               if isinstance(module, types.ModuleType) and getattr(module, '__file__', None)]
    found = next(((module, name) for module in modules for name, value in list(vars(module).items())
                  if value is defaults), None)
    if found is None:  # a dict no module holds: its values alone
        print('\n'.join(f"--{key}={value}" for key, value in defaults.items()))
        return
    module, name = found
    source = inspect.getsource(module)
    block = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and any(getattr(target, 'id', None) == name for target in node.targets))
    print((module.__doc__ or '').strip() + '\n\nEvery key below is overridable as --key=value:\n')
    print('\n'.join(source.splitlines()[block.lineno - 1:block.end_lineno]))


def check_device(device):
    """A torch device string that this machine can run on ('cpu', 'cuda', 'cuda:1', 'mps'), or UserError."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device={device}: not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if parsed.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"--device={device}: expected cpu, cuda, cuda:N or mps")
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available in this torch build or on this machine; "
                        "use --device=cpu")
    if parsed.type == 'cuda' and (parsed.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"--device={device}: MPS is not available on this machine; use --device=cpu")
    return device


DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)


def torch_dtype(name, device):
    """The torch dtype of --dtype=name on `device`, or UserError. 'auto' is bfloat16 on a CUDA device that supports
    it (as in nanoGPT), float32 elsewhere, so the CPU default computes what it always has."""
    cuda_bf16 = torch.device(device).type == 'cuda' and torch.cuda.is_bf16_supported()
    if name == 'auto':
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype={name}: expected auto, float32, bfloat16 or float16")
    if name == 'bfloat16' and torch.device(device).type == 'cuda' and not cuda_bf16:
        raise UserError(f"--dtype=bfloat16: {device} does not support it; use --dtype=float16")
    return DTYPES[name]


def to_device(tensors, device):
    """A batch's tensors on `device`; on CUDA through pinned memory, so the copy does not hold up the host."""
    if torch.device(device).type == 'cuda':
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)

"""What every command line does with a mistake: one `error: ...` line on stderr, exit status 2.

    from rmoe_jax import cli
    ...
    if __name__ == "__main__":
        cli.run(main)                 # instead of absl's app.run(main)

`cli.run` parses absl flags, `--config` files and `--config.<field>=<value>` overrides
(`ml_collections.config_flags`) and turns each mistake into one line naming the flag, the file
or the field and what to do:

    error: --config.model.num_expert: no such field (did you mean --config.model.moe.num_experts?)
    error: --config configs/nope.py: no such file (/work/configs/nope.py); pass a config file ...
    error: --config.model.moe.num_experts=abc: 'abc' is not an int (the config's value: 16)
    error: unexpected argument 'extra': flags look like --name=value (--helpfull lists them)

A traceback is printed only with `--verbosity` (any value). Without `--verbosity`, logging is
set to WARNING (absl, Orbax and TensorStore log at INFO). The same messages serve argparse
commands (`python -m rmoe_jax.data.prepare --config FILE --config.data.FIELD=VALUE`) through
`load_config_file` and `apply_overrides`, which raise `CliError`.

`writable_dir_problem(path, what)` says why a directory cannot be written (a file, no
permission), for checks made before any work starts.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

EXIT_USAGE = 2


class CliError(ValueError):
    """A command-line mistake; the message is the whole `error:` line (without the prefix)."""


# -- config fields ---------------------------------------------------------------------------------

def field_paths(config, prefix: str = "") -> list[str]:
    """Every leaf field of a ConfigDict (or dict) as a dotted path, depth first."""
    out = []
    for key in config.keys():
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and callable(value.keys):
            out += field_paths(value, path + ".")
        else:
            out.append(path)
    return out


def suggest_fields(config, path: str, limit: int = 3) -> list[str]:
    """Fields of `config` that `path` (a misspelled dotted field) probably meant, best first."""
    paths = field_paths(config)
    leaf = path.rsplit(".", 1)[-1]
    scored = {}
    for candidate in paths:
        whole = difflib.SequenceMatcher(None, path, candidate).ratio()
        part = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        score = max(whole, part)
        if score >= 0.75:
            scored[candidate] = score
    best = sorted(scored, key=lambda c: -scored[c])
    return [c for c in best if scored[c] >= scored[best[0]] - 0.05][:limit]


def field_exists(config, path: str) -> bool:
    from ml_collections.config_flags import config_path

    try:
        config_path.get_value(path, config)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        return False
    return True


def unknown_field_message(config, path: str, flag: str = "--config.") -> str:
    """`--config.model.num_expert: no such field (did you mean --config.model.moe.num_experts?)`."""
    guesses = suggest_fields(config, path)
    hint = (f"did you mean {' or '.join(flag + g for g in guesses)}?" if guesses else
            "rmoe_jax/config.py lists every field")
    return f"{flag}{path}: no such field ({hint})"


def _type_name(value) -> str:
    return {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a string",
            tuple: "a tuple", list: "a list"}.get(type(value), f"a {type(value).__name__}")


def apply_overrides(config, fields: dict, flag: str = "--set ") -> Any:
    """Set dotted `fields` in `config` (in place), refusing unknown fields and wrong types.

    Raises CliError naming the field: unknown (with the closest known fields), or a value of
    another type than the config's (an int field takes ints; a float field ints or floats).
    """
    from ml_collections.config_flags import config_path

    from rmoe_jax.config import set_fields

    for path, value in fields.items():
        if not field_exists(config, path):
            raise CliError(unknown_field_message(config, path, flag))
        old = config_path.get_value(path, config)
        if old is not None and not isinstance(value, type(old)) and not (
                isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise CliError(f"{flag}{path}={value!r}: expected {_type_name(old)} like the config's "
                           f"value {old!r}, got {_type_name(value)}")
        try:
            set_fields(config, {path: value})
        except (TypeError, ValueError) as error:
            raise CliError(f"{flag}{path}={value!r}: {error}") from None
    return config


# -- config files ----------------------------------------------------------------------------------

def config_file_problem(spec: str, flag: str = "--config") -> Optional[str]:
    """Why `spec` (`path/to/config.py[:arg]`) cannot give a config, or None when it can."""
    try:
        load_config_file(spec, flag)
    except CliError as error:
        return str(error)
    return None


def load_config_file(spec: str, flag: str = "--config"):
    """`path/to/config.py[:arg]` -> the file's `get_config(arg)`; raises CliError saying why not."""
    import importlib.util

    path, _, arg = spec.partition(":")
    full = os.path.abspath(os.path.expanduser(path)) if path else ""
    if not path:
        raise CliError(f"{flag}: no config file given (e.g. {flag} configs/tiny.py)")
    if not os.path.exists(full):
        raise CliError(f"{flag} {path}: no such file ({full}); pass a config file such as "
                       "configs/tiny.py (relative to the current directory)")
    if os.path.isdir(full):
        raise CliError(f"{flag} {path}: is a directory; pass one of its .py config files")
    module_spec = importlib.util.spec_from_file_location("_rmoe_cli_config", full)
    if module_spec is None or module_spec.loader is None:
        raise CliError(f"{flag} {path}: not a Python file; pass a config file such as configs/tiny.py")
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise CliError(f"{flag} {path}: the file defines no get_config()")
        return module.get_config(arg) if arg else module.get_config()
    except CliError:
        raise
    except Exception as error:  # the file's own bug: say where, not a 40-line traceback
        _remember_traceback()
        raise CliError(f"{flag} {spec}: loading the config failed: {_one_line(error)}"
                       f"{_traceback_hint()}") from error


# -- absl commands ---------------------------------------------------------------------------------

_LAST_TRACEBACK: list[str] = []


def _remember_traceback() -> None:
    _LAST_TRACEBACK[:] = [traceback.format_exc()]


def _verbose(argv: Sequence[str]) -> bool:
    return any(re.match(r"^--?(v|verbosity)(=|$)", a) for a in argv)


def _traceback_hint() -> str:
    return "" if _verbose(sys.argv) else " (add --verbosity=1 for the traceback)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _config_flags(flag_values) -> list[str]:
    """Names of the `DEFINE_config_file` flags of `flag_values`."""
    return [name for name, f in flag_values._flags().items()  # noqa: SLF001 (absl's own registry)
            if type(f).__name__ == "_ConfigFlag" and name == f.name]


def _flag_argument(argv: Sequence[str], name: str) -> Optional[str]:
    """The value given to `--name` in argv (`--name=V` or `--name V`), or None."""
    for i, arg in enumerate(argv):
        match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if match:
            if match.group(1) is not None:
                return match.group(2)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The fields of `--name.FIELD=VALUE` / `--name.FIELD VALUE` / `--noname.FIELD` in argv."""
    out = []
    for arg in argv:
        match = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)", arg)
        if match:
            out.append(match.group(2))
    return out


def diagnose(argv: Sequence[str], flag_values) -> Optional[str]:
    """The first config-file or override mistake in `argv`, as one line; None if none found."""
    for name in _config_flags(flag_values):
        spec = _flag_argument(argv, name)
        if spec is None:
            if _overrides(argv, name):
                return f"--{name}.{_overrides(argv, name)[0]} given without --{name} FILE before it"
            continue
        try:
            config = load_config_file(spec, f"--{name}")
        except CliError as error:
            return str(error)
        for path in _overrides(argv, name):
            if not field_exists(config, path):
                return unknown_field_message(config, path, f"--{name}.")
    return None


_VALUE_ERROR = re.compile(r"^flag --(?P<flag>[^=]+)=(?P<value>.*?): (?P<why>.*)$", re.S)


def _describe_flag_error(error: Exception, argv: Sequence[str], flag_values) -> str:
    """absl's `flag --config.a.b=x: invalid literal for int()...` -> what the field takes."""
    message = str(error)
    required = re.search(r"Flag --(\S+) must have a value other than None", message)
    if required:
        example = " configs/tiny.py" if required.group(1) in _config_flags(flag_values) else "=..."
        return f"--{required.group(1)} is required (e.g. --{required.group(1)}{example})"
    match = _VALUE_ERROR.match(message)
    if match:
        flag, value = match.group("flag"), match.group("value")
        name, _, path = flag.partition(".")
        if path and name in _config_flags(flag_values):
            spec = _flag_argument(argv, name)
            try:
                config = load_config_file(spec, f"--{name}") if spec else None
                from ml_collections.config_flags import config_path

                old = config_path.get_value(path, config) if config is not None else None
            except (CliError, KeyError, AttributeError, IndexError, TypeError, ValueError):
                old = None
            if old is not None:
                return (f"--{flag}={value}: {value!r} is not {_type_name(old)} (the config's value: "
                        f"{old!r})")
        return f"--{flag}={value}: {' '.join(match.group('why').split())}"
    return " ".join(message.split())


def _fail(message: str) -> None:
    if _LAST_TRACEBACK and _verbose(sys.argv):
        sys.stderr.write(_LAST_TRACEBACK[0])
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def parse_flags(argv: Sequence[str], *, flag_values=None, positional: bool = False,
                quiet: bool = True) -> list[str]:
    """absl `flags_parser`: parse `argv`, or print one `error:` line and exit with status 2.

    positional: whether the command takes positional arguments (else they are refused).
    quiet: set logging to WARNING unless --verbosity is given.
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    argv = list(argv)
    try:
        rest = flag_values(argv)
    except SystemExit:
        raise
    except flags.Error as error:
        # A config file or an override that cannot work explains the error better than absl.
        message = diagnose(argv, flag_values) or _describe_flag_error(error, argv, flag_values)
        if isinstance(error, flags.UnrecognizedFlagError):
            message += " (--helpfull lists the flags)"
        _fail(message)
    except Exception as error:  # config_flags raises KeyError/AttributeError for unknown fields
        _remember_traceback()
        _fail(diagnose(argv, flag_values) or f"parsing the command line failed: {_one_line(error)}"
              f"{_traceback_hint()}")
    for name in _config_flags(flag_values):  # a missing config file only fails on first access
        value = flag_values[name].value
        if type(value).__name__ == "_ErrorConfig":
            spec = _flag_argument(argv, name) or ""
            _fail(config_file_problem(spec, f"--{name}") or f"--{name} {spec}: cannot be loaded")
    if not positional and len(rest) > 1:
        _fail(f"unexpected argument {rest[1]!r}: flags look like --name=value "
              "(--helpfull lists them)")
    if quiet and "verbosity" in flag_values and not flag_values["verbosity"].present:
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # absl would default to INFO after parsing
    return rest


def run(main: Callable, argv: Optional[Sequence[str]] = None, *, positional: bool = False,
        quiet: bool = True) -> None:
    """absl's `app.run(main)` with `parse_flags`: mistakes exit 2 with one line."""
    from absl import app

    app.run(main, argv=None if argv is None else list(argv),
            flags_parser=functools.partial(parse_flags, positional=positional, quiet=quiet))


def quiet_logs() -> None:
    """For argparse commands: absl/Orbax/TensorStore log lines only for errors (Orbax warns
    on every read-only restore that it skips saving)."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)


# -- paths -----------------------------------------------------------------------------------------

def writable_dir_problem(path: str, what: str, *, write: bool = True) -> Optional[str]:
    """Why the directory `path` cannot be created or written, naming `what` (a flag or field).

    write=False: only what makes it no directory at all (a file at `path` or above it).
    """
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        return (f"{what} {path}: is a file, not a directory ({full}); pass a directory (new or "
                "existing), or move the file away")
    existing = full
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return (f"{what} {path}: {existing} is a file, so the directory {full} cannot be created; "
                "pass another path")
    if not write:
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        action = "write to" if existing == full else f"create {full} in"
        return (f"{what} {path}: permission denied: cannot {action} {existing}; pass a "
                "directory you can write to")
    # os.access ignores read-only mounts and is True for root: try it (an empty folder, removed).
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rmoe_write_test_", dir=existing))
    except OSError as error:
        action = "write to" if existing == full else f"create {full} in"
        return (f"{what} {path}: cannot {action} {existing} ({error.strerror or error}); pass a "
                "directory you can write to")
    return None

"""One source for each configuration: command-line flags generated from dataclass fields, config
files (YAML, JSON, or a run folder's ``config.json``) with the command line overriding the file.

A config dataclass declares each field once, with its default and its help::

    @dataclass
    class TrainConfig:
        steps: int = arg(800, "training steps", budget=True)
        position: str = arg("suffix", "where the trigger goes", choices=("suffix", "prefix"))
        model: ModelConfig = arg(default_factory=ModelConfig, cli=False)   # not a flag

``add_dataclass_args(parser, TrainConfig)`` adds ``--steps`` and ``--position`` (types, defaults,
choices and help from the fields) and ``from_args(TrainConfig, ns)`` builds the config back from
the parsed namespace. ``parse_args(parser, argv)`` reads ``--config FILE`` first: the file's values
become the parser's defaults (checked and converted like typed flags; an unknown key is an error
that names it) and the flags given on the command line override them.

Field annotations understood: ``int``, ``float``, ``str``, ``bool`` (``--x`` / ``--no-x``),
``Optional[T]`` (the word ``none`` gives None), ``Tuple[T, ...]`` / ``List[T]`` (one or more
values), ``Tuple[T, T]`` (exactly that many). Anything else needs ``cli=False`` or an explicit
``type=`` for argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A bad configuration: an unknown key, a value of the wrong type, a value out of range."""


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    choices: Optional[Sequence] = None,
    flag: Optional[str] = None,
    metavar: Any = None,
    budget: bool = False,
    cli: bool = True,
    **argparse_kwargs,
):
    """A dataclass field with what its command-line flag needs. ``flag``: the flag's name when it
    is not ``--field-name``; ``budget``: the field is a step / epoch / round budget, which a resumed
    run may raise (see `Run.resume`); ``cli=False``: no flag (nested configs, derived values);
    further keywords go to ``argparse.add_argument`` (``type=``, ``action=``, ``nargs=``)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "metavar": metavar,
        "budget": budget,
        "cli": cli,
        "argparse": argparse_kwargs,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def budget_fields(cls) -> Tuple[str, ...]:
    """The names of the fields declared with ``budget=True``."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("budget"))


def _none_or(conv):
    def parse(s):
        if isinstance(s, str) and s.strip().lower() in ("none", "null"):
            return None
        return conv(s)

    parse.__name__ = getattr(conv, "__name__", "value")
    parse.accepts_none = True
    return parse


def _bool(s):
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


_bool.__name__ = "bool"


def _int(s):
    if isinstance(s, bool):
        raise ValueError(f"not an integer: {s!r}")
    if isinstance(s, float):
        if not s.is_integer():
            raise ValueError(f"not an integer: {s!r}")
        return int(s)
    return int(s)


_int.__name__ = "int"


def _float(s):
    if isinstance(s, bool):
        raise ValueError(f"not a number: {s!r}")
    return float(s)


_float.__name__ = "float"


def _str(s):
    return s if isinstance(s, str) else str(s)


_str.__name__ = "str"

_SCALARS = {int: _int, float: _float, str: _str, bool: _bool}


def _field_spec(f: dataclasses.Field, hint) -> Dict[str, Any]:
    """argparse keywords for one field, from its annotation."""
    optional = False
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            optional, hint, origin = True, args[0], typing.get_origin(args[0])
    kw: Dict[str, Any] = {}
    if hint in _SCALARS:
        if hint is bool and not optional:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _SCALARS[hint]
    elif origin in (tuple, list, typing.Tuple, typing.List):
        args = typing.get_args(hint)
        if origin in (list, typing.List) or (len(args) == 2 and args[1] is Ellipsis):
            elem, n = args[0] if args else str, "+"
        else:
            if len(set(args)) != 1:
                raise TypeError(f"field {f.name}: mixed tuple types {hint} need an explicit type=")
            elem, n = args[0], len(args)
        if elem not in _SCALARS:
            raise TypeError(f"field {f.name}: elements of type {elem} need an explicit type=")
        kw["type"], kw["nargs"] = _SCALARS[elem], n
    else:
        raise TypeError(f"field {f.name}: annotation {hint} has no flag; give it cli=False or an explicit type=")
    if optional and "type" in kw:
        kw["type"] = _none_or(kw["type"])
    return kw


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls,
    *,
    title: Optional[str] = None,
    exclude: Iterable[str] = (),
    defaults: Optional[Mapping[str, Any]] = None,
    help: Optional[Mapping[str, str]] = None,
) -> List[str]:
    """Add one flag per field of the dataclass ``cls`` (fields with ``cli=False`` and those in
    ``exclude`` skipped) to ``parser``, in a group titled ``title`` when given. ``defaults``
    replaces field defaults for this parser (a sub-command that trains longer by default, say);
    ``help`` replaces help texts. Returns the destinations added."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(title) if title else parser
    exclude = set(exclude)
    defaults = dict(defaults or {})
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"add_dataclass_args({cls.__name__}): defaults for unknown fields {sorted(unknown)}")
    added = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or not f.init:
            continue
        extra = dict(f.metadata.get("argparse") or {})
        kw = extra if ("type" in extra or "action" in extra) else {**_field_spec(f, hints[f.name]), **extra}
        default = defaults.get(f.name, _default_of(f))
        if isinstance(default, tuple) and kw.get("nargs") is not None:
            default = list(default)
        kw["default"] = default
        if f.metadata.get("choices") is not None:
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar") is not None:
            kw["metavar"] = f.metadata["metavar"]
        text = (help or {}).get(f.name, f.metadata.get("help", ""))
        text = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        kw["help"] = text.replace("%", "%%").replace("%%(default)s", "%(default)s")
        kw["dest"] = f.name
        target.add_argument(_flag(f), **kw)
        added.append(f.name)
    return added


def from_args(cls, ns: Any, **overrides):
    """An instance of the dataclass ``cls`` from the parsed namespace (or mapping) ``ns``: every
    field present there (lists turned back into tuples where the field is a tuple), the rest at its
    default or from ``overrides``."""
    values = ns if isinstance(ns, Mapping) else vars(ns)
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in overrides:
            kw[f.name] = overrides[f.name]
        elif f.name in values:
            v = values[f.name]
            hint = hints[f.name]
            if typing.get_origin(hint) is typing.Union:
                inner = [a for a in typing.get_args(hint) if a is not type(None)]
                hint = inner[0] if len(inner) == 1 else hint
            if isinstance(v, list) and typing.get_origin(hint) in (tuple, typing.Tuple):
                v = tuple(v)
            kw[f.name] = v
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"from_args({cls.__name__}): overrides for unknown fields {sorted(unknown)}")
    return cls(**kw)


def config_from_checkpoint(cls, values: Any, source: str, *, ignore: Iterable[str] = (), **overrides):
    """``cls(**values, **overrides)`` for the config saved in a checkpoint or run folder (keys in
    ``ignore``, derived values saved next to the fields, dropped), with a ValueError naming
    ``source`` when the fields do not fit (another method's checkpoint, or one written by an older
    version) instead of a TypeError."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: holds no {cls.__name__} (is it a checkpoint of this method?)")
    values = {k: v for k, v in values.items() if k not in set(ignore)}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{source}: not a checkpoint of this method's {cls.__name__} (unknown fields {', '.join(unknown)})"
        )
    try:
        return cls(**{**values, **overrides})
    except TypeError as e:
        raise ValueError(f"{source}: its {cls.__name__} does not fit this version ({e})")


def config_dict(cfg) -> Dict[str, Any]:
    """A dataclass config as plain JSON-able values (tuples as lists, nested dataclasses as dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# --- config files -------------------------------------------------------------------------------


def load_config_file(path: str) -> Dict[str, Any]:
    """The settings of ``path``: a YAML or JSON mapping of option names (``lr`` or ``--lr`` or
    ``batch-size``), or a run folder / its ``config.json`` (whose ``config`` entry is used)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no file {path!r}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            from pyops._optional import requires

            with requires("methods", "YAML config files"):
                import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as e:
        if isinstance(e, ImportError):
            raise
        raise ConfigError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {e}")
    except Exception as e:  # yaml.YAMLError does not derive from ValueError
        raise ConfigError(f"--config {path}: not valid YAML: {str(e).splitlines()[0]}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    if isinstance(data.get("config"), dict) and "meta" in data:  # a run folder's config.json
        data = data["config"]
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A file value checked and converted as the command line would convert it."""
    where = f"--config {path}: {key}"
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreFalseAction)
    ):
        try:
            return _bool(value)
        except ValueError:
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    conv = action.type or _str  # an untyped option takes strings on the command line
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(action, argparse._AppendAction):
        many = True

    def one(v):
        if v is None:
            if getattr(conv, "accepts_none", False):
                return None
            raise ConfigError(f"{where}: null is not allowed")
        try:
            out = conv(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {e}")
        if action.choices is not None and out not in action.choices:
            raise ConfigError(f"{where}: {out!r} is not one of {list(action.choices)}")
        return out

    if many:
        if not isinstance(value, (list, tuple)):
            value = [value]
        vals = [one(v) for v in value]
        if isinstance(action.nargs, int) and len(vals) != action.nargs:
            raise ConfigError(f"{where}: expected {action.nargs} values, got {len(vals)}")
        if action.nargs == "+" and not vals:
            raise ConfigError(f"{where}: expected at least one value")
        return vals
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected one value, got {value!r}")
    return one(value)


def _subparser(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """The sub-command parser ``argv`` selects (``parser`` itself when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for tok in argv:
                if tok in action.choices:
                    return _subparser(action.choices[tok], argv[argv.index(tok) + 1 :])[0], action.dest, tok
            return parser, None, None
    return parser, None, None


def _config_path(argv: Sequence[str]) -> Optional[str]:
    path = None
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif tok.startswith("--config="):
            path = tok.split("=", 1)[1]
    return path


def apply_config_file(parser: argparse.ArgumentParser, path: str, argv: Sequence[str] = ()) -> Dict[str, Any]:
    """Make the settings of the config file ``path`` the defaults of ``parser`` (or of the
    sub-command ``argv`` selects). Returns the settings applied."""
    target, sub_dest, sub_name = _subparser(parser, list(argv))
    data = load_config_file(path)
    actions = {a.dest: a for a in target._actions if a.dest not in (argparse.SUPPRESS, "help")}
    if sub_dest is not None and sub_dest in data:
        if data[sub_dest] != sub_name:
            raise ConfigError(f"--config {path}: written by the {data[sub_dest]!r} command, not {sub_name!r}")
        data.pop(sub_dest)
    for key in ("config", "fresh"):  # run control, never carried by a file
        data.pop(key, None)
    # a key may also be the flag's name where it differs from the field's (--image-size for the field n)
    flags = {
        o[2:].replace("-", "_"): a.dest
        for a in actions.values()
        for o in a.option_strings
        if o.startswith("--") and not (isinstance(a, argparse.BooleanOptionalAction) and o.startswith("--no-"))
    }
    data = {k if k in actions else flags.get(k, k): v for k, v in data.items()}
    unknown = sorted(k.replace("_", "-") for k in data if k not in actions)
    if unknown:
        known = ", ".join(sorted(k.replace("_", "-") for k in actions if k not in ("config", "fresh")))
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)} (known: {known})")
    values = {k: _coerce(actions[k], k, v, path) for k, v in data.items()}
    for k in values:
        actions[k].required = False  # given by the file; the command line may still override it
    target.set_defaults(**values)
    return values


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _given(action: argparse.Action, argv: Sequence[str]) -> bool:
    return any(tok in action.option_strings or tok.split("=", 1)[0] in action.option_strings for tok in argv)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` after ``--config FILE`` (when present) set the defaults: the
    precedence is field default < config file < command line. A bad file is a usage error.

    Abbreviated long options are turned off (``--conf x`` would otherwise be taken for ``--config``
    without the file being read), and an option that collects values (``action="append"``) given on
    the command line replaces the file's values instead of adding to them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for p in _parsers(parser):
        p.allow_abbrev = False
    path = _config_path(argv)
    from_file: Dict[str, Any] = {}
    target = parser
    if path is not None:
        target, _, _ = _subparser(parser, argv)
        try:
            from_file = apply_config_file(parser, path, argv)
        except ConfigError as e:
            target.error(str(e))
    ns = parser.parse_args(argv)
    for action in target._actions:
        if isinstance(action, argparse._AppendAction) and action.dest in from_file and _given(action, argv):
            values = getattr(ns, action.dest)
            setattr(ns, action.dest, values[len(from_file[action.dest]) :])
    return ns


def run_options(ns: Any) -> Dict[str, Any]:
    """The parsed options a run folder's ``config.json`` records: everything but ``--config`` and
    ``--fresh`` (so that ``--config <run folder>`` repeats the run)."""
    values = ns if isinstance(ns, Mapping) else vars(ns)
    return {k: v for k, v in values.items() if k not in ("config", "fresh") and not callable(v)}


__all__ = [
    "ConfigError",
    "add_dataclass_args",
    "apply_config_file",
    "arg",
    "budget_fields",
    "config_dict",
    "config_from_checkpoint",
    "from_args",
    "load_config_file",
    "parse_args",
    "run_options",
]

"""The options engine: JSON with `//` comments, `--set` overrides, validation against a schema.

This module owns how any option file is read and checked, whatever its schema:
- `parse_json_with_comments` reads KAIR-style JSON (`//` comments outside strings, no `eval`);
- `apply_overrides` applies `--set dotted.key=value` pairs (values parsed with `json.loads`,
  falling back to the plain string);
- `resolve` checks a raw dict against a schema of `Section`s and `Key`s (unknown keys name the
  dotted path and the nearest valid key, wrong types, out-of-range values, names outside a
  registry) and fills missing optional keys with their defaults;
- `read_option_file` and `origin_namer` tie errors to the file (or `--set`) and the dotted key;
- `reference_markdown` prints a schema as the Markdown table of the docs.
Every error is a one-line `UserError`. What the keys of a training run are and mean (the
schema itself and the checks across keys) lives with the training runner:
`runners/train_options.py`.
"""
import copy
import difflib
import json
import math
from typing import NamedTuple

from utils.errors import UserError

__all__ = ["Key", "Section", "REQUIRED", "all_paths", "parse_json_with_comments",
           "parse_override", "apply_overrides", "resolve", "origin_namer", "read_option_file",
           "reference_markdown"]


class _Required:
    def __repr__(self):
        return "required"


REQUIRED = _Required()


class Key(NamedTuple):
    """One option: its type, default (or REQUIRED), allowed values and meaning.

    `kind` is one of str, int, float, bool, list_int, list_float, list_str. `minimum` and
    `choices` apply to scalars and to list elements; `exclusive_min` makes it strict.
    `registry` names what `choices` are (a
    "dataset type"): a value outside them is then "unknown", with the closest name suggested.
    """
    kind: str
    default: object = REQUIRED
    doc: str = ""
    choices: tuple = None
    nullable: bool = False
    minimum: float = None
    maximum: float = None
    exclusive_min: bool = False
    length: int = None
    registry: str = None


class Section(NamedTuple):
    """A nested object of options; an optional section may be left out entirely."""
    keys: dict
    doc: str = ""
    optional: bool = False


def parse_json_with_comments(text, source="options"):
    """Parse JSON where `//` starts a comment outside strings; duplicate keys are errors."""
    out, i, n, in_string = [], 0, len(text), False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))  # keep columns so decode errors point at the right place
            i = end
            continue
        else:
            out.append(ch)
        i += 1

    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise UserError(f"{source}: key {key!r} appears twice in the same object")
            seen[key] = value
        return seen

    try:
        return json.loads("".join(out), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno} "
                        f"({exc.msg})") from None


def parse_override(text):
    """`dotted.key=value` -> (['dotted', 'key'], value); the value is JSON or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(opt, overrides):
    """Apply `--set` strings to a raw options dict; returns the dotted keys that were set."""
    touched = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = opt
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
                touched.add(".".join(parts[:depth + 1]))  # created here: errors name --set
            if not isinstance(node[part], dict):
                raise UserError(f"--set {text!r}: {'.'.join(parts[:depth + 1])} is not an object")
            node = node[part]
        node[parts[-1]] = value
        touched.add(".".join(parts))
    return touched


def all_paths(section, prefix=""):
    """Yield `(dotted path, Key or Section)` for every entry of `section`, depth first."""
    for name, spec in section.keys.items():
        path = f"{prefix}{name}"
        yield path, spec
        if isinstance(spec, Section):
            yield from all_paths(spec, path + ".")


def _suggest(name, section, prefix, schema):
    """The likeliest key meant: the same name in another section (a misplaced key), else the
    closest name in this section, else the closest name anywhere in `schema`."""
    leaves = [(path, path.rsplit(".", 1)[-1]) for path, _ in all_paths(schema)]
    misplaced = [path for path, leaf in leaves if leaf == name]
    if misplaced:
        return f"did you mean {misplaced[0]!r}?"
    close = difflib.get_close_matches(name, list(section.keys), n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    score, path = max((difflib.SequenceMatcher(None, name, leaf).ratio(), path)
                      for path, leaf in leaves)
    if score >= 0.8:
        return f"did you mean {path!r}?"
    return "valid keys here: " + ", ".join(prefix + k for k in section.keys)


def _type_name(spec):
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list_int": "a list of integers", "list_float": "a list of numbers",
             "list_str": "a list of strings"}
    text = names[spec.kind]
    if spec.length:
        text = text.replace("a list", f"a list of {spec.length}").replace(" of integers",
                                                                          " integers")
        text = text.replace(" of numbers", " numbers")
    return text + (" or null" if spec.nullable else "")


def _check_number(value, spec, where):
    if not math.isfinite(value):  # JSON's NaN and Infinity, which Python's parser accepts
        raise UserError(f"{where}: must be a finite number, got {value}")
    if spec.minimum is not None:
        if value < spec.minimum or (spec.exclusive_min and value == spec.minimum):
            bound = f"> {spec.minimum}" if spec.exclusive_min else f">= {spec.minimum}"
            raise UserError(f"{where}: must be {bound}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise UserError(f"{where}: must be <= {spec.maximum}, got {value}")


def _check_scalar(value, kind, where, spec):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int" and is_int:
        _check_number(value, spec, where)
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        _check_number(value, spec, where)
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")


def _check_value(value, spec, where):
    if value is None:
        if spec.nullable:
            return None
        raise UserError(f"{where}: expected {_type_name(spec)}, got null")
    if spec.kind.startswith("list_"):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")
        if spec.length is not None and len(value) != spec.length:
            raise UserError(f"{where}: expected {_type_name(spec)}, got {json.dumps(value)}")
        item_kind = spec.kind[len("list_"):]
        return [_check_choice(_check_scalar(v, item_kind, f"{where}[{i}]", spec), spec,
                              f"{where}[{i}]") for i, v in enumerate(value)]
    return _check_choice(_check_scalar(value, spec.kind, where, spec), spec, where)


def _check_choice(value, spec, where):
    if spec.choices is not None and value not in spec.choices:
        if spec.registry:
            close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1,
                                              cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{where}: unknown {spec.registry} {value!r}; {hint}known: "
                            f"{', '.join(spec.choices)}")
        choices = ", ".join(json.dumps(c) for c in spec.choices)
        raise UserError(f"{where}: {json.dumps(value)} is not one of {choices}")
    return value


def _validate_section(raw, section, prefix, origin, schema, errors):
    """The resolved section; each problem found is appended to `errors`, and the check goes on."""
    if not isinstance(raw, dict):
        where = origin(prefix.rstrip(".")) if prefix else origin("")
        errors.append(f"{where}: expected an object, got {json.dumps(raw)[:60]}")
        return None
    for name in raw:
        if name not in section.keys:
            path = prefix + name
            errors.append(f"{origin(path)}: unknown key {path!r}; "
                          f"{_suggest(name, section, prefix, schema)}")
    resolved = {}
    for name, spec in section.keys.items():
        path = prefix + name
        if isinstance(spec, Section):
            if name not in raw or raw[name] is None:
                if spec.optional:
                    resolved[name] = None
                    continue
                raw_sub = {}
            else:
                raw_sub = raw[name]
            resolved[name] = _validate_section(raw_sub, spec, path + ".", origin, schema, errors)
        elif name in raw:
            try:
                resolved[name] = _check_value(raw[name], spec, origin(path))
            except UserError as exc:
                errors.append(str(exc))
        elif spec.default is REQUIRED:
            errors.append(f"{origin(path)}: missing required key {path!r} ({spec.doc})")
        else:
            resolved[name] = copy.deepcopy(spec.default)
    return resolved


def resolve(raw, schema, origin):
    """A checked copy of `raw` with every default of `schema` filled in, or one UserError with
    every problem found, one line each, each starting with `origin(dotted key)` (see
    `origin_namer`)."""
    errors = []
    resolved = _validate_section(raw, schema, "", origin, schema, errors)
    if errors:
        raise UserError("\n".join(errors))
    return resolved


def origin_namer(source, overridden=()):
    """The function that names where a dotted key came from in errors: `--set key` for the
    keys `--set` gave (and what lies below them), else `source: key`."""
    overridden = set(overridden)

    def origin(path):
        if path in overridden or any(path.startswith(k + ".") for k in overridden):
            return f"--set {path}"
        return f"{source}: {path}" if path else source
    return origin


def read_option_file(path, overrides=()):
    """`(raw dict, dotted keys set by overrides)` of an option file with `--set` applied."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read option file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    raw = parse_json_with_comments(text, source=path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return raw, apply_overrides(raw, overrides)


def reference_markdown(schema):
    """`schema` as a Markdown table (dotted key, type, default, meaning)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, spec in all_paths(schema):
        if isinstance(spec, Section):
            if spec.doc:
                lines.append(f"| `{path}` | object | {'optional' if spec.optional else ''} | "
                             f"{spec.doc.replace('|', chr(92) + '|')} |")
            continue
        if spec.choices is not None:
            kind = " \\| ".join(json.dumps(c) for c in spec.choices)
        else:
            kind = _type_name(spec)
        default = "required" if spec.default is REQUIRED else f"`{json.dumps(spec.default)}`"
        doc = spec.doc.replace("|", "\\|")
        lines.append(f"| `{path}` | {kind} | {default} | {doc} |")
    return "\n".join(lines)

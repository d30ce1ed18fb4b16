"""Errors a run reports in one message, without a traceback (``sg2img`` prints them and exits with 2)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigurationError(ValueError):
    """Settings that cannot work together (the graph branch on data without graphs, token widths that do not
    match the UNet, an image branch without an image encoder), found at start-up, before any training."""


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss under ``model.nonfinite_loss: stop``: the run ends before the batch changes a weight,
    so the checkpoints and the exported file on disk are the last good ones."""


def _config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a parsed YAML mapping (``{"a": {"b": 1}}`` -> ``["a", "a.b"]``)."""
    if not isinstance(node, dict):
        return []
    keys = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        keys += [key, *_config_keys(v, key + ".")]
    return keys


def _parser_keys(parser: Any) -> list[str]:
    """The dotted settings a (sub)command parser accepts, as ``model.optimizer.lr``."""
    return [a.dest for a in parser._actions if a.dest and a.dest not in ("help", "config", "==SUPPRESS==")]


def _value_error(message: str) -> str:
    """jsonargparse's account of a bad value, in one line: 'Parser key "k":' and the reason below it become
    'k: reason'."""
    lines = [ln.strip().lstrip("- ").strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    key = re.fullmatch(r'Parser key "([^"]+)":', lines[0])
    if key is None or len(lines) < 2:
        return lines[0]
    reason = re.sub(
        r"^Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", r"expected one of \1; got \2", lines[1]
    )
    return f"{key[1]}: {reason[:1].lower()}{reason[1:]}"


def describe_parse_error(message: str, parser: Any, args: Sequence[str], command: str = "") -> str:
    """One line for a command-line or config mistake: the setting, the config file that holds it, and the
    nearest setting the command accepts (``optimiser`` -> ``optimizer``). ``command``: the command's words
    (default: the first of ``args``)."""
    match = (
        re.search(r"does not accept option '([^']+)'", message)
        or re.search(r"Option '([^']+)' is not accepted", message)
        or re.search(r"unrecognized arguments: --([\w.\-]+)", message)
    )
    if match is None:
        return _value_error(message)
    key = match[1]
    where = "on the command line"
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    for name in files:
        try:
            data = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if key in _config_keys(data):
            where = f"in {name}"
    near = difflib.get_close_matches(key, _parser_keys(parser), n=1, cutoff=0.6)
    command = command or (args[0] if args else "fit")
    hint = f"; did you mean {near[0]}?" if near else f"; see `sg2img {command} --help`"
    return f"unknown setting {key} {where}{hint}"

"""Upstream builds `--schedule-policy`, `--load-balance-method`, ... with fixed argparse `choices`
(sglang/srt/arg_groups/fields/*.py). Plugins load in the launcher before `prepare_server_args` parses argv, so a
hook after `ServerArgs.add_cli_args` can extend the built action; each tier's hook calls this one helper."""
from __future__ import annotations


def add_choice(parser, dest: str, value: str) -> None:
    for action in parser._actions:
        if action.dest == dest and action.choices is not None and value not in action.choices:
            action.choices = list(action.choices) + [value]

"""Every command and option explains itself, with its default, in the user's words; the names
offered by ``--help`` are those of ``anomalens list`` and of the registries."""

from __future__ import annotations

import argparse
import re

import pytest

from anomalens.cli import _names
from anomalens.cli.main import build_parser, main

#: words of the team, not of the user (paths of the team's machines, issue numbers, ...)
JARGON = re.compile(r"\.\./shared|/work/|\bshared/|\bissue \d|\bteam\b|TODO|XXX", re.IGNORECASE)


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub-)parser with its command path, depth first."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"command {' '.join((*path, name))} has no help line"
                out += _parsers(sub, (*path, name))
    return out


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as printed (with the formatter's appended default)."""
    return parser._get_formatter()._expand_help(action)


ALL = _parsers(build_parser())


def test_the_walk_reaches_every_command():
    names = {" ".join(p) for p, _ in ALL}
    for cmd in ("predict", "fit", "benchmark", "synth", "demo", "list", "train", "serve"):
        assert cmd in names
    assert {"weights list", "weights download", "weights pack", "weights unpack"} <= names


@pytest.mark.parametrize("path, parser", ALL, ids=[" ".join(p) or "anomalens" for p, _ in ALL])
def test_every_option_has_help_with_its_default(path, parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = _help_of(parser, action)
        assert text and text.strip(), f"{' '.join(path)} {name}: no help text"
        assert not JARGON.search(text), f"{' '.join(path)} {name}: internal wording: {text!r}"
        takes_value = action.nargs != 0
        if action.option_strings and takes_value and not action.required:
            assert "default" in text.lower(), f"{' '.join(path)} {name}: help names no default"
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert "default" in text.lower(), f"{' '.join(path)} {name}: default not shown"


@pytest.mark.parametrize("path, parser", ALL, ids=[" ".join(p) or "anomalens" for p, _ in ALL])
def test_descriptions_are_free_of_internal_wording(path, parser):
    for text in (parser.description or "", parser.epilog or "", parser.format_help()):
        assert not JARGON.search(text), f"{' '.join(path)}: {JARGON.search(text)}"


def test_defaults_are_printed_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0 1 2 4)" in out and "(default: 10 20 30)" in out
    assert "(default: without_replacement)" in out and "(default: exact)" in out


def test_method_names_in_help_are_those_of_list(capsys):
    parser = dict(ALL)[("predict",)]
    method = next(a for a in parser._actions if a.dest == "method")
    in_help = re.findall(r"[a-z_]+", method.help.split(":", 1)[1].split("(")[0])
    assert tuple(in_help) == _names.METHODS
    assert main(["list", "methods"]) == 0
    listed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[1:]]
    assert set(_names.METHODS) <= set(listed)  # the test suite registers toy detectors too


def test_dataset_choices_are_those_of_list(capsys):
    bench = dict(ALL)[("benchmark",)]
    dataset = next(a for a in bench._actions if a.dest == "dataset")
    assert main(["list", "datasets"]) == 0
    listed = [ln.strip() for ln in capsys.readouterr().out.splitlines()[1:]]
    assert list(dataset.choices) == listed


def test_names_match_the_registries():
    """cli/_names.py mirrors the registries without importing torch; keep them equal."""
    from anomalens.data.registry import list_datasets
    from anomalens.data.sampling import SHOT_RULES
    from anomalens.registry import _DETECTOR_MODULES, _REGISTRY, list_detectors

    list_detectors()  # loads the built-in modules
    builtin = sorted(n for n, cls in _REGISTRY.items() if cls.__module__ in _DETECTOR_MODULES)
    assert list(_names.METHODS) == builtin
    assert list(_names.DATASETS) == list_datasets()
    assert _names.SHOT_RULES == SHOT_RULES
    from anomalens.training import cli as train_cli

    assert set(train_cli.DATASETS) <= set(list_datasets())
    assert set(train_cli.METHODS) <= set(builtin)

"""scalellm's pytest options, known to pytest wherever a path option points (pytest-dev/pytest#8846).

pytest picks its rootdir and config file (``_pytest.config.findpaths.determine_setup``) from the
command line's free arguments before any plugin or conftest has added its options. Until then it
reads ``--baseline-dir /tmp/b`` as an unknown flag followed by a path to test, ``/tmp/b``. When
that path exists outside the checkout, pytest looks for a config file from there, finds none and
makes ``/tmp/b`` the rootdir: ``pyproject.toml`` is never read (no ``addopts``, markers or
``testpaths``), the root ``conftest.py`` is never loaded, and the run stops with ``unrecognized
arguments: --baseline-dir`` (pytest-dev/pytest#8846, pytest-dev/pytest#13368). Written
``--baseline-dir=/tmp/b`` the path is never free, and all is well.

This module is the ``pytest11`` entry point of the installed distribution (``pip install -e .``;
tox installs the project that way). pytest loads entry points after it has picked the rootdir and
before it loads any conftest, the earliest a plugin can act. Here the module

1. registers the options, so that they parse wherever the rootdir landed;
2. asks pytest's own ``determine_setup`` which rootdir and config file the command line gives once
   these options are known, before anything is collected or printed (outermost around
   ``pytest_load_initial_conftests``: the capture plugin has not yet taken the terminal). When the
   answer differs from the one pytest acted on, the same command runs again in this process
   (``os.execve``) with these options written ``--opt=PATH``: that run reads ``pyproject.toml``,
   loads the root conftest, and its node ids, the keys of the baseline store, are relative to the
   checkout as usual. The rewritten command has no ``--opt PATH`` left, so it never runs again.

Only the process's own command line can be run again (the arguments pytest parses are
``sys.argv[1:]``); a run started with other arguments (``pytest.main([...])``, pytester's in-process
runs) stops with a usage error that says to write ``--opt=PATH``.

The root ``conftest.py`` names this module in ``pytest_plugins`` too, for a checkout that is not
installed (the options then work in ``--opt=PATH`` form or with paths inside the checkout); pytest
registers a module once, under the entry point's name, which is the module's name.
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest

#: (flag, keyword arguments of ``addoption``).
OPTIONS = (
    ("--update-baselines", dict(action="store_true",
                                help="store the figures of passing tests as the new baselines (atomic; "
                                     "never on an interrupted run)")),
    ("--update-levels", dict(default="class,kind,any", metavar="LEVELS",
                             help="with --update-baselines: write only figures of these scopes (comma list of "
                                  "class, kind, any); the others are still checked")),
    ("--baseline-dir", dict(default=None, metavar="PATH",
                            help="baseline store to compare with (default: the checkout's baselines/)")),
    ("--require-device", dict(action="store_true",
                              help="an absent device is an error, not a skip (for GPU boxes, where it is "
                                   "a fault)")),
    ("--report-dir", dict(default=None, metavar="DIR",
                          help="write results.json and summary.md of this run into DIR")),
    ("--model", dict(default=None, metavar="PATH", dest="model_path",
                     help="run the real-model checks on this local HF checkpoint instead of SmolLM2")),
)
#: The flags that take a value (all of them paths): the value pytest reads as a test path until it knows them.
PATH_OPTIONS = tuple(flag for flag, kwargs in OPTIONS if kwargs.get("action", "store") == "store")


def pytest_addoption(parser):
    group = parser.getgroup("scalellm")
    for flag, kwargs in OPTIONS:
        group.addoption(flag, **kwargs)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config, parser):
    spaced = spaced_paths(env_addopts() + list(early_config.invocation_params.args))
    if spaced and setup_misread(early_config, parser):
        rerun(early_config, spaced)
    return (yield)


def spaced_paths(args: list[str]) -> list[tuple[str, str]]:
    """The ``(flag, path)`` pairs of ``args`` written ``--opt PATH``, up to a ``--``."""
    return _scan(args)[1]


def joined(args: list[str]) -> list[str]:
    """``args`` with every ``--opt PATH`` written ``--opt=PATH``, the form pytest cannot misread."""
    return _scan(args)[0]


def _scan(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    out, pairs, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:], pairs
        # A value that starts with "-" is no path to pytest either (findpaths.get_dirs_from_args).
        if arg in PATH_OPTIONS and i + 1 < len(args) and not args[i + 1].startswith("-"):
            pairs.append((arg, args[i + 1]))
            out.append(f"{arg}={args[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out, pairs


def env_addopts() -> list[str]:
    return shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))


def setup_misread(config: pytest.Config, parser: pytest.Parser) -> bool:
    """Whether the rootdir and config file pytest acted on are not those of this command line, read
    with these options known (pytest's own ``determine_setup``, given what ``Config.parse`` gives it)."""
    from _pytest.config.findpaths import determine_setup

    ns = parser.parse_known_args(env_addopts() + list(config.invocation_params.args))
    rootpath, inipath, _, _ = determine_setup(
        inifile=ns.inifilename, override_ini=ns.override_ini, args=ns.file_or_dir,
        rootdir_cmd_arg=ns.rootdir or None, invocation_dir=config.invocation_params.dir)
    return (rootpath, inipath) != (config.rootpath, config.inipath)


def rerun(config: pytest.Config, spaced: list[tuple[str, str]]) -> None:
    """Run this command again with its path options written ``--opt=PATH``; never returns."""
    args = list(config.invocation_params.args)
    own = list(getattr(sys, "orig_argv", []))  # the interpreter's whole command line (Python >= 3.10)
    start = len(own) - len(args)
    if args != sys.argv[1:] or start < 1 or own[start:] != args:
        written = " ".join(f"{flag}={path}" for flag, path in spaced)
        raise pytest.UsageError(
            f"pytest took the path after {' and '.join(f for f, _ in spaced)} for a test path and chose "
            f"its rootdir ({config.rootpath}) from it (pytest-dev/pytest#8846); this run cannot be "
            f"started again from its own command line: write {written}")
    env = dict(os.environ)
    if "PYTEST_ADDOPTS" in env:
        env["PYTEST_ADDOPTS"] = shlex.join(joined(env_addopts()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, own[:start] + joined(args), env)

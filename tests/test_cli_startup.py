"""Start-up and shell integration: the package and the CLI import without torch; click's
completion hook answers for bash, zsh and fish."""
from __future__ import annotations

import subprocess
import sys

import pytest

from loratools.cli.main import COMMANDS, SUMMARIES, LazyGroup, cli, main


def _run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_and_help_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "import loratools, loratools.cli.main as m\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert m.main(['--help']) == 0 and m.main(['--version']) == 0\n"
            "assert 'Commands:' in out.getvalue() and '0.1.0' in out.getvalue()\n"
            "print('torch' in sys.modules)\n")
    assert _run_python(code) == "False"


def test_api_loads_on_first_use_and_functions_are_not_submodules():
    code = ("import sys, loratools, loratools.blending, loratools.merging\n"
            "print(callable(loratools.merge), callable(loratools.blend), callable(loratools.resize),"
            " callable(loratools.extract), 'torch' in sys.modules)\n")
    assert _run_python(code) == "True True True True True"


def test_unknown_attribute_is_an_attribute_error():
    import loratools

    with pytest.raises(AttributeError, match="no_such_thing"):
        loratools.no_such_thing  # noqa: B018


def test_help_lists_every_command_with_its_summary(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(SUMMARIES) == set(COMMANDS)
    for name in COMMANDS:
        assert f"{name}  " in out and SUMMARIES[name].split()[0] in out
    assert isinstance(cli, LazyGroup)


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef loratools"),
                                           ("fish", "complete --no-files --command loratools")])
def test_completion_scripts(monkeypatch, capsys, shell, marker):
    monkeypatch.setenv("_LORATOOLS_COMPLETE", f"{shell}_source")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert marker in out and f"_LORATOOLS_COMPLETE={shell}_complete" in out


def test_bash_completes_commands_and_options(monkeypatch, capsys):
    monkeypatch.setenv("_LORATOOLS_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", "loratools re")
    monkeypatch.setenv("COMP_CWORD", "1")
    assert main([]) == 0
    assert capsys.readouterr().out.split() == ["plain,resize"]
    monkeypatch.setenv("COMP_WORDS", "loratools merge --dr")
    monkeypatch.setenv("COMP_CWORD", "2")
    assert main([]) == 0
    assert capsys.readouterr().out.split() == ["plain,--dry-run"]


def test_unknown_shell_fails(monkeypatch, capsys):
    monkeypatch.setenv("_LORATOOLS_COMPLETE", "tcsh_source")
    assert main([]) == 1
    assert "use bash_source, zsh_source or fish_source" in capsys.readouterr().err

"""`tl-codebook`: a user error in any subcommand is one line on stderr and exit code 2."""

import argparse

import pytest

from tl_codebook import cli


def _add_failing(error: BaseException):
    def setup(parser: argparse.ArgumentParser) -> None:
        def fail(args: argparse.Namespace) -> int:
            raise error

        parser.set_defaults(func=fail)

    return setup


@pytest.fixture
def failing_command(monkeypatch):
    def install(error: BaseException) -> None:
        monkeypatch.setitem(cli.SUBCOMMANDS, "boom", ("fails", _add_failing(error)))

    return install


@pytest.mark.parametrize(
    "error, line",
    [
        (
            ValueError("bad --k 0:\n  must be >= 1"),
            "tl-codebook boom: error: bad --k 0: must be >= 1",
        ),
        (FileNotFoundError("no file x.json"), "tl-codebook boom: error: no file x.json"),
        (KeyError("unknown hook 'h'"), "tl-codebook boom: error: unknown hook 'h'"),
        (TypeError(), "tl-codebook boom: error: TypeError"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(failing_command, capsys, error, line):
    failing_command(error)
    assert cli.main(["boom"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [line]
    assert "Traceback" not in captured.err


def test_traceback_flag_re_raises(failing_command):
    failing_command(ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        cli.main(["--traceback", "boom"])


def test_a_bug_that_is_not_a_user_error_is_not_hidden(failing_command):
    failing_command(ZeroDivisionError("bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])

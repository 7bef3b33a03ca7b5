"""``kat-timm`` itself (kat_timm/cli/__init__.py): dispatch, usage, and what a mistyped subcommand gets."""
import pytest

from kat_timm import cli


@pytest.mark.parametrize("typed, meant", [("predcit", "predict"), ("downlod", "download"), ("exprt", "export"),
                                          ("vaildate", "validate")])
def test_mistyped_subcommand_gets_did_you_mean(typed, meant, capsys):
    assert cli.main([typed, "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kat-timm: error: unknown command {typed!r}; did you mean {meant!r}? choose from demo, ")
    assert len(err.splitlines()) == 1


def test_unrelated_word_gets_no_guess(capsys):
    assert cli.main(["zzzzzz"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'zzzzzz'; choose from demo, info" in err and "did you mean" not in err


def test_no_command_prints_usage_with_every_subcommand(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(f"  {name}" in err for name in cli.SUBCOMMANDS)

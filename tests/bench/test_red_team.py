"""Every bad input of bench.red_team ends in a non-zero exit naming the file, nothing lost."""

from __future__ import annotations

from bench import red_team


def test_every_bad_input_is_refused_cleanly(capsys):
    assert red_team.main([]) == 0
    printed = capsys.readouterr().out
    assert f"{len(red_team.scenarios())} of {len(red_team.scenarios())} end in" in printed
    assert "**no**" not in printed and "TRACEBACK" not in printed

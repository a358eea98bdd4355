"""bench/pooled_curve.py: a site it does not know is refused before any training."""

from __future__ import annotations

import pytest

from bench.pooled_curve import main


@pytest.mark.parametrize("sites", ["CX", ""])
def test_an_unknown_site_is_refused_with_the_flag_named(
        sites: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--sites", sites])
    assert exit_info.value.code == 2
    assert "--sites takes letters of ABCD" in capsys.readouterr().err

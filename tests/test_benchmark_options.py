"""Option parsing of the benchmark scripts: a mistyped option is a one-line argparse error, not a traceback."""
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("real_vit", Path(__file__).parents[1] / "benchmarks" / "real_vit.py")
real_vit = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(real_vit)


def test_a_variant_name_may_contain_an_equals_sign():
    assert real_vit._parse_variant('recovery_tflops=13.2={"recovery_tflops": 13.2}') == \
        ("recovery_tflops=13.2", {"recovery_tflops": 13.2})
    assert real_vit._parse_variant('no block recovery={"block_recovery": false}') == \
        ("no block recovery", {"block_recovery": False})


@pytest.mark.parametrize("text, message", [
    ("recovery=13", "expected NAME="),
    ('={"recovery_tflops": 1}', "expected NAME="),
    ('big={"recovery_tflops": 1', "not valid JSON"),
])
def test_a_malformed_variant_is_a_clear_error(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        real_vit.main(["--variant", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

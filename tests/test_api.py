"""The Python API under the command lines (m3_convert.convert, m3_verify.verify): the same outputs, typed errors."""
import pytest

from conftest import FIXTURES, run_convert
from m3_convert.errors import EXIT_INPUT, EXIT_USAGE, M3Error


def test_convert_writes_what_the_cli_writes(tmp_path):
    from m3_convert import convert
    res = convert(FIXTURES / "ar_model_naming", tmp_path / "api", max_shard_size="1MB")
    assert run_convert(FIXTURES / "ar_model_naming", tmp_path / "cli", "--max-shard-size", "1MB", "--quiet").exit_code == 0
    assert (tmp_path / "api" / "SHA256SUMS").read_bytes() == (tmp_path / "cli" / "SHA256SUMS").read_bytes()
    assert not res.dry_run and res.files == len((tmp_path / "api" / "SHA256SUMS").read_text().splitlines())
    assert res.written_shards and res.reused_shards == [] and not res.resumed
    assert res.stats["bits_histogram"] and res.stats["output_bytes"] > 0


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path):
    from m3_convert import convert
    res = convert(FIXTURES / "ar_model_naming", tmp_path / "never", dry_run=True)
    assert res.dry_run and not (tmp_path / "never").exists() and res.files == 0
    assert res.stats["gpu_weight_bytes"]["native"] > 0 and res.plan.shards


@pytest.mark.parametrize("kw, code, text", [
    ({"keep_mtp": True}, EXIT_USAGE, "--keep-mtp needs --keep-vision"),
    ({"stock_min_bits": 4}, EXIT_USAGE, "--stock-min-bits needs --target stock-vllm"),
    ({"target": "nope"}, EXIT_USAGE, "unknown target"),
    ({"max_shard_size": "5 parsecs"}, EXIT_USAGE, "is not a size"),
])
def test_option_errors_are_typed_with_their_exit_code(tmp_path, kw, code, text):
    from m3_convert import convert
    with pytest.raises(M3Error, match=text) as e:
        convert(FIXTURES / "ar_model_naming", tmp_path / "o", **kw)
    assert e.value.exit_code == code and not (tmp_path / "o").exists()


def test_a_missing_input_is_an_input_error(tmp_path):
    from m3_convert import convert
    with pytest.raises(M3Error, match="IN_DIR does not exist") as e:
        convert(tmp_path / "missing", tmp_path / "o")
    assert e.value.exit_code == EXIT_INPUT


def test_verify_reports_findings(converted, tmp_path):
    import shutil

    from m3_verify import verify
    rep = verify(converted["ar_model_naming"], against=FIXTURES / "ar_model_naming")
    assert rep.ok and set(rep.seconds) == {"integrity", "structure", "against"}
    bad = tmp_path / "bad"
    shutil.copytree(converted["ar_model_naming"], bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace('"bits"', '"bitz"', 1))
    rep = verify(bad)
    assert not rep.ok and any(f.file == "config.json" for f in rep.findings)

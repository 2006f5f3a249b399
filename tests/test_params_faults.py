"""params.yaml faults that used to be lost or silently wrong (issue 16): duplicate keys,
non-UTF-8 bytes, unreadable paths, YAML 1.1 floats such as 1e-3, and an empty sweep key."""
import re
from pathlib import Path

import pytest
import yaml

from effdetr.cli import main
from effdetr.config import ConfigError, experiment_config, load_params, read_yaml
from tests.conftest import REPO, TINY


def _tiny_with(tmp_path, old: str, new: str) -> Path:
    """A copy of the tiny params with one exact text edit (kept as text: line numbers matter)."""
    text = TINY.read_text()
    assert text.count(old) == 1, old
    f = tmp_path / "params.yaml"
    f.write_text(text.replace(old, new))
    return f


def _line(f: Path, start: str, nth: int = 0) -> int:
    """1-based number of the nth line that starts with ``start``."""
    return [i for i, line in enumerate(f.read_text().splitlines(), 1) if line.startswith(start)][nth]


# --- 4. duplicate keys -------------------------------------------------------------------
def test_duplicate_key_in_block_mapping_names_file_path_and_both_lines(tmp_path):
    f = _tiny_with(tmp_path, "  experiment: effdetr-test\n", "  experiment: effdetr-test\n  experiment: other\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert e.value.path == "tracking.experiment"
    assert str(f) in str(e.value) and "duplicate key" in str(e.value)
    assert f"line {_line(f, '  experiment:')} and again at line {_line(f, '  experiment:', 1)}" in str(e.value)


def test_duplicate_key_in_flow_mapping_is_an_error(tmp_path):
    f = _tiny_with(tmp_path, "train: {epochs: 2, lr: 0.0005,", "train: {epochs: 2, epochs: 3, lr: 0.0005,")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert e.value.path == "profiles.synth.train.epochs"
    assert f"line {_line(f, '    train: {epochs: 2, epochs: 3')} (columns" in str(e.value)


def test_duplicated_experiment_is_a_duplicate_key_not_an_architecture_error(tmp_path):
    dup = "  act:\n    paper: act\n    table: act_main\n    stages: [eval]\n    init_from: nobody\n"
    f = _tiny_with(tmp_path, "speed: {", dup + "speed: {")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert e.value.path == "experiments.act"
    first, again = _line(f, "  act:"), _line(f, "  act:", 1)
    assert f"line {first} and again at line {again}" in str(e.value)


def test_duplicate_key_inside_a_list_names_the_index(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("a:\n  - {x: 1}\n  - y: 1\n    z: 2\n    y: 3\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert e.value.path == "a[1].y" and "line 3 and again at line 5" in str(e.value)


def test_merge_keys_still_override_without_being_duplicates(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("base: &base {enc_layers: 3, dec_layers: 3}\nmid: &mid {<<: *base, enc_layers: 6}\n"
                 "top: {<<: *mid, nheads: 8}\nboth: {<<: [*base, *mid], dec_layers: 4}\n")
    assert read_yaml(f) == {"base": {"enc_layers": 3, "dec_layers": 3}, "mid": {"enc_layers": 6, "dec_layers": 3},
                            "top": {"enc_layers": 6, "dec_layers": 3, "nheads": 8},
                            "both": {"enc_layers": 3, "dec_layers": 4}}


def test_chained_merge_keeps_the_middle_override_for_one_letter_keys(tmp_path):
    # PyYAML's SafeLoader gives c y: 1 here (its merge dedups by string identity, and
    # one-letter strings are one object), while the same file with longer keys gives 2.
    f = tmp_path / "p.yaml"
    f.write_text("a: &a {x: 1, y: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: *b, z: 3}\n")
    assert read_yaml(f)["c"] == {"x": 1, "y": 2, "z": 3}


def test_cli_reports_a_duplicate_key_with_file_and_lines(tmp_path, capsys):
    f = _tiny_with(tmp_path, "    eval: {batch_size: 8,", "    eval: {batch_size: 8, max_images: 1}\n    eval: {batch_size: 8,")
    assert main(["dag", "list", "--params", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effdetr dag: error: ") and str(f) in err and "profiles.synth.eval" in err
    assert f"line {_line(f, '    eval: {')} and again at line {_line(f, '    eval: {', 1)}" in err


# --- 12. bytes that are not UTF-8, paths that cannot be read -----------------------------
def test_non_utf8_byte_names_file_line_and_column(tmp_path, capsys):
    f = tmp_path / "params.yaml"
    f.write_bytes(b"profile: synth\ntracking: {experiment: caf\xe9}\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert str(f) in str(e.value)
    assert "byte 0xe9 at line 2, column 27 (byte offset 41)" in str(e.value)
    assert main(["dag", "list", "--params", str(f)]) == 2
    assert "line 2, column 27" in capsys.readouterr().err


def test_directory_and_unreadable_params_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is a directory"):
        read_yaml(tmp_path)
    f = tmp_path / "params.yaml"
    f.write_text(TINY.read_text())

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    with monkeypatch.context() as m, pytest.raises(ConfigError, match=re.escape(
            f"{f}: <file>: cannot read the params file: Permission denied")):
        m.setattr(Path, "open", refuse)  # as root, chmod 000 would not stop the read
        read_yaml(f)


def test_yaml_syntax_errors_name_the_file_in_their_marks(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\nb: [\n")
    with pytest.raises(ConfigError, match=re.escape(f'in "{f}", line 3')):
        read_yaml(f)


# --- 13. YAML 1.2 floats -----------------------------------------------------------------
def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("a: [1e-3, 1E5, -2.5e-4, .5, +3e2, 12, '1e-3', 1.0e-3, 0x1f, 1e3x, 2024-01-02]\n")
    values = read_yaml(f)["a"]
    assert values[:6] == [0.001, 100000.0, -0.00025, 0.5, 300.0, 12]
    assert [type(v) for v in values[:6]] == [float] * 5 + [int]
    assert values[6:10] == ["1e-3", 0.001, 31, "1e3x"]


def test_lr_1e_minus_3_loads_as_a_number(tmp_path):
    f = _tiny_with(tmp_path, "train: {epochs: 2, lr: 0.0005,", "train: {epochs: 2, lr: 1e-3,")
    cfg, _ = experiment_config(f, "detr_dc5")
    assert cfg.train.lr == 0.001


def test_quoted_number_in_a_float_field_says_how_to_write_it(tmp_path):
    f = _tiny_with(tmp_path, "train: {epochs: 2, lr: 0.0005,", "train: {epochs: 2, lr: '1e-3',")
    with pytest.raises(ConfigError, match=r"profiles\.synth\.train\.lr: expected a number, got '1e-3' "
                                          r"\(text, not a number: write it without quotes, e\.g\. 1e-3\)"):
        load_params(f)
    f = _tiny_with(tmp_path, "train: {epochs: 2,", "train: {epochs: '2',")
    with pytest.raises(ConfigError, match="expected an integer, got '2' .*without quotes"):
        load_params(f)


@pytest.mark.parametrize("f", [REPO / "params.yaml", *sorted((REPO / "tests" / "data").glob("*.yaml"))],
                         ids=lambda f: f.name)
def test_repo_yaml_files_parse_exactly_as_before(f):
    assert read_yaml(f) == yaml.safe_load(f.read_text())


# --- 14. sweep keys ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "model..rounds", "model.act.", " . "])
def test_sweep_key_must_be_a_dotted_path_with_non_empty_parts(tmp_path, key):
    f = _tiny_with(tmp_path, "sweep: {key: model.act.rounds, values: [32, 16]",
                   f"sweep: {{key: '{key}', values: [32, 16]")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert e.value.path == "experiments.act.sweep.key"
    assert "must be a dotted key path inside the profile, like model.act.rounds" in str(e.value)

"""Provenance: the dirty flag ignores the pipeline's own outputs."""
import subprocess

from effdetr.utils.repro import git_info


def test_dirty_flag_ignores_pipeline_outputs(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "t.md").write_text("a")
    (tmp_path / "dvc.lock").write_text("a")
    (tmp_path / "params.yaml").write_text("a")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    assert git_info(str(tmp_path))["dirty"] is False
    (tmp_path / "reports" / "t.md").write_text("b")
    (tmp_path / "dvc.lock").write_text("b")
    assert git_info(str(tmp_path))["dirty"] is False
    (tmp_path / "params.yaml").write_text("b")
    info = git_info(str(tmp_path))
    assert info["dirty"] is True and len(info["sha"]) == 40

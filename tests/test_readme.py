"""The README documents every training flag and names the two commands that exist."""

from conftest import REPO
from segment_anything.training.config import TrainConfig


def test_every_flag_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    flags = [opt for action in TrainConfig.parser()._actions for opt in action.option_strings if opt.startswith("--")]
    missing = [flag for flag in flags if flag != "--help" and f"`{flag}`" not in readme]
    assert len(flags) > 15 and not missing, f"flags missing from README.md: {missing}"


def test_the_two_commands_exist():
    readme = (REPO / "README.md").read_text()
    for command, script in (("bash launch/demo.sh", "launch/demo.sh"), ("bash .ci/run", ".ci/run")):
        assert command in readme
        assert (REPO / script).is_file()

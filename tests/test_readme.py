"""The README names the two commands, and both exist (docs/flags.md lists the flags: tests/test_docs.py)."""

from conftest import REPO


def test_the_two_commands_exist():
    readme = (REPO / "README.md").read_text()
    for command, script in (("bash launch/demo.sh", "launch/demo.sh"), ("bash .ci/run", ".ci/run")):
        assert command in readme
        assert (REPO / script).is_file()

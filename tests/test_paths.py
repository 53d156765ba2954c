"""Path confinement for paths a user types into the app (hanorec.paths)."""

import os

import pytest

from hanorec.paths import PathError, confine, is_inside


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "demo" / "images").mkdir(parents=True)
    (root / "demo" / "pairs.tsv").write_text("u1\t1 2\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("x")
    (root / "escape").symlink_to(outside)
    (root / "inner").symlink_to(root / "demo")
    runs = tmp_path / "runs"
    runs.mkdir()
    return root, runs, outside


def test_relative_and_absolute_inside_are_accepted(tree):
    root, runs, _ = tree
    assert confine("demo", [root, runs]) == (root / "demo").resolve()
    assert confine("demo/pairs.tsv", [root]) == (root / "demo" / "pairs.tsv").resolve()
    assert confine(str(root / "demo"), [root]) == (root / "demo").resolve()
    assert confine(str(runs), [root, runs]) == runs.resolve()
    # a link that stays inside is fine
    assert confine("inner", [root]) == (root / "demo").resolve()


def test_relative_to_working_directory(tree, monkeypatch):
    root, _, _ = tree
    monkeypatch.chdir(root.parent)
    assert confine("data/demo", [root]) == (root / "demo").resolve()


@pytest.mark.parametrize(
    "typed, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../secret", "'..'"),
        ("demo/../../secret", "'..'"),
        ("demo\\..\\..\\secret", "'..'"),
        ("%2e%2e/secret", "URL-encoded"),
        ("..%2fsecret", "URL-encoded"),
        ("demo%00", "URL-encoded"),
        ("~/secret", "'~'"),
        ("demo\x00", "NUL"),
    ],
)
def test_bad_forms_are_rejected_in_one_sentence(tree, typed, words):
    root, runs, _ = tree
    with pytest.raises(PathError) as e:
        confine(typed, [root, runs])
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.endswith(".")


def test_absolute_outside_and_symlink_escape_are_rejected(tree):
    root, runs, outside = tree
    with pytest.raises(PathError, match="outside the allowed folders"):
        confine(str(outside / "key.txt"), [root, runs])
    with pytest.raises(PathError, match="outside the allowed folders"):
        confine("/etc/passwd", [root])
    with pytest.raises(PathError, match="link that leads outside"):
        confine("escape", [root])
    with pytest.raises(PathError, match="link that leads outside"):
        confine("escape/key.txt", [root])
    with pytest.raises(PathError, match="link that leads outside"):
        confine(str(root / "escape"), [root])


def test_missing_path_and_must_exist(tree):
    root, _, _ = tree
    with pytest.raises(PathError, match="does not exist"):
        confine("nothere", [root])
    assert confine("newrun", [root], must_exist=False) == (root / "newrun").resolve()
    with pytest.raises(PathError, match="outside"):
        confine("/tmp/elsewhere-new", [root], must_exist=False)


def test_is_inside(tree):
    root, _, outside = tree
    assert is_inside(root / "demo", root)
    assert not is_inside(root / "escape", root)
    assert not is_inside(outside, root)
    assert os.path.islink(root / "escape")

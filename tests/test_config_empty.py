"""An experiment file with no settings is refused with one line naming it, not trained on the
defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from evl_platform.cli import main
from evl_platform.config import ConfigError, load_config

NO_SETTINGS = {
    "empty": "",
    "blank_lines": "\n\n  \n",
    "only_comments": "# the recipe goes here\n# (later)\n",
    "null": "null\n",
    "tilde": "~\n",
}


@pytest.mark.parametrize("body", NO_SETTINGS.values(), ids=NO_SETTINGS.keys())
def test_a_file_without_settings_is_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "no settings" in message
    assert "\n" not in message


def test_an_empty_base_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("# nothing yet\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\ntrain: {num_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: the file holds no settings"):
        load_config(tmp_path / "exp.yaml")


def test_an_explicit_empty_mapping_still_means_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text("{}\n")
    assert load_config(tmp_path / "exp.yaml").name == "exp"


def test_train_refuses_it_with_one_line_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("# empty\n")
    storage = tmp_path / "storage"
    code = main(["train", str(path), "--storage-path", str(storage)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {path}: the file holds no settings (empty, only comments or null)\n"
    assert not storage.exists()

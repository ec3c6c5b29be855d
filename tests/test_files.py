"""Files written whole or not at all."""

from pathlib import Path

import pytest

from hdb.files import write_atomically


class WriteFailed(Exception):
    pass


def failing_write(partial: Path) -> None:
    partial.write_text("half of it")
    raise WriteFailed


def test_a_write_that_raises_leaves_no_file_and_no_partial(tmp_path):
    with pytest.raises(WriteFailed):
        write_atomically(tmp_path / "weights.safetensors", failing_write)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_when_the_write_succeeds(tmp_path):
    path = tmp_path / "latest"
    path.write_text("old")
    with pytest.raises(WriteFailed):
        write_atomically(path, failing_write)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    write_atomically(path, lambda partial: partial.write_text("new"))
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_a_folder_is_written_whole_and_replaces_the_old_one(tmp_path):
    folder = tmp_path / "checkpoint-3"

    def write_folder(partial: Path, text: str) -> None:
        partial.mkdir()
        (partial / "state.json").write_text(text)

    write_atomically(folder, lambda partial: write_folder(partial, "first"))
    (tmp_path / "checkpoint-3.partial").mkdir()  # what a killed run left: cleared, not mixed in
    (tmp_path / "checkpoint-3.partial" / "stale").write_text("")
    write_atomically(folder, lambda partial: write_folder(partial, "second"))
    assert sorted(p.name for p in folder.iterdir()) == ["state.json"]
    assert (folder / "state.json").read_text() == "second" and list(tmp_path.iterdir()) == [folder]
    with pytest.raises(WriteFailed):
        write_atomically(folder, lambda partial: (write_folder(partial, "third"), failing_write(partial / "x")))
    assert (folder / "state.json").read_text() == "second" and list(tmp_path.iterdir()) == [folder]

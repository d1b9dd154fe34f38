"""The local admin credential `up` makes and the Admin-calling commands send."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from cli.admin_credential import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE,
    admin_key,
    admin_metadata,
    ensure_admin_credential,
)
from gateway.auth import ADMIN_SCOPE, AuthConfig, Authenticator
from mesh.cli_error import CliError


def test_up_writes_a_private_key_and_an_auth_file_holding_only_its_hash(tmp_path: Path) -> None:
    auth_file = ensure_admin_credential(tmp_path / "state")
    key_file = tmp_path / "state" / ADMIN_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("msk_") and key not in auth_file.read_text()
    config = AuthConfig.load(auth_file)
    assert config.open_data_plane
    client = Authenticator(config).authenticate({"x-api-key": key})
    assert ADMIN_SCOPE in client.scopes
    # A restart keeps the key (scripts holding it keep working).
    assert ensure_admin_credential(tmp_path / "state") == auth_file
    assert key_file.read_text().strip() == key


def test_the_key_sent_is_explicit_then_the_environment_then_the_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    assert admin_key(None, tmp_path) is None and admin_metadata(None, tmp_path) == ()
    ensure_admin_credential(tmp_path)
    stored = (tmp_path / ADMIN_KEY_FILE).read_text().strip()
    assert admin_key(None, tmp_path) == stored
    monkeypatch.setenv(ADMIN_KEY_ENV, "msk_from-env")
    assert admin_key(None, tmp_path) == "msk_from-env"
    assert admin_metadata("msk_flag", tmp_path) == (("x-api-key", "msk_flag"),)


@pytest.mark.parametrize(
    ("source", "key", "named"),
    [
        ("flag", "clé", "--api-key"),
        ("env", "msk_abc\r", f"${ADMIN_KEY_ENV}"),
        ("file", "msk_\x01abc", ADMIN_KEY_FILE),
    ],
)
def test_a_key_grpc_cannot_send_is_a_one_line_error_naming_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, key: str, named: str
) -> None:
    """grpc refuses metadata values outside printable ASCII: such a key ended the command
    in a traceback (grpc's ExecuteBatchError), never saying which key was wrong."""
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    if source == "env":
        monkeypatch.setenv(ADMIN_KEY_ENV, key)
    if source == "file":
        (tmp_path / ADMIN_KEY_FILE).write_text(key)
    with pytest.raises(CliError, match=rf"^the admin key from \S*{re.escape(named)} is not"):
        admin_metadata(key if source == "flag" else None, tmp_path)

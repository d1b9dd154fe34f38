"""``meshserve certs``: init, issue, show, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from mesh.security.ca import CertificateAuthority, load_issued


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_init_issue_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert main(["certs", "init", "--dir", d, "--trust-domain", "example.org"]) == 0
    assert main(["certs", "issue", "--dir", d, "--service", "data", "--namespace", "ml"]) == 0
    issued = load_issued(tmp_path / "ml" / "data")
    assert issued.identity.uri == "spiffe://example.org/ns/ml/sa/data"
    assert CertificateAuthority.load(tmp_path).trust_domain == "example.org"
    capsys.readouterr()
    assert main(["certs", "show", "--dir", d]) == 0
    shown = capsys.readouterr().out
    assert "workload" in shown and "CA" in shown and f"{issued.serial:x}"[:8] in shown


def test_init_refuses_to_replace_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 1
    assert "already holds a mesh CA" in _err(capsys)
    assert (tmp_path / "ca.pem").read_bytes() == before
    assert main(["certs", "init", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_issue_without_ca_and_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "issue", "--dir", str(tmp_path), "--service", "x"]) == 1
    assert "meshserve certs init" in _err(capsys)
    assert main(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert main(["certs", "issue", "--dir", str(tmp_path), "--service", "a/b"]) == 1
    assert "service 'a/b'" in _err(capsys)

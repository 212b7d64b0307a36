"""Supply chain of the generated project: `nox -s audit` on a real lock, with the real `uv audit`.

The public service (api.osv.dev) may be out of reach where the tests run: the test against it
then asserts the audit's own "cannot reach" exit code, never a pass. The failing and ignoring
paths run against an OSV-protocol mirror in this process, serving a recorded (abridged) real
advisory: GHSA-9wx4-h78v-vm56 / CVE-2024-35195, requests < 2.32.0, `verify=False` sticking to
a pooled connection. A copy of the default project pins requests 2.31.0 in its uv.lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e import PACKAGE, Project
from helpers import EXAMPLE
from packaging.version import Version

ADVISORY = json.loads((Path(__file__).parent / "data" / "GHSA-9wx4-h78v-vm56.json").read_text())
OSV = "https://api.osv.dev/"
UNREACHABLE = 3


def affected(record: dict, name: str, version: str) -> bool:
    """Whether ``name==version`` lies in one of the record's ECOSYSTEM ranges (OSV semantics)."""
    for entry in record["affected"]:
        if entry["package"]["name"] != name:
            continue
        for span in entry["ranges"]:
            start, end = None, None
            for event in span["events"]:
                start = event.get("introduced", start)
                end = event.get("fixed", end)
            low = Version("0" if start in (None, "0") else start)
            if low <= Version(version) and (end is None or Version(version) < Version(end)):
                return True
    return False


class OsvMirror(BaseHTTPRequestHandler):
    """The two OSV API calls uv makes: POST /v1/querybatch, then GET /v1/vulns/<id>."""

    def do_POST(self) -> None:
        queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["queries"]
        results = [
            {"vulns": [{"id": ADVISORY["id"], "modified": ADVISORY["modified"]}]}
            if affected(ADVISORY, q["package"]["name"], q["version"])
            else {}
            for q in queries
        ]
        self._answer(200, {"results": results})

    def do_GET(self) -> None:
        found = self.path.rstrip("/").endswith(f"/v1/vulns/{ADVISORY['id']}")
        self._answer(200 if found else 404, ADVISORY if found else {"message": "not found"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def mirror() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OsvMirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the default project: its uv.lock, noxfile and audit code (no environment)."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "project"))


def nox_audit(project: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "AUDIT_SERVICE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "nox", "-s", "audit"],
        cwd=project, env={**environ, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip


def pin(project: Path, name: str, version: str) -> None:
    """Set ``name``'s locked version in uv.lock (as a lock made before the fix would hold it).

    The version moves in the package's block everywhere uv checks it (its files' names too);
    the hashes stay wrong, which an audit never reads.
    """
    lock = project / "uv.lock"
    blocks = lock.read_text().split("\n[[package]]\n")
    for number, block in enumerate(blocks):
        if block.startswith(f'name = "{name}"\n'):
            old = block.split('version = "', 1)[1].split('"', 1)[0]
            blocks[number] = block.replace(old, version)
    lock.write_text("\n[[package]]\n".join(blocks))


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def test_audit_against_the_public_service_passes_or_says_it_cannot_reach_it(project) -> None:
    result = nox_audit(project)
    if reachable(OSV):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "audit passed:" in result.stdout
    else:
        assert result.returncode == UNREACHABLE, result.stdout + result.stderr
        said = [line for line in result.stderr.splitlines() if not line.startswith("nox >")]
        assert len(said) == 1, result.stderr
        assert said[0].startswith(f"audit: cannot reach the advisory service {OSV} (")
        assert said[0].endswith("): nothing was checked")
        assert "passed" not in result.stdout


def test_audit_fails_on_a_locked_release_with_an_advisory(project, mirror) -> None:
    clean = nox_audit(project, AUDIT_SERVICE_URL=mirror)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    pin(project, "requests", "2.31.0")
    result = nox_audit(project, AUDIT_SERVICE_URL=mirror)
    assert result.returncode == 1, result.stdout + result.stderr
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failing == [
        f"FAIL requests 2.31.0: GHSA-9wx4-h78v-vm56 (CVE-2024-35195), fixed in 2.32.0: "
        f"{ADVISORY['summary']}"
    ]


def test_audit_ignores_an_accepted_advisory_until_its_expiry(project, mirror) -> None:
    pin(project, "requests", "2.31.0")
    entry = '[[ignore]]\nid = "CVE-2024-35195"\nreason = "no verify=False here"\nexpires = {}\n'
    (project / "audit-ignore.toml").write_text(entry.format("2999-12-31"))
    result = nox_audit(project, AUDIT_SERVICE_URL=mirror)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignored until 2999-12-31: requests 2.31.0: GHSA-9wx4-h78v-vm56" in result.stdout

    (project / "audit-ignore.toml").write_text(entry.format("2020-01-01"))
    result = nox_audit(project, AUDIT_SERVICE_URL=mirror)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CVE-2024-35195 expired on 2020-01-01, no longer ignored" in result.stdout


# Built here rather than written out, so that no secret scan of this repository flags it.
FAKE_AWS_KEY = "AKIA" + "Z7VRSQ5TJN2XPLQE"


@pytest.mark.e2e
def test_secret_scan_passes_clean_and_names_a_planted_key(pristine: Project, tmp_path) -> None:
    project = pristine.copy(tmp_path / "my-ml-project")
    # The scan passes on the project as copied, DVC files too (the whole lint session passes in
    # test_e2e.py's GitLab lint job).
    project.nox("secrets")
    planted = project.path / "src" / PACKAGE / "settings.py"
    planted.write_text(f'"""Settings."""\n\nAWS_ACCESS_KEY_ID = "{FAKE_AWS_KEY}"\n')
    for session in ("secrets", "lint"):
        result = project.nox(session, check=False)
        assert result.returncode != 0, session
        output = result.stdout + result.stderr
        assert "Secret Type: AWS Access Key" in output, output
        assert f"Location:    src/{PACKAGE}/settings.py:3" in output, output

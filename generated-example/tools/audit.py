"""Check the locked dependencies (uv.lock) against a public advisory database (``nox -s audit``).

Fails when a locked package has a known vulnerability that a released version fixes, printing
the package, the advisory and the fixed versions. Advisories without a fix yet are shown and do
not fail. ``audit-ignore.toml`` lists advisories not to fail on, each with a reason and an
expiry date; an expired entry stops being ignored and says so.

Exit codes: 0 nothing to fix; 1 something to fix (or a project PyPI quarantined); 2 bad input
(``audit-ignore.toml``, uv.lock, uv's own error); 3 the advisory service could not be reached:
nothing was checked, so this is never a pass.

Why ``uv audit`` rather than pip-audit on ``uv export``: it reads uv.lock itself (every extra and
group, at the locked versions, no export and no resolver) and fails when the service does not
answer. pip-audit's default service (PyPI's JSON API) marks a package it cannot look up as
"skipped" and still reports "No known vulnerabilities found" with exit code 0: on a PyPI mirror
without the per-version API, all 183 exported packages were skipped and the run passed. uv audit
is experimental in uv 0.13 (its JSON schema says "preview"), so its report is checked here and
anything unexpected fails closed (exit 2).

torch is audited at its locked version: the CPU and CUDA builds the project installs come from
the same release as PyPI's wheel, so the same advisories apply.

Stdlib only: ``nox -s audit`` runs it without the project environment (a CI audit job needs
uv and the lock, not torch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

OK, FIX, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3
IGNORE_FILE = Path("audit-ignore.toml")
SERVICE_URL = "https://api.osv.dev/"  # uv's default: the OSV database (PyPA advisories, GHSA, ...)
UV_AUDIT = ["uv", "audit", "--frozen", "--output-format", "json"]
# `uv audit` and its JSON output are preview features in uv 0.13: asked for by name, no warning.
PREVIEW = ["--preview-features", "audit-command,json-output"]


class AuditError(Exception):
    """The audit has no answer: the message says why; ``exit_code``: BAD_INPUT or UNREACHABLE."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Ignore:
    """An audit-ignore.toml entry: an advisory id (or alias) not to fail on until ``expires``."""

    id: str
    reason: str
    expires: date


@dataclass(frozen=True)
class Finding:
    """A vulnerability of a locked package, as uv reports it."""

    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    summary: str

    def ids(self) -> set[str]:
        return {self.id, *self.aliases}

    def line(self) -> str:
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        fix = f"fixed in {', '.join(self.fixed_in)}" if self.fixed_in else "no fixed release yet"
        return f"{self.package} {self.version}: {self.id}{aliases}, {fix}: {self.summary}"


@dataclass
class Result:
    """The findings sorted by what they mean for the build."""

    packages: int
    to_fix: list[Finding] = field(default_factory=list)
    unfixed: list[Finding] = field(default_factory=list)
    ignored: list[tuple[Finding, Ignore]] = field(default_factory=list)
    expired: list[Ignore] = field(default_factory=list)
    unused: list[Ignore] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return FIX if self.to_fix or self.quarantined else OK


def parse_ignores(text: str, source: str = str(IGNORE_FILE)) -> list[Ignore]:
    """The entries of an ignore file; AuditError naming the entry and key when one is malformed.

    Checked by hand rather than with pydantic: this module runs without the project environment.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"{source}: not valid TOML: {exc}") from None
    if unknown := sorted(set(data) - {"ignore"}):
        raise AuditError(f"{source}: unknown key {unknown[0]!r} (only [[ignore]] entries)")
    entries = data.get("ignore", [])
    if not isinstance(entries, list):
        raise AuditError(f"{source}: 'ignore' must be a list of [[ignore]] tables")
    ignores, seen = [], set()
    for number, entry in enumerate(entries, 1):
        where = f"{source}: [[ignore]] entry {number}"
        if not isinstance(entry, dict):
            raise AuditError(f"{where}: expected a table with id, reason, expires")
        if unknown := sorted(set(entry) - {"id", "reason", "expires"}):
            raise AuditError(f"{where}: unknown key {unknown[0]!r} (id, reason, expires)")
        for key in ("id", "reason"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise AuditError(f"{where}: '{key}' must be a non-empty string")
        expires = entry.get("expires")
        # A TOML date (2027-01-31), not a string or a datetime: a typo must not mean "forever".
        if not isinstance(expires, date) or isinstance(expires, datetime):
            raise AuditError(f"{where}: 'expires' must be a date such as 2027-01-31, unquoted")
        if entry["id"] in seen:
            raise AuditError(f"{where}: {entry['id']} is listed twice")
        seen.add(entry["id"])
        ignores.append(Ignore(entry["id"].strip(), entry["reason"].strip(), expires))
    return ignores


def load_ignores(path: Path = IGNORE_FILE) -> list[Ignore]:
    """The ignore file's entries ([] when there is no file)."""
    return parse_ignores(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []


def parse_report(text: str) -> tuple[int, list[Finding], list[dict[str, Any]]]:
    """(packages audited, vulnerabilities, adverse statuses) from ``uv audit``'s JSON report."""
    try:
        report = json.loads(text)
        packages = int(report["summary"]["audited_packages"])
        findings: list[Finding] = []
        for v in report["vulnerabilities"]:
            shown = v.get("display_id") or v["id"]
            finding = Finding(
                package=v["dependency"]["name"],
                version=v["dependency"]["version"],
                id=shown,
                aliases=tuple(a for a in [v["id"], *v.get("aliases", [])] if a != shown),
                fixed_in=tuple(v.get("fix_versions") or ()),
                summary=(v.get("summary") or "").strip() or "(no summary)",
            )
            findings.append(finding)
        statuses = list(report.get("adverse_statuses", []))
    except (ValueError, KeyError, TypeError) as exc:
        message = f"uv audit's report was not understood ({exc!r}): check uv's version"
        raise AuditError(message) from None
    return packages, findings, statuses


def classify(
    packages: int,
    findings: list[Finding],
    statuses: list[dict[str, Any]],
    ignores: list[Ignore],
    today: date,
) -> Result:
    """Sort findings into to-fix, no-fix-yet and ignored; note expired and unused ignores."""
    result = Result(packages)
    active = [i for i in ignores if i.expires >= today]
    result.expired = [i for i in ignores if i.expires < today]
    used: set[str] = set()
    for finding in findings:
        ignore = next((i for i in active if i.id in finding.ids()), None)
        if ignore is not None:
            result.ignored.append((finding, ignore))
            used.add(ignore.id)
        elif finding.fixed_in:
            result.to_fix.append(finding)
        else:
            result.unfixed.append(finding)
    result.unused = [i for i in active if i.id not in used]
    for status in statuses:
        reason = status.get("reason") or "no reason"
        line = f"{status.get('name')}: {status.get('status')} ({reason})"
        # PyPI quarantines a project while it investigates malware: never ship one.
        (result.quarantined if status.get("status") == "quarantined" else result.notes).append(line)
    return result


def report_lines(result: Result) -> list[str]:
    """What the audit prints, failures first."""
    lines = [f"FAIL {f.line()}" for f in result.to_fix]
    lines += [f"FAIL quarantined on PyPI: {q}" for q in result.quarantined]
    lines += [
        f"{IGNORE_FILE}: {i.id} expired on {i.expires}, no longer ignored ({i.reason})"
        for i in result.expired
    ]
    lines += [f"warn {f.line()}" for f in result.unfixed]
    lines += [f"note {n}" for n in result.notes]
    lines += [f"ignored until {i.expires}: {f.line()} ({i.reason})" for f, i in result.ignored]
    lines += [f"{IGNORE_FILE}: {i.id} matched nothing: remove it?" for i in result.unused]
    verdict = "FAILED" if result.exit_code else "passed"
    lines.append(
        f"audit {verdict}: {result.packages} locked packages, {len(result.to_fix)} to fix, "
        f"{len(result.unfixed)} without a fix yet, {len(result.ignored)} ignored"
    )
    return lines


def reachable(url: str, timeout: float = 10) -> str | None:
    """None when ``url`` answers HTTP (any status under 500), else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def run_uv_audit(service_url: str, python_version: str | None) -> str:
    """``uv audit``'s JSON report; AuditError (UNREACHABLE or BAD_INPUT) when it has none."""
    command = [*UV_AUDIT, *PREVIEW, "--service-url", service_url]
    command += ["--python-version", python_version] if python_version else []
    try:
        proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AuditError("uv is not installed (https://docs.astral.sh/uv/)") from None
    # uv exits 1 when it found vulnerabilities, 2 on errors.
    if proc.returncode in (0, 1) and proc.stdout.lstrip().startswith("{"):
        return proc.stdout
    # Judged by asking the service ourselves, not by parsing uv's wording, which may change.
    if why := reachable(service_url):
        raise AuditError(
            f"audit: cannot reach the advisory service {service_url} ({why}): nothing was checked",
            UNREACHABLE,
        )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    raise AuditError(f"uv audit failed: {(errors or proc.stderr.splitlines() or ['?'])[-1]}")


def audit(service_url: str, python_version: str | None, ignore_file: Path, today: date) -> Result:
    ignores = load_ignores(ignore_file)  # a bad ignore file fails before any network call
    if not Path("uv.lock").exists():
        raise AuditError("no uv.lock here: run `nox -s lock` first")
    return classify(*parse_report(run_uv_audit(service_url, python_version)), ignores, today)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audit", description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", help="Python version whose dependencies to audit")
    parser.add_argument("--ignore-file", type=Path, default=IGNORE_FILE)
    args = parser.parse_args(argv)
    # An OSV-protocol mirror for networks that cannot reach api.osv.dev.
    service_url = os.environ.get("AUDIT_SERVICE_URL") or SERVICE_URL
    try:
        result = audit(service_url, args.python_version, args.ignore_file, datetime.now(UTC).date())
    except AuditError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    print("\n".join(report_lines(result)))
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

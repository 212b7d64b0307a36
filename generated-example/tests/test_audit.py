"""The dependency audit's own logic: the ignore file, uv's report, what fails and what does not.

The report below is what `uv audit --output-format json` (uv 0.13.9) printed for a lock pinning
requests 2.31.0, with the real advisory GHSA-9wx4-h78v-vm56 (fixed in 2.32.0), and one
advisory without a fix added. The real tool against the real service is the template's test.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from tools.audit import (
    BAD_INPUT,
    FIX,
    OK,
    AuditError,
    Ignore,
    classify,
    load_ignores,
    main,
    parse_ignores,
    parse_report,
    report_lines,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TODAY = date(2026, 6, 1)
REQUESTS = {
    "dependency": {"name": "requests", "version": "2.31.0"},
    "id": "GHSA-9wx4-h78v-vm56",
    "display_id": "GHSA-9wx4-h78v-vm56",
    "aliases": ["CVE-2024-35195"],
    "summary": "Requests `Session` object does not verify requests after making first request "
    "with verify=False",
    "description": "...",
    "link": "https://github.com/advisories/GHSA-9wx4-h78v-vm56",
    "fix_versions": ["2.32.0"],
    "published": "2024-05-20T20:15:00Z",
    "modified": "2024-06-10T00:00:00Z",
}
UNFIXED = {
    **REQUESTS,
    "dependency": {"name": "somepkg", "version": "1.0"},
    "id": "PYSEC-2026-1",
    "display_id": "PYSEC-2026-1",
    "aliases": [],
    "summary": "not fixed yet",
    "fix_versions": [],
}


def report(*vulnerabilities: dict, statuses: tuple[dict, ...] = ()) -> str:
    return json.dumps(
        {
            "schema": {"version": "preview"},
            "summary": {"audited_packages": 223, "vulnerabilities": len(vulnerabilities)},
            "vulnerabilities": list(vulnerabilities),
            "adverse_statuses": list(statuses),
        }
    )


def run(text: str, ignores: list[Ignore] = ()):  # type: ignore[assignment]
    return classify(*parse_report(text), list(ignores), TODAY)


def test_shipped_ignore_file_is_valid_and_empty() -> None:
    assert load_ignores(PROJECT_ROOT / "audit-ignore.toml") == []


def test_a_fixable_vulnerability_fails_naming_package_advisory_and_fix() -> None:
    result = run(report(REQUESTS, UNFIXED))
    assert result.exit_code == FIX
    assert [f.package for f in result.to_fix] == ["requests"]
    assert [f.package for f in result.unfixed] == ["somepkg"]
    failing = [line for line in report_lines(result) if line.startswith("FAIL")]
    assert failing == [
        "FAIL requests 2.31.0: GHSA-9wx4-h78v-vm56 (CVE-2024-35195), fixed in 2.32.0: "
        + REQUESTS["summary"]
    ]
    assert report_lines(result)[-1].startswith("audit FAILED: 223 locked packages, 1 to fix")


def test_without_a_fix_it_warns_and_passes() -> None:
    result = run(report(UNFIXED))
    assert result.exit_code == OK
    assert any(line.startswith("warn somepkg 1.0: PYSEC-2026-1") for line in report_lines(result))


@pytest.mark.parametrize("ignored_id", ["GHSA-9wx4-h78v-vm56", "CVE-2024-35195"])
def test_an_ignore_by_id_or_alias_passes_until_it_expires(ignored_id: str) -> None:
    entry = Ignore(ignored_id, "not reachable from our code", date(2026, 6, 1))
    result = run(report(REQUESTS), [entry])
    assert (result.exit_code, result.ignored) == (OK, [(result.ignored[0][0], entry)])
    assert "ignored until 2026-06-01" in "\n".join(report_lines(result))

    expired = Ignore(ignored_id, "not reachable from our code", date(2026, 5, 31))
    result = run(report(REQUESTS), [expired])
    assert result.exit_code == FIX
    assert result.expired == [expired]
    assert f"{ignored_id} expired on 2026-05-31, no longer ignored" in "\n".join(
        report_lines(result)
    )


def test_an_ignore_matching_nothing_is_pointed_out() -> None:
    result = run(report(), [Ignore("GHSA-xxxx-xxxx-xxxx", "old", date(2030, 1, 1))])
    assert result.exit_code == OK
    assert "GHSA-xxxx-xxxx-xxxx matched nothing" in "\n".join(report_lines(result))


def test_a_quarantined_project_fails() -> None:
    status = {"name": "evilpkg", "status": "quarantined", "reason": None}
    result = run(report(statuses=(status,)))
    assert result.exit_code == FIX
    assert result.quarantined == ["evilpkg: quarantined (no reason)"]


def test_ignore_file_entries_are_parsed() -> None:
    text = '[[ignore]]\nid = "GHSA-1"\nreason = "why"\nexpires = 2027-01-31\n'
    assert parse_ignores(text) == [Ignore("GHSA-1", "why", date(2027, 1, 31))]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('id = "GHSA-1"\nexpires = 2027-01-31', "'reason' must be a non-empty string"),
        ('id = "GHSA-1"\nreason = "x"\nexpires = "2027-01-31"', "'expires' must be a date"),
        ('id = "GHSA-1"\nreason = "x"\nexpires = 2027-01-31T00:00:00', "'expires' must be a date"),
        ('id = "GHSA-1"\nreason = "x"\nexpires = 2027-01-31\nuntil = 1', "unknown key 'until'"),
        ('id = ""\nreason = "x"\nexpires = 2027-01-31', "'id' must be a non-empty string"),
        ("id = ", "not valid TOML"),
    ],
    ids=["no-reason", "quoted-date", "datetime", "unknown-key", "empty-id", "bad-toml"],
)
def test_a_bad_ignore_entry_is_refused_naming_it(body: str, named: str) -> None:
    with pytest.raises(AuditError, match=named) as error:
        parse_ignores(f"[[ignore]]\n{body}\n")
    assert error.value.exit_code == BAD_INPUT


def test_an_id_listed_twice_is_refused() -> None:
    entry = '[[ignore]]\nid = "GHSA-1"\nreason = "x"\nexpires = 2027-01-31\n'
    with pytest.raises(AuditError, match="GHSA-1 is listed twice"):
        parse_ignores(entry * 2)


@pytest.mark.parametrize("text", ["", "not json", '{"summary": {}}', '{"vulnerabilities": 3}'])
def test_a_report_not_understood_fails_closed(text: str) -> None:
    with pytest.raises(AuditError, match="not understood") as error:
        parse_report(text)
    assert error.value.exit_code == BAD_INPUT


def test_a_bad_ignore_file_stops_the_audit_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "audit-ignore.toml"
    bad.write_text('[[ignore]]\nid = "GHSA-1"\n', encoding="utf-8")
    assert main(["--ignore-file", str(bad)]) == BAD_INPUT
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert "entry 1: 'reason' must be a non-empty string" in out.err

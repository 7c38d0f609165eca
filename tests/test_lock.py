"""The dependency locks (requirements/runtime.lock, requirements/test.lock) against pyproject.toml.

The locks are made by scripts/lock (pip-tools, `--generate-hashes`); scripts/lockcheck.py says
when they no longer match pyproject's dependency lists. The first test is the real check and
fails with one line, `requirements/*.lock is stale: run scripts/lock (...)`; the others feed the
checker changed lists or locks and show that it notices.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_lockcheck():
    spec = importlib.util.spec_from_file_location("lockcheck", ROOT / "scripts" / "lockcheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lockcheck", module)
    spec.loader.exec_module(module)
    return module


lockcheck = _load_lockcheck()


def current() -> tuple[dict[str, list[str]], dict[str, str]]:
    """pyproject's dependency lists and the texts of both locks, as they are in the repository."""
    decl = lockcheck.declared(lockcheck.read_pyproject(ROOT))
    texts = {key: (ROOT / rel).read_text() for key, rel in lockcheck.LOCKS.items()}
    return decl, texts


def restamped(texts: dict[str, str], decl: dict[str, list[str]]) -> dict[str, str]:
    """The locks with the digest of DECL in their headers: only the pins can then be wrong."""
    digest = lockcheck.deps_digest(decl)
    return {key: lockcheck.stamp_text(key, text, digest) for key, text in texts.items()}


# --- the real check -----------------------------------------------------------------------------

def test_the_locks_are_current_with_pyproject():
    found = lockcheck.check(ROOT)
    if found:
        pytest.fail(lockcheck.stale_message(found), pytrace=False)


def test_both_locks_cover_hypercorn_bcrypt_and_pytest_where_they_belong():
    _, texts = current()
    runtime = lockcheck.parse_lock(texts["runtime"]).pins
    test = lockcheck.parse_lock(texts["test"]).pins
    assert {"hypercorn", "bcrypt", "pydantic", "authlib"} <= runtime.keys()
    assert "pytest" in test and "pytest" not in runtime
    assert runtime.keys() <= test.keys()


def test_every_pin_in_the_locks_is_exact_and_carries_sha256_hashes():
    _, texts = current()
    for key, text in texts.items():
        lock = lockcheck.parse_lock(text)
        assert lock.pins and not lock.unpinned, (key, lock.unpinned)
        for name, hashes in lock.hashes.items():
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_command_line_check_passes_on_the_repository():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lockcheck.py")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the checker can fail -----------------------------------------------------------------------

def test_a_copy_of_the_repository_whose_pyproject_gained_a_dependency_is_stale(tmp_path):
    (tmp_path / "requirements").mkdir()
    for rel in ("pyproject.toml", *lockcheck.LOCKS.values()):
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    assert lockcheck.check(tmp_path) == []
    pyproject = tmp_path / "pyproject.toml"
    text, n = re.subn(r"^(dependencies\s*=\s*\[)", r'\1 "uvloop>=0.19", ', pyproject.read_text(),
                      count=1, flags=re.MULTILINE)
    assert n == 1
    pyproject.write_text(text)
    found = lockcheck.check(tmp_path)
    assert "requirements/runtime.lock: uvloop is not pinned" in found, found
    assert "requirements/test.lock: uvloop is not pinned" in found, found
    (tmp_path / lockcheck.LOCKS["test"]).unlink()
    assert "requirements/test.lock is missing" in lockcheck.check(tmp_path)


def test_a_dependency_added_to_pyproject_makes_the_locks_stale():
    decl, texts = current()
    changed = {**decl, "runtime": decl["runtime"] + ["left-pad>=1.0"]}
    found = lockcheck.problems(changed, texts)
    assert any("made from other pyproject dependencies" in p for p in found), found
    assert any("left-pad is not pinned" in p for p in found), found
    message = lockcheck.stale_message(found)
    assert message.startswith("requirements/*.lock is stale: run scripts/lock")
    assert "\n" not in message


def test_a_changed_test_extra_makes_the_locks_stale():
    decl, texts = current()
    changed = {**decl, "test": decl["test"] + ["pytest-timeout>=2"]}
    found = lockcheck.problems(changed, texts)
    assert any("requirements/test.lock: pytest-timeout is not pinned" in p for p in found), found
    # the runtime lock does not carry the test extra, but its digest covers it
    assert any(p.startswith("requirements/runtime.lock was made from other") for p in found)


def test_a_range_the_pinned_version_no_longer_satisfies_is_reported_even_with_a_fresh_digest():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["runtime"]).pins["bcrypt"]
    major = int(pin.split(".")[0])
    changed = {**decl, "runtime": [f"bcrypt>={major + 1}" if r.startswith("bcrypt") else r
                                   for r in decl["runtime"]]}
    found = lockcheck.problems(changed, restamped(texts, changed))
    assert found == [
        f"requirements/runtime.lock: bcrypt=={pin} does not satisfy '>={major + 1}'",
        f"requirements/test.lock: bcrypt=={pin} does not satisfy '>={major + 1}'",
    ]


def test_the_unchanged_lists_with_a_fresh_digest_are_current():
    decl, texts = current()
    assert lockcheck.problems(decl, restamped(texts, decl)) == []


def test_a_lock_without_a_digest_line_is_stale():
    decl, texts = current()
    stripped = {k: "\n".join(ln for ln in t.splitlines()
                             if not ln.startswith(lockcheck.DIGEST_PREFIX))
                for k, t in texts.items()}
    found = lockcheck.problems(decl, stripped)
    assert "requirements/runtime.lock records no pyproject-deps-sha256" in found, found


def test_a_pin_without_hashes_or_without_an_exact_version_is_reported():
    decl = {"runtime": ["bcrypt>=4.1"], "test": []}
    digest = lockcheck.DIGEST_PREFIX + lockcheck.deps_digest(decl)
    texts = {"runtime": f"{digest}\nbcrypt==5.0.0\nidna>=3\n"}
    assert lockcheck.problems(decl, texts) == [
        "requirements/runtime.lock: idna>=3 is not pinned with ==",
        "requirements/runtime.lock: bcrypt has no --hash",
    ]


def test_a_package_pinned_differently_in_the_two_locks_is_reported():
    decl, texts = current()
    pin = lockcheck.parse_lock(texts["test"]).pins["idna"]
    other = re.sub(r"^idna==\S+", "idna==3.6", texts["test"], flags=re.MULTILINE)
    assert pin != "3.6"
    found = lockcheck.problems(decl, {**texts, "test": other})
    assert found == [
        f"idna is {pin} in requirements/runtime.lock but 3.6 in requirements/test.lock"]


def test_the_digest_ignores_order_and_whitespace_but_not_versions():
    decl = {"runtime": ["a>=1", "b <2"], "test": ["pytest>=8"]}
    same = {"runtime": ["b<2", "a >= 1"], "test": ["pytest>=8"]}
    assert lockcheck.deps_digest(decl) == lockcheck.deps_digest(same)
    assert lockcheck.deps_digest(decl) != lockcheck.deps_digest(
        {**decl, "runtime": ["a>=2", "b<2"]})
    assert lockcheck.deps_digest(decl) != lockcheck.deps_digest({**decl, "test": []})


def test_stamping_twice_leaves_one_header():
    _, texts = current()
    once = lockcheck.stamp_text("runtime", texts["runtime"], "0" * 64)
    twice = lockcheck.stamp_text("runtime", once, "0" * 64)
    assert once == twice
    assert twice.count(lockcheck.DIGEST_PREFIX) == 1
    assert lockcheck.parse_lock(twice).pins == lockcheck.parse_lock(texts["runtime"]).pins


@pytest.mark.parametrize("version, specifier", [
    ("5.0.0", ">=4.1"), ("3.11.3", ">=3.10,<4"), ("4.0", ">=3.10,<4"), ("3.9.9", ">=3.10,<4"),
    ("2.14.4", "~=2.5"), ("3.0.0", "~=2.5"), ("1.9.10", "==1.9.*"), ("1.10.0", "==1.9.*"),
    ("0.18.0", "!=0.18.0"), ("0.18.0", ""), ("2026.10.19.post1", ">=2024"),
])
def test_the_fallback_version_check_agrees_with_packaging(version, specifier):
    pytest.importorskip("packaging")
    expected = lockcheck.satisfies(version, specifier)
    assert lockcheck._simple_satisfies(version, specifier) == expected


def test_the_fallback_requirement_parser_agrees_with_packaging_on_pyproject():
    pytest.importorskip("packaging")
    decl, _ = current()
    for text in decl["runtime"] + decl["test"]:
        simple = lockcheck._simple_requirement(text)
        full = lockcheck.parse_requirement(text)
        assert simple.name == full.name
        assert sorted(simple.specifier.split(",")) == sorted(full.specifier.split(",")), text


def test_without_packaging_the_small_parser_passes_the_real_locks_and_catches_a_bad_range(
        monkeypatch):
    monkeypatch.setattr(lockcheck, "HAVE_PACKAGING", False)
    decl, texts = current()
    assert lockcheck.problems(decl, texts) == []
    changed = {**decl, "runtime": [r.replace("<3", "<2") if r.startswith("pydantic") else r
                                   for r in decl["runtime"]]}
    assert changed != decl
    found = lockcheck.problems(changed, restamped(texts, changed))
    assert len(found) == 2 and all("pydantic==" in p and "'>=2.5,<2'" in p for p in found), found


# --- who installs from the locks ------------------------------------------------------------------

def test_setup_installs_the_hashed_test_lock_then_the_project_without_dependencies():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "scripts" / "setup").read_text())
    lock = text.index("--require-hashes -r requirements/test.lock")
    own = text.index("--no-deps -e .")
    assert lock < own
    assert "'.[test]'" not in text


def test_the_image_builds_from_the_hashed_runtime_lock_and_the_context_lets_it_in():
    dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    assert re.search(r"^RUN pip wheel .*--require-hashes .*-r requirements/runtime\.lock",
                     dockerfile, re.MULTILINE), dockerfile
    assert re.search(r"^RUN pip wheel .*--no-deps .*\.", dockerfile, re.MULTILINE)
    assert "--no-index" in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements/runtime.lock" in ignore

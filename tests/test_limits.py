"""Connection caps: shared accounts under any of their names, and a cap changed on reload."""

from __future__ import annotations

from inbox_exporter.limits import ConnectionLimits


def test_an_account_known_by_two_logins_is_one_account():
    limits = ConnectionLimits()
    held = limits.acquire("imap", "127.0.0.1", {"alice", "alice@example.test"}, 1)
    assert held is not None
    # Another inbox logs in as the address only: same mailbox, so it must wait.
    assert limits.acquire("imap", "127.0.0.1", {"alice@example.test"}, 0.05) is None
    assert limits.acquire("smtp", "127.0.0.1", {"alice@example.test"}, 0.05) is not None  # other protocol
    limits.release(held)
    assert limits.acquire("imap", "127.0.0.1", {"ALICE@example.test"}, 0.05) is not None


def test_the_host_cap_counts_imap_and_smtp_together_and_a_new_cap_applies_to_open_connections():
    limits = ConnectionLimits(per_host=2)
    a = limits.acquire("imap", "127.0.0.1", {"a"}, 1)
    b = limits.acquire("smtp", "127.0.0.1", {"b"}, 1)
    assert a and b
    assert limits.acquire("imap", "127.0.0.1", {"c"}, 0.05) is None
    limits.per_host = 3
    c = limits.acquire("imap", "127.0.0.1", {"c"}, 0.05)
    assert c is not None
    limits.per_host = 1  # lowered while three are open: nobody new until below one
    limits.release(a)
    assert limits.acquire("imap", "127.0.0.1", {"d"}, 0.05) is None
    limits.release(b)
    limits.release(c)
    assert limits.acquire("imap", "127.0.0.1", {"d"}, 0.05) is not None


def test_the_same_login_on_two_servers_is_two_accounts_and_try_acquire_never_waits():
    limits = ConnectionLimits()
    a = limits.try_acquire("imap", "127.0.0.1", {"alice"})
    b = limits.try_acquire("imap", "127.0.0.2", {"alice"})  # another server: another account
    assert a is not None and b is not None
    assert limits.try_acquire("imap", "127.0.0.1", {"alice"}) is None  # busy: None at once
    limits.release(a)
    limits.release(b)

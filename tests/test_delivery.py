"""Finding the probe mail and removing only it, against the lab's real Dovecot and Postfix."""

from __future__ import annotations

import hashlib
import random
import ssl
import time
import uuid

import pytest
from imapclient import IMAPClient

from inbox_exporter.check import Checker
from inbox_exporter.probe_id import ProbeKey
from inbox_exporter.probes import delivery
from inbox_exporter.probes.smtp import PROBE_HEADER, probe_message

from .conftest import make_inbox

KEY = ProbeKey.generate()  # this deployment's: the checks sign with it, cleanup verifies it


def login(lab, user: str) -> IMAPClient:
    ctx = ssl.create_default_context(cafile=str(lab.ca_file))
    client = IMAPClient(lab.host, port=lab.ports.imaps, ssl=True, ssl_context=ctx, timeout=10)
    client.login(lab.users[user].address, lab.users[user].password)
    return client


def probe_mail(lab, to: str, probe_id: str | None = None) -> tuple[str, bytes]:
    probe_id = probe_id or KEY.new_id()
    inbox = make_inbox(email=lab.users["alice"].address, test_email={"to": to})
    return probe_id, probe_message(inbox, probe_id)


def test_the_probe_mail_sent_by_a_check_is_found_by_its_id(lab, lab_inbox):
    result = Checker(probe_key=KEY).check(lab_inbox())
    assert result.ok
    sent_at = result.started_at
    with login(lab, "bcc") as client:
        deadline, found = time.monotonic() + 15, None
        while found is None and time.monotonic() < deadline:
            found = delivery.find(client, "INBOX", result.probe_id, KEY)
            time.sleep(0.1)
    assert found is not None
    assert sent_at - 2 <= found.internal_date <= time.time() + 2
    assert found.received and abs(found.received[0] - found.internal_date) < 5


def test_the_junk_folder_is_found_by_special_use_and_searched(lab):
    with login(lab, "bcc") as client:
        assert delivery.junk_folder(client) == "Junk"
        assert delivery.trash_folder(client) == "Trash"
        probe_id, raw = probe_mail(lab, lab.users["bcc"].address)
        client.append("Junk", raw)
        assert delivery.find(client, "INBOX", probe_id, KEY) is None
        assert delivery.find(client, "Junk", probe_id, KEY).folder == "Junk"
        assert delivery.remove(client, "Junk", probe_id, None, KEY) == 1
        assert delivery.find(client, "Junk", probe_id, KEY) is None


def ordinary_mail(n: int, rng: random.Random) -> bytes:
    subject = rng.choice(["Quarterly numbers", "inbox-exporter test email", "Re: invoice",
                          f"Probe id: {uuid.uuid4().hex}", "Lunch?"])
    extra = ""
    kind = n % 10
    if kind == 1:  # our header with an id of the wrong shape
        extra = f"{PROBE_HEADER}: not-an-id-{n}\r\n"
    elif kind == 2:  # our header and a good-looking id, but not our Message-ID: not ours
        extra = f"{PROBE_HEADER}: {uuid.uuid4().hex}\r\n"
    elif kind == 3:  # our Message-ID shape without our header
        extra = ""
    msg_id = f"<inbox-exporter.{uuid.uuid4().hex}@example.test>" if kind == 3 else f"<m{n}@example.test>"
    return (f"From: someone{n}@example.net\r\nTo: keeper@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: {msg_id}\r\n{extra}Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n"
            f"Body {n} {rng.random()}\r\n").encode()


def snapshot(client: IMAPClient, folder: str) -> dict[int, tuple]:
    """UID -> (flags, sha256 of the whole message). \\Recent is left out: it is not stored but
    belongs to a session (RFC 3501 2.3.2), and any read-write SELECT by any client ends it."""
    client.select_folder(folder, readonly=True)
    uids = client.search(["ALL"])
    data = client.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
    return {uid: (tuple(sorted(f for f in d[b"FLAGS"] if f != b"\\Recent")),
                  hashlib.sha256(d[b"BODY[]"]).hexdigest())
            for uid, d in data.items()}


@pytest.fixture
def keeper(lab):
    """A mailbox holding 200 ordinary messages in INBOX and Junk: some flagged \\Deleted or
    \\Seen by their user, some with look-alike subjects, headers or Message-IDs."""
    if "keeper" not in lab.users:
        lab.add_user("keeper", "keeper-password")
        rng = random.Random(7)
        with login(lab, "keeper") as client:
            for n in range(200):
                folder = "Junk" if n % 4 == 0 else "INBOX"
                flags = [b"\\Deleted"] if n % 7 == 0 else ([b"\\Seen"] if n % 3 == 0 else [])
                client.append(folder, ordinary_mail(n, rng), flags=flags)
    return lab.users["keeper"]


def test_fifty_checks_with_delivery_leave_every_other_message_byte_for_byte(lab, lab_inbox, keeper):
    from inbox_exporter.confirm import DeliveryConfirmer
    from inbox_exporter.limits import ConnectionLimits

    inbox = lab_inbox("keeper", delivery={"mailbox": "self", "timeout": "10s"})
    limits = ConnectionLimits()
    checker = Checker(limits, probe_key=KEY)
    confirmer = DeliveryConfirmer(limits, on_result=lambda *a: None, probe_key=KEY)
    with login(lab, "keeper") as client:
        before = {f: snapshot(client, f) for f in ("INBOX", "Junk")}
    assert sum(len(s) for s in before.values()) >= 200
    assert any(b"\\Deleted" in flags for flags, _ in before["INBOX"].values())
    try:
        for n in range(50):
            result = checker.check(inbox)
            assert result.ok, result.to_json()
            found = confirmer.confirm_now(inbox, result.probe_id, result.sent_at)
            assert found.step.status.value == "ok" and found.folder == "INBOX"
            if n % 10 == 9:
                confirmer.sweep_now(inbox)  # what the daemon does at start: stale ones only
    finally:
        confirmer.stop()
    with login(lab, "keeper") as client:
        after = {f: snapshot(client, f) for f in ("INBOX", "Junk")}
    assert after == before


def test_the_sweep_removes_stale_probe_mails_of_ours_and_nothing_else(lab, keeper):
    with login(lab, "keeper") as client:
        before = snapshot(client, "INBOX")
        ids = []
        for _ in range(3):
            probe_id, raw = probe_mail(lab, keeper.address)
            client.append("INBOX", raw)
            ids.append(probe_id)
        assert delivery.remove(client, "INBOX", None, "Trash", KEY, older_than=time.time() - 3600) == 0
        assert delivery.remove(client, "INBOX", None, "Trash", KEY, older_than=time.time() + 60) == 3
        assert snapshot(client, "INBOX") == before


def delivery_inbox(lab, lab_inbox, **delivery):
    return lab_inbox(delivery={"timeout": "10s", **delivery})


def confirm(lab, inbox):
    from inbox_exporter.confirm import DeliveryConfirmer
    from inbox_exporter.limits import ConnectionLimits

    limits = ConnectionLimits()
    result = Checker(limits, probe_key=KEY).check(inbox)
    assert result.ok and result.sent_at, result.to_json()
    confirmer = DeliveryConfirmer(limits, on_result=lambda *a: None, probe_key=KEY)
    try:
        return result, confirmer.confirm_now(inbox, result.probe_id, result.sent_at)
    finally:
        confirmer.stop()


def test_delivery_to_the_inbox_itself_is_confirmed_timed_and_cleaned_up(lab, lab_inbox):
    inbox = delivery_inbox(lab, lab_inbox, mailbox="self")
    assert inbox.test_email_to == lab.users["alice"].address  # sent to itself
    result, found = confirm(lab, inbox)
    assert found.step.status.value == "ok" and found.folder == "INBOX"
    assert 0 < found.step.duration_seconds < 10
    assert found.received_seconds is not None and found.received_seconds < 10
    ids = [m[PROBE_HEADER] for m in lab.messages("alice")]
    assert result.probe_id not in ids  # cleaned up


def test_a_delivery_held_in_the_queue_past_the_timeout_is_a_delivery_timeout(lab, lab_inbox):
    inbox = delivery_inbox(lab, lab_inbox, timeout="2s", mailbox="self")
    with lab.held_delivery():
        _, found = confirm(lab, inbox)
    d = found.step.diagnosis
    assert (d.category.value, d.reason.value) == ("delivery_failed", "delivery_timeout")
    assert 2 <= found.step.duration_seconds < 6
    assert "not found in INBOX, Junk" in d.detail


def test_a_mail_that_goes_elsewhere_is_a_delivery_timeout(lab, lab_inbox):
    # The watched account (bob) is not where the mail goes (bcc): it never arrives there.
    bob = lab.users["bob"]
    inbox = delivery_inbox(lab, lab_inbox, timeout="2s", mailbox={
        "host": lab.host, "port": lab.ports.imaps, "security": "ssl",
        "username": bob.address, "password": bob.password})
    _, found = confirm(lab, inbox)
    d = found.step.diagnosis
    assert (d.category.value, d.reason.value) == ("delivery_failed", "delivery_timeout")
    assert 2 <= found.step.duration_seconds < 6


def test_a_mail_filed_as_spam_is_delivered_to_junk_and_still_cleaned_up(lab, lab_inbox):
    bcc = lab.users["bcc"]
    inbox = lab_inbox(test_email={"to": f"bcc+Junk@{lab.domain}"}, delivery={
        "timeout": "10s", "mailbox": {"host": lab.host, "port": lab.ports.imaps,
                                      "security": "ssl", "username": bcc.address,
                                      "password": bcc.password}})
    result, found = confirm(lab, inbox)
    d = found.step.diagnosis
    assert (d.category.value, d.reason.value) == ("delivery_failed", "delivered_to_junk")
    assert found.folder == "Junk"
    with login(lab, "bcc") as client:
        assert delivery.find(client, "Junk", result.probe_id, KEY) is None


def test_the_check_command_shows_the_delivery_step(tmp_path, lab):
    from .conftest import lab_entry, write_config
    from .test_cli import run_cli

    config = write_config(tmp_path, lab, [{**lab_entry(lab, "d"), "delivery": {"timeout": "10s"}}])
    out = run_cli("check", "--config.file", str(config), "--output", "json",
                  env={"PW_D": lab.users["alice"].password})
    import json as _json

    steps = _json.loads(out.stdout)["inboxes"][0]["steps"]
    assert [s["step"] for s in steps][-2:] == ["test_email", "delivery"]
    assert steps[-1]["status"] == "ok" and out.returncode == 0


def test_idle_sees_the_mail_as_it_lands_instead_of_at_the_next_poll(lab, lab_inbox):
    import threading

    from inbox_exporter.confirm import DeliveryConfirmer
    from inbox_exporter.limits import ConnectionLimits

    inbox = delivery_inbox(lab, lab_inbox, timeout="20s", mailbox="self")
    limits = ConnectionLimits()
    confirmer = DeliveryConfirmer(limits, on_result=lambda *a: None, probe_key=KEY)
    polls = []
    real = confirmer.poll_once
    confirmer.poll_once = lambda *a, **k: polls.append(1) or real(*a, **k)
    held = lab.held_delivery()
    held.__enter__()  # Postfix accepts the test email but keeps it queued...
    try:
        result = Checker(limits, probe_key=KEY).check(inbox)
        release = threading.Timer(2.0, held.__exit__, (None, None, None))  # ...for 2 s
        release.start()
        found = confirmer.confirm_now(inbox, result.probe_id, result.sent_at)
        release.join()
    finally:
        confirmer.stop()
    assert found.step.status.value == "ok"
    assert found.step.duration_seconds > 1.9  # it really was held back
    # One poll: it missed at 0.5 s, then IDLE announced the mail and the same session found it
    # (without IDLE a miss ends the poll and the next one comes at 1.5 s, 3.5 s, 7.5 s ...).
    assert len(polls) == 1
    assert found.step.duration_seconds - found.received_seconds < 1.5  # seen as it landed


def test_only_mail_signed_with_our_key_is_ever_removed(lab, keeper):
    """Another deployment's probes (another key), a forged header (our format, a made-up tag)
    and an id of the old unsigned format look like ours and are never touched."""
    other = ProbeKey.generate()
    theirs = other.new_id()
    forged = ProbeKey.generate().new_id()[:-24] + "0" * 24
    old_format = uuid.uuid4().hex
    mine = KEY.new_id()
    with login(lab, "keeper") as client:
        for probe_id in (theirs, forged, old_format, mine):
            client.append("INBOX", probe_mail(lab, keeper.address, probe_id)[1])
        before = snapshot(client, "INBOX")
        for probe_id in (theirs, forged, old_format):
            assert delivery.find(client, "INBOX", probe_id, KEY) is None
            assert delivery.remove(client, "INBOX", probe_id, "Trash", KEY) == 0
        # the sweep takes every probe mail of ours, and only ours
        assert delivery.remove(client, "INBOX", None, "Trash", KEY, older_than=time.time() + 60) == 1
        after = snapshot(client, "INBOX")
        # the other exporter, with its key, removes its own and nothing else
        assert delivery.remove(client, "INBOX", None, "Trash", other, older_than=time.time() + 60) == 1
        assert len(snapshot(client, "INBOX")) == len(after) - 1
    assert len(after) == len(before) - 1
    assert KEY.verifies(mine) and not KEY.verifies(theirs) and not KEY.verifies(forged)
    assert not KEY.verifies(old_format)


def test_the_copy_in_the_senders_sent_folder_is_removed_and_nothing_else(lab, lab_inbox):
    from inbox_exporter.confirm import DeliveryConfirmer
    from inbox_exporter.limits import ConnectionLimits

    from .conftest import wait_until

    inbox = lab_inbox("sender")
    assert inbox.test_email_cleanup_sent  # the default
    with login(lab, "sender") as client:  # the user's own sent mail, which must stay
        own_id = KEY.new_id()
        client.append("Sent", probe_mail(lab, "x@example.test", own_id)[1].replace(
            own_id.encode(), b"their-own-text"))
        before = snapshot(client, "Sent")
    limits = ConnectionLimits()
    confirmer = DeliveryConfirmer(limits, on_result=lambda *a: None, probe_key=KEY)
    try:
        result = Checker(limits, probe_key=KEY).check(inbox)
        assert result.ok and result.sent_at
        # The server filed a copy in Sent (the lab's Postfix does, as Gmail does) ...
        lab.wait_for_message("sender", lambda m: m.maillab_folder == "Sent"
                             and result.probe_id in m.get(PROBE_HEADER, ""))
        # ... and the daemon's cleanup removes it, and only it.
        wait_until(lambda: confirmer.remove_sent_copy(inbox, result.probe_id, final=False),
                   10, "the Sent copy to be removed")
    finally:
        confirmer.stop()
    with login(lab, "sender") as client:
        assert snapshot(client, "Sent") == before
    assert not [m for m in lab.messages("sender") if result.probe_id in m.get(PROBE_HEADER, "")]


def test_a_trickling_watched_server_cannot_hold_a_delivery_poll_or_the_sweep(lab_inbox):
    """Bounded by the watchdog like the steps: a server that sends one byte at a time, never
    finishing its greeting, ends the poll within the inbox's deadline."""
    from inbox_exporter.confirm import DeliveryConfirmer
    from inbox_exporter.limits import ConnectionLimits

    from .fakeserver import FakeServer, Trickle

    with FakeServer([(None, Trickle("* OK " + "x" * 500 + "\r\n", every=0.2))]) as server:
        inbox = lab_inbox(timeout="1s", deadline="2s", delivery={"timeout": "10s", "mailbox": {
            "host": "127.0.0.1", "port": server.port, "security": "none", "username": "u",
            "password": "p"}}, allow_plaintext_login=True)
        confirmer = DeliveryConfirmer(ConnectionLimits(), on_result=lambda *a: None, probe_key=KEY)
        try:
            t0 = time.monotonic()
            result = confirmer.poll_once(inbox, KEY.new_id(), time.time(), final=True)
            poll = time.monotonic() - t0
            t0 = time.monotonic()
            confirmer.sweep_now(inbox)
            sweep = time.monotonic() - t0
        finally:
            confirmer.stop()
    assert result.step.status.value == "failed"
    assert poll < 3.5 and sweep < 3.5, (poll, sweep)  # deadline 2 s + the watchdog's poll

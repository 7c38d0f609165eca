"""Finding the probe mail in a mailbox, and removing it — and only it.

The exporter never deletes, moves or flags mail it did not send itself. A message is ours only
when its X-Inbox-Exporter-Probe header holds a probe id that verifies under our key
(probe_id.py: another deployment's probes and forged headers do not) *and* its Message-ID is
the one we build from that id (probes/smtp.py); every message is checked again, in the
read-write session that changes it, before anything is changed. Removal is `\\Deleted` plus
UID EXPUNGE of exactly those UIDs (UIDPLUS), else MOVE to the Trash folder; never a plain
EXPUNGE, which would also purge the user's own `\\Deleted` mail. Without either, the probe
mail stays.

Search uses a single token of the id (HEADER search on the hex id): some servers' full-text
search splits ids at dashes, so ours have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser

from imapclient import IMAPClient

from ..probe_id import ProbeKey
from .smtp import PROBE_HEADER

# Folder names providers use when SPECIAL-USE (RFC 6154) is not offered.
JUNK_NAMES = ("Junk", "Spam", "Junk E-mail", "Junk Email", "[Gmail]/Spam", "Bulk Mail", "INBOX.Junk",
              "INBOX.Spam")
SENT_NAMES = ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "[Gmail]/Sent Mail", "INBOX.Sent")
TRASH_NAMES = ("Trash", "Deleted Items", "Deleted Messages", "[Gmail]/Trash", "INBOX.Trash")
_HEADERS = (f"BODY.PEEK[HEADER.FIELDS ({PROBE_HEADER} MESSAGE-ID RECEIVED "
            "AUTHENTICATION-RESULTS ARC-AUTHENTICATION-RESULTS)]")


@dataclass(frozen=True)
class Found:
    folder: str
    uid: int
    internal_date: float  # when the server stored it (Unix time)
    received: tuple[float, ...]  # Received: header timestamps, newest first
    # Received, Authentication-Results and ARC-Authentication-Results fields as (name, value),
    # topmost first: the verdict needs their order (a Received line ends the receiver's hop)
    verdict_fields: tuple[tuple[str, str], ...] = ()


def is_ours(headers: bytes, key: ProbeKey, probe_id: str | None = None) -> bool:
    """Our header with an id signed by our key, and the Message-ID we make of that id."""
    msg = BytesHeaderParser().parsebytes(headers)
    value = (msg.get(PROBE_HEADER) or "").strip()
    if (probe_id is not None and value != probe_id) or not key.verifies(value):
        return False
    message_id = (msg.get("Message-ID") or "").strip()
    return message_id.startswith(f"<inbox-exporter.{value}@") and message_id.endswith(">")


def _special(client: IMAPClient, flag: bytes, names: tuple[str, ...]) -> str | None:
    folders = client.list_folders()
    for flags, _, name in folders:
        if flag in flags:
            return name
    existing = {name.lower(): name for _, _, name in folders}
    return next((existing[n.lower()] for n in names if n.lower() in existing), None)


def junk_folder(client: IMAPClient) -> str | None:
    return _special(client, b"\\Junk", JUNK_NAMES)


def sent_folder(client: IMAPClient) -> str | None:
    return _special(client, b"\\Sent", SENT_NAMES)


def trash_folder(client: IMAPClient) -> str | None:
    return _special(client, b"\\Trash", TRASH_NAMES)


def _ours(client: IMAPClient, uids: list[int], probe_id: str | None,
          key: ProbeKey) -> dict[int, dict]:
    if not uids:
        return {}
    data = client.fetch(uids, [_HEADERS, "INTERNALDATE"])
    field = next((k for d in data.values() for k in d if k.startswith(b"BODY[HEADER")), None)
    return {uid: d for uid, d in data.items() if field and is_ours(d[field], key, probe_id)}


_VERDICT_FIELDS = frozenset({"received", "authentication-results", "arc-authentication-results"})


def find(client: IMAPClient, folder: str, probe_id: str, key: ProbeKey) -> Found | None:
    """The probe mail in `folder`, read-only (EXAMINE); None if it is not there."""
    client.select_folder(folder, readonly=True)
    uids = client.search(["HEADER", PROBE_HEADER, probe_id])
    for uid, d in _ours(client, uids, probe_id, key).items():
        key = next(k for k in d if k.startswith(b"BODY[HEADER"))
        msg = BytesHeaderParser().parsebytes(d[key])
        return Found(folder, uid, _timestamp(d[b"INTERNALDATE"]), _received(d[key]),
                     tuple((name, str(value)) for name, value in msg.items()
                           if name.lower() in _VERDICT_FIELDS))
    return None


def remove(client: IMAPClient, folder: str, probe_id: str | None, trash: str | None,
           key: ProbeKey, older_than: float | None = None) -> int:
    """Remove our probe mail from `folder` (one id, or with probe_id None every probe mail of
    ours older than `older_than` Unix time). Returns how many were removed."""
    client.select_folder(folder, readonly=False)
    criteria = ["HEADER", PROBE_HEADER, probe_id or ""]
    ours = _ours(client, client.search(criteria), probe_id, key)
    if older_than is not None:
        ours = {u: d for u, d in ours.items() if _timestamp(d[b"INTERNALDATE"]) < older_than}
    uids = sorted(ours)
    if not uids:
        return 0
    caps = client.capabilities()
    if b"UIDPLUS" in caps:
        client.add_flags(uids, [b"\\Deleted"])
        client.expunge(uids)  # UID EXPUNGE: exactly these, never the user's \Deleted mail
    elif b"MOVE" in caps and trash and trash != folder:
        client.move(uids, trash)
    else:
        return 0
    return len(uids)


def wait_for_new_mail(client: IMAPClient, folder: str, seconds: float) -> bool:
    """IDLE (RFC 2177) on `folder` for up to `seconds`: True when new mail was announced.
    False at once when the server does not offer IDLE."""
    if b"IDLE" not in client.capabilities():
        return False
    client.select_folder(folder, readonly=True)
    client.idle()
    try:
        responses = client.idle_check(timeout=seconds)
    finally:
        client.idle_done()
    return any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses)


def _timestamp(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # IMAPClient normalises to local time without tzinfo
            return value.timestamp()
        return value.astimezone(UTC).timestamp()
    return float(value)


def _received(headers: bytes) -> tuple[float, ...]:
    from email.utils import parsedate_to_datetime

    msg = BytesHeaderParser().parsebytes(headers)
    out = []
    for line in msg.get_all("Received") or []:
        _, _, date = line.rpartition(";")
        try:
            out.append(parsedate_to_datetime(date.strip()).timestamp())
        except (TypeError, ValueError):
            continue
    return tuple(out)

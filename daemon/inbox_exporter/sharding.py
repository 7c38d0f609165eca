"""Sharding: with N replicas, each checks the inboxes with hashmod(name) % N == its index.

The hash is Prometheus' `hashmod` relabel action (the last 8 bytes of the MD5 of the value,
big-endian), so the assignment can be reproduced in PromQL tooling, and it depends on the
name only: every inbox lives on exactly one replica, and adding inboxes never moves others.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass


def hashmod(value: str, modulus: int) -> int:
    return int.from_bytes(hashlib.md5(value.encode()).digest()[8:], "big") % modulus


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def owns(self, inbox_name: str) -> bool:
        return self.count == 1 or hashmod(inbox_name, self.count) == self.index


def parse_shard(count: int, index: str, hostname: str | None = None) -> Shard:
    """`index` is a number, or "hostname": the StatefulSet ordinal at the end of the pod's
    host name (inbox-exporter-2 -> 2)."""
    if count < 1:
        raise ValueError(f"--shard.count must be at least 1, got {count}")
    if index == "hostname":
        name = hostname or os.environ.get("HOSTNAME") or socket.gethostname()
        m = re.search(r"-(\d+)$", name)
        if not m:
            raise ValueError(f"--shard.index=hostname: no ordinal (-N) at the end of {name!r}")
        value = int(m.group(1))
    elif index.isdigit():
        value = int(index)
    else:
        raise ValueError(f"--shard.index must be a number or 'hostname', got {index!r}")
    if value >= count:
        raise ValueError(f"--shard.index {value} is not below --shard.count {count}")
    return Shard(value, count)

"""Control-socket methods for the DHT (``lattica dht ...``), registered by the daemon.

Values cross the control socket as UTF-8 text when they decode as such, else as base64 with
``"encoding": "base64"`` -- the CLI never has to guess.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from lattica.control import ControlError, ControlServer
from lattica.dht import BootstrapError, QuorumError, SignedRecord, record_key
from lattica.errors import InvalidPeerIdError
from lattica.identity import PeerId
from lattica.net.address import InvalidAddressError, PeerAddr, format_host_port
from lattica.node import Node


def _text(params: dict[str, Any], name: str, *, max_bytes: int = 1024) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise ControlError("bad-request", f"missing {name!r}")
    if len(value.encode()) > max_bytes:
        raise ControlError("bad-request", f"{name} is longer than {max_bytes} bytes")
    return value


def _peer(params: dict[str, Any]) -> PeerId | None:
    text = params.get("peer")
    if text is None:
        return None
    try:
        return PeerId.parse(str(text))
    except InvalidPeerIdError as exc:
        raise ControlError("bad-request", f"--peer: {exc}") from None


def record_json(record: SignedRecord) -> dict[str, Any]:
    """A record as the CLI shows it."""
    try:
        value, encoding = record.value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        value, encoding = base64.b64encode(record.value).decode("ascii"), "base64"
    return {
        "key": record.key.decode("utf-8", errors="replace"),
        "value": value,
        "encoding": encoding,
        "writer": str(record.writer_id),
        "seq": record.seq,
        "expires_at": record.expires_at,
    }


def register_dht_methods(server: ControlServer, node: Node) -> None:
    """Expose ``dht.put``, ``dht.get``, ``dht.provide``, ``dht.providers``, ``dht.routing``,
    ``dht.bootstrap`` on the control socket."""
    dht = node.dht

    async def put(params: dict[str, Any]) -> dict[str, Any]:
        key = _text(params, "key")
        value = params.get("value")
        if not isinstance(value, str):
            raise ControlError("bad-request", "missing 'value'")
        ttl_s = params.get("ttl_s")
        if ttl_s is not None and (not isinstance(ttl_s, int | float) or ttl_s <= 0):
            raise ControlError("bad-request", "ttl_s must be a positive number of seconds")
        try:
            acks = (await dht.put(key.encode(), value.encode(), None if ttl_s is None else float(ttl_s))).acks
        except QuorumError as exc:
            raise ControlError("quorum", str(exc)) from None
        stored = node.dht_store.get_record(record_key(node.peer_id, key.encode()), now=time.time())
        return {"key": key, "acks": acks, "seq": stored.seq if stored else None}

    async def get(params: dict[str, Any]) -> dict[str, Any] | None:
        key = _text(params, "key").encode()
        writer = _peer(params) or node.peer_id
        if params.get("local"):
            record = node.dht_store.get_record(record_key(writer, key), now=time.time())
        else:
            quorum = params.get("quorum")
            valid = isinstance(quorum, int) and not isinstance(quorum, bool) and 1 <= quorum <= 32
            if quorum is not None and not valid:
                raise ControlError("bad-request", "quorum must be an integer from 1 to 32")
            record = (await dht.get(key, writer, quorum=quorum)).record
        return None if record is None else record_json(record)

    async def provide(params: dict[str, Any]) -> dict[str, Any]:
        cid = _text(params, "cid")
        try:
            acks = (await dht.provide(cid.encode())).acks
        except QuorumError as exc:
            raise ControlError("quorum", str(exc)) from None
        return {"cid": cid, "acks": acks}

    async def providers(params: dict[str, Any]) -> list[dict[str, Any]]:
        cid = _text(params, "cid")
        count = params.get("count", 20)
        if not isinstance(count, int) or not 1 <= count <= 100:
            raise ControlError("bad-request", "count must be 1..100")
        found = (await dht.find_providers(cid.encode(), count)).providers
        return [
            {
                "peer_id": str(record.provider_id),
                "addrs": [f"{record.provider_id}@{format_host_port(a)}" for a in record.address_list()],
                "expires_at": record.expires_at,
            }
            for record in found
        ]

    async def routing(_: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        buckets: dict[int, list[dict[str, Any]]] = {}
        for entry in dht.routing_table_snapshot():
            buckets.setdefault(entry.bucket, []).append(
                {
                    "peer_id": str(entry.peer_id),
                    "addrs": [format_host_port(a) for a in entry.addresses],
                    "last_seen_s_ago": round(max(0.0, now - entry.last_seen), 1),
                }
            )
        return {"buckets": [{"index": index, "peers": peers} for index, peers in sorted(buckets.items())]}

    async def bootstrap(params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("peers") or []
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ControlError("bad-request", "peers must be a list of PEERID@HOST:PORT")
        try:
            addrs = [PeerAddr.parse(p) for p in raw]
        except InvalidAddressError as exc:
            raise ControlError("bad-request", str(exc)) from None
        try:
            answered = await dht.bootstrap(addrs or None)
        except BootstrapError as exc:
            raise ControlError("bootstrap", str(exc)) from None
        return {"answered": answered, "peers": len(dht.routing_table)}

    for name, handler in (
        ("dht.put", put),
        ("dht.get", get),
        ("dht.provide", provide),
        ("dht.providers", providers),
        ("dht.routing", routing),
        ("dht.bootstrap", bootstrap),
    ):
        server.add_method(name, handler)

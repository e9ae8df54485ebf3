"""Every bound of the control API, defined once: the daemon enforces them, the CLI checks them at
parse time (so a bad argument is a usage error before any socket is opened) and quotes them in
its help.

The DHT limits repeat :mod:`lattica.dht.records`' values on purpose: importing the DHT would cost
a client command ~200 ms of imports (trio, aioquic). ``tests/unit/test_control.py`` checks that
the two agree.
"""

from __future__ import annotations

MAX_LINE_BYTES = 1 << 20
"""Longest request or reply line, newline excluded. A 64 KiB value base64-encoded fits easily."""

MAX_REPLY_BYTES = 64 << 20
"""Longest reply the client reads (a routing table or provider list is far below this)."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects in a line; control messages need 4 at most. msgspec
recurses per level and raises ``RecursionError`` past ~1,000 levels, so depth is checked first."""

MAX_CONNECTIONS = 64
"""Control connections served at once; more are answered ``busy`` and closed at once."""

REQUEST_TIMEOUT_S = 30.0
"""How long a connected client may take to send its request line, and to take each reply line
(also each line of a stream: a subscriber that stops reading is dropped after this long)."""

MAX_STREAMS = 16
"""Streaming calls (``state.watch``) served at once, out of :data:`MAX_CONNECTIONS`: watchers
never take every slot, so ``lattica status`` still answers. More are answered ``busy``."""

STREAM_BUFFER_ITEMS = 256
"""Lines the daemon buffers for one streaming client. A subscriber that falls further behind is
sent ``overflow`` and its stream ends: it lost changes, and must not cost the node memory."""

DEFAULT_CALL_TIMEOUT_S = 120.0
"""How long the CLI waits for a reply (a cold DHT lookup can take tens of seconds)."""

MAX_KEY_BYTES = 512
"""Longest DHT record key, UTF-8 bytes (``lattica.dht.records.MAX_USER_KEY_BYTES``)."""

MAX_CID_BYTES = 128
"""Longest content id, UTF-8 bytes (``lattica.dht.records.MAX_CID_BYTES``)."""

MAX_VALUE_BYTES = 64 * 1024
"""Largest DHT record value, bytes (``lattica.dht.records.MAX_VALUE_BYTES``)."""

MIN_RECORD_TTL_S = 10.0
"""Shortest record lifetime: expiry is stored in whole unix seconds and checked by every replica,
so a sub-second TTL expires before the put reaches anyone."""

MAX_RECORD_TTL_S = 7 * 24 * 3600.0
"""Longest record lifetime (``DhtConfig.max_record_ttl_s``): replicas refuse records that expire
later than this."""

MAX_QUORUM = 32
"""Most copies ``dht get --quorum`` may wait for."""

MAX_PROVIDERS = 100
"""Most providers ``dht providers --count`` may ask for."""

MAX_PING_COUNT = 10_000
"""Most pings one ``lattica ping`` sends."""

MAX_PING_TIMEOUT_S = 300.0
"""Longest wait for one ping's answer."""

MAX_BOOTSTRAP_PEERS = 64
"""Most peers one ``dht bootstrap`` call may name."""

MAX_DIAL_STRING_CHARS = 320
"""Longest ``PEERID@HOST:PORT`` accepted (52-char id, 255-char DNS name, port)."""

MAX_SPACE_NAME_CHARS = 128
"""Longest local name of a space (``lattica.crdt.space_id``'s limit)."""

MAX_SPACE_REF_CHARS = 128
"""Longest SPACE argument: a space id (52 characters) or a local name."""

MAX_SPACE_WRITERS = 64
"""Most writers one ``state create`` grants (more: ``state grant`` one at a time)."""

MAX_STATE_KEY_BYTES = 512
"""Longest key of ``state set``/``state get``, UTF-8 bytes."""

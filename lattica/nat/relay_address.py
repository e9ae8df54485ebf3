"""Relayed dial strings: ``RELAYPEERID@HOST:PORT/relay/TARGETPEERID``.

The part before ``/relay/`` is the relay's ordinary dial string and must name the relay's peer
id (a circuit is only as trustworthy as the relay's identity is checked); the part after it is
the target's peer id, proven end to end by the QUIC handshake through the circuit. Parsing is
strict: exactly one ``/relay/``, no other slashes, the target differs from the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from lattica.errors import InvalidPeerIdError
from lattica.identity import PeerId
from lattica.net.address import InvalidAddressError, PeerAddr

RELAY_SEPARATOR: Final = "/relay/"


@dataclass(frozen=True, slots=True)
class RelayedAddr:
    """A target reached through a relay."""

    relay: PeerAddr
    """The relay's address, with its peer id."""
    target: PeerId
    """Who must answer through the circuit."""

    @classmethod
    def parse(cls, text: str) -> RelayedAddr:
        """Parse ``RELAYPEERID@HOST:PORT/relay/TARGETPEERID``; raises :class:`InvalidAddressError`."""
        relay_text, separator, target_text = text.strip().partition(RELAY_SEPARATOR)
        if not separator:
            raise InvalidAddressError(f"{text!r:.120} is not RELAYPEERID@HOST:PORT/relay/PEERID")
        if "/" in relay_text or "/" in target_text:
            raise InvalidAddressError(f"{text!r:.120} has more than one /relay/ part")
        relay = PeerAddr.parse(relay_text)
        if relay.peer_id is None:
            raise InvalidAddressError(f"the relay in {text!r:.120} needs its peer id (RELAYPEERID@HOST:PORT)")
        try:
            target = PeerId.parse(target_text)
        except InvalidPeerIdError as exc:
            raise InvalidAddressError(f"bad target peer id in {text!r:.120}: {exc}") from None
        if target == relay.peer_id:
            raise InvalidAddressError(f"{text!r:.120} relays a peer through itself")
        return cls(relay, target)

    @staticmethod
    def looks_relayed(text: str) -> bool:
        """True if ``text`` is meant as a relayed dial string (it contains ``/relay/``)."""
        return RELAY_SEPARATOR in text

    def __str__(self) -> str:
        return f"{self.relay}{RELAY_SEPARATOR}{self.target}"

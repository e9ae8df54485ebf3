"""NAT traversal, part 1: observed (server-reflexive) addresses over STUN Binding (RFC 8489)."""

from lattica.nat.binding import BindingFailed, BindingSucceeded, BindingTimedOut, BindingTransaction
from lattica.nat.service import NatService, NatStats, ObservedAddressError, ObservedAddressTimeoutError
from lattica.nat.stun import (
    MalformedStunError,
    NotStunError,
    StunClass,
    StunDecodeError,
    StunMessage,
    StunMessageTooLargeError,
    decode_message,
    encode_binding_request,
    encode_binding_success,
    encode_message,
    xor_mapped_address,
)

__all__ = [
    "BindingFailed",
    "BindingSucceeded",
    "BindingTimedOut",
    "BindingTransaction",
    "MalformedStunError",
    "NatService",
    "NatStats",
    "NotStunError",
    "ObservedAddressError",
    "ObservedAddressTimeoutError",
    "StunClass",
    "StunDecodeError",
    "StunMessage",
    "StunMessageTooLargeError",
    "decode_message",
    "encode_binding_request",
    "encode_binding_success",
    "encode_message",
    "xor_mapped_address",
]

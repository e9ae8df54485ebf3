"""NAT traversal: observed (server-reflexive) addresses over STUN Binding (RFC 8489) and
identify, agreement on them, and AutoNAT-style reachability by dial-back."""

from lattica.nat.autonat import Reachability, ReachabilityStatus
from lattica.nat.autonat_service import DialBackSocketFactory, ReachabilityService
from lattica.nat.binding import BindingFailed, BindingSucceeded, BindingTimedOut, BindingTransaction
from lattica.nat.config import NatConfig
from lattica.nat.observed import BelievedAddress, MappingBehaviour, ObservedAddressBook
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
    "BelievedAddress",
    "BindingFailed",
    "BindingSucceeded",
    "BindingTimedOut",
    "BindingTransaction",
    "DialBackSocketFactory",
    "MalformedStunError",
    "MappingBehaviour",
    "NatConfig",
    "NatService",
    "NatStats",
    "NotStunError",
    "ObservedAddressBook",
    "ObservedAddressError",
    "ObservedAddressTimeoutError",
    "Reachability",
    "ReachabilityService",
    "ReachabilityStatus",
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

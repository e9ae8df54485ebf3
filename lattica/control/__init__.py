"""The local control API the CLI talks to: JSON lines over ``control.sock`` (mode 0600).

Layout:

* :mod:`~lattica.control.limits` -- every bound, shared by the daemon and the CLI;
* :mod:`~lattica.control.errors` -- the one error shape (code, message, hint) and its codes;
* :mod:`~lattica.control.messages` / :mod:`~lattica.control.codec` -- the envelope and the
  sans-I/O line codec (bounded length and depth, typed errors);
* :mod:`~lattica.control.registry` -- where each service registers its typed methods;
* :mod:`~lattica.control.server` -- the trio server (import it explicitly: it loads trio);
* :mod:`~lattica.control.client` -- the blocking client the CLI uses;
* :mod:`~lattica.control.node_methods` -- the node's own methods (``id``, ``status``, ``peers``,
  ``ping``, ``connect``); the DHT's live in :mod:`lattica.control.dht_methods`.

This package's ``__init__`` re-exports only what loads without trio, aioquic or cryptography, so
``lattica id`` stays cheap to start.
"""

from lattica.control import codec, limits
from lattica.control.client import Subscription, call, subscribe
from lattica.control.errors import ControlDecodeError, ControlError, DaemonNotRunningError
from lattica.control.registry import Method, MethodRegistry, Stream

__all__ = [
    "ControlDecodeError",
    "ControlError",
    "DaemonNotRunningError",
    "Method",
    "MethodRegistry",
    "Stream",
    "Subscription",
    "call",
    "codec",
    "limits",
    "subscribe",
]

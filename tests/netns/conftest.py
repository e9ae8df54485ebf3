"""Real kernel NATs in network namespaces (root): see :mod:`tests.netns.harness`."""

from tests.netns.harness import netns_bed, netns_daemons

__all__ = ["netns_bed", "netns_daemons"]

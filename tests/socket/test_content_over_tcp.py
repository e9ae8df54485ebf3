"""The content exchange over real loopback sockets: TLS-over-TCP where both nodes run it,
QUIC where the fetching node keeps TCP off."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattica.config import NodeConfig
from lattica.content import ContentConfig
from lattica.identity import Identity
from lattica.net import UdpSocket
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.node import Node
from tests.unit.content_samples import KIB, random_bytes

CONTENT = ContentConfig(chunk_bytes=64 * KIB)


@pytest.mark.parametrize("fetcher_runs_tcp", [True, False])
async def test_fetch_takes_tcp_where_both_run_it(tmp_path: Path, fetcher_runs_tcp: bool) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(random_bytes(3 * 1024 * KIB + 5, seed=11))
    tcp = NodeConfig(net=NetConfig(tcp_listen=True), content=CONTENT)
    fetcher_config = tcp if fetcher_runs_tcp else NodeConfig(content=CONTENT)
    async with (
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0), tcp, blocks_dir=tmp_path / "a") as a,
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0), fetcher_config, blocks_dir=tmp_path / "b") as b,
    ):
        assert a.content is not None and b.content is not None
        cid = (await a.content.publish(source)).cid
        await b.connect(PeerAddr(a.socket.local_address, a.peer_id))
        result = await b.content.fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.peer_bytes == {str(a.peer_id): source.stat().st_size}
        assert (b.tcp.connection(a.peer_id) is not None) is fetcher_runs_tcp

"""The queue's control port refuses clients without the run's secret (any local process can
reach a TCP port on localhost)."""

import socket

import pytest
import torch

from asyncflow.queue import ColumnSpec, Controller, QueueConfig, StageSpec, connect
from asyncflow.queue.client import serve
from asyncflow.queue.server import recv_frame, send_frame


def _config(secret: str) -> QueueConfig:
    return QueueConfig(columns=[ColumnSpec("x", "float32", [])],
                       stages=[StageSpec("s", ["x"])], capacity_rows=8, transport="local",
                       secret=secret, timeout_s=2.0)


def test_a_client_with_the_secret_is_served_and_one_without_is_refused():
    cfg = _config("s3cret")
    server = serve(cfg, Controller(cfg))
    try:
        port = server.address[1]
        good = connect(QueueConfig(**{**cfg.__dict__, "port": port}), 0)
        good.put({"x": torch.ones(2)})
        assert len(good.get("s", 2, timeout_s=1.0)) == 2
        for wrong in ("", "guess"):
            with pytest.raises(ConnectionError, match="refused this client: wrong or missing"):
                connect(QueueConfig(**{**cfg.__dict__, "port": port, "secret": wrong}), 1)
        with socket.create_connection(server.address, timeout=2) as raw:  # a hand-made hello
            send_frame(raw, {"op": "hello", "rank": 0})
            reply = recv_frame(raw)
            assert reply["ok"] is False and "secret" in reply["message"]
            assert recv_frame(raw) is None  # and the connection is closed
    finally:
        server.close()

"""A throwaway S3 endpoint on loopback (moto in server mode) for tests."""
from __future__ import annotations

import logging

from moto.server import ThreadedMotoServer

logger = logging.getLogger(__name__)


class LocalS3Server:
    """Start with :meth:`start` (returns the endpoint URL), stop with :meth:`stop`."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> str:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        logger.info("moto S3 server at %s", self.endpoint_url)
        return self.endpoint_url

    def stop(self) -> None:
        self._server.stop()

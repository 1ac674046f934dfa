"""The latent-recording policy server: openpi's websocket protocol, a store record per inference.

Modules: `protocol` (wire format, request fields, observation checks), `recording` (episodes, noise, step records),
`engine` (how the model runs: one at a time or batched), `server` (`PolicyServer`), `args` (`ServeArgs`, manifest),
`setup` (`create_server`), `client` (`RecordingClient`, a harness's
wrapper of openpi_client adding the record fields).
"""

from openpi.serving.args import ServeArgs
from openpi.serving.protocol import CONNECTIONS_TASK_ID, RECORD_FIELDS, RequestError
from openpi.serving.server import PolicyServer
from openpi.serving.setup import create_server

__all__ = ["CONNECTIONS_TASK_ID", "RECORD_FIELDS", "PolicyServer", "RequestError", "ServeArgs", "create_server"]

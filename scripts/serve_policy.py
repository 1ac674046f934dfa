"""Serve pi0 on openpi's websocket protocol and record its latents at every inference.

Any openpi client (openpi's examples/libero/main.py, LIBERO-PRO / LIBERO-Plus runners, openpi_client on a robot)
talks to it unchanged; each inference's latents, observation, prompt and actions go to the latent store.

Offline smoke run (tiny random-weight model, no download):

    uv run python scripts/serve_policy.py --preset pi0_libero_tiny --output-dir data/served

The released checkpoint, reachable from other machines (then set an API key):

    OPENPI_SERVER_API_KEY=... uv run python scripts/serve_policy.py --preset pi0_libero --host 0.0.0.0

Ctrl-C (or SIGTERM) stops serving; open episodes are ended (outcome unknown) and the store is closed.
"""

import asyncio
import signal
import sys

import tyro

from openpi import serving
from openpi.shared import cli, jax_cache

SETUP_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ImportError)
CLI_FLAGS = {"asset_id": "--asset-id", "checkpoint_dir": "--checkpoint"}


async def _serve(server: serving.PolicyServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)

    def ready(port: int) -> None:
        print(f"Serving on ws://{server.host}:{port} (health check: http://{server.host}:{port}/healthz)", flush=True)

    await server.serve(ready)


def main(args: serving.ServeArgs) -> None:
    cli.configure_logging()
    try:
        jax_cache.configure(args.jax_cache_dir)
        server = serving.create_server(args)
    except SETUP_ERRORS as e:
        print(f"error: {cli.cli_message(str(e), CLI_FLAGS)}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(_serve(server))
    if args.record:
        print(
            f"Latents in {args.output_dir}. Open them with:\n  import expert_data_utils\n"
            f"  expert_data_utils.load_inference_task_data({str(args.output_dir)!r}, task_id=...)"
        )


if __name__ == "__main__":
    main(tyro.cli(serving.ServeArgs, description=__doc__))

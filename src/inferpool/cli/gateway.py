"""``inferpool gateway``: the OpenAI-compatible HTTP API, served by uvicorn."""

from __future__ import annotations

import ipaddress

import click

from inferpool._exceptions import ConfigurationError
from inferpool.cli._common import configure_logging, load_settings

#: Idle keep-alive connections stay open this long (uvicorn's default is 5 s): longer than the 60 s idle
#: timeout of common load balancers, so the gateway is not the side that closes a connection the balancer
#: (or a pooled SDK client) is about to reuse; such a race surfaces as a connection error in the client.
KEEP_ALIVE_S = 75


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--no-auth", is_flag=True, help="Serve without API keys, as one tenant; only on a loopback address.")
@click.option("--workers", "processes", default=1, show_default=True, type=click.IntRange(1, 64),
              help="uvicorn worker processes (the gateway keeps no state: any number can serve).")  # fmt: skip
@click.option("--log-level", default="warning", show_default=True, help="uvicorn's log level.")
@click.pass_context
def gateway(ctx: click.Context, host: str, port: int, no_auth: bool, processes: int, log_level: str) -> None:
    """Serve the OpenAI API (chat and text completions with streaming, embeddings, models, files, batches).

    Point any OpenAI SDK at it: base_url="http://HOST:PORT/v1", api_key=a key from `inferpool keys create`.
    Usage is counted for the key's tenant; a tenant never sees another's files or batches.

    Environment: REDIS_URL (the pool), INFERPOOL_FILES_DIR (uploaded files; share it between gateways).
    Health: GET /health (the process), GET /ready (its Redis).
    """
    import uvicorn

    from inferpool.gateway import create_app

    settings = load_settings(ctx)
    settings.require_redis_url()
    if no_auth and not _is_loopback(host):
        raise ConfigurationError(f"--no-auth serves anyone who can connect: it only binds to loopback, not {host!r}. "
                                 "Create keys with `inferpool keys create --tenant NAME` instead.")  # fmt: skip
    configure_logging(settings.log_level)
    click.echo(f"inferpool gateway on http://{host}:{port}/v1 ({'no auth, loopback only' if no_auth else 'API keys'})",
               err=True)  # fmt: skip
    if processes > 1:
        factory = "inferpool.cli.gateway:app_from_environment_no_auth" if no_auth else \
            "inferpool.cli.gateway:app_from_environment"  # fmt: skip
        uvicorn.run(factory, factory=True, host=host, port=port, workers=processes, log_level=log_level,
                    timeout_keep_alive=KEEP_ALIVE_S)  # fmt: skip
    else:
        uvicorn.run(create_app(settings, require_keys=not no_auth), host=host, port=port, log_level=log_level,
                    timeout_keep_alive=KEEP_ALIVE_S)  # fmt: skip


def app_from_environment() -> object:
    """The app for uvicorn's worker processes (settings from the environment)."""
    from inferpool.gateway import create_app
    from inferpool.plumbing.settings import Settings

    return create_app(Settings())


def app_from_environment_no_auth() -> object:
    from inferpool.gateway import create_app
    from inferpool.plumbing.settings import Settings

    return create_app(Settings(), require_keys=False)

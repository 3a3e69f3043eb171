"""``xobackup serve``: the web overview and its JSON API."""

from __future__ import annotations

import os
from pathlib import Path

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.errors import UsageError
from xobackup_web.auth import TOKEN_ENV, Auth, is_loopback, load_token, parse_listen

DEFAULT_LISTEN = "127.0.0.1:8480"


@click.command("serve")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="ADDRESS:PORT",
    help="Where to listen. Any address other than loopback needs a token.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="XOBACKUP_WEB_TOKEN_FILE",
    help=f"File holding the token clients must give (else ${TOKEN_ENV}).",
)
@pass_app
def serve_command(app: AppContext, listen: str, token_file: Path | None) -> None:
    """Serve the web overview and the JSON API (/api/, documented at /api/docs).

    Jobs with their schedules, runs with their task trees (live while they run), backups per
    VM and remote, and a button to run a job now. Without a token only loopback addresses
    are allowed; with one, every page and API call needs it.
    """
    import uvicorn

    from xobackup_web.app import create_app
    from xobackup_web.overview import Overview

    host, port = parse_listen(listen)
    token = load_token(token_file, dict(os.environ))
    if token is None and not is_loopback(host):
        raise UsageError(
            f"--listen {listen}: {host} is not a loopback address, so clients must sign in; "
            f"set {TOKEN_ENV} or --token-file to a token of at least 16 characters "
            "(e.g. from `openssl rand -hex 24`)"
        )
    overview = Overview(app, token=token)
    application = create_app(overview, Auth(token))
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"xobackup web: http://{shown}:{port}/ "
        f"({'token required' if token else 'loopback only, no sign-in'}); Ctrl-C stops it",
        err=True,
    )
    try:
        uvicorn.run(
            application,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=3,
            server_header=False,
        )
    finally:
        overview.close()

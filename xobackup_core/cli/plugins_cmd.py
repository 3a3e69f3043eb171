"""``xobackup plugins``: what is installed and what each plugin provides."""

from __future__ import annotations

import json

import click

from xobackup_core.cli.context import AppContext, pass_app


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def plugins_command(app: AppContext, as_json: bool) -> None:
    """List loaded plugins: name, distribution, version and what each provides."""
    infos = app.plugins.plugins_info()
    if as_json:
        payload = [
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "provides": [
                    {"kind": p.kind, "name": p.name, "description": p.description}
                    for p in info.provides
                ],
            }
            for info in infos
        ]
        click.echo(json.dumps(payload, indent=2))
        return
    for info in infos:
        provides = ", ".join(f"{p.kind}:{p.name}" for p in info.provides) or "-"
        click.echo(f"{info.name:<24} {info.distribution} {info.version:<10} {provides}")


def register(cli: click.Group) -> None:
    cli.add_command(plugins_command)

"""Docs describe the code: every config key and CLI command is in the reference."""

from pathlib import Path

import pytest

from xobackup_core.cli.main import cli
from xobackup_core.config import (
    Config,
    JobConfig,
    PoolLimits,
    RemoteConfig,
    ScheduleConfig,
    ServerConfig,
    Settings,
)
from xobackup_core.errors import ExitCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    "model", [Config, Settings, PoolLimits, ServerConfig, RemoteConfig, JobConfig, ScheduleConfig]
)
def test_every_config_key_is_documented(model):
    text = (DOCS / "config.md").read_text()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        assert f"`{name}`" in text or f"[{name}" in text, f"{model.__name__}.{name} undocumented"


def test_every_command_and_exit_code_is_documented():
    text = (DOCS / "cli.md").read_text()
    for name in ("plugins", "config check", "remote test"):
        assert f"xobackup {name}" in text
    for code in ExitCode:
        assert f"| {int(code)} | `{code.name}` |" in text
    for name in cli.commands:
        assert f"xobackup {name}" in text, f"command {name} is not in docs/cli.md"

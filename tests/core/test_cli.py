"""The command line, run as users run it: a child process, its output and its exit code."""

import json
import textwrap

from xobackup_core.errors import ExitCode


def write_config(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_version_and_help(cli):
    result = cli("--version")
    assert result.returncode == 0 and "xobackup" in result.stdout
    result = cli("--help")
    assert result.returncode == 0 and "plugins" in result.stdout and "remote" in result.stdout


def test_plugins_lists_distribution_and_capabilities(cli):
    result = cli("plugins", "--json")
    assert result.returncode == 0
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["remote_local"]["distribution"] == "xobackup-remote-local"
    assert {"kind": "remote", "name": "file", "description": "a local folder: file:///path"} in (
        plugins["remote_local"]["provides"]
    )
    assert "remote_local" not in cli("--disable-plugin", "remote_local", "plugins").stdout
    text = cli("plugins", env={"XOBACKUP_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout
    assert "core.selector" in text and "remote_local" not in text


def test_config_check_ok_and_secret_free(cli, tmp_path):
    path = write_config(
        tmp_path,
        f"""
        [servers.lab]
        type = "xcpng"
        url = "https://master"
        password = "hunter2-secret"
        [remotes.nas]
        url = "file://{tmp_path}/backups"
        [jobs.nightly]
        mode = "delta"
        remotes = ["nas"]
        """,
    )
    result = cli("--disable-plugin", "hypervisor_xcpng", "--config", str(path), "config", "check")
    # Without a hypervisor plugin the server type cannot be checked: a clear error, exit 2.
    assert result.returncode == ExitCode.USAGE
    assert "servers.lab.type" in result.stderr and "installed types" in result.stderr
    assert "hunter2-secret" not in result.stdout + result.stderr
    path.write_text(path.read_text().replace('type = "xcpng"\n', 'type = "xcpng"\n', 1))


def test_config_check_success(cli, tmp_path):
    path = write_config(
        tmp_path,
        f"""
        [remotes.nas]
        url = "file://{tmp_path}/backups"
        [jobs.nightly]
        mode = "full"
        remotes = ["nas"]
        [schedules.nightly]
        job = "nightly"
        cron = "0 3 * * *"
        """,
    )
    result = cli("--config", str(path), "config", "check")
    assert result.returncode == 0, result.stderr
    assert "OK (0 servers, 1 remotes, 1 jobs, 1 schedules)" in result.stdout


def test_bad_configs_exit_2_without_traceback(cli, tmp_path):
    cases = {
        "[jobs.a\n": "not valid TOML",
        "[remotes.x]\nurl = 'ftp://host/x'\n": "installed remote types: ",
        "[remotes.x]\nurl = 'file:///x'\ncolour = 'red'\n": "remotes.x.colour: unknown key",
        "[jobs.a]\nmode = 'full'\nremotes = 'nas'\n": "jobs.a.remotes",
    }
    for text, expected in cases.items():
        path = write_config(tmp_path, text)
        result = cli("--config", str(path), "config", "check")
        assert result.returncode == ExitCode.USAGE, (text, result.stderr)
        assert expected in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr
    result = cli("--config", str(tmp_path / "missing.toml"), "config", "check")
    assert result.returncode == ExitCode.USAGE and "does not exist" in result.stderr


def test_remote_test_by_url_and_by_name(cli, tmp_path):
    result = cli("remote", "test", f"file://{tmp_path}/r", "--size", "2")
    assert result.returncode == 0, result.stderr
    assert "OK, write" in result.stdout and "MiB/s" in result.stdout
    assert list((tmp_path / "r").iterdir()) == []
    path = write_config(tmp_path, f"[remotes.nas]\nurl = 'file://{tmp_path}/named'\n")
    result = cli("--config", str(path), "remote", "test", "nas", "--size", "1")
    assert result.returncode == 0 and "remote 'nas': OK" in result.stdout
    result = cli("--config", str(path), "remote", "test", "other")
    assert result.returncode == ExitCode.USAGE and "remotes in the config: nas" in result.stderr


def test_remote_test_unwritable_folder_is_a_usage_error(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("remote", "test", f"file://{blocker}/sub")
    assert result.returncode == ExitCode.USAGE
    assert "cannot be created" in result.stderr and "Traceback" not in result.stderr


def test_remote_test_names_failing_step(cli, tmp_path):
    # A 1 MiB filesystem cannot take the 2 MiB test file: the write step fails.
    import subprocess

    from tests.conftest import require, require_tool

    mount = require_tool("mount")
    target = tmp_path / "tiny"
    target.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)])
    require(done.returncode == 0, "a tmpfs mount (needs root)")
    try:
        result = cli("remote", "test", f"file://{target}", "--size", "2")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert result.returncode == ExitCode.FAILURE
    assert "write failed" in result.stderr and "No space left" in result.stderr


def test_remote_test_never_prints_a_password_from_the_url(cli, tmp_path):
    result = cli("remote", "test", "sftp://user:hunter2-secret@127.0.0.1:1/x", "--size", "1")
    assert result.returncode != 0
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "***" in result.stdout + result.stderr

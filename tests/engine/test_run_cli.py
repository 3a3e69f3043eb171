"""`xobackup run` as users run it: progress lines, terminal redraws, exit codes."""

import os
import pty
import subprocess
import sys

from tests.core.conftest import run_cli
from tests.engine.test_backup_runs import guest_vms


def write_config(tmp_path, sim, extra=""):
    (tmp_path / "pw").write_text(sim.password)
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
log_db = "{tmp_path}/logs.sqlite"
[servers.pool]
url = "{sim.pool(0).url}"
password = {{ file = "{tmp_path}/pw" }}
[remotes.nas]
url = "file://{tmp_path}/remote"
[jobs.nightly]
mode = "delta"
remotes = ["nas"]
smart = {{ tags = ["prod"] }}
{extra}
"""
    )
    return path


def test_plain_progress_lines_and_success(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    result = run_cli("--config", str(config), "run", "nightly")
    assert result.returncode == 0, result.stderr
    prod = [r["name_label"] for r in guest_vms(xapi_sim).values() if "prod" in r["tags"]]
    for name in prod:
        assert f"{name}: snapshot" in result.stdout
        assert f"{name}: export" in result.stdout
        assert f"{name}: success, " in result.stdout
    assert "\x1b[" not in result.stdout, "no terminal codes when the output is not a terminal"
    run_id = result.stdout.split("run ", 1)[1].split(":", 1)[0]
    shown = run_cli("--config", str(config), "logs", "show", run_id)
    assert shown.returncode == 0 and "success" in shown.stdout


def test_failed_vm_exits_1(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    xapi_sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", times=None)
    result = run_cli("--config", str(config), "run", "nightly")
    assert result.returncode == 1
    assert ": failure" in result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_job_is_a_usage_error(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    result = run_cli("--config", str(config), "run", "weekly")
    assert result.returncode == 2
    assert "unknown job 'weekly'; jobs in the config: nightly" in result.stderr


def test_terminal_progress_redraws_vm_lines(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=4 * 1024 * 1024, times=None)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "xobackup_core.cli", "--config", str(config), "run", "nightly"],
        stdout=follower,
        stderr=follower,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=120)
    os.close(leader)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "\x1b[2K" in text, "lines are redrawn in place on a terminal"
    assert "MiB/s" in text

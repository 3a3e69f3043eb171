"""Every hook reachable through the typed facade, with the behaviour the engine relies on."""

import click
import pytest

from xobackup_core.errors import PluginError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.hypervisor import Inventory, Pool, Vm
from xobackup_core.plugins import Plugins, Provided


class Recorder:
    """A plugin implementing every hook, registered in code like an embedding application."""

    def __init__(self):
        self.events = []

    @hookimpl
    def xobackup_provides(self):
        return [Provided("hypervisor", "fake", "test"), Provided("file-reader", "fakefs")]

    @hookimpl
    def xobackup_hypervisor(self, server):
        return "driver for " + server["url"] if server["type"] == "fake" else None

    @hookimpl(tryfirst=True)
    def xobackup_select_vms(self, job, inventory):
        return [vm for vm in inventory.vms if vm.name == job.get("only")] if "only" in job else None

    @hookimpl
    def xobackup_remote(self, url, options):
        return None

    @hookimpl
    def xobackup_compressor(self, name):
        return None

    @hookimpl
    def xobackup_file_readers(self):
        return ["fakefs-reader"]

    @hookimpl
    def xobackup_cli_commands(self, cli):
        @click.command("hello")
        def hello():
            click.echo("hello from a plugin")

        cli.add_command(hello)

    @hookimpl
    def xobackup_run_started(self, run):
        self.events.append(("started", run["runId"]))

    @hookimpl
    def xobackup_task_finished(self, run_id, task):
        self.events.append(("task", run_id, task["status"]))

    @hookimpl
    def xobackup_run_finished(self, run):
        self.events.append(("finished", run["runId"], run["status"]))


def make_plugins():
    recorder = Recorder()
    return Plugins(extra=[("recorder", recorder)]), recorder


def inventory():
    pool = Pool(uuid="p1", name="lab", flavour="xcp-ng")
    vms = (
        Vm(uuid="a", name="web", pool_uuid="p1", power_state="Running"),
        Vm(uuid="b", name="db", pool_uuid="p1", power_state="Halted"),
    )
    return Inventory(pools=(pool,), vms=vms)


def test_provides_are_listed_per_plugin():
    plugins, _ = make_plugins()
    info = {i.name: i for i in plugins.plugins_info()}
    assert info["recorder"].provides[0] == Provided("hypervisor", "fake", "test")
    assert info["core.codecs"].distribution == "xobackup-core"
    assert "fake" in plugins.provided_names("hypervisor")
    assert "file" in plugins.provided_names("remote")


def test_hypervisor_hook_and_clear_error():
    plugins, _ = make_plugins()
    assert plugins.hypervisor({"type": "fake", "url": "u"}) == "driver for u"
    with pytest.raises(PluginError, match="installed types: fake"):
        plugins.hypervisor({"type": "vmware", "url": "u"})


def test_select_vms_hook_can_override_builtin():
    plugins, _ = make_plugins()
    assert [vm.uuid for vm in plugins.select_vms({"id": "j", "only": "db"}, inventory())] == ["b"]
    assert [vm.uuid for vm in plugins.select_vms({"id": "j"}, inventory())] == ["a", "b"]


def test_remote_hook_and_unknown_scheme(tmp_path):
    plugins, _ = make_plugins()
    remote = plugins.remote(f"file://{tmp_path}", {"name": "here"})
    assert remote.name == "here"
    with pytest.raises(PluginError, match=r"'ftp' URLs; installed remote types: .*file"):
        plugins.remote("ftp://host/x", {})


def test_compressor_hook():
    plugins, _ = make_plugins()
    assert plugins.compressor("none").name == "none"
    with pytest.raises(PluginError, match=r"unknown compression 'lz4'; installed: .*none"):
        plugins.compressor("lz4")


def test_file_readers_hook():
    plugins, _ = make_plugins()
    assert "fakefs-reader" in plugins.file_readers()


def test_cli_commands_hook():
    plugins, _ = make_plugins()
    group = click.Group("xobackup")
    plugins.add_cli_commands(group)
    assert "hello" in group.commands


def test_event_hooks_reach_every_plugin():
    plugins, recorder = make_plugins()
    plugins.run_started({"runId": "r1"})
    plugins.task_finished("r1", {"status": "success"})
    plugins.run_finished({"runId": "r1", "status": "failure"})
    assert recorder.events == [
        ("started", "r1"),
        ("task", "r1", "success"),
        ("finished", "r1", "failure"),
    ]


def test_disabled_and_no_autoload():
    assert "remote_local" in {i.name for i in Plugins().plugins_info()}
    assert "remote_local" not in {i.name for i in Plugins(disabled=["remote_local"]).plugins_info()}
    names = {i.name for i in Plugins(autoload=False).plugins_info()}
    assert names == {"core.codecs", "core.selector"}
    names = {i.name for i in Plugins(autoload=False, only=["remote_local"]).plugins_info()}
    assert "remote_local" in names


def test_misspelled_hook_is_rejected():
    class Typo:
        @hookimpl
        def xobackup_remot(self, url, options):
            return None

    with pytest.raises(PluginError, match="xobackup_remot"):
        Plugins(extra=[("typo", Typo())])

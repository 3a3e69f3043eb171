from xobackup_core.builtin.selector import select
from xobackup_core.hypervisor import Inventory, Pool, Vm


def vm(uuid, pool="p1", state="Running", tags=(), **extra):
    return Vm(uuid=uuid, name=f"vm-{uuid}", pool_uuid=pool, power_state=state, tags=tags, **extra)


INVENTORY = Inventory(
    pools=(
        Pool(uuid="p1", name="lab", flavour="xcp-ng"),
        Pool(uuid="p2", name="prod", flavour="xcp-ng"),
    ),
    vms=(
        vm("1", tags=("web",)),
        vm("2", state="Halted", tags=("db", "prod")),
        vm("3", pool="p2", tags=("web", "scratch")),
        vm("4", pool="p2", tags=("xo:no-bak",)),
        vm("5", pool="p2", tags=("xo:no-bak=too big",)),
        vm("6", pool="p2", is_snapshot=True),
        vm("7", other_config={"xo:backup:job": "job-1"}, blocked_operations={"start": "replica"}),
        vm("8", other_config={"xo:backup:job": "other-job"}, blocked_operations={"start": "x"}),
    ),
)


def uuids(job):
    return [v.uuid for v in select({"id": "job-1", **job}, INVENTORY)]


def test_smart_default_takes_all_but_exclusions():
    assert uuids({"smart": {}}) == ["1", "2", "3", "8"]


def test_pools_by_uuid_or_name_and_not_pools():
    assert uuids({"smart": {"pools": ["prod"]}}) == ["3"]
    assert uuids({"smart": {"pools": ["p1"]}}) == ["1", "2", "8"]
    assert uuids({"smart": {"not_pools": ["lab"]}}) == ["3"]


def test_power_state_and_tags():
    assert uuids({"smart": {"power_state": "Halted"}}) == ["2"]
    assert uuids({"smart": {"tags": ["web"]}}) == ["1", "3"]
    assert uuids({"smart": {"tags": ["web"], "not_tags": ["scratch"]}}) == ["1"]
    assert uuids({"smart": {"tags": ["db", "web"], "power_state": "Running"}}) == ["1", "3"]


def test_explicit_list_by_uuid_or_name_still_honours_no_bak():
    assert uuids({"vms": ["2", "vm-3", "4"]}) == ["2", "3"]


def test_new_vm_is_picked_up_at_next_evaluation():
    grown = Inventory(pools=INVENTORY.pools, vms=(*INVENTORY.vms, vm("9", tags=("web",))))
    assert [v.uuid for v in select({"id": "j", "smart": {"tags": ["web"]}}, grown)] == [
        "1",
        "3",
        "9",
    ]

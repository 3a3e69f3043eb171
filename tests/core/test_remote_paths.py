import errno

import pytest

from xobackup_core.errors import (
    RemoteConnectionError,
    RemoteError,
    RemoteNoSpaceError,
    RemoteNotFoundError,
    RemotePathError,
    RemotePermissionError,
)
from xobackup_core.remote import (
    is_temp_name,
    join_path,
    make_temp_name,
    map_os_error,
    normalize_path,
    parent_path,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("", "/"), ("/", "/"), ("a", "/a"), ("a//b/./c/", "/a/b/c"), ("\\\\x\\y", "/x/y")],
)
def test_normalize(given, expected):
    assert normalize_path(given) == expected


@pytest.mark.parametrize("bad", ["..", "/a/../b", "a/b/..", "x\x00"])
def test_refused(bad):
    with pytest.raises(RemotePathError):
        normalize_path(bad)


def test_join_and_parent():
    assert join_path("/xo-vm-backups", "vm", "x.json") == "/xo-vm-backups/vm/x.json"
    assert parent_path("/a/b/c") == "/a/b" and parent_path("/a") == "/"


def test_temp_names_are_recognised_and_unique():
    first, second = make_temp_name("20260801T040000Z.xva"), make_temp_name("20260801T040000Z.xva")
    assert first != second and is_temp_name(first) and is_temp_name(second)
    assert not is_temp_name("20260801T040000Z.xva") and not is_temp_name(".hidden")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOENT, RemoteNotFoundError),
        (errno.EACCES, RemotePermissionError),
        (errno.ENOSPC, RemoteNoSpaceError),
        (errno.ECONNRESET, RemoteConnectionError),
        (errno.EINVAL, RemoteError),
    ],
)
def test_os_error_mapping(code, kind):
    error = map_os_error(OSError(code, "boom"), remote="nas", operation="write", path="/p")
    assert type(error) is kind
    assert str(error) == "remote 'nas' write /p: boom"
    assert error.transient == (kind is RemoteConnectionError)

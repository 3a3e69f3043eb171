"""The ``.xva.checksum`` of full backups: Xen Orchestra's crypt-like ``$<id>$$<hex>`` form."""

from __future__ import annotations

import hashlib

import pytest

from xobackup_core.engine.runner import xva_checksum, xva_checksum_algorithm
from xobackup_core.engine.streams import BackgroundDigest


@pytest.mark.parametrize(("algorithm", "prefix"), [("md5", "$1$$"), ("sha256", "$5$$")])
def test_checksum_names_its_algorithm_as_xen_orchestra_reads_it(algorithm, prefix):
    data = b"xva bytes " * 100_000
    digest = BackgroundDigest(algorithm)
    for start in range(0, len(data), 65536):
        digest.update(data[start : start + 65536])
    assert xva_checksum(digest) == prefix + hashlib.new(algorithm, data).hexdigest()


def test_the_algorithm_is_one_xen_orchestra_verifies():
    assert xva_checksum_algorithm() in ("md5", "sha256")
    assert xva_checksum_algorithm() is xva_checksum_algorithm()  # measured once

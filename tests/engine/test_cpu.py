"""The CPU compatibility rule that replication with memory and memory restores share."""

from __future__ import annotations

from xobackup_core.engine.cpu import cpu_problem, describe_bits, missing_cpu_features
from xobackup_core.hypervisor import CpuInfo

HOST = CpuInfo(
    vendor="GenuineIntel",
    features_hvm="1fcbfbff-f7fa3223-2d93fbff-00000023",
    model_name="Intel(R) Xeon(R) Gold 6248",
)


def test_a_vm_with_fewer_feature_words_than_the_host_resumes():
    # XAPI compares word by word; a short list is padded with zeros, not read as one number
    assert cpu_problem({"vendor": "GenuineIntel", "features": "1fcbfbff-f7fa3223"}, HOST) == ""


def test_a_vm_using_a_feature_the_host_lacks_is_refused_with_the_bit_named():
    problem = cpu_problem(
        {"vendor": "GenuineIntel", "features": "1fcbfbff-f7fa3223-2d93fbff-00000063"}, HOST
    )
    assert "00000000-00000000-00000000-00000040" in problem
    assert "word 3 bit 6" in problem


def test_another_vendor_is_refused_naming_both():
    problem = cpu_problem({"vendor": "AuthenticAMD", "features": "00000001"}, HOST)
    assert "AuthenticAMD" in problem and "GenuineIntel" in problem


def test_feature_words_beyond_the_hosts_count_are_not_compared():
    assert missing_cpu_features("00000001-00000002-ffffffff", "00000001-00000002") == ""
    assert describe_bits("00000001-00000010") == "word 0 bit 0, word 1 bit 4"

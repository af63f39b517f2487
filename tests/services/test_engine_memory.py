"""The KV cache vLLM on CPU starts with: explicit sizes win, else a share of the free memory, never more than is free.

vLLM's own CPU default reserves `gpu_memory_utilization` (0.85) of the machine's total memory and refuses to
start when that much is not free, which is what broke `mindgap up` beside its trainer (issue 15).
"""

from __future__ import annotations

import pytest

from services.engine import AUTO_KV_CACHE_MAX_GIB, EngineStartError, GiB, cpu_kv_cache_gib


def test_the_machine_that_failed_now_gets_a_cache_that_fits() -> None:
    # "Available memory on node 0 (18.44/23.54 GiB) … less than desired (0.85, 20.01 GiB)"
    gib, source = cpu_kv_cache_gib(None, None, int(18.44 * GiB))
    assert gib == AUTO_KV_CACHE_MAX_GIB and gib * GiB < 18.44 * GiB
    assert "18.4 GiB free" in source


@pytest.mark.parametrize(("free_gib", "expected"), [(64.0, 4), (12.0, 3), (9.0, 2), (6.0, 1), (1.5, 1)])
def test_automatic_size_is_a_quarter_of_free_memory_from_1_to_4_gib(free_gib: float, expected: int) -> None:
    assert cpu_kv_cache_gib(None, None, int(free_gib * GiB))[0] == expected


def test_configured_size_wins_and_rounds_up_to_whole_gib() -> None:
    assert cpu_kv_cache_gib(2.5, "7", 16 * GiB) == (3, "engine.kv_cache_gib")
    assert cpu_kv_cache_gib(0.25, None, 16 * GiB) == (1, "engine.kv_cache_gib")


def test_an_exported_variable_is_used_when_nothing_is_configured() -> None:
    assert cpu_kv_cache_gib(None, "3", 16 * GiB) == (3, "VLLM_CPU_KVCACHE_SPACE")
    for bad in ("abc", "0", "-1", "1.5"):
        with pytest.raises(EngineStartError, match="VLLM_CPU_KVCACHE_SPACE"):
            cpu_kv_cache_gib(None, bad, 16 * GiB)


def test_more_than_the_free_memory_is_one_clear_error() -> None:
    with pytest.raises(EngineStartError, match=r"needs 8 GiB \(engine\.kv_cache_gib\) but only 5\.0 GiB") as err:
        cpu_kv_cache_gib(8, None, 5 * GiB)
    assert "\n" not in str(err.value) and "kv_cache_gib" in str(err.value)
    with pytest.raises(EngineStartError, match=r"only 0\.5 GiB of memory is free"):
        cpu_kv_cache_gib(None, None, GiB // 2)

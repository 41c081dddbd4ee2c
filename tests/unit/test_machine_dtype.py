"""The dtype rule (sae_steer.machine_dtype): bfloat16 only on a GPU or a CPU with native bf16 (AVX-512 BF16 or
AMX), float32 elsewhere; --dtype wins. The flag sets are real /proc/cpuinfo `flags` lines (trimmed)."""
from __future__ import annotations

import pytest

from sae_steer import machine_dtype
from sae_steer.machine_dtype import default_dtype, pick_dtype, read_cpu_flags

# AMD EPYC 7B12 (Zen 2; issue 17's machine): AVX2, no AVX-512 at all
EPYC_AVX2 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
             "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid "
             "extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes "
             "xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch "
             "osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap "
             "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid")
# Intel Cooper Lake / AMD Zen 4: AVX-512 with the BF16 extension, no AMX
AVX512_BF16 = EPYC_AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512_vbmi"
# Intel Sapphire Rapids: AMX tiles with bf16 (and AVX-512 BF16 too, as every AMX part has)
AMX = AVX512_BF16 + " amx_bf16 amx_tile amx_int8 avx512_fp16"
# AVX-512 without the BF16 extension (Skylake-SP): no native bf16 either
AVX512_NO_BF16 = EPYC_AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl"


@pytest.mark.parametrize("flags, expected", [(EPYC_AVX2, "float32"), (AVX512_NO_BF16, "float32"),
                                             (AVX512_BF16, "bfloat16"), (AMX, "bfloat16")])
def test_bf16_only_where_the_cpu_computes_it(flags, expected):
    dtype, reason = default_dtype(flags.split(), cuda=False)
    assert dtype == expected, reason
    if expected == "bfloat16":
        assert "avx512_bf16" in reason or "amx_bf16" in reason
    else:
        assert "no native bfloat16" in reason


def test_amx_alone_is_enough():
    assert default_dtype(["avx2", "amx_bf16"], cuda=False)[0] == "bfloat16"


def test_a_gpu_gets_bf16_whatever_the_host_cpu():
    assert default_dtype(EPYC_AVX2.split(), cuda=True) == ("bfloat16", "a GPU computes bfloat16 natively")


def test_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: {EPYC_AVX2}\n\n"
                       f"processor\t: 1\nflags\t\t: {EPYC_AVX2}\n")
    flags = read_cpu_flags(str(cpuinfo))
    assert "avx2" in flags and "avx512_bf16" not in flags and "EPYC" not in flags
    assert read_cpu_flags(str(tmp_path / "absent")) is None


def test_no_cpuinfo_means_float32(monkeypatch):
    monkeypatch.setattr(machine_dtype, "read_cpu_flags", lambda: None)
    dtype, reason = default_dtype(cuda=False)
    assert dtype == "float32" and "cpuinfo" in reason


def test_this_machines_choice_follows_its_own_flags():
    import torch
    flags = read_cpu_flags() or set()
    native = torch.cuda.is_available() or bool({"avx512_bf16", "amx_bf16"} & flags)
    assert default_dtype()[0] == ("bfloat16" if native else "float32")


def test_the_override_wins_and_the_choice_is_said_once(monkeypatch, capsys):
    monkeypatch.setattr(machine_dtype, "_said", set())
    monkeypatch.setattr(machine_dtype, "default_dtype", lambda: ("bfloat16", "the CPU computes bfloat16 natively"))
    assert pick_dtype("float32") == "float32"
    assert pick_dtype() == "bfloat16" and pick_dtype() == "bfloat16"
    err = capsys.readouterr().err.splitlines()
    assert err == ["[sae-steer] dtype float32: --dtype",
                   "[sae-steer] dtype bfloat16: the CPU computes bfloat16 natively"]


@pytest.mark.parametrize("given, added", [([], ["--dtype", "float32"]), (["--dtype", "bfloat16"], []),
                                          (["--dtype=float16"], [])])
def test_serve_passes_a_given_dtype_and_adds_the_machines_otherwise(tmp_path, monkeypatch, given, added):
    """`sae-steer serve` hands vLLM's server the arguments it was given, plus this machine's --dtype when none
    was given (vLLM's own default would be the checkpoint's dtype). vLLM's launcher is replaced by one that
    records its argv: what is checked is the command line the server would start with."""
    import sys
    import types

    from sae_steer import cli
    from sae_steer.vllm_plugin.observers import RUNTIME_DIR_ENV
    launched = []
    launcher = types.ModuleType("vllm.entrypoints.launchers.api_server.entry")
    launcher.main = lambda: launched.append(list(sys.argv))
    monkeypatch.setitem(sys.modules, launcher.__name__, launcher)
    monkeypatch.setattr(machine_dtype, "default_dtype", lambda: ("float32", "no native bfloat16 (test)"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv(RUNTIME_DIR_ENV, str(runtime))
    monkeypatch.setenv("VLLM_PLUGINS", "")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    cli.serve(["/models/m", "--port", "8001", *given])
    argv = launched[0]
    assert argv[:3] == ["sae-steer serve", "--model", "/models/m"] and argv[3] == "--additional-config"
    assert argv[5:] == [*added, "--port", "8001", *given]

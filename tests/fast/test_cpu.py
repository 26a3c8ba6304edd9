"""CPU capability detection, ``dtype="auto"`` on the CPU, and threads (``--threads``, physical cores).

The bf16 units are mocked both ways (``realisr.cpu.cpu_info`` replaced), so these run on any CPU: bf16
arithmetic works everywhere, only its speed needs the units.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import realisr
from realisr import cpu
from realisr.cli.main import main

COMPACT = "realesr-animevideov3-x4"  # the smallest registered GAN model: fast in any dtype
AMX = cpu.CPUInfo(name="Fake Xeon", arch="x86_64", amx_bf16=True, avx512_bf16=True, physical_cores=2,
                  logical_cores=4)
PLAIN = cpu.CPUInfo(name="Fake EPYC", arch="x86_64", amx_bf16=False, avx512_bf16=False, physical_cores=2,
                    logical_cores=4)
AVX512_BF16_ONLY = dataclasses.replace(PLAIN, name="Fake Zen 4", avx512_bf16=True)


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    monkeypatch.delenv("REALISR_CPU_BF16", raising=False)  # tests/conftest.py sets it for the rest of the suite
    cpu._cached.cache_clear()
    yield
    cpu._cached.cache_clear()


@pytest.fixture
def fake_cpu(monkeypatch):
    def use(info):
        monkeypatch.setattr(cpu, "cpu_info", lambda: info)
    return use


@pytest.fixture
def spy_forward(monkeypatch):
    """Records (tile dtype, torch threads) of every GAN forward: what really ran."""
    from realisr.pipelines.gan.pipeline_gan import GANPipeline

    seen = []
    real = GANPipeline._forward

    def forward(self, x):
        seen.append((x.dtype, torch.get_num_threads()))
        return real(self, x)

    monkeypatch.setattr(GANPipeline, "_forward", forward)
    return seen


# -- detection -------------------------------------------------------------------------------------------
def _fake_sysfs(root, topology):
    for cpu_id, (package, core) in enumerate(topology):
        d = root / f"cpu{cpu_id}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_hyperthread_siblings_once(tmp_path):
    # 2 sockets x 2 cores x 2 threads; core ids repeat across sockets
    sysfs = _fake_sysfs(tmp_path / "sys", [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1)])
    nocg = tmp_path / "no-cgroup"
    assert cpu.physical_cores_available(range(8), sysfs, nocg) == (4, 8)
    assert cpu.physical_cores_available([0, 1, 4], sysfs, nocg) == (2, 3)  # affinity: siblings 0, 1 + core 4
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("150000 100000\n")  # a quota of 1.5 CPUs -> 2
    assert cpu.physical_cores_available(range(8), sysfs, cg) == (2, 2)
    (cg / "cpu.max").write_text("max 100000\n")
    assert cpu.physical_cores_available(range(8), sysfs, cg) == (4, 8)
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.physical_cores_available(range(8), sysfs, v1) == (1, 1)
    # no topology (e.g. a sandbox without /sys): the logical CPUs
    assert cpu.physical_cores_available(range(3), tmp_path / "none", nocg) == (3, 3)


def test_default_threads_are_physical_cores_unless_omp_says(fake_cpu, monkeypatch):
    fake_cpu(AMX)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.default_threads() == 2  # physical, not the 4 logical
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.default_threads() == 3


@pytest.mark.parametrize("source", ["torch", "/proc/cpuinfo"])
@pytest.mark.parametrize("flags", [{"amx_bf16", "amx_tile", "avx512_bf16"}, {"avx512_bf16"}, {"avx2"}])
def test_detection_reads_torch_or_proc_cpuinfo(monkeypatch, source, flags):
    if source == "torch":
        caps = {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "cpu_name": "T"}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
        monkeypatch.setattr(cpu, "_proc_cpuinfo", lambda: ("", set()))
    else:  # an older torch without get_capabilities
        monkeypatch.setattr(torch.cpu, "get_capabilities", None, raising=False)
        monkeypatch.setattr(cpu, "_proc_cpuinfo", lambda: ("P", flags | {"fpu", "sse2"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    info = cpu.cpu_info()
    assert info.source == source
    assert info.amx_bf16 == ("amx_bf16" in flags) and info.avx512_bf16 == ("avx512_bf16" in flags)
    assert info.bf16_units == ("amx_bf16" in flags)  # AVX512-BF16 alone measured slower than fp32
    assert info.physical_cores >= 1 and info.units() in info.describe()


@pytest.mark.parametrize("cap, amx", [("AVX512_CORE_BF16", False), ("AVX2", False), ("AVX10_2_512", False),
                                      ("AVX512_CORE_AMX", True), ("ALL", True), ("SOMETHING_NEW", True)])
def test_onednn_isa_cap_hides_the_tiles(monkeypatch, cap, amx):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True},
                        raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap.lower())
    info = cpu.cpu_info()
    assert info.amx_bf16 is amx and info.isa_cap == cap
    assert f"ONEDNN_MAX_CPU_ISA={cap}" in info.describe()


@pytest.mark.parametrize("value, amx", [("0", False), ("off", False), ("1", True), ("", True)])
def test_realisr_cpu_bf16_off_hides_the_tiles(monkeypatch, value, amx):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True},
                        raising=False)
    monkeypatch.setenv("REALISR_CPU_BF16", value)
    info = cpu.cpu_info()
    assert info.amx_bf16 is amx and info.avx512_bf16
    assert ("REALISR_CPU_BF16=0" in info.describe()) is not amx
    assert info.describe().endswith("bf16 where the model allows it" if amx else "fp32")


def test_detection_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_detect", lambda: calls.append(1) or AMX)
    assert cpu.cpu_info() is cpu.cpu_info() and calls == [1]


# -- dtype auto ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info, expected", [(AMX, torch.bfloat16), (PLAIN, torch.float32),
                                            (AVX512_BF16_ONLY, torch.float32)])
def test_auto_picks_bf16_only_with_the_units(fake_cpu, spy_forward, info, expected):
    fake_cpu(info)
    pipe = realisr.load_pipeline(COMPACT, device="cpu")
    assert pipe.dtype == expected
    out = pipe(np.zeros((8, 8, 3), np.uint8))
    assert spy_forward[-1][0] == expected  # the forward really ran in it
    assert out.info["dtype"] == str(expected).replace("torch.", "")
    assert np.isfinite(out.pixels).all()


def test_auto_stays_fp32_where_no_bound_is_stated(fake_cpu, tmp_path):
    fake_cpu(AMX)
    assert realisr.load_pipeline("bicubic").dtype == torch.float32  # no bf16 at all
    from realisr.weights.gan import load_gan_descriptor

    path = tmp_path / "user.pth"  # a user's checkpoint: bf16 possible, but no tested bound
    torch.save(load_gan_descriptor(realisr.registry.get_spec(COMPACT)).model.state_dict(), path)
    pipe = realisr.load_pipeline(str(path), device="cpu")
    assert pipe.dtype == torch.float32 and "no tested bf16 bound" in pipe.dtype_reason


def test_explicit_dtypes_are_kept(fake_cpu):
    fake_cpu(AMX)
    assert realisr.load_pipeline(COMPACT, device="cpu", dtype="fp32").dtype == torch.float32
    fake_cpu(PLAIN)  # bf16 runs everywhere when asked for (emulated without the units)
    assert realisr.load_pipeline(COMPACT, device="cpu", dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("info", [AMX, PLAIN], ids=["amx", "plain"])
def test_diffusion_auto_on_cpu(fake_cpu, info):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from helpers import onestep
    from realisr.pipelines.pisa_sr.pipeline_pisa_sr import PiSASRPipeline

    fake_cpu(info)
    root = onestep.golden_dir()
    pipe = PiSASRPipeline.from_spec(realisr.registry.get_spec("pisa-sr"), device="cpu", sd=str(onestep.sd_dir()),
                                    checkpoint=str(root / "pisa_sr.pkl"))
    bf16 = info.bf16_units
    assert pipe.dtype == (torch.bfloat16 if bf16 else torch.float32) and pipe.vae_dtype == pipe.dtype
    for module in (pipe.unet.conv_in, pipe.vae.encoder.conv_in, pipe.vae.decoder.conv_out):
        assert module.weight.is_contiguous(memory_format=torch.channels_last) == bf16
        assert module.weight.dtype == pipe.dtype


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture
def small_png(tmp_path, photo):
    p = tmp_path / "small.png"
    Image.fromarray(photo[100:112, 200:216]).save(p)
    return p


def _choice_lines(err: str) -> list:
    return [ln for ln in err.splitlines() if "--dtype auto" in ln]


def test_cli_says_the_choice_once_and_fp32_forces_fp32(fake_cpu, spy_forward, small_png, tmp_path, capsys):
    fake_cpu(AMX)
    rc = main(["upscale", "-i", str(small_png), "-o", str(tmp_path / "a"), "-m", COMPACT])
    err = capsys.readouterr().err
    assert rc == 0 and spy_forward[-1][0] == torch.bfloat16
    assert _choice_lines(err) == [f"realisr: {COMPACT} on cpu in bf16 (--dtype auto; --fp32 forces fp32)"]
    rc = main(["upscale", "-i", str(small_png), "-o", str(tmp_path / "b"), "-m", COMPACT, "--fp32"])
    assert rc == 0 and spy_forward[-1][0] == torch.float32
    assert _choice_lines(capsys.readouterr().err) == []  # nothing chosen, nothing said
    fake_cpu(PLAIN)
    rc = main(["upscale", "-i", str(small_png), "-o", str(tmp_path / "c"), "-m", COMPACT])
    assert rc == 0 and spy_forward[-1][0] == torch.float32
    assert _choice_lines(capsys.readouterr().err) == [f"realisr: {COMPACT} on cpu in fp32 (--dtype auto; -v says why)"]
    main(["-q", "upscale", "-i", str(small_png), "-o", str(tmp_path / "d"), "-m", COMPACT])
    assert capsys.readouterr().err == ""


def test_cli_verbose_says_why(fake_cpu, small_png, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="realisr")
    fake_cpu(AMX)
    assert main(["-v", "upscale", "-i", str(small_png), "-o", str(tmp_path / "a"), "-m", COMPACT]) == 0
    why = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert len(why) == 1 and "bfloat16" in why[0] and "AMX-BF16" in why[0] and "50 dB" in why[0], why
    assert _choice_lines(capsys.readouterr().err) == []  # said once: by the log line
    caplog.clear()
    fake_cpu(PLAIN)
    assert main(["-v", "upscale", "-i", str(small_png), "-o", str(tmp_path / "b"), "-m", COMPACT]) == 0
    why = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert len(why) == 1 and "float32" in why[0] and "no AMX-BF16 units" in why[0], why


# -- threads ---------------------------------------------------------------------------------------------
def test_threads_flag_and_physical_default(fake_cpu, spy_forward, small_png, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake_cpu(dataclasses.replace(PLAIN, physical_cores=1, logical_cores=2))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert main(["-q", "upscale", "-i", str(small_png), "-o", str(tmp_path / "a"), "-m", COMPACT]) == 0
        assert spy_forward[-1][1] == 1  # the physical cores, not torch's 3
        assert main(["-q", "upscale", "-i", str(small_png), "-o", str(tmp_path / "b"), "-m", COMPACT,
                     "--threads", "2"]) == 0
        assert spy_forward[-1][1] == 2
        assert torch.get_num_threads() == 3  # restored after each call
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["-q", "upscale", "-i", str(small_png), "--threads", "0"])


def test_api_threads(spy_forward):
    pipe = realisr.load_pipeline(COMPACT, device="cpu", num_threads=1)
    out = pipe(np.zeros((8, 8, 3), np.uint8))
    assert spy_forward[-1][1] == 1 and out.info["threads"] == 1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            realisr.load_pipeline(COMPACT, device="cpu", num_threads=bad)
        with pytest.raises(ValueError, match="num_threads"):
            pipe.num_threads = bad


def test_cli_pisa_sr_in_bf16_on_an_amx_cpu(fake_cpu, tmp_path, monkeypatch, capsys):
    """The user's path on a CPU with AMX: `-m pisa-sr` with --dtype auto runs bf16 (semantic LoRA fused into the
    bf16 weights) and stays finite and within the registry's bound of the fp32 API output."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from helpers import onestep
    from realisr.io import read_image
    from realisr.registry import get_spec

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "pisa_sr.pkl").symlink_to(onestep.golden_dir() / "pisa_sr.pkl")
    monkeypatch.setenv("REALISR_WEIGHTS", str(weights))
    lq = np.load(onestep.golden_dir() / "inputs" / "in1" / "lq.npy")[0].transpose(1, 2, 0)
    src = tmp_path / "in.png"
    Image.fromarray(np.rint(lq * 255).astype(np.uint8)).save(src)
    fake_cpu(AMX)
    rc = main(["upscale", "-i", str(src), "-o", str(tmp_path / "out.png"), "-m", "pisa-sr", "--sd",
               str(onestep.sd_dir()), "--process-size", "96", "--threads", "1"])
    assert rc == 0 and "pisa-sr on cpu in bf16" in capsys.readouterr().err
    got = read_image(tmp_path / "out.png").pixels.astype(np.float64)
    with torch.inference_mode():
        ref = onestep.pisa_pipeline()(np.asarray(Image.open(src)), process_size=96).pixels.astype(np.float64)
    psnr = 10 * np.log10(1.0 / np.mean((got - ref) ** 2))
    assert np.isfinite(got).all() and get_spec("pisa-sr").bf16_psnr_db <= psnr < 90, psnr


def test_keep_freed_memory_stops_page_faults_of_big_reallocations():
    """The CLI's allocator setting: a freed 96 MB block is reused instead of page-faulted in again."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only: elsewhere keep_freed_memory() does nothing")
    code = (  # malloc, touch, free a 96 MB block (as torch allocates an activation), with plain libc calls
        "import ctypes, resource, sys\n"
        "from realisr.cpu import keep_freed_memory\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "def cycle(n=96 << 20):\n"
        "    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
        "cycle()\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(4): cycle()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n")
    faults = {}
    for mode in ("plain", "keep"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.split()[-1])
    assert faults["plain"] >= 4 * 40  # each new block is faulted in: >= 48 faults even with 2 MiB huge pages
    assert faults["keep"] < faults["plain"] / 20, faults

"""llmql's C RMSNorm, gated activation and q/k norm + RoPE against their torch references
(and the engine layers using them against the torch formulas).

Kernel tests run once per build (`LLMQL_CPU_KERNELS` "auto": AVX-512 where the CPU has it;
"avx2": the AVX2 build, as on a CPU without AVX-512) and skip where that build does not run
(no such CPU, no C compiler): the layers then take torch's path."""

from __future__ import annotations

import os

import pytest
import torch

from llmql.kernels.cpu_ops import (
    gated_act,
    norm_rope,
    ref_gated_act,
    ref_norm_rope,
    ref_rms_norm,
    rms_norm,
)


@pytest.fixture
def kernel(c_build: str) -> str:
    """The C kernel build under test (tests/kernels/conftest.py: `c_build`)."""
    return c_build


@pytest.mark.parametrize("shape", [(1, 640), (7, 100), (60, 640), (300, 256), (3, 4, 48), (0, 64)])
def test_rms_norm_matches_reference(shape, kernel) -> None:
    """Row counts on both sides of the threading threshold, a width that is not a multiple of
    16 (masked tail), a 3-D input (per-head norms), no rows."""
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape, generator=gen) * 3
    scale = 1.0 + torch.randn(shape[-1], generator=gen)
    got = rms_norm(x, scale, 1e-6)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref_rms_norm(x, scale, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_strided_rows(kernel) -> None:
    wide = torch.randn(9, 100)
    x, scale = wide[:, 10:74], torch.rand(64)
    torch.testing.assert_close(rms_norm(x, scale, 1e-5), ref_rms_norm(x, scale, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows,width", [(1, 2048), (5, 40), (60, 2048), (200, 1000)])
def test_gated_act_matches_reference(act, rows, width, kernel) -> None:
    """Values across the activation's range (large negative: ~0; large positive: ~x)."""
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 4
    gate_up[0, :8] = torch.tensor([-100.0, -30.0, -9.0, -1e-3, 0.0, 1e-3, 30.0, 100.0])
    got = gated_act(gate_up, act)
    assert got.shape == (rows, width)
    torch.testing.assert_close(got, ref_gated_act(gate_up, act), atol=1e-5, rtol=2e-6)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("t,heads,head_dim", [(1, 4, 256), (9, 2, 20), (70, 8, 64), (0, 2, 16)])
def test_norm_rope_matches_reference(norm, t, heads, head_dim, kernel) -> None:
    """Heads read from the middle of a packed [T, W] output (strided rows), normalised
    (Gemma 3 / Qwen 3) or not (Llama), rotated at arbitrary positions; head widths whose half
    is not a multiple of 16 take the masked tail."""
    gen = torch.Generator().manual_seed(t * 10 + head_dim)
    width = 3 + heads * head_dim + 5
    qkv = torch.randn(t, width, generator=gen) * 2
    scale = 1.0 + torch.randn(head_dim, generator=gen) if norm else None
    angles = torch.rand(t, head_dim, generator=gen) * 50  # NOTE: halves differ (RoPE's repeat), so both count
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # NOTE: the layers' [T, 1, D] tables
    got = norm_rope(qkv, 3, heads, head_dim, scale, 1e-6, cos, sin)
    assert got.shape == (t, heads, head_dim) and got.is_contiguous()
    want = ref_norm_rope(qkv, 3, heads, head_dim, scale, 1e-6, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if not norm:  # NOTE: the same products and sums as torch's formula: bit for bit
        assert torch.equal(got, want)


def test_bad_input_is_refused(kernel) -> None:
    with pytest.raises(ValueError, match="float32"):
        rms_norm(torch.randn(3, 8).double(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="scale"):
        rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="act"):
        gated_act(torch.randn(3, 8), "relu")
    with pytest.raises(ValueError, match="2I"):
        gated_act(torch.randn(3, 7), "silu")
    with pytest.raises(ValueError, match="norm_rope"):
        norm_rope(torch.randn(3, 30), 0, 2, 16, None, 0.0, None, None)  # NOTE: 32 columns > 30
    with pytest.raises(ValueError, match="both tables"):
        norm_rope(torch.randn(3, 32), 0, 2, 16, None, 0.0, torch.ones(3, 16), None)


@pytest.mark.parametrize("kernels", ["auto", "avx2", "0"])
def test_layers_equal_the_formulas_with_and_without_kernels(kernels, monkeypatch) -> None:
    """RMSNorm (Gemma's 1 + w) and the gated MLP's activation step give the torch formulas'
    values whichever path runs (LLMQL_CPU_KERNELS=0: torch's; "avx2": the AVX2 build)."""
    from llmql.engine.layers.mlp import GatedMLP
    from llmql.engine.layers.norm import RMSNorm

    monkeypatch.setenv("LLMQL_CPU_KERNELS", kernels)
    norm = RMSNorm(64, eps=1e-6, offset=1.0)
    norm.weight.data = torch.randn(64)
    x = torch.randn(20, 64) * 2
    torch.testing.assert_close(norm(x), ref_rms_norm(x, 1.0 + norm.weight, 1e-6), atol=1e-5, rtol=1e-5)
    mlp = GatedMLP(64, 96, "gelu_pytorch_tanh")
    for p in mlp.parameters():
        p.data = torch.randn_like(p) * 0.1
    gate_up = x @ mlp.gate_up_proj.weight.T
    want = ref_gated_act(gate_up, "gelu_tanh") @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want, atol=1e-4, rtol=1e-4)


def test_library_build_failures_fall_back(monkeypatch, tmp_path, caplog) -> None:
    """No working C compiler: the build raises a RuntimeError naming the compiler, and the
    loader turns that into "unavailable" (a warning; callers keep torch's paths)."""
    from llmql.kernels import cpu_lib
    from llmql.settings import override

    monkeypatch.setenv("CC", "/bin/false")
    with override(cache_dir=tmp_path):
        with pytest.raises(RuntimeError, match="/bin/false"):
            cpu_lib._build()
        if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"):
            with caplog.at_level("WARNING"):
                assert cpu_lib._load.__wrapped__() is None
            assert "unavailable" in caplog.text
    assert not list(tmp_path.glob("kernels/*.so"))  # NOTE: no partial library left behind
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with override(cache_dir=tmp_path), pytest.raises(OSError):
        cpu_lib._build()


@pytest.mark.parametrize("build", ["AVX512", "AVX2"])
def test_each_build_compiles_where_its_cpu_runs(build) -> None:
    """Where the CPU runs a build and a C compiler is on PATH, the build compiles and loads:
    a source that stops compiling must fail here, not fall back silently to the other build
    or to torch's paths (the kernel tests would then still pass)."""
    import shutil

    from llmql.kernels import cpu_lib

    b = getattr(cpu_lib, build)
    if torch.backends.cpu.get_cpu_capability() not in b.capabilities:
        pytest.skip(f"this CPU does not run the {build} build")
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    assert cpu_lib._build(b).exists()  # NOTE: raises with the compiler's message on an error
    lib = cpu_lib._load(b)
    assert lib is not None and all(hasattr(lib, name) for name in b.exports)

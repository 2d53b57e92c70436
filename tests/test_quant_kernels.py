"""ops.qmatvec, ops.qmatvec_q8 and ops.dequantize over packed GGUF blocks: the CPU kernels (both instruction-set
paths, and qmatvec_q8's AVX-512 VNNI one) and the reference against gguf's own dequantization and an fp64
product.

dequantize must give gguf.quants.dequantize's float32 bits. qmatvec sums in another order than F.linear
(per group: scale * sum(q x) + offset * sum(x)), so it is held to a bound on fp32 rounding of the terms it
sums, which a decoding mistake exceeds by orders of magnitude. qmatvec_q8 is held to the same bound around
the product with the activations as llama.cpp quantizes them (reference.quantize_q8), and must differ from the
exact product by more than it. Outputs are poisoned with NaN first.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import ops
from engine import reference as ref

from .helpers import gen, on_path, poisoned, randn
from .test_ops import _noncontig, _raise, assert_same_one_line_error

QTYPES = list(ref.QUANT_TYPES)  # Q4_0, Q4_1, Q8_0, Q4_K, Q6_K
# The half scales' byte offsets in each block: random bytes there could be inf or NaN.
SCALE_OFFSETS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}
VARIANTS = ["compiled-auto", "compiled-portable", "reference"]  # path and, for the kernels, instruction set
EPS = torch.finfo(torch.float32).eps


def _name(qtype: int) -> str:
    return ref.QUANT_TYPES[qtype][0]


@contextlib.contextmanager
def variant(name: str, op: str) -> Iterator[None]:
    """The reference, or the compiled kernel on its run-time choice of ISA or forced to the portable code."""
    path, _, isa = name.partition("-")
    with on_path(path, op, "cpu"):
        if path == "reference":
            yield
            return
        from engine import _C

        _C.cpu.set_quant_isa(isa)
        try:
            yield
        finally:
            _C.cpu.set_quant_isa("auto")


def random_blocks(qtype: int, N: int, nblocks: int, g: np.random.Generator) -> torch.Tensor:
    """N rows of nblocks random blocks: every code and sub-scale random, the half scales random finite."""
    _, _, nbytes = ref.QUANT_TYPES[qtype]
    b = g.integers(0, 256, (N, nblocks, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        b[:, :, off : off + 2] = (g.standard_normal((N, nblocks)) * 0.02).astype(np.float16)[..., None].view(np.uint8)
    return torch.from_numpy(b.reshape(N, nblocks * nbytes))


def quantized_blocks(qtype: int, N: int, nblocks: int, g: np.random.Generator) -> torch.Tensor:
    """gguf's quantizer on random weights (the blocks a converter writes), for the types it implements."""
    w = g.standard_normal((N, nblocks * ref.QUANT_TYPES[qtype][1])).astype(np.float32)
    return torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType(qtype)))


def make_blocks(qtype: int, N: int, nblocks: int, seed: int, kind: str = "random") -> torch.Tensor:
    g = np.random.default_rng(seed)
    return quantized_blocks(qtype, N, nblocks, g) if kind == "quantized" else random_blocks(qtype, N, nblocks, g)


BLOCK_KINDS = [(q, "random") for q in QTYPES] + [(q, "quantized") for q in (2, 3, 8)]


def gguf_weights(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype)))


def assert_product_close(got: torch.Tensor, h: torch.Tensor, w: torch.Tensor, base: torch.Tensor | None,
                         what: str) -> None:
    """got = base + h @ w^T within fp32 rounding of the terms the kernel sums: each weight's share of its
    group (scale * q and the offset) is at most 8x the group's largest |weight|, and an fp32 sum of n terms
    is off by a few sqrt(n) ulps of their magnitudes (32 ulps allowed), plus the final rounding."""
    truth = F.linear(h.double(), w.double()) + (0 if base is None else base.double())
    groups = w.abs().reshape(w.shape[0], -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(w.shape)
    tol = 256 * EPS * F.linear(h.double().abs(), groups.double()) + 2 * EPS * truth.abs()
    err = (got.double() - truth).abs()
    assert not err.isnan().any(), f"{what}: NaN in the output (an element left unwritten?)"
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the fp32 summation bound by {worst:.3g}"


# ---------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype,kind", BLOCK_KINDS)
@pytest.mark.parametrize("N,nblocks", [(1, 1), (37, 3), (300, 2), (0, 2)])
def test_dequantize_is_gguf_bit_for_bit(var, qtype, kind, N, nblocks):
    blocks = make_blocks(qtype, N, nblocks, seed=N + nblocks, kind=kind)
    want = gguf_weights(blocks, qtype) if N else torch.empty(0, nblocks * ref.QUANT_TYPES[qtype][1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = poisoned(want.shape, dtype, "cpu")
        with variant(var, "dequantize"):
            ops.dequantize(blocks, qtype, out)
        expected = want.to(dtype)
        assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           expected.view(torch.int16 if dtype != torch.float32 else torch.int32)), (_name(qtype), dtype)


@pytest.mark.parametrize("var", VARIANTS[:2])
def test_dequantize_keeps_the_sign_of_zero_and_extreme_scales(var):
    """Q4_0 / Q8_0 / Q6_K weights are d * q with no added offset: a zero product keeps d's sign (-0.0), as in
    gguf; the largest finite and subnormal half scales convert exactly."""
    for qtype in (2, 8, 14):
        blocks = make_blocks(qtype, 4, 2, seed=3)
        off = SCALE_OFFSETS[qtype][0]
        for row, d in enumerate((-0.0, -65504.0, 2.0**-24, -(2.0**-14))):
            blocks.view(4, 2, -1)[row, :, off : off + 2] = torch.tensor([d], dtype=torch.float16).view(torch.uint8)
        out = poisoned((4, 2 * ref.QUANT_TYPES[qtype][1]), torch.float32, "cpu")
        with variant(var, "dequantize"):
            ops.dequantize(blocks, qtype, out)
        assert torch.equal(out.view(torch.int32), gguf_weights(blocks, qtype).view(torch.int32)), _name(qtype)


# ---------------------------------------------------------------------------------------------
# qmatvec
# ---------------------------------------------------------------------------------------------

QMATVEC_SHAPES = [  # x's leading dims (M rows), N, blocks per row
    ((1,), 37, 3),
    ((3, 1), 129, 2),
    ((5,), 17, 1),
    ((8,), 61, 5),
    ((11,), 300, 2),  # two passes: 8 rows of x, then 3
    ((), 5, 1),  # x [K]
    ((0, 2), 6, 2),
]


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype,kind", BLOCK_KINDS)
@pytest.mark.parametrize("lead,N,nblocks", QMATVEC_SHAPES)
def test_qmatvec(var, qtype, kind, lead, N, nblocks):
    blocks = make_blocks(qtype, N, nblocks, seed=N, kind=kind)
    w = gguf_weights(blocks, qtype)
    x = randn((*lead, w.shape[1]), torch.float32, "cpu", gen(N))
    out = poisoned((*lead, N), torch.float32, "cpu")
    with variant(var, "qmatvec"):
        ops.qmatvec(x, blocks, qtype, out)
    assert_product_close(out, x, w, None, f"{_name(qtype)} {kind}")


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("prologue", ["plain", "norm", "swiglu"])
def test_qmatvec_prologues_and_accumulate(var, qtype, prologue):
    """norm: the bits of ops.rms_norm then qmatvec; swiglu: silu(x[..., :K]) * x[..., K:] as F.silu's; with
    accumulate, the bits of base + the product qmatvec writes."""
    check_prologues_and_accumulate("qmatvec", var, qtype, prologue, nblocks=2, seed=7)


def check_prologues_and_accumulate(op: str, var: str, qtype: int, prologue: str, nblocks: int, seed: int) -> None:
    """`op` (qmatvec or qmatvec_q8) with a prologue: fused norm == ops.rms_norm then the product, bit for bit;
    accumulate == base + the product, bit for bit; the result close to the reference of the prologue's rows
    (quantized to int8 first for qmatvec_q8 on the types it quantizes activations for)."""
    kernel = getattr(ops, op)
    N = 45
    blocks = make_blocks(qtype, N, nblocks, seed=seed)
    w = gguf_weights(blocks, qtype)
    K = w.shape[1]
    g = gen(seed + 1)
    x = randn((3, 2 * K if prologue == "swiglu" else K), torch.float32, "cpu", g, scale=2.0)
    norm = randn((K,), torch.float32, "cpu", g) if prologue == "norm" else None
    swiglu = prologue == "swiglu"
    base = randn((3, N), torch.float32, "cpu", g)
    out, product = base.clone(), poisoned((3, N), torch.float32, "cpu")
    with variant(var, op):
        kernel(x, blocks, qtype, out, True, norm, 1e-5, swiglu)
        kernel(x, blocks, qtype, product, False, norm, 1e-5, swiglu)
        if prologue == "norm":
            unfused = poisoned((3, N), torch.float32, "cpu")
            kernel(ops.rms_norm(x, norm, 1e-5), blocks, qtype, unfused)
            assert torch.equal(product, unfused)
    assert torch.equal(out, base + product)
    h = ref.matvec_input(x, norm, 1e-5, swiglu)
    if op == "qmatvec_q8" and qtype in ref.Q8_ACTIVATION_TYPES:
        h = ref.quantize_q8(h)
    assert_product_close(out, h, w, base, f"{_name(qtype)} {prologue}")


@pytest.mark.parametrize("isa", ["auto", "portable"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_qmatvec_row_does_not_depend_on_the_batch(isa, qtype, threads):
    """Each row of x gets the same bits alone as in any batch (M = 1..12, the pass of 8 rows and the rest),
    split over any number of threads: a server batching requests answers each as if alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocks = make_blocks(qtype, 2003, 9 if ref.QUANT_TYPES[qtype][1] == 32 else 2, seed=11)  # > 0.5 MB: threads
        K = blocks.shape[1] // ref.QUANT_TYPES[qtype][2] * ref.QUANT_TYPES[qtype][1]
        x = randn((12, K), torch.float32, "cpu", gen(12))
        norm = randn((K,), torch.float32, "cpu", gen(13))
        with variant(f"compiled-{isa}", "qmatvec"):
            for kw in ({}, {"norm": norm, "eps": 1e-6}):
                alone = torch.stack([_qmatvec(x[m : m + 1], blocks, qtype, **kw)[0] for m in range(12)])
                for lo, hi in ((0, 12), (0, 8), (3, 8), (8, 12), (2, 11)):
                    assert torch.equal(_qmatvec(x[lo:hi], blocks, qtype, **kw), alone[lo:hi]), (lo, hi, kw.keys())
                h = ref.matvec_input(x, kw.get("norm"), 1e-6, False)
                assert_product_close(alone, h, gguf_weights(blocks, qtype), None, _name(qtype))
    finally:
        torch.set_num_threads(n)


def _qmatvec(x: torch.Tensor, blocks: torch.Tensor, qtype: int, **kw) -> torch.Tensor:
    out = poisoned((x.shape[0], blocks.shape[0]), torch.float32, "cpu")
    ops.qmatvec(x, blocks, qtype, out, **kw)
    return out


def _cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])


def test_isa_switch():
    if not ops.HAVE_EXTENSION:
        pytest.skip("engine._C not built")
    from engine import _C

    flags = _cpu_flags()
    has_avx2 = all(flag in flags for flag in ("avx2", "fma", "f16c"))
    has_vnni = has_avx2 and all(flag in flags for flag in ("avx512vl", "avx512_vnni"))
    assert _C.cpu.quant_isa() == ("avx512vnni" if has_vnni else "avx2" if has_avx2 else "portable")
    try:
        _C.cpu.set_quant_isa("avx2")
        assert _C.cpu.quant_isa() == ("avx2" if has_avx2 else "portable")
        _C.cpu.set_quant_isa("portable")
        assert _C.cpu.quant_isa() == "portable"
    finally:
        _C.cpu.set_quant_isa("auto")
    with pytest.raises(ValueError, match="set_quant_isa: isa must be 'auto', 'avx2' or 'portable', got 'avx512'"):
        _C.cpu.set_quant_isa("avx512")


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("qtype", QTYPES)
def test_opcheck(qtype):
    blocks = make_blocks(qtype, 10, 1, seed=31)
    K = ref.QUANT_TYPES[qtype][1]
    g = gen(32)
    x, out = randn((3, K), torch.float32, "cpu", g), torch.empty(3, 10)
    torch.library.opcheck(torch.ops.engine.qmatvec, (x, blocks, qtype, out))
    torch.library.opcheck(torch.ops.engine.qmatvec, (x, blocks, qtype, out, True))
    torch.library.opcheck(torch.ops.engine.qmatvec, (x, blocks, qtype, out, False, randn((K,), torch.float32, "cpu", g), 1e-6))
    x2 = randn((3, 2 * K), torch.float32, "cpu", g)
    torch.library.opcheck(torch.ops.engine.qmatvec, (x2, blocks, qtype, out, True, None, 0.0, True))
    torch.library.opcheck(torch.ops.engine.dequantize, (blocks, qtype, torch.empty(10, K)))


# ---------------------------------------------------------------------------------------------
# qmatvec_q8: activations quantized to 8 bits per block of 32 (Q4_0, Q4_1, Q8_0; K-quants as qmatvec)
# ---------------------------------------------------------------------------------------------

Q8_SHAPES = [(1, 1, 1), (1, 37, 3), (2, 8, 2), (3, 9, 18), (5, 17, 1), (8, 61, 5), (9, 300, 2), (16, 7, 4),
             (17, 64, 3), (33, 15, 2)]  # M, N, blocks per row: N around the AVX2 kernel's 8 rows, M around 8


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype,kind", BLOCK_KINDS)
@pytest.mark.parametrize("M,N,nblocks", Q8_SHAPES)
def test_qmatvec_q8(var, qtype, kind, M, N, nblocks):
    if ref.QUANT_TYPES[qtype][1] == 256 and nblocks > 3:
        nblocks = 2  # K-quants: 512 weights suffice (their product is qmatvec's)
    blocks = make_blocks(qtype, N, nblocks, seed=N + M, kind=kind)
    w = gguf_weights(blocks, qtype)
    x = randn((M, w.shape[1]), torch.float32, "cpu", gen(N + M), scale=3.0)
    out = poisoned((M, N), torch.float32, "cpu")
    with variant(var, "qmatvec_q8"):
        ops.qmatvec_q8(x, blocks, qtype, out)
    exact = qtype not in ref.Q8_ACTIVATION_TYPES
    assert_product_close(out, x if exact else ref.quantize_q8(x), w, None, f"{_name(qtype)} {kind}")
    if not exact and M * N >= 8 and var != "reference":  # the activations were quantized: not the exact product
        with pytest.raises(AssertionError, match="exceeds the fp32 summation bound"):
            assert_product_close(out, x, w, None, "exact")


def test_quantize_q8_is_llama_cpps():
    """d = max|x| / 127 per block of 32, codes x * (1 / d) rounded to nearest (ties to even), all 0 where d
    is 0; a block with an inf or NaN gives NaN."""
    x = torch.zeros(4, 32)
    x[0, :3] = torch.tensor([127.0, -63.5, 0.5])  # d = 1: ties go to the even code (-64, 0)
    x[1] = torch.linspace(-2, 3, 32)
    x[3, 5] = float("inf")
    q = ref.quantize_q8(x)
    assert q[0, :3].tolist() == [127.0, -64.0, 0.0] and torch.equal(q[2], torch.zeros(32, dtype=torch.float64))
    d = 3 / 127
    assert torch.equal(q[1], (torch.round(x[1] * (1 / torch.tensor(d, dtype=torch.float32))).double()
                              * torch.tensor(d, dtype=torch.float32).double()))
    assert q[3].isnan().all() and not q[:3].isnan().any()


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype", [2, 3, 8])
def test_qmatvec_q8_zero_and_nonfinite_rows(var, qtype):
    """A zero row gives zeros; an inf or NaN in a row makes that row's outputs NaN, the other rows untouched."""
    blocks = make_blocks(qtype, 11, 3, seed=5, kind="quantized")
    x = randn((4, 96), torch.float32, "cpu", gen(5))
    x[1] = 0
    x[2, 40] = float("inf")
    x[3, 7] = float("nan")
    out = poisoned((4, 11), torch.float32, "cpu")
    with variant(var, "qmatvec_q8"):
        ops.qmatvec_q8(x, blocks, qtype, out)
    assert torch.equal(out[1], torch.zeros(11)) and out[2:].isnan().all() and not out[0].isnan().any()


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("qtype", [2, 3, 8, 12])
@pytest.mark.parametrize("prologue", ["plain", "norm", "swiglu"])
def test_qmatvec_q8_prologues_and_accumulate(var, qtype, prologue):
    """As for qmatvec: the prologue's rows are what is quantized; with accumulate, base + the product."""
    nblocks = 2 if ref.QUANT_TYPES[qtype][1] == 256 else 9
    check_prologues_and_accumulate("qmatvec_q8", var, qtype, prologue, nblocks=nblocks, seed=9)


@pytest.mark.parametrize("isa", ["auto", "avx2", "portable"])
@pytest.mark.parametrize("qtype", [2, 3, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_qmatvec_q8_row_does_not_depend_on_the_batch(isa, qtype, threads):
    """Each row of x gets the same bits alone as in any batch of 1..33 rows, over any number of threads, with
    any number of weight rows beside its own (the AVX2 kernel computes 8 weight rows at a time)."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocks = make_blocks(qtype, 2003, 9, seed=13)  # > 0.5 MB of blocks: split over the threads
        x = randn((33, 288), torch.float32, "cpu", gen(14))
        with variant(f"compiled-{isa}", "qmatvec_q8"):
            alone = torch.stack([_product(ops.qmatvec_q8, x[m : m + 1], blocks, qtype)[0] for m in range(33)])
            for lo, hi in ((0, 33), (0, 8), (3, 11), (8, 12), (1, 33), (5, 21)):
                assert torch.equal(_product(ops.qmatvec_q8, x[lo:hi], blocks, qtype), alone[lo:hi]), (lo, hi)
            for lo, hi in ((5, 6), (3, 19), (1000, 2003)):  # fewer weight rows: the same bits for those
                assert torch.equal(_product(ops.qmatvec_q8, x[:9], blocks[lo:hi], qtype), alone[:9, lo:hi]), (lo, hi)
        assert_product_close(alone, ref.quantize_q8(x), gguf_weights(blocks, qtype), None, _name(qtype))
    finally:
        torch.set_num_threads(n)


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("qtype", QTYPES)
def test_qmatvec_q8_vnni_equals_avx2_bit_for_bit(qtype):
    """The VNNI kernel sums the same integers as the AVX2 one (both exactly): every output has the same bits,
    Q8_0's codes -128..127 included, prologues and accumulate too. Skipped where the CPU lacks AVX-512 VNNI."""
    from engine import _C

    if _C.cpu.quant_isa() != "avx512vnni":
        pytest.skip(f"this CPU's kernels are {_C.cpu.quant_isa()}, not avx512vnni")
    nblocks = 2 if ref.QUANT_TYPES[qtype][1] == 256 else 7
    blocks = make_blocks(qtype, 45, nblocks, seed=21)  # random bytes: every code, Q8_0's -128 among them
    K = gguf_weights(blocks, qtype).shape[1]
    g = gen(22)
    x, base, norm = randn((11, 2 * K), torch.float32, "cpu", g, scale=3.0), randn((11, 45), torch.float32, "cpu", g), randn((K,), torch.float32, "cpu", g)
    head = x[:, :K].contiguous()
    calls = [dict(x=head), dict(x=head[:5], norm=norm, eps=1e-6), dict(x=x, swiglu=True), dict(x=head[:9], accumulate=True)]
    for kw in calls:
        got = {}
        for isa in ("auto", "avx2"):
            _C.cpu.set_quant_isa(isa)
            try:
                out = poisoned((kw["x"].shape[0], 45), torch.float32, "cpu")
                if kw.get("accumulate"):
                    out.copy_(base[: out.shape[0]])
                ops.qmatvec_q8(kw["x"], blocks, qtype, out, kw.get("accumulate", False), kw.get("norm"), kw.get("eps", 0.0),
                               kw.get("swiglu", False))
                got[isa] = out
            finally:
                _C.cpu.set_quant_isa("auto")
        assert not got["auto"].isnan().any() and torch.equal(got["auto"], got["avx2"]), sorted(kw)


def _product(op, x: torch.Tensor, blocks: torch.Tensor, qtype: int, **kw) -> torch.Tensor:
    out = poisoned((x.shape[0], blocks.shape[0]), torch.float32, "cpu")
    op(x, blocks, qtype, out, **kw)
    return out


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("qtype", [2, 3, 8])
def test_opcheck_q8(qtype):
    blocks = make_blocks(qtype, 10, 2, seed=33)
    g = gen(34)
    x, out = randn((3, 64), torch.float32, "cpu", g), torch.empty(3, 10)
    torch.library.opcheck(torch.ops.engine.qmatvec_q8, (x, blocks, qtype, out))
    torch.library.opcheck(torch.ops.engine.qmatvec_q8, (x, blocks, qtype, out, True, randn((64,), torch.float32, "cpu", g), 1e-6))
    torch.library.opcheck(torch.ops.engine.qmatvec_q8, (randn((3, 128), torch.float32, "cpu", g), blocks, qtype, out,
                                                        True, None, 0.0, True))


# ---------------------------------------------------------------------------------------------
# bad input: the same one-line error on both paths
# ---------------------------------------------------------------------------------------------

def _qmatvec_args() -> dict:
    return dict(x=torch.zeros(3, 64), blocks=torch.zeros(5, 40, dtype=torch.uint8), qtype=3, out=torch.zeros(3, 5))


def _dequantize_args() -> dict:
    return dict(blocks=torch.zeros(5, 40, dtype=torch.uint8), qtype=3, out=torch.zeros(5, 64))


NOT_PACKED = "is not kept packed (supported: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K); load with --weights dequantize"
BAD_INPUTS = [  # op, argument, corruption, exception, message
    ("qmatvec", "qtype", lambda q: 6, ValueError, f"qmatvec: quant type 6 (Q5_0) {NOT_PACKED}"),
    ("qmatvec", "qtype", lambda q: 99, ValueError, f"qmatvec: quant type 99 (unknown) {NOT_PACKED}"),
    ("qmatvec", "qtype", lambda q: 0, ValueError, f"qmatvec: quant type 0 (F32) {NOT_PACKED}"),
    ("qmatvec", "blocks", lambda t: t[:, :30].contiguous(), ValueError,
     "qmatvec: a row of 30 bytes is not a whole number of Q4_1 blocks (20 bytes each); load with --weights dequantize"),
    ("qmatvec", "blocks", lambda t: t.to(torch.int8), TypeError, "qmatvec: blocks must be uint8, got int8"),
    ("qmatvec", "blocks", lambda t: t[None], ValueError, "qmatvec: blocks must have shape [N, row_bytes] = [?, ?], got [1, 5, 40]"),
    ("qmatvec", "blocks", _noncontig, ValueError, "qmatvec: blocks must be contiguous [N, row_bytes], got strides [1, 5]"),
    ("qmatvec", "x", lambda t: t.bfloat16(), TypeError, "qmatvec: x must be float32, got bfloat16"),
    ("qmatvec", "x", lambda t: t[:, :32], ValueError, "qmatvec: x must have shape [..., K] = [?, 64], got [3, 32]"),
    ("qmatvec", "x", _noncontig, ValueError, "qmatvec: x must be contiguous [..., K], got strides [1, 3]"),
    ("qmatvec", "x", lambda t: torch.zeros(3, 64, device="meta"), ValueError, "qmatvec: x must be on cpu like blocks, got meta"),
    ("qmatvec", "out", lambda t: t.double(), TypeError, "qmatvec: out must be float32, got float64"),
    ("qmatvec", "out", lambda t: t[:2], ValueError, "qmatvec: out must have shape [..., N] = [3, 5], got [2, 5]"),
    ("qmatvec", "out", _noncontig, ValueError, "qmatvec: out must be contiguous [..., N], got strides [1, 3]"),
    ("qmatvec", "norm", lambda _: torch.ones(63), ValueError, "qmatvec: norm must have shape [K] = [64], got [63]"),
    ("qmatvec", "swiglu", lambda _: True, ValueError, "qmatvec: x must have shape [..., 2K] = [?, 128], got [3, 64]"),
    ("qmatvec_q8", "qtype", lambda q: 6, ValueError, f"qmatvec_q8: quant type 6 (Q5_0) {NOT_PACKED}"),
    ("qmatvec_q8", "x", lambda t: t.bfloat16(), TypeError, "qmatvec_q8: x must be float32, got bfloat16"),
    ("qmatvec_q8", "out", lambda t: t[:2], ValueError, "qmatvec_q8: out must have shape [..., N] = [3, 5], got [2, 5]"),
    ("qmatvec_q8", "norm", lambda _: torch.ones(63), ValueError, "qmatvec_q8: norm must have shape [K] = [64], got [63]"),
    ("dequantize", "qtype", lambda q: 13, ValueError, f"dequantize: quant type 13 (Q5_K) {NOT_PACKED}"),
    ("dequantize", "blocks", lambda t: t[:, :39].contiguous(), ValueError,
     "dequantize: a row of 39 bytes is not a whole number of Q4_1 blocks (20 bytes each); load with --weights dequantize"),
    ("dequantize", "blocks", lambda t: t.float(), TypeError, "dequantize: blocks must be uint8, got float32"),
    ("dequantize", "out", lambda t: t.double(), TypeError, "dequantize: out must be float32 or bfloat16 or float16, got float64"),
    ("dequantize", "out", lambda t: t[:, :32], ValueError, "dequantize: out must have shape [N, K] = [5, 64], got [5, 32]"),
    ("dequantize", "out", _noncontig, ValueError, "dequantize: out must be contiguous [N, K], got strides [1, 5]"),
]


@pytest.mark.parametrize("op,arg,corrupt,exc,message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_same_error_on_both_paths(op, arg, corrupt, exc, message):
    errors = {}
    for path in ("compiled", "reference"):
        if path == "compiled" and not ops.HAVE_EXTENSION:
            continue
        args = _qmatvec_args() if op.startswith("qmatvec") else _dequantize_args()
        args[arg] = corrupt(args.get(arg))
        errors[path] = _raise(path, op, args)
    assert_same_one_line_error(errors, exc, message)


@pytest.mark.parametrize("path", ["compiled", "reference"])
def test_valid_args_are_accepted_and_overlap_is_refused(path):
    """The base of BAD_INPUTS is itself valid; an out that overlaps an input is refused on both paths."""
    with on_path(path, "qmatvec", "cpu"):
        ops.qmatvec(**_qmatvec_args())
        ops.dequantize(**_dequantize_args())
    x, blocks = torch.zeros(3, 64), torch.zeros(5, 40, dtype=torch.uint8)
    overlap = dict(x=x, blocks=blocks, qtype=3, out=x.view(-1)[:15].view(3, 5))
    for op in ("qmatvec", "qmatvec_q8"):
        assert_same_one_line_error({path: _raise(path, op, overlap)}, ValueError,
                                   f"{op}: out must not overlap x or blocks")
    out = torch.zeros(5, 64)
    inside = dict(blocks=out.view(-1).view(torch.uint8)[:200].view(5, 40), qtype=3, out=out)
    assert_same_one_line_error({path: _raise(path, "dequantize", inside)}, ValueError,
                               "dequantize: out must not overlap blocks")


def test_type_names_are_ggml_names():
    """The messages' type names (engine.reference, csrc/checks.cpp) are gguf's."""
    for qtype, name in ref.GGML_TYPE_NAMES.items():
        assert gguf.GGMLQuantizationType(qtype).name == name
    for qtype, (name, weights, nbytes) in ref.QUANT_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)] == (weights, nbytes) and ref.GGML_TYPE_NAMES[qtype] == name

"""The CUDA kernels of packed GGUF weights (csrc/cuda/qmatvec.cu) against gguf and engine.reference; GPU only.

dequantize must give gguf.quants.dequantize's float32 bits exactly (rounded once to fp16/bf16). qmatvec is
matvec by those weights, held to test_ops' accuracy rule: at most 2x the error, against fp64, of plain
PyTorch in the input precision (F.linear of the prologue's rows by the weights rounded to that dtype).
Blocks are gguf.quants.quantize's (Q4_0, Q4_1, Q8_0) or random bytes with finite half scales (every type),
in shapes that end in a partial window of the kernel (1024 weights) or an odd tile of rows, at a base
address that 16-byte loads cannot start from. Outputs are poisoned with NaN first.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import ops
from engine import reference as ref

from .helpers import assert_within, gen, poisoned, randn

pytestmark = pytest.mark.cuda

CUDA = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
Q = gguf.GGMLQuantizationType
QTYPES = {"Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q8_0": Q.Q8_0, "Q4_K": Q.Q4_K, "Q6_K": Q.Q6_K}
QUANTIZABLE = ["Q4_0", "Q4_1", "Q8_0"]  # the types gguf.quants.quantize implements
# Byte offsets of each block's half-precision scale fields (csrc/quant_blocks.h).
SCALE_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}
EPS = 1e-5

SHAPES = [  # N, K: odd rows, partial last windows, Llama-2-7B's ffn_down K (43 super-blocks)
    (1, 256),
    (37, 1280),
    (300, 4096),
    (130, 11008),
]


def block_size(name: str) -> tuple[int, int]:
    """Weights and bytes per block."""
    return gguf.GGML_QUANT_SIZES[QTYPES[name]]


def random_blocks(name: str, N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """[N, row_bytes] random bytes, every scale field a finite half of a weight-like size: all bit patterns of
    the quants, scales and packed K-quant sub-scales occur."""
    weights, nbytes = block_size(name)
    nb = K // weights
    raw = torch.randint(0, 256, (N, nb, nbytes), generator=g, dtype=torch.uint8)
    for off in SCALE_FIELDS[name]:
        scale = (torch.randn(N, nb, generator=g) * 0.01).half()
        raw[:, :, off : off + 2] = scale.view(torch.uint8).view(N, nb, 2)
    return raw.view(N, nb * nbytes)


def quantized_blocks(name: str, N: int, K: int, g: torch.Generator) -> torch.Tensor:
    """gguf.quants.quantize of normal weights: the blocks a real file holds."""
    w = (torch.randn(N, K, generator=g) * 0.02).numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, QTYPES[name])))


def gguf_weights(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """The float32 weights gguf decodes: the truth dequantize must match bit for bit."""
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks.numpy(), QTYPES[name])))


def on_cuda_misaligned(blocks: torch.Tensor, shift: int) -> torch.Tensor:
    """blocks on the GPU, starting `shift` bytes past a 16-byte boundary (still contiguous)."""
    buf = torch.zeros(blocks.numel() + shift, dtype=torch.uint8, device=CUDA)
    out = buf[shift:].view(blocks.shape)
    out.copy_(blocks)
    return out


def cuda_op(name: str):
    """The CUDA kernel of engine op `name`, called directly (skipped when engine._C has none)."""
    if not ops.has_kernel(name, CUDA):
        pytest.skip(f"engine._C has no cuda kernel for {name}")
    return getattr(torch.ops.engine, name).default


def make_blocks(source: str, name: str, N: int, K: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return quantized_blocks(name, N, K, g) if source == "quantized" else random_blocks(name, N, K, g)


# ---------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("source", ["random", "quantized"])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("shift", [0, 6])
def test_dequantize_fp32_is_gguf_bit_for_bit(name, source, N, K, shift):
    if source == "quantized" and name not in QUANTIZABLE:
        pytest.skip(f"gguf cannot quantize {name}")
    blocks = make_blocks(source, name, N, K, N + K)
    want = gguf_weights(blocks, name)
    out = poisoned((N, K), torch.float32, CUDA)
    cuda_op("dequantize")(on_cuda_misaligned(blocks, shift), int(QTYPES[name]), out)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_rounds_once_to_the_dtype(name, dtype):
    N, K = 37, 1280
    blocks = random_blocks(name, N, K, gen(5))
    out = poisoned((N, K), dtype, CUDA)
    cuda_op("dequantize")(blocks.to(CUDA), int(QTYPES[name]), out)
    assert torch.equal(out.cpu(), gguf_weights(blocks, name).to(dtype))


@pytest.mark.parametrize("name", list(QTYPES))
def test_dequantize_matches_the_reference(name):
    N, K = 9, 1280
    blocks = random_blocks(name, N, K, gen(6))
    want = poisoned((N, K), torch.float32, "cpu")
    ref.dequantize(blocks, int(QTYPES[name]), want)
    out = poisoned((N, K), torch.float32, CUDA)
    cuda_op("dequantize")(blocks.to(CUDA), int(QTYPES[name]), out)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# qmatvec
# ---------------------------------------------------------------------------------------------

def qmatvec_inputs(name: str, source: str, M: int, N: int, K: int, dtype: torch.dtype, prologue: str, seed: int):
    """x [M, K or 2K], norm or None, blocks on the GPU, and the exact float32 weights on the CPU."""
    g = gen(seed)
    blocks = make_blocks(source, name, N, K, seed)
    x = randn((M, 2 * K if prologue == "swiglu" else K), dtype, CUDA, g, scale=2.0)
    norm = randn((K,), dtype, CUDA, g) if prologue == "norm" else None
    return x, norm, on_cuda_misaligned(blocks, seed % 16), gguf_weights(blocks, name)


def expected(x, norm, w, prologue, dtype, out0=None):
    """(truth, baseline): h @ w^T in fp64 with h the prologue's rows in dtype (engine.reference), and plain
    PyTorch's F.linear of h by w rounded to dtype; each plus out0 when accumulating."""
    h = ref.matvec_input(x, norm, EPS, prologue == "swiglu")
    truth = F.linear(h.double(), w.double().to(h.device))
    base = F.linear(h, w.to(h.device, dtype))
    if out0 is not None:
        truth, base = truth + out0.double(), out0 + base
    return truth, base


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "norm", "swiglu"])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_qmatvec(name, dtype, prologue, M):
    for (N, K) in SHAPES:
        x, norm, blocks, w = qmatvec_inputs(name, "random", M, N, K, dtype, prologue, N + K + M)
        out = poisoned((M, N), dtype, CUDA)
        cuda_op("qmatvec")(x, blocks, int(QTYPES[name]), out, False, norm, EPS, prologue == "swiglu")
        truth, base = expected(x, norm, w, prologue, dtype)
        assert_within(out, truth, base, f"qmatvec {name} {prologue} N={N} K={K}")


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qmatvec_quantized_weights(name, dtype):
    M, N, K = 2, 300, 4096
    x, norm, blocks, w = qmatvec_inputs(name, "quantized", M, N, K, dtype, "norm", 8)
    out = poisoned((M, N), dtype, CUDA)
    cuda_op("qmatvec")(x, blocks, int(QTYPES[name]), out, False, norm, EPS, False)
    truth, base = expected(x, norm, w, "norm", dtype)
    assert_within(out, truth, base, f"qmatvec {name}")


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "swiglu"])
def test_qmatvec_accumulate(name, dtype, prologue):
    """accumulate adds the product rounded to out's dtype, as out.add_(F.linear(h, w)): the same bits as
    the product written on its own and then added."""
    M, N, K = 3, 37, 1280
    x, norm, blocks, w = qmatvec_inputs(name, "random", M, N, K, dtype, prologue, 21)
    out0 = randn((M, N), dtype, CUDA, gen(22))
    out, product = out0.clone(), poisoned((M, N), dtype, CUDA)
    op, qtype, swiglu = cuda_op("qmatvec"), int(QTYPES[name]), prologue == "swiglu"
    op(x, blocks, qtype, out, True, norm, EPS, swiglu)
    op(x, blocks, qtype, product, False, norm, EPS, swiglu)
    assert torch.equal(out, out0 + product)
    truth, base = expected(x, norm, w, prologue, dtype, out0)
    assert_within(out, truth, base, f"qmatvec accumulate {name}")


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("prologue", ["none", "norm", "swiglu"])
def test_qmatvec_matches_the_reference(name, prologue):
    """fp32 on the GPU against engine.reference.qmatvec on the CPU (its only activation dtype there)."""
    M, N, K = 2, 37, 1280
    x, norm, blocks, w = qmatvec_inputs(name, "random", M, N, K, torch.float32, prologue, 31)
    out = poisoned((M, N), torch.float32, CUDA)
    qtype, swiglu = int(QTYPES[name]), prologue == "swiglu"
    cuda_op("qmatvec")(x, blocks, qtype, out, False, norm, EPS, swiglu)
    want = poisoned((M, N), torch.float32, "cpu")
    ref.qmatvec(x.cpu(), blocks.cpu(), qtype, want, False, None if norm is None else norm.cpu(), EPS, swiglu)
    truth, _ = expected(x, norm, w, prologue, torch.float32)
    assert_within(out, truth, want, f"qmatvec {name} vs reference")


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatvec_row_does_not_depend_on_the_batch(name, dtype):
    """A request's output has the same bits alone, in a batch of 3, of 8, or of 11 (two launches)."""
    N, K = 130, 2304
    x, norm, blocks, _ = qmatvec_inputs(name, "random", 11, N, K, dtype, "norm", 41)
    op, qtype = cuda_op("qmatvec"), int(QTYPES[name])

    def run(rows: torch.Tensor) -> torch.Tensor:
        out = poisoned((rows.shape[0], N), dtype, CUDA)
        op(rows.contiguous(), blocks, qtype, out, False, norm, EPS, False)
        return out

    alone = torch.cat([run(x[i : i + 1]) for i in range(11)])
    for rows in (slice(0, 11), slice(0, 8), slice(2, 5), slice(7, 9)):
        assert torch.equal(run(x[rows]), alone[rows]), rows


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K"])
def test_qmatvec_in_cuda_graph(name):
    """A layer's shape of calls captured (a norm prologue's product, an accumulating product back into the
    residual, a dequantize), replayed with new inputs: the same bits as eager calls."""
    M, N, K, dtype = 2, 512, 4096, torch.bfloat16
    g = gen(51)
    up, down = random_blocks(name, N, K, g).to(CUDA), random_blocks(name, K, N, g).to(CUDA)
    norm = randn((K,), dtype, CUDA, g)
    op, deq, qtype = cuda_op("qmatvec"), cuda_op("dequantize"), int(QTYPES[name])

    def step(x, h, res, weights):
        op(x, up, qtype, h, False, norm, EPS, False)
        op(h, down, qtype, res, True, None, 0.0, False)
        deq(up, qtype, weights)

    def buffers(res0):
        return (torch.empty(M, N, dtype=dtype, device=CUDA), res0.clone(), torch.empty(N, K, dtype=dtype, device=CUDA))

    x = randn((M, K), dtype, CUDA, g)
    static = buffers(randn((M, K), dtype, CUDA, g))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as torch.cuda.graphs asks
        step(x, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, *static)
    for _ in range(3):
        x.copy_(randn((M, K), dtype, CUDA, g))
        res0 = randn((M, K), dtype, CUDA, g)
        static[1].copy_(res0)
        graph.replay()
        eager = buffers(res0)
        step(x, *eager)
        torch.cuda.synchronize()
        for what, got, want in zip(["h", "residual", "weights"], static, eager):
            assert torch.equal(got, want), what


@pytest.mark.skipif(not ops.HAVE_EXTENSION, reason="engine._C not built")
@pytest.mark.parametrize("op,args", [
    ("qmatvec", lambda: (torch.randn(3, 256), random_blocks("Q4_K", 5, 256, gen(61)), int(Q.Q4_K),
                         torch.empty(3, 5), False, torch.randn(256), 1e-5, False)),
    ("qmatvec", lambda: (torch.randn(2, 64), random_blocks("Q8_0", 7, 32, gen(62)), int(Q.Q8_0),
                         torch.randn(2, 7), True, None, 0.0, True)),
    ("dequantize", lambda: (random_blocks("Q6_K", 3, 512, gen(63)), int(Q.Q6_K), torch.empty(3, 512))),
], ids=["qmatvec-norm", "qmatvec-swiglu-accumulate", "dequantize"])
def test_opcheck(op, args):
    cuda_op(op)
    moved = tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args())
    torch.library.opcheck(getattr(torch.ops.engine, op), moved)

#!/usr/bin/env bash
# compute-sanitizer over the engine's CUDA kernels, on a GPU machine with engine._C built with CUDA.
#
#   tests/run_cuda_sanitizer.sh                 # memcheck, racecheck, synccheck, initcheck
#   tests/run_cuda_sanitizer.sh racecheck       # one tool (or several)
#
# A small driver runs every op on shapes that reach each code path (split-KV decode with and without
# probabilities, head blocks, scalar loads, both prefill key tiles, column scores at their own
# scale, compaction in each unit width). Only kernels in the engine namespace are instrumented;
# torch's caching allocator is off so out-of-bounds accesses land outside an allocation. Exits
# non-zero on the first tool that reports an error.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the driver runs from a temp file

sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$sanitizer" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
[ $# -gt 0 ] || set -- memcheck racecheck synccheck initcheck

driver=$(mktemp --suffix=.py)
trap 'rm -f "$driver"' EXIT
cat >"$driver" <<'EOF'
import torch

from engine import ops

assert torch.cuda.is_available(), "no CUDA device"
for op in ("rms_norm", "decode_attention", "prefill_attention", "rope_append", "value_norm", "select_victim",
           "compact", "merge_value"):
    assert ops.has_kernel(op, "cuda"), f"engine._C has no cuda kernel for {op}"
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, device=dev).to(dtype)


def slots(B, Hkv, C, holes=True):
    pos = torch.arange(C, device=dev, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    if holes:
        pos[torch.rand(B, Hkv, C, generator=g, device=dev) < 0.3] = -1
    return pos


with ops.use_reference(False):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ops.rms_norm(rand(5, 129, dtype=dtype), rand(129, dtype=dtype), 1e-6)

        # decode: B, H, Hkv, C, D, length (several splits; 2 head blocks; scalar loads; one split)
        for B, H, Hkv, C, D, length in [(1, 8, 2, 1100, 128, 1030), (1, 16, 1, 600, 64, 600),
                                        (2, 6, 2, 70, 37, 65), (2, 4, 4, 40, 256, 40)]:
            q, k, v = rand(B, H, D, dtype=dtype), rand(B, Hkv, C, D, dtype=dtype), rand(B, Hkv, C, D, dtype=dtype)
            pos = slots(B, Hkv, C)
            out = torch.empty(B, H, D, dtype=dtype, device=dev)
            acc = torch.zeros(B, Hkv, C, device=dev)
            probs = torch.empty(B, H, C, device=dev)
            ops.decode_attention(q, k, v, pos, length, 0.1, out, acc, probs)
            ops.decode_attention(q, k, v, pos, length, 0.1, out, acc, None)
            ops.decode_attention(q, k, v, pos, length, 0.1, out, None, None)
            if D % 2 == 0:  # keys before RoPE, rotated by their slot's rank (positions="cache")
                angles = torch.rand(C + 1, D // 2, generator=g, device=dev) * torch.arange(C + 1, device=dev)[:, None]
                emb = torch.cat([angles, angles], -1)
                rank = torch.randint(0, C + 1, (B, Hkv, C), generator=g, device=dev, dtype=torch.int32)
                ops.decode_attention(q, k, v, pos, length, 0.1, out, acc, probs, rope=(emb.cos(), emb.sin(), rank))
                qkv = rand(B, (H + 2 * Hkv) * D, dtype=dtype)
                slot = torch.randint(0, C, (B, Hkv), generator=g, device=dev)
                for rotate_key in (True, False):
                    ops.rope_append(qkv, emb[5].cos(), emb[5].sin(), slot, rotate_key, out, k, v)
            ops.select_victim(acc, pos, 0, C, torch.empty(B, Hkv, dtype=torch.int64, device=dev))

        # prefill: B, H, Hkv, L, S, D (32-key tiles; 16-key tiles at D=256; odd D)
        for B, H, Hkv, L, S, D in [(1, 6, 2, 40, 70, 64), (2, 4, 4, 17, 33, 256), (1, 3, 1, 5, 9, 37)]:
            q, k, v = rand(B, H, L, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype)
            kpos = slots(B, Hkv, S)
            qpos = (S - L + torch.arange(L, device=dev, dtype=torch.int32)).expand(B, L).contiguous()
            out = torch.empty(B, H, L, D, dtype=dtype, device=dev)
            lse = torch.empty(B, H, L, device=dev)
            cols = torch.empty(B, Hkv, S, device=dev)
            ops.prefill_attention(q, k, v, qpos, kpos, 0.125, out, lse, cols, 0, 0.125)
            ops.prefill_attention(q, k, v, qpos, kpos, 0.125, out, lse, cols, 3, 0.05)
            ops.prefill_attention(q, k, v, qpos, kpos, 0.125, out, lse, None, 0, 1.0)

        # cache maintenance: 16-, 4- and 2-byte units per slot
        for D in (64, 5, 37):
            B, Hkv, C = 2, 3, 50
            k, v = rand(B, Hkv, C, D, dtype=dtype), rand(B, Hkv, C, D, dtype=dtype)
            ops.value_norm(v, 2, torch.empty(B, Hkv, C, device=dev))
            keep = torch.stack([torch.randperm(C, device=dev)[:30] for _ in range(B * Hkv)]).view(B, Hkv, 30)
            ops.compact(k, v, slots(B, Hkv, C), [torch.rand(B, Hkv, C, device=dev)], keep)
            victim = torch.tensor([[0, 1, -1]] * B, device=dev)
            receiver = torch.tensor([[2, 1, 4]] * B, device=dev)
            ops.merge_value(v, torch.rand(B, Hkv, C, device=dev), victim, receiver, torch.rand(B, Hkv, device=dev))
torch.cuda.synchronize()
print("driver finished")
EOF

for tool in "$@"; do
  echo "== compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --kernel-name kns=engine --error-exitcode 1 \
    python "$driver"
done
echo "compute-sanitizer: no errors reported by $*"

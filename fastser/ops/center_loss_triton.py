"""Triton kernels for the fused center loss (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

forward : per block of rows, diff = x - c_y (fp32) and the row's squared distance, one pass.
backward: per block of rows, grad_x = g_i * diff_i and, in the same pass, the Wen update or the
          center gradient scattered with fp32 atomics; or, deterministic, one program per
          (class, column block) summing its rows in label-sorted order, no atomics.
"""
import triton
import triton.language as tl

ROWS = 4  # rows per program: enough independent loads in flight for D in the hundreds


def _block_d(D: int) -> int:
    return max(16, min(512, triton.next_power_of_2(D)))


@triton.jit
def _forward_kernel(X, LABELS, CENTERS, ROW_LOSS, DIFF, B, D, C,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    labels = tl.load(LABELS + rows, mask=row_ok, other=0)
    valid = row_ok & (labels >= 0) & (labels < C)  # the host checks labels; never read out of bounds
    labels = tl.where(valid, labels, 0)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(CENTERS + labels[:, None] * D + cols[None, :], mask=m, other=0.0)
        v = x - c
        tl.store(DIFF + rows[:, None] * D + cols[None, :], v, mask=m)
        acc += v * v
    loss = tl.sum(acc, axis=1)
    tl.store(ROW_LOSS + rows, tl.where(valid, loss, float("nan")), mask=row_ok)


@triton.jit
def _backward_kernel(DIFF, LABELS, COUNTS, ROW_SCALE, scale_stride, GRAD_X, CENTERS, GRAD_C,
                     alpha, B, D, C,
                     HAS_GRAD_X: tl.constexpr, SCATTER: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # SCATTER: 0 nothing, 1 Wen update into CENTERS, 2 gradient into GRAD_C
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    labels = tl.load(LABELS + rows, mask=row_ok, other=0)
    valid = row_ok & (labels >= 0) & (labels < C)
    labels = tl.where(valid, labels, 0)
    g = tl.load(ROW_SCALE + rows * scale_stride, mask=row_ok, other=0.0)
    if SCATTER == 1:
        n = tl.load(COUNTS + labels, mask=valid, other=0).to(tl.float32)
        coef = alpha / (1.0 + n)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (cols[None, :] < D)
        v = tl.load(DIFF + rows[:, None] * D + cols[None, :], mask=m, other=0.0)
        if HAS_GRAD_X:
            gx = g[:, None] * v
            tl.store(GRAD_X + rows[:, None] * D + cols[None, :], gx.to(GRAD_X.dtype.element_ty), mask=m)
        mv = valid[:, None] & (cols[None, :] < D)
        if SCATTER == 1:
            tl.atomic_add(CENTERS + labels[:, None] * D + cols[None, :], coef[:, None] * v, mask=mv)
        if SCATTER == 2:
            tl.atomic_add(GRAD_C + labels[:, None] * D + cols[None, :], -g[:, None] * v, mask=mv)


@triton.jit
def _segment_kernel(DIFF, ORDER, OFFSETS, ROW_SCALE, scale_stride, CENTERS, GRAD_C, alpha, D,
                    WEN: tl.constexpr, BLOCK_D: tl.constexpr):
    cls = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    begin = tl.load(OFFSETS + cls)
    end = tl.load(OFFSETS + cls + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for k in range(begin, end):
        i = tl.load(ORDER + k)
        v = tl.load(DIFF + i * D + cols, mask=m, other=0.0)
        if WEN:
            acc += v
        else:
            acc += tl.load(ROW_SCALE + i * scale_stride) * v
    if end > begin:
        if WEN:
            c = tl.load(CENTERS + cls * D + cols, mask=m, other=0.0)
            tl.store(CENTERS + cls * D + cols, c + acc * (alpha / (1.0 + (end - begin).to(tl.float32))), mask=m)
        else:
            tl.store(GRAD_C + cls * D + cols, -acc, mask=m)


def forward(x, labels, centers, row_loss, diff):
    B, D = x.shape
    BLOCK_D = _block_d(D)
    _forward_kernel[(triton.cdiv(B, ROWS),)](x, labels, centers, row_loss, diff, B, D, centers.shape[0],
                                             ROWS=ROWS, BLOCK_D=BLOCK_D)


def backward(diff, labels, counts, num_classes, row_scale, grad_x, centers, alpha, grad_centers):
    B, D = diff.shape
    scatter = 1 if centers is not None else (2 if grad_centers is not None else 0)
    dummy = diff  # stands in for pointers a constexpr branch never touches
    _backward_kernel[(triton.cdiv(B, ROWS),)](
        diff, labels, counts if counts is not None else labels, row_scale, 0 if row_scale.numel() == 1 else 1,
        grad_x if grad_x is not None else dummy,
        centers if centers is not None else dummy,
        grad_centers if grad_centers is not None else dummy,
        float(alpha), B, D, num_classes,
        HAS_GRAD_X=grad_x is not None, SCATTER=scatter, ROWS=ROWS, BLOCK_D=_block_d(D))


def segment_update(diff, order, offsets, row_scale, centers, alpha, grad_centers):
    D = diff.shape[1]
    C = offsets.numel() - 1
    BLOCK_D = min(_block_d(D), 256)
    target = centers if centers is not None else grad_centers
    _segment_kernel[(triton.cdiv(D, BLOCK_D), C)](
        diff, order, offsets, row_scale, 0 if row_scale.numel() == 1 else 1,
        target, target, float(alpha), D, WEN=centers is not None, BLOCK_D=BLOCK_D)

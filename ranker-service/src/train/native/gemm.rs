//! Strided f32 matrix products through the `gemm` crate, bounds-checked before the unsafe call.

use gemm::{gemm, Parallelism};

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

fn parallelism(macs: usize) -> Parallelism {
    if macs >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// A strided read-only matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `(rows, cols)` with row stride `rs`.
    pub(super) fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub(super) fn t(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm {what}: operand out of bounds");
        }
    }
}

/// `dst (m, n)` (row-major, row stride `dst_rs`) `= [dst +] alpha * lhs (m, k) rhs (k, n)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    product(m, n, k, dst, dst_rs, accumulate, lhs, rhs, alpha, parallelism(m * n * k))
}

/// [`matmul`] on the given threads: the one place a safe product is bounds-checked.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst: out of bounds");
    // SAFETY: the three operands were bounds-checked above for the given strides, `dst` is
    // borrowed mutably and does not alias the shared operands.
    unsafe {
        gemm_ptr(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs,
            rhs,
            alpha,
            par,
        )
    }
}


/// [`matmul`] on the calling thread (inside tasks that are already parallel).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_local(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    product(m, n, k, dst, dst_rs, false, lhs, rhs, alpha, Parallelism::None)
}

/// [`matmul_local`] adding to `dst`.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_acc_local(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    product(m, n, k, dst, dst_rs, true, lhs, rhs, alpha, Parallelism::None)
}


/// [`matmul_local`] into a destination that other tasks write too (disjoint regions).
///
/// # Safety
/// `dst` must be valid for the `(m, n)` matrix with row stride `dst_rs`, and no other thread
/// may touch those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_shared(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    gemm_ptr(
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        lhs,
        rhs,
        alpha,
        Parallelism::None,
    )
}

/// `dst = [dst +] alpha * lhs rhs` through the `gemm` crate.
///
/// # Safety
/// The operands must be in bounds for their strides (see [`Mat::check`]) and `dst` valid for
/// writes of the `(m, n)` matrix with row stride `dst_rs`, touched by no one else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    par: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        par,
    );
}

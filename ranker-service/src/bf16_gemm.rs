//! bf16 projections with f32 accumulation on CPUs with AVX-512 BF16 (`vdpbf16ps`).
//!
//! A frozen projection `y = x · Wᵀ` is the bulk of a forward pass (and of the LoRA training
//! step's frozen products). With AVX-512 BF16 one instruction does 32 bf16 multiply-adds into
//! 16 f32 sums, twice the f32 FMA rate, and bf16 weights halve the bytes streamed and held.
//!
//! Layout. The weight `(out, in)` is packed once, at load, into panels of 16 output columns:
//! for each pair of input positions `(2kk, 2kk + 1)`, the 16 columns' two values side by side,
//! 32 bf16 = one 512-bit register, exactly what `vdpbf16ps` pairs with a broadcast pair of the
//! input row. The input rows are rounded to bf16 per call (round to nearest even). The
//! microkernel keeps 6 rows × 4 panels (64 columns) of f32 sums in 24 registers across the whole
//! input dimension, so each output is written once.
//!
//! Numerics: products of bf16-rounded inputs and weights (8 significant bits each), summed in
//! f32. Relative error per output is ~2⁻⁸ of the terms' magnitude, like PyTorch's bf16
//! autocast on CPU; the ranker's letter distributions are checked against the f32 path in the
//! tests.

use rayon::prelude::*;

use crate::cpu_kernels::SharedMut;

/// Output columns per panel (one 512-bit register of f32 sums).
const LANES: usize = 16;
/// Rows per microkernel tile.
const MR: usize = 6;
/// Panels per microkernel tile.
const NR: usize = 4;
/// Rows per parallel task: large enough to amortize a task, small enough to balance 2+ cores.
const ROW_CHUNK: usize = 96;
/// Input pairs per AMX tile (16 rows of 64 bytes: 32 bf16 of the input dimension).
const TILE_PAIRS: usize = 16;
/// Rows of an AMX tile.
const TILE_ROWS: usize = 16;
/// Output panels per AMX task: 8 panels = 128 columns, 4 column tiles of 2 panels... (see
/// `amx_task`): each task computes 32 rows × this many panels.
const AMX_TASK_PANELS: usize = 8;

/// Which instructions [`PackedBf16::matmul`] uses, chosen at run time from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`): 16×16 f32 sums per instruction (Sapphire Rapids and later).
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps`): 16 f32 sums per instruction (Cooper Lake, Zen 4, ...).
    Avx512,
}

impl Bf16Kernel {
    /// The best this CPU (and kernel: AMX needs the OS to grant the tile state) supports.
    pub fn detect() -> Option<Self> {
        if amx_ready() {
            Some(Self::Amx)
        } else if supported() {
            Some(Self::Avx512)
        } else {
            None
        }
    }

    /// For logs and Info.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amx => "bf16-amx",
            Self::Avx512 => "bf16-avx512",
        }
    }
}

/// True when AMX-BF16 is present and Linux granted this process the tile data state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once).
pub fn amx_ready() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (`is_x86_feature_detected!` for
            // AMX is not stable yet); the system call below says whether the OS enables them.
            // Leaf 7 exists on every CPU with AVX-512 (checked first).
            let edx = if supported() { std::arch::x86_64::__cpuid_count(7, 0).edx } else { 0 };
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// True when this CPU can run the bf16 kernels (checked at run time, once per call site).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The AMX tile configuration (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_16x64() -> Self {
        let mut c = Self { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            c.colsb[t] = 64;
            c.rows[t] = TILE_ROWS as u8;
        }
        c
    }
}

/// A projection weight `(out, in)` packed for [`PackedBf16::matmul`].
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    out: usize,
    inp: usize,
    /// Input positions in pairs, padded to a multiple of [`TILE_PAIRS`] (one AMX tile's depth).
    pairs: usize,
    /// `[panel][pair][lane][2]` bf16 bits; panels beyond `out` are zero-padded.
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs a row-major `(out, inp)` f32 weight.
    pub fn pack(weight: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(weight.len(), out * inp, "weight is not (out, in)");
        let pairs = inp.div_ceil(2 * TILE_PAIRS) * TILE_PAIRS;
        let panels = out.div_ceil(LANES);
        let mut data = vec![0u16; panels * pairs * LANES * 2];
        for p in 0..panels {
            for kk in 0..pairs {
                let base = (p * pairs + kk) * LANES * 2;
                for lane in 0..LANES {
                    let c = p * LANES + lane;
                    if c >= out {
                        continue;
                    }
                    for j in 0..2 {
                        let k = 2 * kk + j;
                        if k < inp {
                            data[base + 2 * lane + j] = to_bf16(weight[c * inp + k]);
                        }
                    }
                }
            }
        }
        Self { out, inp, pairs, data }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        2 * self.data.len()
    }

    /// The weight as f32 `(out, in)`, bf16-rounded (for tests and the reference path).
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        for c in 0..self.out {
            let (p, lane) = (c / LANES, c % LANES);
            for k in 0..self.inp {
                let (kk, j) = (k / 2, k % 2);
                w[c * self.inp + k] = from_bf16(self.data[(p * self.pairs + kk) * LANES * 2 + 2 * lane + j]);
            }
        }
        w
    }

    /// `y = x · Wᵀ` for `x` of shape `(rows, in)`, on the current rayon pool, with the best
    /// kernel this CPU has. Panics unless [`supported`] (callers choose bf16 only then).
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let kernel = Bf16Kernel::detect().expect("bf16 kernels need AVX-512 BF16");
        self.matmul_with(kernel, x, rows)
    }

    /// [`PackedBf16::matmul`] with a given kernel (the tests and the probe compare them).
    pub fn matmul_with(&self, kernel: Bf16Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(supported(), "bf16 kernels need AVX-512 BF16");
        assert!(kernel != Bf16Kernel::Amx || amx_ready(), "AMX is not available");
        assert_eq!(x.len(), rows * self.inp, "input is not (rows, in)");
        let width = 2 * self.pairs;
        // AMX reads whole 16-row tiles: pad the rounded input with zero rows (never stored).
        let padded_rows = match kernel {
            Bf16Kernel::Amx => rows.div_ceil(2 * TILE_ROWS) * 2 * TILE_ROWS,
            Bf16Kernel::Avx512 => rows,
        };
        let mut xb = vec![0u16; padded_rows * width];
        xb.par_chunks_mut(width).zip(x.par_chunks(self.inp)).for_each(|(dst, src)| {
            // SAFETY: `supported()` was checked above.
            unsafe { convert_row(src, &mut dst[..self.inp]) }
        });
        let mut y = vec![0f32; rows * self.out];
        let out_ptr = SharedMut(y.as_mut_ptr());
        let panels = self.out.div_ceil(LANES);
        match kernel {
            Bf16Kernel::Avx512 => {
                let groups = panels.div_ceil(NR);
                let chunks = rows.div_ceil(ROW_CHUNK);
                (0..groups * chunks).into_par_iter().for_each(|task| {
                    let (g, c) = (task % groups, task / groups);
                    let r0 = c * ROW_CHUNK;
                    let r1 = (r0 + ROW_CHUNK).min(rows);
                    // SAFETY: AVX-512 BF16 checked above; each task writes rows r0..r1 of the
                    // columns of panel group g only, which no other task writes.
                    unsafe { self.tile_rows(&xb, width, r0, r1, g, out_ptr) }
                });
            }
            Bf16Kernel::Amx => {
                let row_blocks = padded_rows / (2 * TILE_ROWS);
                let col_chunks = panels.div_ceil(AMX_TASK_PANELS);
                (0..row_blocks * col_chunks).into_par_iter().for_each(|task| {
                    let (rb, cc) = (task / col_chunks, task % col_chunks);
                    // SAFETY: AMX granted (checked above); each task writes its 32 rows of
                    // its panels' columns only; `xb` has `padded_rows` rows.
                    unsafe { self.amx_task(&xb, width, rows, rb * 2 * TILE_ROWS, cc * AMX_TASK_PANELS, out_ptr) }
                });
            }
        }
        y
    }

    /// Rows `r0..r0 + 32` (two row tiles) × panels `p0..p0 + AMX_TASK_PANELS`, two panels (two
    /// column tiles) at a time: 4 accumulator tiles (tmm0–3), 2 input tiles (tmm4–5), 2 weight
    /// tiles (tmm6–7), each 16 rows × 64 bytes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn amx_task(&self, xb: &[u16], width: usize, rows: usize, r0: usize, p0: usize, y: SharedMut) {
        use std::arch::asm;
        let cfg = TileConfig::all_16x64();
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
        let panels = self.out.div_ceil(LANES);
        let p1 = (p0 + AMX_TASK_PANELS).min(panels);
        let panel_len = self.pairs * LANES * 2;
        let a_stride = 2 * width;
        let mut scratch = [0f32; TILE_ROWS * LANES];
        let mut p = p0;
        while p < p1 {
            let two = p + 1 < p1;
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for kb in 0..self.pairs / TILE_PAIRS {
                let a0 = xb.as_ptr().add(r0 * width + kb * 2 * TILE_PAIRS);
                let a1 = a0.add(TILE_ROWS * width);
                let b0 = self.data.as_ptr().add(p * panel_len + kb * TILE_PAIRS * LANES * 2);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, sa = in(reg) a_stride, sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
                if two {
                    let b1 = b0.add(panel_len);
                    asm!(
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        b1 = in(reg) b1, sb = in(reg) 64usize,
                        options(nostack, readonly)
                    );
                }
            }
            // Accumulator tile (row tile, panel) → y, through a scratch tile at the edges.
            for (tile, rt, pt) in [(0, 0, p), (1, 0, p + 1), (2, 1, p), (3, 1, p + 1)] {
                if pt >= p1 {
                    continue;
                }
                let row = r0 + rt * TILE_ROWS;
                if row >= rows {
                    continue;
                }
                let col = pt * LANES;
                let valid_rows = (rows - row).min(TILE_ROWS);
                let valid_cols = (self.out - col).min(LANES);
                let whole = valid_rows == TILE_ROWS && valid_cols == LANES;
                let (dst, stride) = if whole {
                    (y.ptr().add(row * self.out + col), 4 * self.out)
                } else {
                    (scratch.as_mut_ptr(), 4 * LANES)
                };
                match tile {
                    0 => asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) dst, s = in(reg) stride, options(nostack)),
                    1 => asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) dst, s = in(reg) stride, options(nostack)),
                    2 => asm!("tilestored [{d} + {s}*1], tmm2", d = in(reg) dst, s = in(reg) stride, options(nostack)),
                    _ => asm!("tilestored [{d} + {s}*1], tmm3", d = in(reg) dst, s = in(reg) stride, options(nostack)),
                }
                if !whole {
                    for r in 0..valid_rows {
                        std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * LANES), y.ptr().add((row + r) * self.out + col), valid_cols);
                    }
                }
            }
            p += 2;
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn amx_task(&self, _: &[u16], _: usize, _: usize, _: usize, _: usize, _: SharedMut) {
        unreachable!("AMX is x86-64 only")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_rows(&self, xb: &[u16], width: usize, r0: usize, r1: usize, group: usize, y: SharedMut) {
        let panels = self.out.div_ceil(LANES);
        let p0 = group * NR;
        let np = (panels - p0).min(NR);
        let mut r = r0;
        while r < r1 {
            let mr = (r1 - r).min(MR);
            macro_rules! call {
                ($m:literal, $n:literal) => {
                    self.micro::<$m, $n>(xb, width, r, p0, y)
                };
            }
            match (mr, np) {
                (6, 4) => call!(6, 4),
                (6, 3) => call!(6, 3),
                (6, 2) => call!(6, 2),
                (6, 1) => call!(6, 1),
                (m, 4) => (0..m).for_each(|i| self.micro::<1, 4>(xb, width, r + i, p0, y)),
                (m, 3) => (0..m).for_each(|i| self.micro::<1, 3>(xb, width, r + i, p0, y)),
                (m, 2) => (0..m).for_each(|i| self.micro::<1, 2>(xb, width, r + i, p0, y)),
                (m, _) => (0..m).for_each(|i| self.micro::<1, 1>(xb, width, r + i, p0, y)),
            }
            r += mr;
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile_rows(&self, _: &[u16], _: usize, _: usize, _: usize, _: usize, _: SharedMut) {
        unreachable!("bf16 kernels are x86-64 only")
    }

    /// Rows `r..r + M` × panels `p0..p0 + N` over the whole input dimension.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn micro<const M: usize, const N: usize>(&self, xb: &[u16], width: usize, r: usize, p0: usize, y: SharedMut) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let panel_stride = self.pairs * LANES * 2;
        let w = self.data.as_ptr().add(p0 * panel_stride);
        let x = xb.as_ptr().add(r * width);
        for kk in 0..self.pairs {
            let mut b = [_mm512_setzero_si512(); N];
            for (j, bj) in b.iter_mut().enumerate() {
                *bj = _mm512_loadu_si512(w.add(j * panel_stride + kk * LANES * 2) as *const _);
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let pair = (x.add(i * width + 2 * kk) as *const i32).read_unaligned();
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for j in 0..N {
                    acc_i[j] = _mm512_dpbf16_ps(acc_i[j], a, std::mem::transmute::<__m512i, __m512bh>(b[j]));
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let row = y.ptr().add((r + i) * self.out);
            for (j, sums) in acc_i.iter().enumerate() {
                let c0 = (p0 + j) * LANES;
                let valid = self.out.saturating_sub(c0).min(LANES);
                let mask: __mmask16 = if valid == LANES { 0xffff } else { (1u16 << valid) - 1 };
                _mm512_mask_storeu_ps(row.add(c0), mask, *sums);
            }
        }
    }
}

/// Rounds one row to bf16 bits (16 values per instruction where possible).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_row(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mut i = 0;
    while i + LANES <= n {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let b: __m256bh = _mm512_cvtneps_pbh(v);
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(b));
        i += LANES;
    }
    for k in i..n {
        dst[k] = to_bf16(src[k]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn convert_row(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = to_bf16(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn packing_round_trips_through_bf16() {
        let mut s = 7;
        let (out, inp) = (37, 11);
        let w: Vec<f32> = (0..out * inp).map(|_| lcg(&mut s)).collect();
        let p = PackedBf16::pack(&w, out, inp);
        let back = p.unpack();
        for (a, b) in w.iter().zip(&back) {
            assert_eq!(from_bf16(to_bf16(*a)), *b);
        }
    }

    /// Every tile shape (full and partial rows, full and partial panel groups, odd input
    /// width) against an f64 product of the same bf16-rounded operands.
    #[test]
    fn matmul_matches_the_product_of_the_rounded_operands() {
        if !supported() {
            eprintln!("SKIPPED: this CPU has no AVX-512 BF16; the bf16 kernel test runs where it has");
            return;
        }
        let mut s = 42;
        for &(rows, out, inp) in &[(1, 16, 2), (7, 70, 33), (13, 64, 576), (100, 200, 129), (623, 96, 64), (40, 144, 1536)] {
            let w: Vec<f32> = (0..out * inp).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..rows * inp).map(|_| lcg(&mut s)).collect();
            let p = PackedBf16::pack(&w, out, inp);
            let mut kernels = vec![Bf16Kernel::Avx512];
            if amx_ready() {
                kernels.push(Bf16Kernel::Amx);
            } else {
                eprintln!("AMX not available here: only the AVX-512 BF16 kernel is checked");
            }
            for kernel in kernels {
            let y = p.matmul_with(kernel, &x, rows);
            let wr = p.unpack();
            for r in 0..rows {
                for c in 0..out {
                    let want: f64 = (0..inp).map(|k| from_bf16(to_bf16(x[r * inp + k])) as f64 * wr[c * inp + k] as f64).sum();
                    let got = y[r * out + c] as f64;
                    let scale: f64 = (0..inp).map(|k| (x[r * inp + k] * w[c * inp + k]).abs() as f64).sum::<f64>().max(1e-6);
                    assert!((got - want).abs() <= 1e-5 * scale + 1e-6, "{kernel:?} ({rows},{out},{inp}) at [{r},{c}]: {got} vs {want}");
                }
            }
            }
        }
    }
}

//! Q4_K and Q6_K blocks computed here, bit for bit as llama.cpp's reference quantizers
//! (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref` in ggml-quants.c) compute them.
//!
//! These two types are nearly all of a `q4_k_m` export's work, and ggml's reference code
//! searches each sub-block's scale one float at a time. Here the sub-blocks of a 256-value
//! super-block are the lanes of fixed-size arrays (8 sub-blocks of 32 for Q4_K, 16 of 16 for
//! Q6_K): every lane runs exactly ggml's sequence of f32 operations (same order, no fused
//! multiply-add, ggml's rounding trick), so the compiler can use SIMD registers without
//! changing a single bit. Branches become per-lane selects.

use half::f16;

/// Values per super-block.
pub const QK_K: usize = 256;
/// Bytes of a Q4_K block: d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 of nibbles.
pub const Q4K_BYTES: usize = 144;
/// Bytes of a Q6_K block: 128 low nibbles, 64 of high bits, 16 scales, d (f16).
pub const Q6K_BYTES: usize = 210;
/// ggml's `GROUP_MAX_EPS`: below this a group counts as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round to nearest (ties to even) through the float's mantissa.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `nearest_int(v)` clamped to `[lo, hi]`, as a float (exact: the levels are small).
#[inline(always)]
fn level(v: f32, lo: i32, hi: i32) -> f32 {
    nearest_int(v).max(lo).min(hi) as f32
}

/// ggml's `make_qkx2_quants` (no MAD) for 8 groups of 32 at once: group `k` is lane `k`
/// of `x[i]` and `w[i]`. Writes the levels (as floats) to `levels` and returns
/// `(scale, -min)` per lane. Uses AVX2 registers explicitly where the CPU has them: the
/// compiler keeps this search's sums in scalar registers otherwise.
#[inline(always)]
fn make_qkx2(
    x: &[[f32; 8]; 32],
    w: &[[f32; 8]; 32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    levels: &mut [[f32; 8]; 32],
) -> ([f32; 8], [f32; 8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::make_qkx2(x, w, nmax, rmin, rdelta, nstep, levels) };
    }
    make_qkx2_lanes(x, w, nmax, rmin, rdelta, nstep, levels)
}

/// `make_qkx2` on plain arrays, one lane at a time as far as the compiler is concerned.
#[inline(always)]
fn make_qkx2_lanes(
    x: &[[f32; 8]; 32],
    w: &[[f32; 8]; 32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    levels: &mut [[f32; 8]; 32],
) -> ([f32; 8], [f32; 8]) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = [0f32; 8];
    for k in 0..8 {
        sum_x[k] = sum_w[k] * x[0][k];
    }
    for i in 1..32 {
        for k in 0..8 {
            let v = x[i][k];
            min[k] = if v < min[k] { v } else { min[k] };
            max[k] = if v > max[k] { v } else { max[k] };
            sum_w[k] += w[i][k];
            sum_x[k] += w[i][k] * v;
        }
    }
    let mut flat = [false; 8];
    let (mut iscale, mut scale, mut best_error) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for k in 0..8 {
        min[k] = if min[k] > 0.0 { 0.0 } else { min[k] };
        flat[k] = max[k] == min[k];
        iscale[k] = nmax as f32 / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    for i in 0..32 {
        for k in 0..8 {
            let l = level(iscale[k] * (x[i][k] - min[k]), 0, nmax);
            levels[i][k] = l;
            let diff = scale[k] * l + min[k] - x[i][k];
            best_error[k] += w[i][k] * (diff * diff);
        }
    }
    let mut aux = [[0f32; 8]; 32];
    for is in 0..=nstep {
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for k in 0..8 {
            iscale[k] = (rmin + rdelta * is as f32 + nmax as f32) / (max[k] - min[k]);
        }
        for i in 0..32 {
            for k in 0..8 {
                let l = level(iscale[k] * (x[i][k] - min[k]), 0, nmax);
                aux[i][k] = l;
                let wl = w[i][k] * l;
                sum_l[k] += wl;
                sum_l2[k] += wl * l;
                sum_xl[k] += wl * x[i][k];
            }
        }
        let (mut this_scale, mut this_min, mut positive) = ([0f32; 8], [0f32; 8], [false; 8]);
        for k in 0..8 {
            let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            positive[k] = d > 0.0;
            let s = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
            let m = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
            this_min[k] = if m > 0.0 { 0.0 } else { m };
            this_scale[k] = if m > 0.0 { sum_xl[k] / sum_l2[k] } else { s };
        }
        let mut cur_error = [0f32; 8];
        for i in 0..32 {
            for k in 0..8 {
                let diff = this_scale[k] * aux[i][k] + this_min[k] - x[i][k];
                cur_error[k] += w[i][k] * (diff * diff);
            }
        }
        let mut better = [false; 8];
        for k in 0..8 {
            better[k] = positive[k] && cur_error[k] < best_error[k] && !flat[k];
            if better[k] {
                best_error[k] = cur_error[k];
                scale[k] = this_scale[k];
                min[k] = this_min[k];
            }
        }
        for i in 0..32 {
            for k in 0..8 {
                levels[i][k] = if better[k] { aux[i][k] } else { levels[i][k] };
            }
        }
    }
    let mut neg_min = [0f32; 8];
    for k in 0..8 {
        neg_min[k] = -min[k];
        if flat[k] {
            scale[k] = 0.0;
            for row in levels.iter_mut() {
                row[k] = 0.0;
            }
        }
    }
    (scale, neg_min)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! `make_qkx2` on AVX2 registers: the same operations in the same order, per lane.

    use std::arch::x86_64::*;

    /// `nearest_int` clamped to `[0, hi]`, as floats.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn level(v: __m256, hi: __m256i) -> __m256 {
        let t = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12_582_912.0)));
        let l = _mm256_sub_epi32(
            _mm256_and_si256(t, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x0040_0000),
        );
        _mm256_cvtepi32_ps(_mm256_min_epi32(
            _mm256_max_epi32(l, _mm256_setzero_si256()),
            hi,
        ))
    }

    /// See `super::make_qkx2`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn make_qkx2(
        x: &[[f32; 8]; 32],
        w: &[[f32; 8]; 32],
        nmax: i32,
        rmin: f32,
        rdelta: f32,
        nstep: i32,
        levels: &mut [[f32; 8]; 32],
    ) -> ([f32; 8], [f32; 8]) {
        let ld = |a: &[f32; 8]| unsafe { _mm256_loadu_ps(a.as_ptr()) };
        let zero = _mm256_setzero_ps();
        let hi = _mm256_set1_epi32(nmax);
        let (mut min, mut max) = (ld(&x[0]), ld(&x[0]));
        let mut sum_w = ld(&w[0]);
        let mut sum_x = _mm256_mul_ps(sum_w, ld(&x[0]));
        for i in 1..32 {
            let (v, wi) = (ld(&x[i]), ld(&w[i]));
            min = _mm256_blendv_ps(min, v, _mm256_cmp_ps::<_CMP_LT_OQ>(v, min));
            max = _mm256_blendv_ps(max, v, _mm256_cmp_ps::<_CMP_GT_OQ>(v, max));
            sum_w = _mm256_add_ps(sum_w, wi);
            sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(wi, v));
        }
        min = _mm256_blendv_ps(min, zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min, zero));
        let flat = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
        let iscale = _mm256_div_ps(_mm256_set1_ps(nmax as f32), _mm256_sub_ps(max, min));
        let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
        let mut best = zero;
        let mut lv = [zero; 32];
        for i in 0..32 {
            let v = ld(&x[i]);
            let l = level(_mm256_mul_ps(iscale, _mm256_sub_ps(v, min)), hi);
            lv[i] = l;
            let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, l), min), v);
            best = _mm256_add_ps(best, _mm256_mul_ps(ld(&w[i]), _mm256_mul_ps(diff, diff)));
        }
        let mut aux = [zero; 32];
        for is in 0..=nstep {
            let top = _mm256_set1_ps(rmin + rdelta * is as f32 + nmax as f32);
            let iscale = _mm256_div_ps(top, _mm256_sub_ps(max, min));
            let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
            for i in 0..32 {
                let v = ld(&x[i]);
                let l = level(_mm256_mul_ps(iscale, _mm256_sub_ps(v, min)), hi);
                aux[i] = l;
                let wl = _mm256_mul_ps(ld(&w[i]), l);
                sum_l = _mm256_add_ps(sum_l, wl);
                sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, l));
                sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, v));
            }
            let d = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(d, zero);
            let s = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l));
            let m = _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl));
            let (s, m) = (_mm256_div_ps(s, d), _mm256_div_ps(m, d));
            let clamp = _mm256_cmp_ps::<_CMP_GT_OQ>(m, zero);
            let this_min = _mm256_blendv_ps(m, zero, clamp);
            let this_scale = _mm256_blendv_ps(s, _mm256_div_ps(sum_xl, sum_l2), clamp);
            let mut cur = zero;
            for i in 0..32 {
                let diff = _mm256_sub_ps(
                    _mm256_add_ps(_mm256_mul_ps(this_scale, aux[i]), this_min),
                    ld(&x[i]),
                );
                cur = _mm256_add_ps(cur, _mm256_mul_ps(ld(&w[i]), _mm256_mul_ps(diff, diff)));
            }
            let better = _mm256_andnot_ps(
                flat,
                _mm256_and_ps(positive, _mm256_cmp_ps::<_CMP_LT_OQ>(cur, best)),
            );
            best = _mm256_blendv_ps(best, cur, better);
            scale = _mm256_blendv_ps(scale, this_scale, better);
            min = _mm256_blendv_ps(min, this_min, better);
            for i in 0..32 {
                lv[i] = _mm256_blendv_ps(lv[i], aux[i], better);
            }
        }
        for (out, l) in levels.iter_mut().zip(lv) {
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_blendv_ps(l, zero, flat));
        }
        let (mut scale_out, mut neg_min) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(scale_out.as_mut_ptr(), _mm256_blendv_ps(scale, zero, flat));
        let negated = _mm256_xor_ps(min, _mm256_set1_ps(-0.0));
        _mm256_storeu_ps(neg_min.as_mut_ptr(), negated);
        (scale_out, neg_min)
    }
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no weights, for 16 groups of 16 at once
/// (group `k` is lane `k` of `x[i]`). Writes levels (offset by `nmax`) and returns the scales.
#[inline(always)]
fn make_qx(x: &[[f32; 16]; 16], nmax: i32, levels: &mut [[i8; 16]; 16]) -> [f32; 16] {
    let (mut max, mut amax) = ([0f32; 16], [0f32; 16]);
    for row in x {
        for k in 0..16 {
            let ax = row[k].abs();
            let bigger = ax > amax[k];
            amax[k] = if bigger { ax } else { amax[k] };
            max[k] = if bigger { row[k] } else { max[k] };
        }
    }
    // One pass of the search: levels and the weighted sums for this inverse scale.
    let pass = |iscale: &[f32; 16], aux: &mut [[i8; 16]; 16]| {
        let (mut sumlx, mut suml2) = ([0f32; 16], [0f32; 16]);
        for (row, out) in x.iter().zip(aux.iter_mut()) {
            for k in 0..16 {
                let l = nearest_int(iscale[k] * row[k]).clamp(-nmax, nmax - 1);
                out[k] = (l + nmax) as i8;
                let w = row[k] * row[k];
                sumlx[k] += w * row[k] * l as f32;
                suml2[k] += w * l as f32 * l as f32;
            }
        }
        (sumlx, suml2)
    };
    let mut iscale = [0f32; 16];
    for k in 0..16 {
        iscale[k] = -nmax as f32 / max[k];
    }
    let (sumlx, suml2) = pass(&iscale, levels);
    let (mut scale, mut best) = ([0f32; 16], [0f32; 16]);
    for k in 0..16 {
        scale[k] = if suml2[k] != 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        };
        best[k] = scale[k] * sumlx[k];
    }
    let mut aux = [[0i8; 16]; 16];
    for is in (-9..=9).filter(|&is| is != 0) {
        for k in 0..16 {
            iscale[k] = -(nmax as f32 + 0.1 * is as f32) / max[k];
        }
        let (sumlx, suml2) = pass(&iscale, &mut aux);
        let mut better = [false; 16];
        for k in 0..16 {
            better[k] = suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best[k] * suml2[k];
            if better[k] {
                scale[k] = sumlx[k] / suml2[k];
                best[k] = scale[k] * sumlx[k];
            }
        }
        for (row, new) in levels.iter_mut().zip(&aux) {
            for k in 0..16 {
                row[k] = if better[k] { new[k] } else { row[k] };
            }
        }
    }
    for k in 0..16 {
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for row in levels.iter_mut() {
                row[k] = 0;
            }
        }
    }
    scale
}

/// One 256-value super-block as Q4_K (`quantize_row_q4_K_ref`).
#[inline(always)]
fn q4_k_block(x: &[f32], out: &mut [u8]) {
    let mut xt = [[0f32; 8]; 32];
    for (j, group) in x.chunks_exact(32).enumerate() {
        for (i, &v) in group.iter().enumerate() {
            xt[i][j] = v;
        }
    }
    let mut sum_x2 = [0f32; 8];
    for row in &xt {
        for k in 0..8 {
            sum_x2[k] += row[k] * row[k];
        }
    }
    let mut av_x = [0f32; 8];
    for k in 0..8 {
        av_x[k] = (sum_x2[k] / 32.0).sqrt();
    }
    let mut w = [[0f32; 8]; 32];
    for (wr, xr) in w.iter_mut().zip(&xt) {
        for k in 0..8 {
            wr[k] = av_x[k] + xr[k].abs();
        }
    }
    let mut lt = [[0f32; 8]; 32];
    let (scales, mins) = make_qkx2(&xt, &w, 15, -1.0, 0.1, 20, &mut lt);

    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);

    let mut levels = [0u8; QK_K];
    for (i, row) in lt.iter().enumerate() {
        for (j, &l) in row.iter().enumerate() {
            levels[32 * j + i] = l as u8;
        }
    }
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            (
                (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
                (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
            )
        };
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, 15);
            levels[32 * j + ii] = l as u8;
        }
    }
    out[..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    for (c, q) in out[16..].chunks_exact_mut(32).enumerate() {
        for l in 0..32 {
            q[l] = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

/// One 256-value super-block as Q6_K (`quantize_row_q6_K_ref`).
#[inline(always)]
fn q6_k_block(x: &[f32], out: &mut [u8]) {
    let mut xt = [[0f32; 16]; 16];
    for (j, group) in x.chunks_exact(16).enumerate() {
        for (i, &v) in group.iter().enumerate() {
            xt[i][j] = v;
        }
    }
    let mut lt = [[0i8; 16]; 16];
    let scales = make_qx(&xt, 32, &mut lt);
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for &s in &scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    out.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for (s, &v) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * v).min(127) as i8;
    }
    let mut levels = [0u8; QK_K];
    for (i, row) in lt.iter().enumerate() {
        for (j, &l) in row.iter().enumerate() {
            levels[16 * j + i] = l as u8;
        }
    }
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
            levels[16 * j + ii] = (l + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for (half, (ql, qh)) in ql
        .chunks_exact_mut(64)
        .zip(qh.chunks_exact_mut(32))
        .enumerate()
    {
        let l = &levels[128 * half..128 * (half + 1)];
        for i in 0..32 {
            ql[i] = (l[i] & 0xF) | ((l[i + 64] & 0xF) << 4);
            ql[i + 32] = (l[i + 32] & 0xF) | ((l[i + 96] & 0xF) << 4);
            qh[i] = (l[i] >> 4)
                | ((l[i + 32] >> 4) << 2)
                | ((l[i + 64] >> 4) << 4)
                | ((l[i + 96] >> 4) << 6);
        }
    }
    for (o, s) in rest[..16].iter_mut().zip(sc) {
        *o = s as u8;
    }
    rest[16..18].copy_from_slice(&d.to_le_bytes());
}

/// A block type computed here: bytes per super-block and how one is quantized.
trait KQuant {
    const BYTES: usize;
    fn block(x: &[f32], out: &mut [u8]);
}

struct Q4K;
struct Q6K;

impl KQuant for Q4K {
    const BYTES: usize = Q4K_BYTES;
    #[inline(always)]
    fn block(x: &[f32], out: &mut [u8]) {
        q4_k_block(x, out);
    }
}

impl KQuant for Q6K {
    const BYTES: usize = Q6K_BYTES;
    #[inline(always)]
    fn block(x: &[f32], out: &mut [u8]) {
        q6_k_block(x, out);
    }
}

#[inline(always)]
fn each_block<Q: KQuant>(src: &[f32], dst: &mut [u8]) {
    for (x, out) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q::BYTES)) {
        Q::block(x, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn each_block_avx2<Q: KQuant>(src: &[f32], dst: &mut [u8]) {
    each_block::<Q>(src, dst);
}

/// Quantizes every super-block, compiled for AVX2 when the CPU has it (wider registers
/// for the same lane-wise operations; the bytes do not depend on the path).
fn blocks<Q: KQuant>(src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % QK_K, 0, "rows are whole super-blocks");
    assert_eq!(
        dst.len(),
        src.len() / QK_K * Q::BYTES,
        "destination sized for the blocks"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { each_block_avx2::<Q>(src, dst) };
    }
    each_block::<Q>(src, dst);
}

/// Quantizes `src` (whole super-blocks) to Q4_K blocks in `dst`.
pub fn quantize_q4_k(src: &[f32], dst: &mut [u8]) {
    blocks::<Q4K>(src, dst);
}

/// Quantizes `src` (whole super-blocks) to Q6_K blocks in `dst`.
pub fn quantize_q6_k(src: &[f32], dst: &mut [u8]) {
    blocks::<Q6K>(src, dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        let got: Vec<i32> = [2.5f32, 3.5, -2.5, 0.49999997, -7.6]
            .map(nearest_int)
            .to_vec();
        assert_eq!(got, vec![2, 4, -2, 0, -8]);
    }

    /// Groups of 32 that take every branch of the search: random, flat, all zero,
    /// one-signed, a lone spike, tiny and large values.
    fn groups(seed: u64) -> [[f32; 8]; 32] {
        let mut s = seed;
        let mut x = [[0f32; 8]; 32];
        for (i, row) in x.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let r = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                *v = match k {
                    0 | 1 => r,
                    2 => 0.3,
                    3 => 0.0,
                    4 => r.abs(),
                    5 => -r.abs(),
                    6 => f32::from(i == 5),
                    _ => r * if seed % 2 == 0 { 1e-30 } else { 1e17 },
                };
            }
        }
        x
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_search_equals_the_lane_by_lane_search() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for seed in 1..40u64 {
            let x = groups(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut w = [[0f32; 8]; 32];
            for (wr, xr) in w.iter_mut().zip(&x) {
                for k in 0..8 {
                    wr[k] = 0.01 + xr[k].abs();
                }
            }
            for (nmax, rmin, nstep) in [(15, -1.0, 20), (31, -0.5, 15)] {
                let (mut a, mut b) = ([[0f32; 8]; 32], [[0f32; 8]; 32]);
                let plain = make_qkx2_lanes(&x, &w, nmax, rmin, 0.1, nstep, &mut a);
                // SAFETY: AVX2 was detected above.
                let wide = unsafe { avx2::make_qkx2(&x, &w, nmax, rmin, 0.1, nstep, &mut b) };
                let bits = |v: [f32; 8]| v.map(f32::to_bits);
                assert_eq!(bits(plain.0), bits(wide.0), "scales, seed {seed}");
                assert_eq!(bits(plain.1), bits(wide.1), "mins, seed {seed}");
                assert_eq!(a, b, "levels, seed {seed}");
            }
        }
    }

    #[test]
    fn zero_blocks_are_zero_bytes_and_a_ramp_dequantizes_close() {
        let mut q4 = [1u8; 2 * Q4K_BYTES];
        let mut q6 = [1u8; 2 * Q6K_BYTES];
        quantize_q4_k(&[0.0; 2 * QK_K], &mut q4);
        quantize_q6_k(&[0.0; 2 * QK_K], &mut q6);
        assert!(q4.iter().chain(&q6).all(|&b| b == 0));

        // Q6_K of a ramp: value = d * scale * (level - 32), as llama.cpp dequantizes.
        let x: Vec<f32> = (0..QK_K).map(|i| i as f32 / 128.0 - 1.0).collect();
        let mut out = [0u8; Q6K_BYTES];
        quantize_q6_k(&x, &mut out);
        let d = f16::from_le_bytes([out[208], out[209]]).to_f32();
        for (i, &v) in x.iter().enumerate() {
            let (half, l) = (i / 128, i % 128);
            let (ql, qh) = (&out[64 * half..], &out[128 + 32 * half..]);
            let low = (ql[l % 64] >> (4 * (l / 64))) & 0xF;
            let high = (qh[l % 32] >> (2 * (l / 32))) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let scale = out[192 + i / 16] as i8 as f32;
            assert!((d * scale * q as f32 - v).abs() < 0.02, "{i}");
        }
    }
}

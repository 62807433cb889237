//! GGML tensor types and their de-quantisation to f32 (llama.cpp's `ggml-quants.c`).
//!
//! Block layouts (all little-endian, `d`/`m`/`dmin` are f16):
//! - `Q8_0`: 32 values, `d, qs[32] i8`; `y = d·q`.
//! - `Q4_0`: 32 values, `d, qs[16]`; low nibbles are values 0..16, high nibbles 16..32;
//!   `y = d·(q − 8)`.
//! - `Q4_1`: 32 values, `d, m, qs[16]`; `y = d·q + m`.
//! - `Q4_K`: 256 values in 8 sub-blocks of 32 with 6-bit scales and mins,
//!   `d, dmin, scales[12], qs[128]`; `y = d·sc·q − dmin·mn`.
//! - `Q5_K`: as `Q4_K` plus a fifth bit per value in `qh[32]`.
//! - `Q6_K`: 256 values in 16 sub-blocks of 16 with i8 scales, `ql[128], qh[64], scales[16], d`;
//!   `y = d·sc·(q − 32)`.

use half::{bf16, f16};

/// A GGML tensor storage type this reader can de-quantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit, blocks of 32 with one scale.
    Q8_0,
    /// 4-bit, blocks of 32 with one scale.
    Q4_0,
    /// 4-bit, blocks of 32 with a scale and a minimum.
    Q4_1,
    /// 4-bit k-quant, super-blocks of 256.
    Q4K,
    /// 5-bit k-quant, super-blocks of 256.
    Q5K,
    /// 6-bit k-quant, super-blocks of 256.
    Q6K,
}

impl GgmlType {
    /// The type with GGML id `id`, or `None` if it is unknown or not supported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The llama.cpp name of GGML type `id` (for error messages).
    pub fn id_name(id: u32) -> String {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES
            .get(id as usize)
            .map_or_else(|| format!("type {id}"), |n| n.to_string())
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    /// Bytes that `n` values occupy, or `None` if `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (values, bytes) = self.block();
        n.is_multiple_of(values)
            .then(|| (n / values).checked_mul(bytes))
            .flatten()
    }

    /// De-quantises `data`, which must hold exactly `bytes_for(out.len())` bytes, into `out`.
    pub fn dequantize(self, data: &[u8], out: &mut [f32]) {
        let (values, bytes) = self.block();
        debug_assert_eq!(Some(data.len()), self.bytes_for(out.len()));
        let blocks = data.chunks_exact(bytes).zip(out.chunks_exact_mut(values));
        match self {
            Self::F32 => {
                blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            Self::F16 => blocks.for_each(|(b, y)| y[0] = half16(b, 0)),
            Self::BF16 => blocks.for_each(|(b, y)| {
                y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
            }),
            Self::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
            Self::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
            Self::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
            Self::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
            Self::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
            Self::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
        }
    }
}

fn half16(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half16(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = d * (q as i8) as f32;
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half16(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * ((q & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half16(b, 0), half16(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * (q & 0xF) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Scale and min of sub-block `j` from the 12 packed bytes of 6-bit values
/// (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (chunk, (q, y)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0xF) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half16(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

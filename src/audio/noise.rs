//! Comfort noise: soft pink-ish noise, the sound of an open line, so a caller never hears the
//! digital silence that makes people say "hello? are you there?".

/// Generates `len` samples of pink-ish noise at `level_dbfs` RMS.
///
/// Deterministic for a given seed, so tests and benchmarks hear the same thing every run.
pub fn pink_noise(len: usize, level_dbfs: f64, seed: u64) -> Vec<i16> {
    let mut rng = XorShift(seed | 1);
    // Paul Kellet's "economy" pink filter: three one-pole sections whose sum slopes at about
    // -3 dB/octave over the speech band, which sounds far softer than white noise.
    let (mut b0, mut b1, mut b2) = (0.0f64, 0.0f64, 0.0f64);
    let raw: Vec<f64> = (0..len)
        .map(|_| {
            let white = rng.next_f64() * 2.0 - 1.0;
            b0 = 0.99765 * b0 + white * 0.099_046_0;
            b1 = 0.96300 * b1 + white * 0.296_516_4;
            b2 = 0.57000 * b2 + white * 1.052_691_3;
            b0 + b1 + b2 + white * 0.1848
        })
        .collect();
    let rms = (raw.iter().map(|x| x * x).sum::<f64>() / len.max(1) as f64).sqrt();
    let gain = if rms > 0.0 { 10f64.powf(level_dbfs / 20.0) / rms * 32767.0 } else { 0.0 };
    raw.iter().map(|x| (x * gain).round().clamp(-32768.0, 32767.0) as i16).collect()
}

struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::rms_dbfs;

    #[test]
    fn level_is_what_was_asked() {
        let n = pink_noise(48_000, -40.0, 7);
        assert!((rms_dbfs(&n) - -40.0).abs() < 0.5, "{}", rms_dbfs(&n));
    }

    #[test]
    fn deterministic_per_seed() {
        assert_eq!(pink_noise(500, -40.0, 3), pink_noise(500, -40.0, 3));
        assert_ne!(pink_noise(500, -40.0, 3), pink_noise(500, -40.0, 4));
    }

    #[test]
    fn energy_leans_to_low_frequencies() {
        // Pink noise has more energy in slow changes than white noise: the sample-to-sample
        // difference carries less power than the signal itself.
        let n = pink_noise(48_000, -30.0, 11);
        let diff: Vec<i16> = n.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
        assert!(rms_dbfs(&diff) < rms_dbfs(&n) - 3.0);
    }
}

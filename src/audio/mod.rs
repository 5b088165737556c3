//! Baton's own audio: comfort noise or a filler clip, encoded to Opus once and looped.

pub mod encoded_loop;
pub mod filler;
pub mod noise;
pub mod wav;

/// Opus at the WebRTC clock: 48 kHz mono, 20 ms frames.
pub const SAMPLE_RATE: u32 = 48_000;
pub const FRAME_SAMPLES: usize = 960;
pub const FRAME_DURATION: std::time::Duration = std::time::Duration::from_millis(20);

/// RMS level in dBFS of a block of samples (`-inf` for digital silence is clamped to -127).
pub fn rms_dbfs(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return -127.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / samples.len() as f64).sqrt() / 32768.0;
    if rms <= 0.0 { -127.0 } else { (20.0 * rms.log10()).max(-127.0) }
}

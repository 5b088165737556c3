//! Reading a filler clip from a WAV file: any common PCM or float format, any channel count and
//! sample rate, turned into 48 kHz mono for the Opus encoder.
//!
//! The file comes from the operator's configuration, not the network, but a wrong file must
//! still end in a clear message, never a panic or a huge allocation.

use std::path::Path;

use super::SAMPLE_RATE;

#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("{0}")]
    Read(String),
    #[error("unsupported WAV format: {0}")]
    Format(String),
    #[error("clip is {0:.1} s long; the limit is {1} s")]
    TooLong(f64, f64),
}

/// Reads `path` as 48 kHz mono 16-bit samples: channels averaged, other rates resampled
/// linearly (plenty for hold music and comfort sounds; this is not a mastering tool).
pub fn read_mono_48k(path: &Path, max_seconds: f64) -> Result<Vec<i16>, WavError> {
    let mut reader = hound::WavReader::open(path).map_err(|e| WavError::Read(e.to_string()))?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate < 4_000 || spec.sample_rate > 384_000 {
        return Err(WavError::Format(format!("{} channels at {} Hz", spec.channels, spec.sample_rate)));
    }
    let seconds = f64::from(reader.duration()) / f64::from(spec.sample_rate);
    if seconds > max_seconds {
        return Err(WavError::TooLong(seconds, max_seconds));
    }
    let samples: Vec<f64> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => {
            reader.samples::<f32>().map(|s| s.map(f64::from)).collect::<Result<_, _>>()
        }
        (hound::SampleFormat::Int, bits @ 8..=32) => {
            let scale = f64::from(1u32 << (bits - 1));
            reader.samples::<i32>().map(|s| s.map(|v| f64::from(v) / scale)).collect::<Result<_, _>>()
        }
        (fmt, bits) => return Err(WavError::Format(format!("{bits}-bit {fmt:?}"))),
    }
    .map_err(|e| WavError::Read(e.to_string()))?;
    let ch = usize::from(spec.channels);
    let mono: Vec<f64> = samples.chunks_exact(ch).map(|c| c.iter().sum::<f64>() / ch as f64).collect();
    let resampled = resample(&mono, spec.sample_rate, SAMPLE_RATE);
    Ok(resampled.iter().map(|x| (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16).collect())
}

fn resample(x: &[f64], from: u32, to: u32) -> Vec<f64> {
    if from == to || x.is_empty() {
        return x.to_vec();
    }
    let n = (x.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let ratio = f64::from(from) / f64::from(to);
    (0..n)
        .map(|i| {
            let pos = i as f64 * ratio;
            let j = pos as usize;
            let frac = pos - j as f64;
            let a = x[j.min(x.len() - 1)];
            let b = x[(j + 1).min(x.len() - 1)];
            a + (b - a) * frac
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, spec: hound::WavSpec, frames: usize, f: impl Fn(usize, u16) -> i32) {
        let mut w = hound::WavWriter::create(path, spec).expect("create");
        for i in 0..frames {
            for c in 0..spec.channels {
                match spec.sample_format {
                    hound::SampleFormat::Int => w.write_sample(f(i, c)).expect("write"),
                    hound::SampleFormat::Float => w.write_sample(f(i, c) as f32 / 32768.0).expect("write"),
                }
            }
        }
        w.finalize().expect("finalize");
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("baton-wav-{}-{name}.wav", std::process::id()))
    }

    #[test]
    fn stereo_16k_becomes_48k_mono_at_the_same_level() {
        let p = tmp("stereo16k");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        // Left and right differ; the mix is their mean: 8000.
        write(&p, spec, 16_000, |_, c| if c == 0 { 6000 } else { 10_000 });
        let pcm = read_mono_48k(&p, 60.0).expect("read");
        std::fs::remove_file(&p).ok();
        assert_eq!(pcm.len(), 48_000);
        assert!(pcm.iter().all(|&s| (s - 8000).abs() <= 1), "{:?}", &pcm[..4]);
    }

    #[test]
    fn float_and_24_bit_are_read() {
        for (fmt, bits) in [(hound::SampleFormat::Float, 32), (hound::SampleFormat::Int, 24)] {
            let p = tmp(&format!("{bits}"));
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: 48_000,
                bits_per_sample: bits,
                sample_format: fmt,
            };
            let scale = if bits == 24 { 256 } else { 1 };
            write(&p, spec, 960, |i, _| ((i as i32 % 100) - 50) * 100 * scale);
            let pcm = read_mono_48k(&p, 60.0).expect("read");
            std::fs::remove_file(&p).ok();
            assert_eq!(pcm.len(), 960);
            assert!((i32::from(pcm[10]) - (-40 * 100)).abs() <= 2, "{bits}: {}", pcm[10]);
        }
    }

    #[test]
    fn too_long_missing_and_garbage_files_are_clear_errors() {
        let p = tmp("long");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        write(&p, spec, 8_000 * 3, |_, _| 0);
        let e = read_mono_48k(&p, 2.0).expect_err("too long");
        assert!(e.to_string().contains("3.0 s long; the limit is 2 s"), "{e}");
        std::fs::write(&p, b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk").expect("write");
        assert!(matches!(read_mono_48k(&p, 60.0), Err(WavError::Read(_))));
        std::fs::remove_file(&p).ok();
        assert!(matches!(read_mono_48k(Path::new("/nonexistent/clip.wav"), 60.0), Err(WavError::Read(_))));
    }
}

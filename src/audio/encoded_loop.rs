//! A clip encoded to Opus once, then played forever by handing out its packets in a circle.
//!
//! Encoding happens at start-up, not per room: a worker holding hundreds of rooms pays for one
//! encoder run, and each room only copies a pointer per 20 ms frame.

use std::sync::Arc;

use super::{FRAME_SAMPLES, SAMPLE_RATE, rms_dbfs};

/// Errors from preparing a loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("clip too short: {0} samples, need at least {1}")]
    TooShort(usize, usize),
    #[error("opus encoder: {0}")]
    Opus(#[from] opus::Error),
}

/// One encoded 20 ms frame and the level to announce for it in the RTP audio-level extension.
#[derive(Clone, Debug)]
pub struct Frame {
    pub opus: Arc<[u8]>,
    /// dBov as the audio-level extension wants it: 0 is loudest, -127 is silence.
    pub level_dbov: i8,
}

/// A looped clip, shareable by every room (`Arc<EncodedLoop>`).
#[derive(Debug)]
pub struct EncodedLoop {
    frames: Vec<Frame>,
}

/// How many milliseconds of the clip's end are blended into its start so the wrap is seamless.
const CROSSFADE_MS: usize = 40;

/// Frames of the clip's end encoded (and thrown away) before the kept pass. The decoder's memory
/// is a few frames, but the encoder's level and bit allocation take longer to settle: with a
/// quarter second of priming a steady tone still dipped 5 dB at every wrap; one second does not.
const PREROLL_FRAMES: usize = 50;

impl EncodedLoop {
    /// Encodes 48 kHz mono PCM for looping.
    ///
    /// The clip is crossfaded at the wrap, and the encoder is primed with the clip's last
    /// frames before the kept pass: its prediction state at the first kept frame then comes from
    /// the clip's own end, which is what the decoder has heard when the loop wraps around.
    pub fn encode(pcm: &[i16], bitrate: i32) -> Result<Self, LoopError> {
        let fade = SAMPLE_RATE as usize * CROSSFADE_MS / 1000;
        let min = FRAME_SAMPLES * 4 + fade;
        if pcm.len() < min {
            return Err(LoopError::TooShort(pcm.len(), min));
        }
        let clip = crossfade_wrap(pcm, fade);
        let whole = clip.len() / FRAME_SAMPLES * FRAME_SAMPLES;
        let clip = &clip[..whole];

        let mut enc = encoder(bitrate)?;
        let mut out = [0u8; 1500];
        let mut frames = Vec::with_capacity(whole / FRAME_SAMPLES);
        let preroll = whole - (PREROLL_FRAMES * FRAME_SAMPLES).min(whole);
        for chunk in clip[preroll..].chunks_exact(FRAME_SAMPLES) {
            enc.encode(chunk, &mut out)?;
        }
        for chunk in clip.chunks_exact(FRAME_SAMPLES) {
            let n = enc.encode(chunk, &mut out)?;
            let level = (-rms_dbfs(chunk)).round().clamp(0.0, 127.0) as i8;
            frames.push(Frame { opus: Arc::from(&out[..n]), level_dbov: -level });
        }
        Ok(Self { frames })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frame to play at `tick` (20 ms ticks since the loop started).
    pub fn frame(&self, tick: u64) -> &Frame {
        // `encode` guarantees at least four frames, so the modulo is never by zero.
        &self.frames[(tick % self.frames.len() as u64) as usize]
    }
}

/// The encoder for baton's own audio.
fn encoder(bitrate: i32) -> Result<opus::Encoder, LoopError> {
    let mut enc = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Audio)?;
    enc.set_bitrate(opus::Bitrate::Bits(bitrate))?;
    // FEC data describes the previous frame, which on a wrap is not what precedes it; DTX
    // would turn quiet noise into gaps, the very thing comfort noise is there to prevent.
    enc.set_inband_fec(false)?;
    enc.set_dtx(false)?;
    Ok(enc)
}

/// Encoded silence, sent while the track is live but quiet: keeps subscribers' receivers
/// running without making a sound. A packet that decodes to silence however often it is
/// repeated: Opus codes each frame's energy relative to the previous one, so the packet that
/// follows loud content describes a decay, and replaying it holds the decoder at an audible
/// level (about -40 dBFS after the comfort noise). A fresh encoder that has seen nothing but
/// silence gives a packet that means "still silent".
pub fn encoded_silence(bitrate: i32) -> Result<Frame, LoopError> {
    let mut enc = encoder(bitrate)?;
    let mut out = [0u8; 1500];
    let mut n = 0;
    for _ in 0..10 {
        n = enc.encode(&[0i16; FRAME_SAMPLES], &mut out)?;
    }
    Ok(Frame { opus: Arc::from(&out[..n]), level_dbov: -127 })
}

/// Blends the last `fade` samples into the first `fade` and drops them from the end, so the
/// sample after the clip's last one is, in effect, its first one.
fn crossfade_wrap(pcm: &[i16], fade: usize) -> Vec<i16> {
    let body = pcm.len() - fade;
    let mut out = pcm[..body].to_vec();
    for i in 0..fade {
        let t = (i as f64 + 0.5) / fade as f64;
        let head = f64::from(pcm[i]) * t;
        let tail = f64::from(pcm[body + i]) * (1.0 - t);
        out[i] = (head + tail).round().clamp(-32768.0, 32767.0) as i16;
    }
    out
}

/// RTP timing for a looped track: one timestamp step of 960 per 20 ms frame, derived from the
/// tick count, so it never resets and keeps advancing while the track is muted.
pub fn rtp_time(tick: u64) -> u64 {
    tick * FRAME_SAMPLES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comfort_noise_encodes_and_decodes_to_noise() {
        let noise = crate::audio::noise::pink_noise(SAMPLE_RATE as usize, -40.0, 7);
        let lp = EncodedLoop::encode(&noise, 24_000).expect("encode");
        assert_eq!(lp.len(), 48); // 1 s minus the 40 ms crossfade, in 20 ms frames
        let mut dec = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).expect("decoder");
        let mut pcm = vec![0i16; FRAME_SAMPLES];
        let mut levels = Vec::new();
        for tick in 0..(lp.len() as u64 * 3) {
            let f = lp.frame(tick);
            let n = dec.decode(&f.opus, &mut pcm, false).expect("decode");
            assert_eq!(n, FRAME_SAMPLES);
            levels.push(rms_dbfs(&pcm));
            assert!(f.level_dbov < -30 && f.level_dbov > -60, "{}", f.level_dbov);
        }
        // After the decoder settles, every frame, wrap points included, is audible noise.
        for (i, l) in levels.iter().enumerate().skip(2) {
            assert!(*l > -55.0 && *l < -30.0, "frame {i} at {l} dBFS");
        }
    }

    #[test]
    fn steady_tone_keeps_its_level_across_the_wrap() {
        // 0.9 s of 1 kHz at -20 dBFS RMS: 43 frames after the crossfade, phase-aligned at the
        // seam, so any level change at the wrap comes from the encoding, not the clip.
        let pcm: Vec<i16> = (0..43_200)
            .map(|i| ((f64::from(i) * std::f64::consts::TAU / 48.0).sin() * 4634.0) as i16)
            .collect();
        let lp = EncodedLoop::encode(&pcm, 32_000).expect("encode");
        let mut dec = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).expect("decoder");
        let mut out = vec![0i16; FRAME_SAMPLES];
        let mut off = Vec::new();
        for tick in 0..(lp.len() as u64 * 3) {
            dec.decode(&lp.frame(tick).opus, &mut out, false).expect("decode");
            let level = rms_dbfs(&out);
            if tick >= 5 && (level + 20.0).abs() > 1.0 {
                off.push((tick, level));
            }
        }
        assert!(off.is_empty(), "level off at the wrap (frames {} long): {off:?}", lp.len());
    }

    #[test]
    fn silence_packet_decodes_to_silence_even_after_loud_audio() {
        let noise = crate::audio::noise::pink_noise(SAMPLE_RATE as usize, -30.0, 3);
        let lp = EncodedLoop::encode(&noise, 24_000).expect("encode");
        let mut dec = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).expect("decoder");
        let mut out = vec![0i16; FRAME_SAMPLES];
        for tick in 0..20 {
            dec.decode(&lp.frame(tick).opus, &mut out, false).expect("decode");
        }
        // The decoder has just played noise; from the third silence packet on it is silent.
        let silence = encoded_silence(24_000).expect("encode");
        let levels: Vec<f64> = (0..25)
            .map(|_| {
                dec.decode(&silence.opus, &mut out, false).expect("decode");
                rms_dbfs(&out)
            })
            .collect();
        assert!(levels[2..].iter().all(|&l| l < -80.0), "{levels:?}");
    }

    #[test]
    fn crossfade_keeps_length_minus_fade_and_blends_ends() {
        let pcm: Vec<i16> = (0..100).map(|i| if i < 50 { 1000 } else { -1000 }).collect();
        let out = crossfade_wrap(&pcm, 10);
        assert_eq!(out.len(), 90);
        // The first sample is mostly the tail (-1000), moving toward the head (+1000).
        assert!(out[0] < -800 && out[9] > 800);
    }

    #[test]
    fn too_short_clip_is_refused() {
        assert!(matches!(EncodedLoop::encode(&[0; 100], 24_000), Err(LoopError::TooShort(100, _))));
    }

    #[test]
    fn rtp_time_steps_960_per_frame() {
        assert_eq!(rtp_time(0), 0);
        assert_eq!(rtp_time(1), 960);
        assert_eq!(rtp_time(50), 48_000);
    }
}

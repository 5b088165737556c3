//! The filler: comfort noise or a configured clip, at a few gain steps, and the envelope that
//! moves between them so the filler fades in and out instead of switching on and off.
//!
//! Fading by re-encoding per room would put an Opus encoder in every room that fades. Instead
//! the whole loop is encoded once per process at each of [`STEPS_DB`] gains; a fade plays the
//! same loop position from the next quieter (or louder) copy on each 20 ms frame. The copies are
//! encoded from the same samples frame for frame, so switching between them mid-loop keeps the
//! decoder's prediction close enough that the step is inaudible next to the gain change itself.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::encoded_loop::{EncodedLoop, Frame, LoopError, encoded_silence};
use super::{FRAME_DURATION, SAMPLE_RATE, noise::pink_noise};

/// Gain of each encoded copy relative to the clip, loudest first. A fade walks these steps:
/// about 3 to 8 dB apart, so each 20 ms step is small, down to -24 dB where the filler is
/// already well under a talking agent.
pub const STEPS_DB: [f64; 6] = [0.0, -3.0, -6.0, -10.0, -16.0, -24.0];

/// Where a fade-in starts (-3 dB): enough to soften the onset of a clip, not so much that the
/// first frames of comfort noise (-45 dBFS) sink toward the level where a line sounds dead.
const FADE_IN_FROM: usize = 1;

/// How long the fade-in takes. Short: the filler exists to cover a gap, and a long ramp from
/// near silence would itself sound like one.
pub const FADE_IN: Duration = Duration::from_millis(40);

/// Longest filler clip accepted: each second costs six seconds of Opus encoding at start-up.
pub const MAX_CLIP_SECONDS: f64 = 60.0;

/// Why the filler could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FillerError {
    #[error("filler clip {path}: {reason}")]
    Clip { path: String, reason: String },
    #[error("{0}")]
    Encode(#[from] LoopError),
}

/// The filler sound at every gain step, shared by all rooms of a process.
#[derive(Debug)]
pub struct FillerSound {
    full: EncodedLoop,
    /// One packet of encoded digital silence (the same for every gain step).
    silence: Frame,
    /// The quieter copies, `STEPS_DB[1..]`. Encoded on a background thread so they do not
    /// delay joining; until they are there a fade plays at full level and then stops, as a
    /// hold would.
    quieter: OnceLock<Vec<EncodedLoop>>,
    /// What it is, for logs: "comfort noise at -45 dBFS" or the clip's path.
    pub description: String,
}

impl FillerSound {
    /// Pink comfort noise at `level_dbfs` RMS, looped every 3 s.
    pub fn comfort_noise(level_dbfs: f64) -> Result<Arc<Self>, FillerError> {
        let pcm = pink_noise((3.0 * f64::from(SAMPLE_RATE)) as usize, level_dbfs, 0x5eed);
        Self::from_pcm(pcm, 24_000, format!("comfort noise at {level_dbfs} dBFS"))
    }

    /// A WAV clip (hold music, "one moment please"), looped seamlessly, with `gain_db` applied.
    pub fn clip(path: &Path, gain_db: f64) -> Result<Arc<Self>, FillerError> {
        let clip_err = |reason: String| FillerError::Clip { path: path.display().to_string(), reason };
        let pcm = super::wav::read_mono_48k(path, MAX_CLIP_SECONDS).map_err(|e| clip_err(e.to_string()))?;
        Self::from_pcm(scaled(&pcm, gain_db), 32_000, format!("clip {}", path.display())).map_err(|e| match e
        {
            FillerError::Encode(LoopError::TooShort(..)) => clip_err(e.to_string()),
            e => e,
        })
    }

    /// The configured filler: the clip if one is named, comfort noise otherwise.
    pub fn configured(
        clip: Option<&Path>,
        clip_gain_db: f64,
        noise_dbfs: f64,
    ) -> Result<Arc<Self>, FillerError> {
        match clip {
            Some(path) => Self::clip(path, clip_gain_db),
            None => Self::comfort_noise(noise_dbfs),
        }
    }

    /// Encodes the full-level loop now (so a bad clip fails at start) and the quieter copies on
    /// a background thread.
    fn from_pcm(pcm: Vec<i16>, bitrate: i32, description: String) -> Result<Arc<Self>, FillerError> {
        let full = EncodedLoop::encode(&pcm, bitrate)?;
        let silence = encoded_silence(bitrate)?;
        let me = Arc::new(Self { full, silence, quieter: OnceLock::new(), description });
        let weak = Arc::downgrade(&me);
        let spawned = std::thread::Builder::new().name("filler-encode".into()).spawn(move || {
            let steps: Result<Vec<_>, _> =
                STEPS_DB[1..].iter().map(|&db| EncodedLoop::encode(&scaled(&pcm, db), bitrate)).collect();
            match (steps, weak.upgrade()) {
                (Ok(steps), Some(me)) => {
                    let _ = me.quieter.set(steps);
                }
                (Err(e), _) => tracing::warn!(error = %e, "filler fade steps not encoded; fades will cut"),
                (Ok(_), None) => {}
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the filler encoder thread; fades will cut");
        }
        Ok(me)
    }

    /// Waits until the fade steps are encoded (tests want the real thing).
    #[cfg(test)]
    pub fn wait_for_fades(&self, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        while self.quieter.get().is_none() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The frame for `tick` at gain step `step` (0 is full level).
    pub fn frame(&self, step: usize, tick: u64) -> &Frame {
        match (step, self.quieter.get()) {
            (0, _) | (_, None) => self.full.frame(tick),
            (s, Some(q)) => q[(s - 1).min(q.len() - 1)].frame(tick),
        }
    }

    /// Encoded digital silence.
    pub fn silence(&self) -> &Frame {
        &self.silence
    }
}

fn scaled(pcm: &[i16], gain_db: f64) -> Vec<i16> {
    let g = 10f64.powf(gain_db / 20.0);
    pcm.iter().map(|&s| (f64::from(s) * g).round().clamp(-32768.0, 32767.0) as i16).collect()
}

/// What the filler is doing, as gain steps over ticks. Pure: the room asks it which step to
/// play at each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    #[default]
    Silent,
    /// Ramping from `from` up to full level over `ticks` frames starting at `start`.
    In {
        start: u64,
        from: usize,
        ticks: u64,
    },
    Full,
    /// Ramping from `from` down to silence over `ticks` frames starting at `start`.
    Out {
        start: u64,
        from: usize,
        ticks: u64,
    },
}

const QUIETEST: usize = STEPS_DB.len() - 1;

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / FRAME_DURATION.as_micros()) as u64
}

impl Envelope {
    /// Gain step to play at `tick`, or `None` for silence.
    pub fn step(&self, tick: u64) -> Option<usize> {
        match *self {
            Envelope::Silent => None,
            Envelope::Full => Some(0),
            Envelope::In { start, from, ticks } => {
                let i = tick.saturating_sub(start);
                if i >= ticks {
                    return Some(0);
                }
                // Frame i of n sits (i + 1) / (n + 1) of the way: never repeats the start step,
                // never reaches full level before the ramp ends.
                let done = (i + 1) as f64 / (ticks + 1) as f64;
                Some((from as f64 * (1.0 - done)).round() as usize)
            }
            Envelope::Out { start, from, ticks } => {
                let i = tick.saturating_sub(start);
                if i >= ticks {
                    return None;
                }
                let done = (i + 1) as f64 / (ticks + 1) as f64;
                Some((from as f64 + (QUIETEST - from) as f64 * done).round() as usize)
            }
        }
    }

    /// Start (or keep) playing from `tick`: fade in from silence, or back up from wherever a
    /// fade-out has got to.
    pub fn start(&mut self, tick: u64) {
        let from = match self.step(tick) {
            None => FADE_IN_FROM,
            Some(0) => {
                *self = Envelope::Full;
                return;
            }
            Some(s) => s.min(FADE_IN_FROM),
        };
        *self = Envelope::In { start: tick, from, ticks: ticks(FADE_IN).max(1) };
    }

    /// Fade out to silence over `fade`, from wherever the envelope is at `tick`.
    pub fn stop(&mut self, tick: u64, fade: Duration) {
        *self = match self.step(tick) {
            Some(from) if !fade.is_zero() && from < QUIETEST => {
                Envelope::Out { start: tick, from, ticks: ticks(fade).max(1) }
            }
            _ => Envelope::Silent,
        };
    }

    /// Whether nothing will be heard from `tick` on (a fade-out has ended, or there was none).
    pub fn silent_from(&self, tick: u64) -> bool {
        match *self {
            Envelope::Silent => true,
            Envelope::Out { start, ticks, .. } => tick >= start + ticks,
            _ => false,
        }
    }

    /// Whether a fade-out is under way at `tick`.
    pub fn fading_out(&self, tick: u64) -> bool {
        matches!(*self, Envelope::Out { .. }) && !self.silent_from(tick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::{FRAME_SAMPLES, rms_dbfs};

    #[test]
    fn fade_in_rises_step_by_step_to_full() {
        let mut e = Envelope::Silent;
        e.start(100);
        let steps: Vec<_> = (100..104).map(|t| e.step(t)).collect();
        assert_eq!(steps, vec![Some(1), Some(0), Some(0), Some(0)]);
        // Monotonic, starts below full, ends at full after FADE_IN.
        assert_eq!(e.step(100 + ticks(FADE_IN)), Some(0));
    }

    #[test]
    fn fade_out_falls_to_silence_after_the_fade() {
        let mut e = Envelope::Full;
        e.stop(10, Duration::from_millis(200)); // 10 frames
        let steps: Vec<_> = (10..21).map(|t| e.step(t)).collect();
        assert_eq!(steps[0], Some(0));
        assert!(steps.windows(2).all(|w| w[1].is_none() || w[1] >= w[0]), "{steps:?}");
        assert_eq!(steps[9], Some(QUIETEST));
        assert_eq!(steps[10], None);
        assert!(!e.silent_from(19) && e.silent_from(20));
        assert!(e.fading_out(15) && !e.fading_out(20));
    }

    #[test]
    fn restart_during_fade_out_resumes_from_the_current_step() {
        let mut e = Envelope::Full;
        e.stop(0, Duration::from_millis(400)); // 20 frames
        let mid = e.step(15).expect("still fading");
        assert!(mid > FADE_IN_FROM);
        e.start(15);
        assert_eq!(e.step(15).map(|s| s <= FADE_IN_FROM), Some(true));
        assert_eq!(e.step(15 + ticks(FADE_IN)), Some(0));
    }

    #[test]
    fn stop_without_fade_is_immediate_and_start_when_full_stays_full() {
        let mut e = Envelope::Full;
        e.start(5);
        assert_eq!(e, Envelope::Full);
        e.stop(5, Duration::ZERO);
        assert_eq!(e.step(5), None);
        assert!(e.silent_from(5));
    }

    #[test]
    fn gain_steps_decode_at_their_levels() {
        let f = FillerSound::comfort_noise(-30.0).expect("encode");
        assert!(f.wait_for_fades(Duration::from_secs(20)), "fade steps never encoded");
        let mut levels = Vec::new();
        for step in 0..STEPS_DB.len() {
            let mut dec = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).expect("decoder");
            let mut pcm = vec![0i16; FRAME_SAMPLES];
            let mut sum = 0.0;
            for tick in 0..40u64 {
                let n = dec.decode(&f.frame(step, tick).opus, &mut pcm, false).expect("decode");
                if tick >= 5 {
                    sum += rms_dbfs(&pcm[..n]);
                }
            }
            levels.push(sum / 35.0);
        }
        for (i, db) in STEPS_DB.iter().enumerate() {
            assert!((levels[i] - (levels[0] + db)).abs() < 1.5, "step {i}: {levels:?}");
        }
    }
}

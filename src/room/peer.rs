//! The one WebRTC peer connection baton needs (the publisher PC), on str0m.
//!
//! This stays synchronous and socket-free: the room task feeds it datagrams and time, and drains
//! what it wants sent. Keeping str0m behind this one type is what would let another WebRTC stack
//! replace it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use crate::audio::encoded_loop::{Frame, rtp_time};

pub const RELIABLE_LABEL: &str = "_reliable";
pub const LOSSY_LABEL: &str = "_lossy";
/// Bound on data waiting for SCTP buffer space, so a stalled connection cannot eat memory.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// Bulk data (context transfer frames) is handed to SCTP only while less than this is buffered
/// there. Everything in SCTP's buffer goes out in order on the one ordered channel, so this
/// bounds how long an urgent control message (`activate`, `deactivate`) can wait behind a
/// bundle: 64 KiB is a few milliseconds on a LAN, and the transfer's own window keeps the pipe
/// full anyway.
const BULK_HIGH_WATER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("webrtc: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("bad SDP from server: {0}")]
    Sdp(String),
    #[error("bad ICE candidate from server: {0}")]
    Candidate(String),
    #[error("no offer is pending")]
    NoPendingOffer,
    #[error("outgoing data queue is full ({MAX_QUEUED_BYTES} bytes)")]
    QueueFull,
}

/// What the peer connection reports to the room.
#[derive(Debug)]
pub enum PeerEvent {
    Connected,
    /// ICE lost the path: the room should resume.
    Disconnected,
    ReliableOpen,
    Data(Vec<u8>),
}

/// Everything one drain of the engine produced.
#[derive(Debug, Default)]
pub struct Drained {
    pub transmits: Vec<(SocketAddr, Vec<u8>)>,
    pub events: Vec<PeerEvent>,
}

pub struct Peer {
    rtc: Rtc,
    local: SocketAddr,
    reliable: ChannelId,
    lossy: ChannelId,
    reliable_open: bool,
    /// Control traffic: written to SCTP as soon as it has room.
    urgent: VecDeque<Vec<u8>>,
    /// Bulk traffic: written only below [`BULK_HIGH_WATER`], after every urgent message.
    bulk: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    audio: Mid,
    pending: Option<SdpPendingOffer>,
    /// Server candidates that arrived before its answer; ICE cannot use them until then.
    early_candidates: Vec<Candidate>,
    have_answer: bool,
    /// DTLS has completed once; after an ICE restart only ICE needs to come back.
    dtls_up: bool,
    connected: bool,
    next_timeout: Instant,
}

impl Peer {
    /// Builds the publisher PC: one host candidate at `local`, the two LiveKit data channels and
    /// one send-only Opus track whose msid track id is `track_cid` (the server pairs the RTP
    /// track with the `AddTrackRequest` by it). Returns the first offer.
    pub fn new(now: Instant, local: SocketAddr, track_cid: &str) -> Result<(Self, String), PeerError> {
        let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(now);
        let candidate = Candidate::host(local, "udp").map_err(|e| PeerError::Candidate(e.to_string()))?;
        rtc.add_local_candidate(candidate);
        let mut api = rtc.sdp_api();
        let reliable = api.add_channel_with_config(ChannelConfig {
            label: RELIABLE_LABEL.into(),
            ordered: true,
            reliability: Reliability::Reliable,
            ..Default::default()
        });
        let lossy = api.add_channel_with_config(ChannelConfig {
            label: LOSSY_LABEL.into(),
            ordered: false,
            reliability: Reliability::MaxRetransmits { retransmits: 0 },
            ..Default::default()
        });
        let audio = api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some(track_cid.to_string()),
            Some(track_cid.to_string()),
            None,
        );
        let (offer, pending) = api.apply().ok_or(PeerError::NoPendingOffer)?;
        let peer = Self {
            rtc,
            local,
            reliable,
            lossy,
            reliable_open: false,
            urgent: VecDeque::new(),
            bulk: VecDeque::new(),
            queued_bytes: 0,
            audio,
            pending: Some(pending),
            early_candidates: Vec::new(),
            have_answer: false,
            dtls_up: false,
            connected: false,
            next_timeout: now,
        };
        Ok((peer, offer.to_sdp_string()))
    }

    /// Our candidate, as the `candidate:` line LiveKit's trickle carries.
    pub fn local_candidate_sdp(&self) -> Option<String> {
        Candidate::host(self.local, "udp").ok().map(|c| c.to_sdp_string())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn reliable_open(&self) -> bool {
        self.reliable_open
    }

    pub fn next_timeout(&self) -> Instant {
        self.next_timeout
    }

    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), PeerError> {
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| PeerError::Sdp(e.to_string()))?;
        let pending = self.pending.take().ok_or(PeerError::NoPendingOffer)?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        self.have_answer = true;
        for c in std::mem::take(&mut self.early_candidates) {
            self.rtc.add_remote_candidate(c);
        }
        Ok(())
    }

    /// A server offer is for the subscriber PC, which a `canSubscribe=false` participant does not
    /// use; it is parsed only to be sure it is well-formed before it is declined.
    pub fn check_offer(sdp: &str) -> Result<(), PeerError> {
        SdpOffer::from_sdp_string(sdp).map(|_| ()).map_err(|e| PeerError::Sdp(e.to_string()))
    }

    /// Takes a trickled candidate (`candidateInit` JSON of LiveKit's trickle message).
    pub fn add_remote_candidate(&mut self, candidate_init: &str) -> Result<(), PeerError> {
        let v: serde_json::Value = serde_json::from_str(candidate_init)
            .map_err(|e| PeerError::Candidate(format!("not JSON: {e}")))?;
        let line = v.get("candidate").and_then(|c| c.as_str()).unwrap_or_default();
        if line.is_empty() {
            // End-of-candidates marker.
            return Ok(());
        }
        let c = Candidate::from_sdp_string(line).map_err(|e| PeerError::Candidate(e.to_string()))?;
        if self.have_answer {
            self.rtc.add_remote_candidate(c);
        } else {
            self.early_candidates.push(c);
        }
        Ok(())
    }

    /// Starts an ICE restart on the existing connection; returns the new offer.
    pub fn ice_restart(&mut self) -> Result<String, PeerError> {
        let mut api = self.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api.apply().ok_or(PeerError::NoPendingOffer)?;
        self.pending = Some(pending);
        self.have_answer = false;
        // The path counts as down until ICE confirms the restarted one; that confirmation is
        // what ends the resume.
        self.connected = false;
        Ok(offer.to_sdp_string())
    }

    /// Queues one reliable data-channel message; it goes out as SCTP buffer space allows.
    /// Bulk messages yield to every urgent one queued before or after them.
    pub fn send_reliable(&mut self, bytes: Vec<u8>, bulk: bool) -> Result<(), PeerError> {
        if self.queued_bytes + bytes.len() > MAX_QUEUED_BYTES {
            return Err(PeerError::QueueFull);
        }
        self.queued_bytes += bytes.len();
        if bulk {
            self.bulk.push_back(bytes)
        } else {
            self.urgent.push_back(bytes)
        }
        Ok(())
    }

    /// Writes one 20 ms Opus frame at loop position `tick`.
    pub fn write_audio(&mut self, frame: &Frame, tick: u64, now: Instant) -> Result<(), PeerError> {
        if !self.connected {
            return Ok(());
        }
        let Some(writer) = self.rtc.writer(self.audio) else { return Ok(()) };
        let Some(pt) = writer.payload_params().next().map(|p| p.pt()) else { return Ok(()) };
        let time = MediaTime::new(rtp_time(tick), Frequency::FORTY_EIGHT_KHZ);
        writer.audio_level(frame.level_dbov, false).write(pt, now, time, frame.opus.clone())?;
        Ok(())
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        data: &[u8],
    ) -> Result<(), PeerError> {
        let Ok(contents) = data.try_into() else {
            // Not STUN, DTLS or (S)RTP: nothing a peer connection would accept.
            return Ok(());
        };
        let input =
            Input::Receive(now, Receive { proto: Protocol::Udp, source, destination: self.local, contents });
        if self.rtc.accepts(&input) {
            self.rtc.handle_input(input)?;
        }
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), PeerError> {
        self.rtc.handle_input(Input::Timeout(now))?;
        Ok(())
    }

    /// Moves queued data into SCTP and drains the engine until it only has a timeout left.
    pub fn drain(&mut self, out: &mut Drained) -> Result<(), PeerError> {
        loop {
            self.flush_queue()?;
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.next_timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => out.transmits.push((t.destination, t.contents.into())),
                Output::Event(e) => self.on_event(e, out),
            }
        }
    }

    fn flush_queue(&mut self) -> Result<(), PeerError> {
        if !self.reliable_open {
            return Ok(());
        }
        let Some(mut ch) = self.rtc.channel(self.reliable) else { return Ok(()) };
        while let Some(front) = self.urgent.front() {
            if !ch.write(true, front)? {
                return Ok(());
            }
            if let Some(sent) = self.urgent.pop_front() {
                self.queued_bytes -= sent.len();
            }
        }
        while let Some(front) = self.bulk.front() {
            if ch.buffered_amount() >= BULK_HIGH_WATER || !ch.write(true, front)? {
                return Ok(());
            }
            if let Some(sent) = self.bulk.pop_front() {
                self.queued_bytes -= sent.len();
            }
        }
        Ok(())
    }

    fn on_event(&mut self, e: Event, out: &mut Drained) {
        match e {
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(?state, "ice state");
                match state {
                    IceConnectionState::Disconnected if self.connected => {
                        self.connected = false;
                        out.events.push(PeerEvent::Disconnected);
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed
                        if self.dtls_up && !self.connected =>
                    {
                        self.connected = true;
                        out.events.push(PeerEvent::Connected);
                    }
                    _ => {}
                }
            }
            Event::Connected => {
                self.dtls_up = true;
                self.connected = true;
                out.events.push(PeerEvent::Connected);
            }
            Event::ChannelOpen(id, label) => {
                tracing::debug!(%label, "data channel open");
                if id == self.reliable {
                    self.reliable_open = true;
                    if let Some(mut ch) = self.rtc.channel(id) {
                        ch.set_buffered_amount_low_threshold(BULK_HIGH_WATER / 2);
                    }
                    out.events.push(PeerEvent::ReliableOpen);
                }
            }
            Event::ChannelData(d) if d.id == self.reliable || d.id == self.lossy => {
                out.events.push(PeerEvent::Data(d.data));
            }
            Event::ChannelClose(id) if id == self.reliable => {
                self.reliable_open = false;
            }
            _ => {}
        }
    }

    pub fn close(&mut self) {
        self.rtc.disconnect();
    }
}

// The call timeline page: polls api/calls every second and draws each call on a time axis
// (who held the floor, the filler, every handoff and recovery with its phases, refusals,
// security rejections and alerts). The event lines it reads are documented in docs/events.md.
// Everything from the events is inserted as text, never as HTML: agent names and reasons come
// from the network.
"use strict";

const POLL_MS = 1000;
const FLOOR_COLORS = ["#4c7bd9", "#2f9e8f", "#c2528b", "#5f8f2f", "#8a63d2", "#c47a2c", "#3f6fa8"];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function colorOf(identity) {
  let h = 0;
  for (const c of identity) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return FLOOR_COLORS[h % FLOOR_COLORS.length];
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function alertText(ev) {
  switch (ev.alert) {
    case "agent_no_show":
      return `${ev.agent_name} never joined after ${ev.attempts} dispatch(es)`;
    case "dispatch_failed":
      return `dispatching ${ev.agent_name} failed (attempt ${ev.attempt}): ${ev.error}`;
    case "floor_vacant":
      return `nobody holds the floor (${ev.identity})`;
    case "ignored_message":
      return `${ev.message_type} from ${ev.from} ignored: ${ev.why}`;
    default:
      return ev.alert;
  }
}

// What one call's events say, as intervals and points in Unix milliseconds.
function model(call, now) {
  const events = call.events || [];
  const start = call.joined_unix_ms || (events[0] && events[0].time_unix_ms) || now;
  const end = call.left_unix_ms || now;
  const floor = [];
  const filler = [];
  const handoffs = new Map();
  const markers = [];
  const closeFloor = (t) => {
    const last = floor[floor.length - 1];
    if (last && last.to === null) last.to = t;
  };
  const handoff = (id, t, ms) => {
    if (!handoffs.has(id)) handoffs.set(id, { id, from: t - (ms || 0), to: null, phases: [], outcome: null });
    return handoffs.get(id);
  };
  for (const ev of events) {
    const t = ev.time_unix_ms;
    switch (ev.event) {
      case "floor_granted":
        closeFloor(t);
        floor.push({ identity: ev.identity, cause: ev.cause, from: t, to: null });
        break;
      case "handoff_phase": {
        const h = handoff(ev.handoff, t, ev.ms);
        h.phases.push({ phase: ev.phase, ms: ev.ms, detail: ev.detail });
        if (ev.phase === "filler_on") filler.push({ from: t, to: null });
        if (ev.phase === "filler_off") {
          const open = filler.find((f) => f.to === null);
          if (open) open.to = t;
        }
        break;
      }
      case "handoff_finished": {
        const last = Math.max(0, ...ev.phases.map((p) => p.ms));
        const h = handoff(ev.handoff, t, last);
        Object.assign(h, {
          kind: ev.kind, source: ev.source, target: ev.target, reason: ev.reason, warm: ev.warm,
          outcome: ev.outcome, failure: ev.failure, bundle: ev.bundle_bytes,
          phases: ev.phases, from: t - last, to: t,
        });
        break;
      }
      case "handoff_refused":
        markers.push({ at: t, cls: "refused", text: `handoff refused: ${ev.from} (${ev.reason})` });
        break;
      case "security_rejected":
        markers.push({ at: t, cls: "security", text: `security: ${ev.message_type} from ${ev.from} ignored (${ev.reason && ev.reason.kind})` });
        break;
      case "alert":
        markers.push({ at: t, cls: "alert", text: `alert: ${alertText(ev)}` });
        if (ev.alert === "floor_vacant") closeFloor(t);
        break;
      case "session_ended":
      case "room_left":
        closeFloor(t);
        break;
      default:
        break;
    }
  }
  for (const seg of floor.concat(filler)) if (seg.to === null) seg.to = end;
  return { start, end: Math.max(end, start + 1), floor, filler, handoffs: [...handoffs.values()], markers };
}

function lane(label, cls) {
  const l = el("div", `lane ${cls}`);
  l.dataset.label = label;
  return l;
}

function place(node, m, from, to) {
  const span = m.end - m.start;
  node.style.left = `${(100 * (from - m.start)) / span}%`;
  if (to !== undefined) node.style.width = `${Math.max(0.2, (100 * (to - from)) / span)}%`;
  return node;
}

function drawCall(call, now) {
  const m = model(call, now);
  const live = !call.left_unix_ms;
  const section = el("section", "call");
  section.dataset.call = call.call;
  section.dataset.room = call.room;
  const title = el("h2", null, call.room);
  title.append(el("span", `state ${live ? "live" : "ended"}`, live ? "live" : "ended"));
  section.append(title);
  const holder = call.holder ? `floor: ${call.holder}` : "floor: nobody";
  section.append(el("div", "meta", `${holder} · ${call.handoffs} handoff(s) · ${seconds(m.end - m.start)}`));
  if (!call.events) {
    section.append(el("div", "meta", "older call: timeline not loaded"));
    return section;
  }

  const floorLane = lane("floor", "floor-lane");
  for (const seg of m.floor) {
    const s = place(el("div", "seg floor-seg", seg.identity), m, seg.from, seg.to);
    s.dataset.identity = seg.identity;
    s.style.background = colorOf(seg.identity);
    s.title = `${seg.identity} (${seg.cause}) ${clock(seg.from)}–${clock(seg.to)}`;
    floorLane.append(s);
  }
  const fillerLane = lane("filler", "filler-lane");
  for (const seg of m.filler) {
    const s = place(el("div", "seg filler-seg"), m, seg.from, seg.to);
    s.title = `filler ${seconds(seg.to - seg.from)}`;
    fillerLane.append(s);
  }
  const handoffLane = lane("handoffs", "handoff-lane");
  for (const h of m.handoffs) {
    const kind = h.kind || "handoff";
    const s = place(el("div", `seg handoff-seg ${kind} ${h.outcome || "running"}`, h.id), m, h.from, h.to || m.end);
    s.dataset.handoff = h.id;
    s.title = `${kind} ${h.id}: ${h.source || "?"} → ${h.target || "?"} ${h.outcome || "running"}`;
    handoffLane.append(s);
  }
  const markerLane = lane("events", "marker-lane");
  for (const mk of m.markers) {
    const s = place(el("div", `marker ${mk.cls}`), m, mk.at);
    s.dataset.event = mk.cls;
    s.title = mk.text;
    markerLane.append(s);
  }
  section.append(floorLane, fillerLane, handoffLane, markerLane);
  const axis = el("div", "axis");
  axis.append(el("span", null, clock(m.start)), el("span", null, live ? "now" : clock(m.end)));
  section.append(axis);

  if (m.handoffs.length) {
    const table = el("table", "handoffs");
    const head = el("tr");
    for (const h of ["handoff", "kind", "from → to", "outcome", "took", "phases (ms after the request or the suspicion)"]) head.append(el("th", null, h));
    table.append(head);
    for (const h of m.handoffs) {
      const row = el("tr", "handoff");
      row.dataset.handoff = h.id;
      row.dataset.outcome = h.outcome || "running";
      // A recovery's kind is only known when it finishes (its phases alone do not say).
      row.dataset.kind = h.kind || (h.outcome ? "handoff" : "");
      row.append(el("td", null, h.id));
      row.append(el("td", "kind", h.kind || (h.outcome ? "handoff" : "…")));
      row.append(el("td", null, `${h.source || "?"} → ${h.target || "?"}`));
      const failure = h.failure ? ` (${h.failure})` : "";
      row.append(el("td", `outcome ${h.outcome || "running"}`, (h.outcome || "running") + failure));
      row.append(el("td", null, h.to ? seconds(h.to - h.from) : "…"));
      const phases = el("td");
      for (const p of h.phases) {
        const chip = el("span", "phase", `${p.phase} `);
        chip.dataset.phase = p.phase;
        chip.append(el("span", "ms", p.ms));
        if (p.detail) chip.title = p.detail;
        phases.append(chip);
      }
      row.append(phases);
      table.append(row);
    }
    section.append(table);
  }
  if (m.markers.length) {
    const notes = el("ul", "notes");
    for (const mk of m.markers) {
      const li = el("li", mk.cls, `${clock(mk.at)} ${mk.text}`);
      notes.append(li);
    }
    section.append(notes);
  }
  return section;
}

async function refresh() {
  try {
    const response = await fetch("api/calls", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const doc = await response.json();
    const main = document.getElementById("calls");
    main.replaceChildren(...doc.calls.map((c) => drawCall(c, doc.now_unix_ms)));
    const live = doc.calls.filter((c) => !c.left_unix_ms).length;
    document.getElementById("summary").textContent =
      `${live} room(s) held now, ${doc.calls.length - live} ended call(s) kept`;
    document.getElementById("updated").textContent = `updated ${clock(doc.now_unix_ms)}`;
    document.body.dataset.loaded = "true";
  } catch (e) {
    document.getElementById("updated").textContent = `update failed: ${e.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);

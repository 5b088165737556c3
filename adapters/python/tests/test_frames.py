"""Codec: golden vectors shared with Rust, round trips, and no-crash on hostile input."""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest
from conftest import load

from lk_baton import frames as fr


def to_json(f: fr.Frame) -> dict[str, Any]:
    base: dict[str, Any] = {"kind": fr.kind_of(f).name.lower(), "id": f"{f.id:032x}"}
    if isinstance(f, fr.Open):
        base |= {
            "payload_size": f.payload_size,
            "wire_size": f.wire_size,
            "chunk_size": f.chunk_size,
            "sha256": f.sha256.hex(),
            "deflate": f.deflate,
            "meta": f.meta,
        }
    elif isinstance(f, fr.Data):
        base |= {"index": f.index, "bytes": f.data.hex()}
    elif isinstance(f, fr.Ack):
        base |= {
            "cumulative": f.cumulative,
            "window": f.window,
            "ranges": [list(r) for r in f.ranges],
            "resume": f.resume,
            "solicited": f.solicited,
        }
    elif isinstance(f, fr.Complete):
        base |= {"sha256": f.sha256.hex()}
    elif isinstance(f, fr.Cancel | fr.Error):
        base |= {"code": f.code, "code_name": fr.code_name(f.code), "reason": f.reason}
    else:
        base |= {"sent": f.sent}
    return base


def from_json(j: dict[str, Any]) -> fr.Frame:
    i = int(j["id"], 16)
    k = j["kind"]
    if k == "open":
        return fr.Open(
            i,
            j["payload_size"],
            j["wire_size"],
            j["chunk_size"],
            bytes.fromhex(j["sha256"]),
            j["deflate"],
            j["meta"],
        )
    if k == "data":
        return fr.Data(i, j["index"], bytes.fromhex(j["bytes"]))
    if k == "ack":
        ranges = tuple((s, e) for s, e in j["ranges"])
        return fr.Ack(i, j["cumulative"], j["window"], ranges, j["resume"], j["solicited"])
    if k == "complete":
        return fr.Complete(i, bytes.fromhex(j["sha256"]))
    if k == "cancel":
        return fr.Cancel(i, j["code"], j["reason"])
    if k == "error":
        return fr.Error(i, j["code"], j["reason"])
    return fr.Resume(i, j["sent"])


VALID = load("frames.json")["frames"]
INVALID = load("invalid.json")["invalid"]


@pytest.mark.parametrize("v", VALID, ids=[v["name"] for v in VALID])
def test_golden_valid_frames_decode_and_encode_identically(v: dict[str, Any]) -> None:
    raw = bytes.fromhex(v["hex"])
    decoded = fr.decode(raw)
    assert to_json(decoded) == v["frame"]
    assert fr.encode(from_json(v["frame"])) == raw


@pytest.mark.parametrize("v", INVALID, ids=[v["name"] for v in INVALID])
def test_golden_invalid_inputs_rejected_with_same_name(v: dict[str, Any]) -> None:
    with pytest.raises(fr.DecodeError) as e:
        fr.decode(bytes.fromhex(v["hex"]))
    assert e.value.name == v["error"]


def test_error_code_table_matches_rust() -> None:
    table = load("frames.json")["error_codes"]
    assert [(c["code"], c["name"]) for c in table] == [
        (c.value, c.name.lower()) for c in fr.ErrorCode
    ]
    assert fr.code_name(999) == "unknown_code"


def test_unsupported_version_maps_to_its_code() -> None:
    with pytest.raises(fr.DecodeError) as e:
        fr.decode(bytes([0xBA, 7]))
    assert e.value.code == fr.ErrorCode.UNSUPPORTED_VERSION


def test_transfer_vector_first_flight_and_deflate() -> None:
    from lk_baton.transfer import Sender, SenderConfig

    t = load("transfer.json")
    plain = t["plain"]
    s = Sender(
        0x0123456789ABCDEFFEDCBA9876543210,
        bytes.fromhex(plain["payload"]),
        plain["meta"],
        SenderConfig(chunk_size=plain["chunk_size"], window=plain["window"]),
        0.0,
    )
    flight = []
    while (f := s.poll_frame()) is not None:
        flight.append(fr.encode(f).hex())
    assert flight == [e["hex"] for e in plain["first_flight"]]
    frames = [fr.decode(bytes.fromhex(h)) for h in t["deflate"]["frames"]]
    assert isinstance(frames[0], fr.Open) and frames[0].deflate
    wire = b"".join(f.data for f in frames[1:] if isinstance(f, fr.Data))
    assert zlib.decompress(wire, -15).hex() == t["deflate"]["payload"]


def test_round_trips_random_frames() -> None:
    rng = random.Random(1)
    for _ in range(300):
        fid = rng.getrandbits(128)
        cum = rng.randrange(0, 1000)
        ranges, at = [], cum
        for _ in range(rng.randrange(0, 5)):
            s = at + rng.randrange(1, 10)
            e = s + rng.randrange(1, 10)
            ranges.append((s, e))
            at = e
        resume = rng.random() < 0.5
        cands: list[fr.Frame] = [
            fr.Open(fid, 5000, 5000, rng.randrange(256, 14977), rng.randbytes(32), False, "{}"),
            fr.Data(fid, rng.getrandbits(32), rng.randbytes(rng.randrange(1, 14977))),
            fr.Ack(
                fid, cum, rng.getrandbits(32), tuple(ranges), resume, resume and rng.random() < 0.5
            ),
            fr.Complete(fid, rng.randbytes(32)),
            fr.Cancel(fid, rng.getrandbits(16), "é" * rng.randrange(0, 100)),
            fr.Error(fid, rng.getrandbits(16), ""),
            fr.Resume(fid, rng.getrandbits(32)),
        ]
        for f in cands:
            raw = fr.encode(f)
            assert len(raw) <= fr.MAX_FRAME_SIZE
            assert fr.decode(raw) == f


def test_mutated_inputs_only_raise_decode_error() -> None:
    rng = random.Random(7)
    seeds = [bytes.fromhex(v["hex"]) for v in VALID]
    ok = bad = 0
    for i in range(5000):
        b = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            if op == 0 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del b[rng.randrange(len(b) + 1) :]
            elif op == 2:
                b += rng.randbytes(rng.randrange(8))
            elif len(b) >= 4:
                j = rng.randrange(len(b) - 3)
                b[j : j + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, rng.randbytes(4)])
        try:
            f = fr.decode(bytes(b))
        except fr.DecodeError:
            bad += 1
        else:
            ok += 1
            assert fr.encode(f) == bytes(b), "encoding is canonical"
    assert ok > 300 and bad > 300


def test_encode_rejects_out_of_bounds() -> None:
    with pytest.raises(fr.EncodeError):
        fr.encode(fr.Data(1, 0, b""))
    with pytest.raises(fr.EncodeError):
        fr.encode(fr.Ack(1, 5, 1, ((5, 7),)))
    with pytest.raises(fr.EncodeError):
        fr.encode(fr.Open(1, 10, 11, 256, bytes(32)))

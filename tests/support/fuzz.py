"""A seeded corpus of hostile DICOM conversations, replayable input by input.

``corpus(seed, count, folder)`` yields ``FuzzInput``s: each one association's worth of bytes for
``ul.converse``. Input k depends only on (seed, k): ``--only K`` replays one. Families:

- data set mutations inside a well-framed C-STORE (wrong lengths, bad VRs, sequences 1,000 deep,
  undefined lengths without delimiters, huge lengths, pixel data of the wrong size, non-ASCII in
  UIDs, flipped and cut bytes, swapped elements, decompression bombs): the node must answer
  each with a status;
- C-STORE command mutations (malformed SOP Class UID, missing attributes, unknown command);
- malformed P-DATA (PDU and PDV lengths that lie, wrong context IDs, fragments out of order,
  unknown PDU types, garbage) and malformed A-ASSOCIATE-RQs, including transfer syntax UIDs
  that are none: a status or a clean abort (or close) will do, never silence.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

from tests.support import ul
from tests.support.hostile import deflate_bomb, j2k_claiming, rle_overrun
from training.synthetic import make_radiograph

SEED = 1  # the corpus the figures in the closing note of issue 13 came from
DX = str(DigitalXRayImageStorageForPresentation)
EXPLICIT = str(ExplicitVRLittleEndian)
STATUS = frozenset({"status"})
STATUS_OR_ABORT = frozenset({"status", "abort", "closed"})
ASSOCIATION_LEVEL = frozenset({"rejected", "abort", "closed", "status"})

# Explicit VR little endian: these VRs have a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV",
             b"UV"}
_SOME_VRS = [b"FD", b"FL", b"UL", b"US", b"SS", b"AT", b"DA", b"TM", b"UI", b"SQ", b"OB", b"UN",
             b"PN", b"IS", b"DS", b"XX", b"\x00\x00", b"\xff\xfe"]


@dataclass(frozen=True)
class FuzzInput:
    index: int
    family: str
    what: str
    association: bytes
    payload: bytes
    complete: bool  # False: the bytes promise more than they hold (the node must time out/close)
    expect: frozenset[str]  # acceptable ul.Reply kinds


@dataclass(frozen=True)
class _Element:
    start: int  # offset of the tag
    vr: bytes
    length_at: int
    length_size: int  # 2 or 4
    value_at: int
    length: int


def elements(body: bytes) -> list[_Element]:
    """The top-level elements of an explicit VR little endian data set (defined lengths)."""
    found, at = [], 0
    while at + 8 <= len(body):
        vr = body[at + 4:at + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", body, at + 8)[0]
            found.append(_Element(at, vr, at + 8, 4, at + 12, length))
        else:
            length = struct.unpack_from("<H", body, at + 6)[0]
            found.append(_Element(at, vr, at + 6, 2, at + 8, length))
        if length == 0xFFFFFFFF:
            break
        at = found[-1].value_at + length
    return found


@dataclass(frozen=True)
class _Sample:
    uid: str
    body: bytes  # the data set, explicit VR little endian, without file meta


def _body(path: Path) -> bytes:
    data = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return data[132 + 12 + int(meta.FileMetaInformationGroupLength):]


@cache
def _samples(folder: Path) -> tuple[_Sample, ...]:
    """Small valid radiographs (fast to send) of a few shapes and bit depths."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for k, (rows, columns, bits) in enumerate([(64, 48, 12), (40, 40, 8), (96, 72, 16)]):
        path = _fixed_uids(make_radiograph(folder / f"sample{k}.dcm", rows=rows,
                                           columns=columns, bits_stored=bits, seed=k), k)
        made.append(_Sample(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                            _body(path)))
    return tuple(made)


def _fixed_uids(path: Path, k: int) -> Path:
    """The same UIDs on every run, so that input k is the same bytes on every machine."""
    ds = dcmread(path)
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.998.1.{k}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.998.2.{k}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
        f"1.2.826.0.1.3680043.10.998.3.{k}"
    ds.save_as(path)
    return path


@cache
def _bombs(folder: Path) -> dict[str, tuple[str, str, bytes]]:
    """name -> (transfer syntax, SOP Instance UID, body): made once, sent many times."""
    folder.mkdir(parents=True, exist_ok=True)
    source = _fixed_uids(make_radiograph(folder / "bomb-source.dcm", rows=256, columns=200), 9)
    made = {}
    for name, ds in (("rle-overrun", rle_overrun(source)),
                     ("j2k-16384", j2k_claiming(source, 16384, 16384))):
        ds.save_as(folder / f"{name}.dcm")
        made[name] = (str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID),
                      _body(folder / f"{name}.dcm"))
    path = deflate_bomb(source, folder / "deflate.dcm", 64 * 2**20)
    meta = dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    made["deflate-64MiB"] = (str(meta.file_meta.TransferSyntaxUID), str(meta.SOPInstanceUID),
                             data[132 + 12 + int(meta.file_meta.FileMetaInformationGroupLength):])
    return made


def _fresh_uid(rng: random.Random) -> str:
    return f"1.2.826.0.1.3680043.10.999.{rng.randrange(10**12)}.{rng.randrange(10**9)}"


def _with_uid(body: bytes, old: str, new: str) -> bytes:
    """BODY with its SOP Instance UID replaced (value lengths kept right: UIDs pad to even)."""
    old_value, new_value = old.encode(), new.encode("latin-1")
    old_value += b"\x00" * (len(old_value) % 2)
    new_value += b"\x00" * (len(new_value) % 2)
    marker = b"\x08\x00\x18\x00UI" + struct.pack("<H", len(old_value)) + old_value
    replacement = b"\x08\x00\x18\x00UI" + struct.pack("<H", len(new_value)) + new_value
    assert marker in body
    return body.replace(marker, replacement, 1)


class _Maker:
    """Builds input k from its own random stream."""

    def __init__(self, rng: random.Random, folder: Path):
        self.rng = rng
        self.folder = folder
        sample = rng.choice(_samples(folder))
        self.uid = _fresh_uid(rng)  # every input its own instance: no duplicate shortcuts
        self.body = _with_uid(sample.body, sample.uid, self.uid)
        self.elements = elements(self.body)

    def store(self, body: bytes, uid: str | None = None, syntax: str = EXPLICIT,
              sop_class: str = DX) -> tuple[bytes, bytes]:
        return (ul.associate_rq(sop_class, [syntax]),
                ul.c_store(sop_class, uid or self.uid, body))

    def element(self, *, vr: bytes | None = None) -> _Element:
        choices = [e for e in self.elements if vr is None or e.vr == vr]
        return self.rng.choice(choices or self.elements)

    def set_length(self, body: bytes, element: _Element, length: int) -> bytes:
        size = element.length_size
        length &= (1 << (8 * size)) - 1
        packed = struct.pack("<I" if size == 4 else "<H", length)
        return body[:element.length_at] + packed + body[element.length_at + size:]


# Data set mutations: each returns (what, body) for a well-framed C-STORE.

def _wrong_length(m: _Maker) -> tuple[str, bytes]:
    element = m.element()
    delta = m.rng.choice([-7, -2, -1, 1, 2, 3, 64, 1000])
    return (f"length of {element.vr.decode(errors='replace')} at {element.start} "
            f"{delta:+d}", m.set_length(m.body, element, max(element.length + delta, 0)))


def _huge_length(m: _Maker) -> tuple[str, bytes]:
    element = m.element(vr=m.rng.choice([b"OW", b"OB", b"UI", b"LO", b"US"]))
    length = m.rng.choice([0x7FFFFFF0, 0xFFFFFFF0, 0xFFFE, 0x10000000])
    return (f"length {length:#x} at {element.start}", m.set_length(m.body, element, length))


def _bad_vr(m: _Maker) -> tuple[str, bytes]:
    element = m.element()
    vr = m.rng.choice(_SOME_VRS)
    start = element.start + 4
    return (f"VR {element.vr!r} -> {vr!r} at {element.start}",
            m.body[:start] + vr + m.body[start + 2:])


def _deep_sequence(m: _Maker) -> tuple[str, bytes]:
    """A private sequence nested DEPTH deep (undefined lengths, delimited), before group 0010."""
    depth = m.rng.choice([100, 500, 1000, 1000])
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    creator = b"\x09\x00\x10\x00LO\x0e\x00SPINENODE FUZZ"
    open_sq = b"\x09\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff"
    nested = (open_sq + item_start) * depth + (item_end + sequence_end) * depth
    at = next(e.start for e in m.elements if e.start and m.body[e.start:e.start + 2] >= b"\x10")
    return f"sequence {depth} deep", m.body[:at] + creator + nested + m.body[at:]


def _undefined_without_delimiters(m: _Maker) -> tuple[str, bytes]:
    """An undefined-length sequence whose items never end: everything after is inside it."""
    at = next(e.start for e in m.elements if m.body[e.start:e.start + 2] >= b"\x10")
    creator = b"\x09\x00\x10\x00LO\x0e\x00SPINENODE FUZZ"
    sequence = b"\x09\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    return "undefined-length sequence without delimiters", m.body[:at] + creator + sequence + \
        m.body[at:]


def _pixel_data_wrong_size(m: _Maker) -> tuple[str, bytes]:
    pixels = next(e for e in m.elements if m.body[e.start:e.start + 4] == b"\xe0\x7f\x10\x00")
    value = m.body[pixels.value_at:pixels.value_at + pixels.length]
    factor = m.rng.choice([0, 0.5, 0.99, 1.5, 2, 4])
    new = (value * 5)[:int(len(value) * factor) // 2 * 2]
    body = m.body[:pixels.value_at] + new + m.body[pixels.value_at + pixels.length:]
    return f"pixel data x{factor}", m.set_length(body, pixels, len(new))


def _non_ascii_uid(m: _Maker) -> tuple[str, bytes, str]:
    """A non-ASCII (or control) character in the SOP Instance UID, in the data set and in the
    command alike (they must agree, or that alone would be the refusal)."""
    odd = m.rng.choice(["é", "\xff", "\n", "\x00", " ", "1..2", ".1"])
    uid = m.uid[:-2] + odd if len(odd) == 1 else m.uid + odd
    body = _with_uid(m.body, m.uid, uid) if len(uid.encode()) < 65 else m.body
    return f"SOP Instance UID with {odd!r}", body, uid


def _flip_bytes(m: _Maker) -> tuple[str, bytes]:
    body = bytearray(m.body)
    header_end = max(e.value_at for e in m.elements[:-1])  # flips land among the headers
    count = m.rng.choice([1, 2, 4, 16])
    for _ in range(count):
        body[m.rng.randrange(header_end)] = m.rng.randrange(256)
    return f"{count} bytes flipped", bytes(body)


def _cut(m: _Maker) -> tuple[str, bytes]:
    at = m.rng.randrange(1, len(m.body))
    return f"cut at {at} of {len(m.body)}", m.body[:at]


def _swap_elements(m: _Maker) -> tuple[str, bytes]:
    first, second = sorted(m.rng.sample(range(len(m.elements) - 1), 2))
    a, b = m.elements[first], m.elements[second]
    a_bytes = m.body[a.start:a.value_at + a.length]
    b_bytes = m.body[b.start:b.value_at + b.length]
    body = (m.body[:a.start] + b_bytes + m.body[a.value_at + a.length:b.start] + a_bytes
            + m.body[b.value_at + b.length:])
    return f"elements {first} and {second} swapped", body


_DATASET_MUTATIONS: list[Callable[[_Maker], tuple]] = [
    _wrong_length, _huge_length, _bad_vr, _deep_sequence, _undefined_without_delimiters,
    _pixel_data_wrong_size, _non_ascii_uid, _flip_bytes, _cut, _swap_elements]


def _dataset_input(m: _Maker) -> tuple[str, str, bytes, bytes, bool, frozenset[str]]:
    mutate = m.rng.choice(_DATASET_MUTATIONS)
    made = mutate(m)
    what, body = made[0], made[1]
    uid = made[2] if len(made) == 3 else m.uid
    association, payload = m.store(body, uid)
    return mutate.__name__.strip("_"), what, association, payload, True, STATUS


def _bomb_input(m: _Maker) -> tuple[str, str, bytes, bytes, bool, frozenset[str]]:
    name = m.rng.choice(sorted(_bombs(m.folder / "bombs")))
    syntax, uid, body = _bombs(m.folder / "bombs")[name]
    association, payload = m.store(body, uid, syntax)
    return "bomb", name, association, payload, True, STATUS


def _command_input(m: _Maker) -> tuple[str, str, bytes, bytes, bool, frozenset[str]]:
    """The C-STORE-RQ itself malformed; the data set is fine."""
    base = dict(AffectedSOPClassUID=DX, CommandField=0x0001, MessageID=1, Priority=0,
                CommandDataSetType=0x0000, AffectedSOPInstanceUID=m.uid)
    what = m.rng.choice(["SOP class not a UID", "SOP class non-ASCII", "no SOP instance",
                         "unknown command field", "says no data set", "priority 7",
                         "SOP class of another context"])
    if what == "SOP class not a UID":
        base["AffectedSOPClassUID"] = m.rng.choice(["1.2.840.10008.5.1.4.1.1.1.1.x", "..",
                                                    "1.2.840.10008.5.1.4.1.1.1.1\n", "A" * 80])
    elif what == "SOP class non-ASCII":
        base["AffectedSOPClassUID"] = "1.2.840.10008.5.1.4.1.1.1.é"
    elif what == "no SOP instance":
        del base["AffectedSOPInstanceUID"]
    elif what == "unknown command field":
        # No C-CANCEL (0x0FFF): that one is answered by nothing, by the standard.
        base["CommandField"] = m.rng.choice([0x7777, 0x8001, 0x0000])
    elif what == "says no data set":
        base["CommandDataSetType"] = 0x0101
    elif what == "priority 7":
        base["Priority"] = 7
    else:
        base["AffectedSOPClassUID"] = "1.2.840.10008.5.1.4.1.1.2"  # CT, not the context's DX
    payload = ul.p_data((ul.COMMAND | ul.LAST, ul.command_set(**base))) + ul.p_data(
        (ul.DATASET | ul.LAST, m.body))
    return "command", what, ul.associate_rq(DX, [EXPLICIT]), payload, True, STATUS_OR_ABORT


def _p_data_input(m: _Maker) -> tuple[str, str, bytes, bytes, bool, frozenset[str]]:
    """Well-formed data, malformed framing."""
    command = ul.c_store_rq(DX, m.uid)
    good = ul.p_data((ul.COMMAND | ul.LAST, command))
    data = ul.p_data((ul.DATASET | ul.LAST, m.body))
    what = m.rng.choice(["PDU longer than sent", "PDU shorter than its items",
                         "PDV longer than its PDU", "PDV length 0", "PDV length 1",
                         "context ID 3", "context ID 0", "data set before command",
                         "command without last bit", "reserved control bits",
                         "unknown PDU type", "garbage", "two commands", "A-ASSOCIATE-RQ again",
                         "release in the middle"])
    complete = True
    if what == "PDU longer than sent":
        payload, complete = good + data[:2] + struct.pack(">I", len(data) + 5000) + data[6:], False
    elif what == "PDU shorter than its items":
        payload = good + data[:2] + struct.pack(">I", max(len(data) - 6 - 100, 1)) + data[6:]
    elif what == "PDV longer than its PDU":
        item = struct.pack(">IBB", len(m.body) + 10_000, 1, ul.DATASET | ul.LAST) + m.body
        payload = good + struct.pack(">BBI", 4, 0, len(item)) + item
    elif what in ("PDV length 0", "PDV length 1"):
        item = struct.pack(">I", 0 if what.endswith("0") else 1) + b"\x01"
        payload = good + struct.pack(">BBI", 4, 0, len(item)) + item
    elif what.startswith("context ID"):
        payload = ul.p_data((ul.COMMAND | ul.LAST, command), context_id=int(what[-1])) + data
    elif what == "data set before command":
        payload = data + good
    elif what == "command without last bit":
        payload = ul.p_data((ul.COMMAND, command)) + data
    elif what == "reserved control bits":
        payload = ul.p_data((ul.COMMAND | ul.LAST | 0xF0, command)) + data
    elif what == "unknown PDU type":
        payload = struct.pack(">BBI", m.rng.choice([0x08, 0x09, 0x7F, 0xFF]), 0, 4) + b"\0" * 4
    elif what == "garbage":
        payload = m.rng.randbytes(m.rng.choice([3, 100, 5000]))
        complete = False  # a length in the garbage may promise anything
    elif what == "two commands":
        payload = good + good + data
    elif what == "A-ASSOCIATE-RQ again":
        payload = ul.associate_rq(DX, [EXPLICIT])
    else:
        payload = good + ul.RELEASE_RQ + data
    return "p-data", what, ul.associate_rq(DX, [EXPLICIT]), payload, complete, STATUS_OR_ABORT


def _association_input(m: _Maker) -> tuple[str, str, bytes, bytes, bool, frozenset[str]]:
    """A malformed A-ASSOCIATE-RQ, or one proposing a transfer syntax UID that is none."""
    what = m.rng.choice(["transfer syntax not a UID", "transfer syntax non-ASCII",
                         "unknown transfer syntax", "protocol version 2", "item length lies",
                         "called AE non-ASCII", "no presentation context", "PDU length lies"])
    request = ul.associate_rq(DX, [EXPLICIT])
    complete = True
    if what == "transfer syntax not a UID":
        request = ul.associate_rq(DX, [m.rng.choice(["1.2.840.10008.1.2.1\n", "x.y", ""])])
    elif what == "transfer syntax non-ASCII":
        request = ul.associate_rq(DX, ["1.2.840.10008.1.2.é"])
    elif what == "unknown transfer syntax":
        request = ul.associate_rq(DX, ["1.2.3.4.5.6.7"])
    elif what == "protocol version 2":
        request = request[:6] + b"\x00\x02" + request[8:]
    elif what == "item length lies":
        at = request.index(b"\x20\x00")  # the presentation context item's length
        request = request[:at + 2] + struct.pack(">H", m.rng.choice([0, 3, 0xFFFF])) + \
            request[at + 4:]
    elif what == "called AE non-ASCII":
        request = request[:10] + "SPINÉNODE".encode().ljust(16)[:16] + request[26:]
    elif what == "no presentation context":
        at = request.index(b"\x20\x00")
        length = struct.unpack_from(">H", request, at + 2)[0]
        body = request[6:at] + request[at + 4 + length:]
        request = struct.pack(">BBI", 1, 0, len(body)) + body
    else:
        request = request[:2] + struct.pack(">I", len(request) + 500) + request[6:]
        complete = False
    payload = ul.c_store(DX, m.uid, m.body)
    if not complete:  # the node waits for the rest of the request: say nothing more
        return "association", what, request, b"", False, ASSOCIATION_LEVEL
    return "association", what, request, payload, True, ASSOCIATION_LEVEL


# Share of the corpus per family (the data set mutations are most of what a sender gets wrong).
_FAMILIES = [(_dataset_input, 60), (_command_input, 10), (_p_data_input, 15),
             (_association_input, 10), (_bomb_input, 5)]


def make_input(seed: int, index: int, folder: Path) -> FuzzInput:
    rng = random.Random(f"{seed}:{index}")
    maker = _Maker(rng, folder)
    family = rng.choices([f for f, _ in _FAMILIES], weights=[w for _, w in _FAMILIES])[0]
    name, what, association, payload, complete, expect = family(maker)
    return FuzzInput(index, name, what, association, payload, complete, expect)


def good_input(folder: Path) -> FuzzInput:
    """A valid radiograph, well sent: to warm a node up (its worker started, its decoder
    loaded) before memory is measured, and to show the path works."""
    maker = _Maker(random.Random("good"), folder)
    association, payload = maker.store(maker.body)
    return FuzzInput(-1, "good", "a valid radiograph", association, payload, True, STATUS)


def corpus(seed: int, count: int, folder: Path) -> Iterator[FuzzInput]:
    for index in range(count):
        yield make_input(seed, index, folder)


def is_ps34_status(status: int) -> bool:
    """A C-STORE response status PS3.4 B.2.3 / PS3.7 C allows: success, the warnings, the
    general failures (01xx, 02xx) and the storage failures (A7xx, A9xx, Cxxx)."""
    return (status in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)
            or 0x0105 <= status <= 0x0124 or 0x0210 <= status <= 0x0213
            or status >> 8 in (0xA7, 0xA9) or status >> 12 == 0xC)


def problems_with(item: FuzzInput, reply: ul.Reply) -> list[str]:
    """What is wrong with how the node answered ITEM (empty: all well)."""
    found = []
    if reply.kind not in item.expect:
        found.append(f"{reply.kind} where {'/'.join(sorted(item.expect))} was due")
    if reply.status is not None:
        if not is_ps34_status(reply.status):
            found.append(f"status {reply.status:#06x} is no PS3.4 status")
        elif reply.status >> 8 == 0xA7:  # out of resources: "retry later" to a broken input
            found.append(f"status {reply.status:#06x} (retry later) for a malformed input")
    return found


def replay(port: int, item: FuzzInput, answer_within: float = 30.0) -> ul.Reply:
    return ul.converse(port, item.association, item.payload, answer_within=answer_within,
                       complete=item.complete)


@dataclass
class Campaign:
    """What one run of (part of) the corpus did to a node."""

    sent: int = 0
    replies: Counter = field(default_factory=Counter)  # (family, kind, status) -> inputs
    by_input: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # (kind, status)
    problems: list[str] = field(default_factory=list)  # one line per input answered wrongly
    echo_failures: list[int] = field(default_factory=list)  # inputs after which C-ECHO failed
    seconds: float = 0.0
    rss_first: int = 0
    rss_peak: int = 0
    rss_last: int = 0

    @property
    def answered(self) -> int:
        return sum(n for (_, kind, _), n in self.replies.items() if kind != "silent")

    @property
    def acknowledged(self) -> int:
        return sum(n for (_, kind, status), n in self.replies.items() if status == 0)


def run_campaign(port: int, pid: int, items: Iterable[FuzzInput],
                 progress: Callable[[Campaign], None] | None = None,
                 answer_within: float = 30.0) -> Campaign:
    """Send each input on its own association, then a C-ECHO (the node must still answer),
    sampling the memory of the node's process tree (PID) throughout."""
    from tests.support.memory import PeakRss
    from tests.support.node import echo

    campaign = Campaign()
    start = time.monotonic()
    with PeakRss(pid) as memory:
        for item in items:
            reply = replay(port, item, answer_within)
            campaign.sent += 1
            campaign.replies[(item.family, reply.kind, reply.status)] += 1
            campaign.by_input[item.index] = (reply.kind, reply.status)
            for problem in problems_with(item, reply):
                campaign.problems.append(f"input {item.index} ({item.family}: {item.what}): "
                                         f"{problem}")
            if echo(port) != 0:
                campaign.echo_failures.append(item.index)
            if progress is not None:
                progress(campaign)
    campaign.seconds = time.monotonic() - start
    campaign.rss_first, campaign.rss_peak, campaign.rss_last = \
        memory.first, memory.peak, memory.last
    return campaign

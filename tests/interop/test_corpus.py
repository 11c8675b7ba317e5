"""Interoperability corpus: real-world files, through Courier, to and from real peers.

Every Part 10 instance bundled with pydicom and the crafted files of
`tests/interop/corpus.py` (big endian, deflated, encapsulated PDF, SR, a private
sequence relayed as UN of undefined length, an odd-length value, out-of-order tags,
truncated files), each with a fresh SOP Instance UID, go

- from Courier (`manage.py send_series`, one association) to Orthanc, and to a dcmtk
  storescp that accepts only the uncompressed transfer syntaxes;
- from dcmtk's `storescu` and `dcmsend`, and pynetdicom sending the files' bytes as
  they are, into Courier's receiver (`manage.py receive`).

For each file: stored at the peer under its own SOP Instance UID with the same pixel
values (decoded with pydicom on both sides when the peer got a converted copy), or
failed by name with the reason. The reference on the same peer is what dcmtk
achieves: `dcmsend +dly` (what mercure uses; it decompresses lossy data too) for the
sending directions, dcmtk's own storescp for the receiving one. Courier must deliver
at least everything the reference delivers, but for the files in
`BEYOND_PYTHON_DECODERS` (only dcmtk decodes them), which it must fail by name with
the decoder's reason. A table per transfer syntax is printed
(`pytest -s`, or in the failure report).
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from targets.dicomnet.sockets import enable_tcp_nodelay
from tests.fixtures.receive_peers import ReceiverProcess, responses_to_the_caller
from tests.interop.corpus import CorpusFile, Source, build_corpus, sources
from tests.peers import DCMTK_ENV, Orthanc, StoreSCP

pytestmark = pytest.mark.interop

# What happened to one file at one peer.
INTACT = "stored"  # own UID, own transfer syntax, the same pixel data bytes
CONVERTED = "converted"  # own UID, another syntax, the same decoded pixel values
FAILED = "failed"  # not stored, and the sender said which file and why
NOT_OFFERED = "not sent"  # a dcmtk sender could not read or send the file itself
WRONG = "WRONG"  # stored, but under another UID, or with other pixel values
SILENT = "SILENT"  # not stored, and no word about it (untried, or unnamed)
DELIVERED = (INTACT, CONVERTED)

# The target's timeouts: a peer that hangs costs this, not the 60 s default.
TIMEOUTS = {"acse_timeout": 10, "dimse_timeout": 10, "connect_timeout": 5}


@dataclass
class Result:
    state: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


# -- comparing what arrived with what was sent ---------------------------------------


def _read(source: Path | bytes, **kwargs) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, bytes):
            return pydicom.dcmread(io.BytesIO(source), force=True, **kwargs)
        return pydicom.dcmread(source, force=True, **kwargs)


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def compare(
    f: CorpusFile, stored: Path | bytes, request_uid: str = "", like: Path | None = None
) -> Result:
    """Judge a stored copy of `f` (a file, or its bytes fetched from the peer).

    `request_uid` is the UID the peer filed it under (storescp's file name). `like`
    is another peer's copy from the same sender: a copy with other pixel values
    than the original but the same as `like` was converted so by the sender (dcmtk
    swaps 32-bit big endian pixel data as 16-bit words), not by the receiver.
    """
    try:
        got = _read(stored)
    except Exception as exc:
        return Result(WRONG, f"the stored copy does not read: {exc}")
    uid = str(got.get("SOPInstanceUID", ""))
    if uid != f.sop_instance_uid or (request_uid and request_uid != uid):
        return Result(
            WRONG,
            f"stored under SOP Instance UID {uid or '(none)'}, not "
            f"{f.sop_instance_uid}",
        )
    original = _read(f.path)
    got_ts = str(got.file_meta.get("TransferSyntaxUID", ""))
    keyword = next((k for k in PIXEL_KEYWORDS if k in original), None)
    if keyword is None:
        return _compare_other(original, got)
    if keyword not in got:
        return Result(WRONG, f"the stored copy has no {keyword}")
    same, why = same_pixels(f.path, original, got, keyword)
    if not same and like is not None:
        alike, _ = same_pixels(like, _read(like), got, keyword)
        if alike:
            return Result(CONVERTED, f"as {_ts(got_ts)}, as the sender converted it")
    if not same:
        return Result(WRONG, f"stored as {_ts(got_ts)}: {why}")
    if got_ts == f.transfer_syntax:
        return Result(INTACT, why)
    return Result(CONVERTED, f"as {_ts(got_ts)}{', ' + why if why else ''}")


UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


def same_pixels(path: Path, a: pydicom.Dataset, b: pydicom.Dataset, keyword: str):
    """(True, how) when `b` holds the pixel values of `a` (read from `path`), else
    (False, why). Lossy data decode a little differently in each decoder (±1 in an
    IDCT, more in chroma upsampling): `b` must equal what one real decoder makes of
    `a`, any of pydicom's plugins or dcmtk's own."""
    ts_a = str(a.file_meta.get("TransferSyntaxUID", ""))
    ts_b = str(b.file_meta.get("TransferSyntaxUID", ""))
    raw_a, raw_b = a[keyword].value, b[keyword].value
    if raw_a == raw_b and (ts_a == ts_b or {ts_a, ts_b} <= UNCOMPRESSED_LE):
        return True, ""
    try:
        after = _pixels(b)
    except Exception as exc:
        return False, f"the stored copy does not decode: {exc}"
    tried = decodings(path, a)
    for label, before in tried:
        if before.shape == after.shape and np.array_equal(before, after):
            return True, f"the values {label} decodes"
    if not tried:
        return False, "the original decodes neither with pydicom nor with dcmtk"
    label, before = tried[0]
    return (
        False,
        f"other pixel values than {label} decodes ({_difference(before, after)})",
    )


# dcmtk's decompressors, as a second opinion where pydicom's plugins disagree or fail.
DCMTK_DECODERS = {
    "1.2.840.10008.1.2.4.50": "dcmdjpeg", "1.2.840.10008.1.2.4.51": "dcmdjpeg",
    "1.2.840.10008.1.2.4.57": "dcmdjpeg", "1.2.840.10008.1.2.4.70": "dcmdjpeg",
    "1.2.840.10008.1.2.4.80": "dcmdjpls", "1.2.840.10008.1.2.4.81": "dcmdjpls",
    "1.2.840.10008.1.2.5": "dcmdrle",
}  # fmt: skip


def decodings(path: Path, ds: pydicom.Dataset) -> list[tuple[str, np.ndarray]]:
    """Every decoding of `ds`'s pixel data that a decoder here manages."""
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import get_decoder

    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not ts.is_compressed:
        try:
            return [("pydicom", _pixels(ds))]
        except Exception:
            return []
    out = []
    try:
        plugins = list(get_decoder(ts).available_plugins)
    except Exception:
        plugins = []
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(
                    (f"pydicom's {plugin}", pixel_array(ds, decoding_plugin=plugin))
                )
        except Exception:
            pass
    tool = DCMTK_DECODERS.get(str(ts))
    if tool:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [f"/usr/bin/{tool}", str(path), f"{tmp}/out.dcm"],
                capture_output=True, env=DCMTK_ENV, timeout=60,
            )  # fmt: skip
            if done.returncode == 0:
                try:
                    out.append(
                        (f"dcmtk's {tool}", _pixels(_read(Path(f"{tmp}/out.dcm"))))
                    )
                except Exception:
                    pass
    return out


def _compare_other(original, got) -> Result:
    """No pixel data: an encapsulated document must be the same bytes; otherwise
    every top-level attribute must have arrived."""
    if "EncapsulatedDocument" in original:
        same = got.get("EncapsulatedDocument") == original.EncapsulatedDocument
        return Result(INTACT) if same else Result(WRONG, "the document differs")
    lost = {e.tag for e in original} - {e.tag for e in got}
    if lost:
        names = ", ".join(str(t) for t in sorted(lost)[:5])
        return Result(WRONG, f"{len(lost)} attributes lost ({names})")
    return Result(INTACT)


def _difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shape {b.shape} instead of {a.shape}"
    delta = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return f"max difference {delta.max()}, {np.count_nonzero(delta)} values differ"


def _ts(uid: str) -> str:
    return UID(uid).name or uid


# -- what the peers hold -------------------------------------------------------------


def orthanc_results(
    orthanc: Orthanc, corpus: list[CorpusFile], named: dict[str, str]
) -> dict[str, Result]:
    out = {}
    for f in corpus:
        oid = orthanc.find_instance(f.sop_instance_uid)
        if oid is not None:
            out[f.name] = compare(f, orthanc.instance_file(oid))
        else:
            out[f.name] = _unstored(f, named)
    return out


def storescp_files(peer: StoreSCP) -> dict[str, Path]:
    """storescp's files by the SOP Instance UID of the request (its file names are
    `<modality>.<SOP Instance UID>.dcm`)."""
    found = {}
    for path in peer.files():
        prefix, dot, rest = path.name.partition(".")
        if dot:
            found[rest.removesuffix(".dcm")] = path
    return found


def storescp_results(
    peer: StoreSCP, corpus: list[CorpusFile], named: dict[str, str]
) -> dict[str, Result]:
    files = storescp_files(peer)
    out = {}
    for f in corpus:
        path = files.get(f.sop_instance_uid)
        if path is not None:
            out[f.name] = compare(f, path, request_uid=f.sop_instance_uid)
        else:
            out[f.name] = _unstored(f, named)
    return out


def spool_results(
    spool: Path,
    corpus: list[CorpusFile],
    named: dict[str, str],
    likes: dict[str, Path],
) -> dict[str, Result]:
    """What Courier's receiver holds: `<spool>/incoming/<series>/<UID>.dcm`;
    `likes` are storescp's copies from the same sender, by UID (see `compare`)."""
    files = {
        p.stem: p
        for p in (spool / "incoming").rglob("*.dcm")
        if ".partial" not in p.parts
    }
    out = {}
    for f in corpus:
        path = files.get(f.sop_instance_uid)
        if path is not None:
            out[f.name] = compare(f, path, like=likes.get(f.sop_instance_uid))
        else:
            out[f.name] = _unstored(f, named)
    return out


def _unstored(f: CorpusFile, named: dict[str, str]) -> Result:
    file_name = f.path.name
    if file_name in named:
        state, _, why = named[file_name].partition("|")
        return Result(state, why)
    return Result(SILENT, "not stored, and no reason given")


# -- the senders ---------------------------------------------------------------------


def courier_send(site, target: str, folder: Path) -> tuple[str, dict[str, str]]:
    """`manage.py send_series`; (its output, {file name: "failed|reason"})."""
    done = site.manage("send_series", target, str(folder), check=False)
    output = done.stdout + done.stderr
    named = {}
    for line in output.splitlines():
        if m := re.match(r"\s*failed: (\S+): (.*)$", line):
            named[m.group(1)] = f"{FAILED}|{m.group(2)}"
        elif m := re.search(r"left out \d+ files?: (.*) \(e\.g\. (.*?)(, …)?\)", line):
            for name in m.group(2).split(", "):
                named[name] = f"{FAILED}|left out: {m.group(1)}"
    return output, named


def dcmsend(port: int, aet: str, folder: Path, workdir: Path) -> dict[str, str]:
    """`dcmsend +dly` as mercure runs it; {file name: state|reason} for each file
    it did not store (from its report and its log)."""
    report = workdir / f"dcmsend-{aet}-{folder.name}.txt"
    done = subprocess.run(
        ["/usr/bin/dcmsend", "+dly", "-nh", "+sd", "-aet", "DCMSEND", "-aec", aet,
         "+crf", str(report), "127.0.0.1", str(port), str(folder)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report.with_suffix(".log").write_text(done.stdout + done.stderr)
    named = _dcmtk_log_reasons(done.stdout + done.stderr, NOT_OFFERED)
    text = report.read_text(errors="replace") if report.exists() else ""
    for block in text.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in block.splitlines())
            if _
        )
        name = Path(fields.get("Filename", "")).name
        status = fields.get("DIMSE Status", "")
        if name and not status.startswith("0x0000"):
            named[name] = f"{FAILED}|{status}"
    return named


def storescu(port: int, aet: str, corpus: list[CorpusFile], workdir: Path):
    """dcmtk `storescu` over one association, proposing each file's own transfer
    syntax as a modality does (a profile made from the corpus, plus uncompressed
    for each SOP class); {file name: state|reason} for each file it could not send
    or that was refused."""
    folder = corpus[0].path.parent
    config = workdir / f"storescu-{folder.name}.cfg"
    config.write_text(storescu_profile(corpus))
    done = subprocess.run(
        ["/usr/bin/storescu", "-v", "-xf", str(config), "Corpus", "-nh", "+sd",
         "-aet", "STORESCU", "-aec", aet, "127.0.0.1", str(port), str(folder)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    config.with_suffix(f".{port}.log").write_text(done.stdout + done.stderr)
    return _dcmtk_log_reasons(done.stdout + done.stderr, FAILED)


def raw_send(
    port: int, aet: str, corpus: list[CorpusFile], *, timeout: float = 10
) -> dict[str, str]:
    """pynetdicom streaming each file's bytes as they are on disk (dcmtk re-encodes:
    a UN of undefined length arrives as SQ, an odd length padded), one context per
    (SOP class, transfer syntax); a new association after one is lost. {file name:
    state|reason} for each file not stored. storescp waits for the rest of a
    truncated dataset: `timeout` is how long that costs."""
    from pynetdicom import AE, _config

    # Without it every C-STORE waits ~80 ms for Nagle and the delayed ACK (PEERS.md).
    enable_tcp_nodelay()
    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, timeout, timeout
    for cls, ts in sorted({(f.sop_class_uid, f.transfer_syntax) for f in corpus}):
        ae.add_requested_context(cls, [ts])
    named, assoc = {}, None
    # The file's bytes as they are, not pydicom's re-encoding of them.
    assert _config.STORE_SEND_CHUNKED_DATASET, "set by the test (monkeypatch)"
    for f in corpus:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title=aet)
            if not assoc.is_established:
                named[f.path.name] = f"{FAILED}|association not established"
                continue
            responses_to_the_caller(assoc)
        try:
            status = assoc.send_c_store(f.path)
        except Exception as exc:  # pynetdicom raises for unreadable files
            named[f.path.name] = f"{NOT_OFFERED}|{type(exc).__name__}: {exc}"
            continue
        code = getattr(status, "Status", None)
        if code is None:
            named[f.path.name] = f"{FAILED}|no response (association lost)"
        elif code != 0:
            named[f.path.name] = f"{FAILED}|status {code:#06x}"
    if assoc is not None and assoc.is_established:
        assoc.release()
    return named


def storescu_profile(corpus: list[CorpusFile]) -> str:
    """A storescu association profile: one context per (SOP class, transfer syntax)
    of the corpus, and one with the uncompressed syntaxes per SOP class."""
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax) for f in corpus})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes, 1):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[Uncompressed]", "TransferSyntax1 = LittleEndianExplicit",
              "TransferSyntax2 = LittleEndianImplicit",
              "TransferSyntax3 = BigEndianExplicit",
              "[[PresentationContexts]]", "[Corpus]"]  # fmt: skip
    contexts = [f"{cls}\\TS{syntaxes.index(ts) + 1}" for cls, ts in pairs]
    contexts += [f"{cls}\\Uncompressed" for cls in sorted({c for c, _ in pairs})]
    assert len(contexts) <= 128, len(contexts)
    lines += [f"PresentationContext{i} = {c}" for i, c in enumerate(contexts, 1)]
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    return "\n".join(lines) + "\n"


def _dcmtk_log_reasons(log: str, state: str) -> dict[str, str]:
    """{file name: state|messages} from dcmtk's error lines: those that name a file,
    and those after "Sending file: ..." (about that file)."""
    named: dict[str, list[str]] = defaultdict(list)
    current = None
    for line in log.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = Path(m.group(1)).name
        if not line.startswith("E:"):
            continue
        m = re.search(r"file: (/\S+?):?(?:\s|$)", line)
        name = Path(m.group(1)).name if m else current
        if name:
            named[name].append(line[3:].strip())
    return {name: f"{state}|" + "; ".join(why) for name, why in named.items()}


def receiver_refusals(log: str, corpus: list[CorpusFile]) -> dict[str, str]:
    """{file name: failed|reason} for each instance Courier's receiver refused."""
    by_uid = {f.sop_instance_uid: f.path.name for f in corpus}
    named = {}
    for line in log.splitlines():
        if "event=instance_refused" not in line:
            continue
        uid = re.search(r"sop_instance=(\S+)", line)
        reason = re.search(r"reason=(.*)$", line)
        if uid and uid.group(1).strip('"') in by_uid:
            why = reason.group(1) if reason else line
            named[by_uid[uid.group(1).strip('"')]] = f"{FAILED}|refused: {why}"
    return named


# -- judging and printing ------------------------------------------------------------


def table(
    title: str, corpus: list[CorpusFile], columns: dict[str, dict[str, Result]]
) -> str:
    """Per transfer syntax: files, then per column stored / converted / failed /
    other (WRONG, SILENT, not sent)."""
    by_ts: dict[str, list[CorpusFile]] = defaultdict(list)
    for f in corpus:
        by_ts[f.syntax_name].append(f)
    heads = "".join(f" | {name[:27]:<27}" for name in columns)
    lines = [
        title,
        f"{'transfer syntax':<44} {'files':>5}{heads}",
        f"{'':<44} {'':>5}" + " | stored  conv  fail  other" * len(columns),
    ]

    def cells(files: list[CorpusFile]) -> str:
        out = ""
        for results in columns.values():
            count = Counter(results[f.name].state for f in files)
            other = len(files) - count[INTACT] - count[CONVERTED] - count[FAILED]
            out += (
                f" | {count[INTACT]:>6} {count[CONVERTED]:>5} {count[FAILED]:>5}"
                f" {other:>6}"
            )
        return out

    for name in sorted(by_ts, key=lambda n: (-len(by_ts[n]), n)):
        files = by_ts[name]
        lines.append(f"{name[:44]:<44} {len(files):>5}{cells(files)}")
    lines.append(f"{'all':<44} {len(corpus):>5}{cells(corpus)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Known:
    """A file a reference delivers and Courier cannot: Courier must fail it by name
    with `reason` in its words; `why` is the explanation printed with the table."""

    reason: str
    why: str


# What dcmtk delivers to the uncompressed-only storescp and Courier cannot. Checked
# both ways: Courier's failure must carry the reason, and an exception Courier no
# longer needs (it delivered the file) fails the test, so this only shrinks.
BEYOND_PYTHON_DECODERS = {
    "test_files/JPEG-lossy.dcm": Known(
        reason="scan start must be zero and scan stop must be 63",
        why="12-bit JPEG extended whose scans carry spectral selection values a "
        "sequential JPEG must not have (Ss/Se not 0/63): libjpeg (pylibjpeg), GDCM "
        "and Pillow refuse it, only dcmtk's own decoder (dcmdjpeg) accepts it, "
        "with a warning; Courier fails it by name with libjpeg's reason",
    ),
}


def judge(
    corpus: list[CorpusFile],
    courier: dict[str, Result],
    references: dict[str, dict[str, Result]],
    known: dict[str, Known] | None = None,
) -> list[str]:
    """What is wrong with Courier's results, in words, one line per file."""
    known = known or {}
    problems = []
    for f in corpus:
        mine = courier[f.name]
        if mine.state in (WRONG, SILENT):
            problems.append(f"{f.name} [{f.syntax_name}]: {mine}")
        elif f.broken and mine.state in DELIVERED:
            problems.append(f"{f.name}: truncated ({f.broken}) but stored: {mine}")
        excuse = known.get(f.name)
        if excuse is not None and mine.state in DELIVERED:
            problems.append(
                f"{f.name}: listed as beyond Courier ({excuse.why}) but Courier "
                f"delivered it ({mine}): remove the exception"
            )
        for ref_name, ref in references.items():
            theirs = ref[f.name]
            if theirs.state in DELIVERED and mine.state not in DELIVERED:
                if (
                    excuse is not None
                    and mine.state == FAILED
                    and excuse.reason in mine.detail
                ):
                    continue
                problems.append(
                    f"{f.name} [{f.syntax_name}]: {ref_name} delivered it "
                    f"({theirs}), Courier did not ({mine})"
                )
    return problems


def report(
    title: str, corpus, courier, references, said: str = "", known=None
) -> list[str]:
    """Print the table and every file not simply stored; return the problems."""
    columns = {"Courier": courier, **references}
    problems = judge(corpus, courier, references, known)
    lines = [table(title, corpus, columns)]
    lines.append(f"\n{len(problems)} problems:" if problems else "\nno problems")
    lines += [f"  {p}" for p in problems]
    for name, excuse in (known or {}).items():
        lines.append(f"known: {name}: delivered by dcmtk, not by Courier: {excuse.why}")
    odd = [
        f"  {f.name}: " + "; ".join(f"{k}={r[f.name]}" for k, r in columns.items())
        for f in corpus
        if any(r[f.name].state != INTACT for r in columns.values())
    ]
    if odd:
        lines.append("\nevery file not simply stored, per sender:")
        lines += odd
    if said:
        lines.append(f"\n{annotate(said, corpus)}")
    print("\n".join(lines))
    return problems


def annotate(text: str, corpus: list[CorpusFile]) -> str:
    """Name the file after each SOP Instance UID in a log."""
    for f in corpus:
        text = text.replace(f.sop_instance_uid, f"{f.sop_instance_uid} [{f.name}]")
    return text


def summary(problems: list[str]) -> str:
    return (
        f"{len(problems)} problems (the table and every file in the captured "
        "output):\n" + "\n".join(problems)
    )


def dicom_target(site, name: str, port: int, aet: str) -> None:
    site.add_target(
        name=name, kind="dicom", host="127.0.0.1", port=port, called_aet=aet,
        calling_aet="COURIER", max_connections=1, **TIMEOUTS,
    )  # fmt: skip


# -- the directions ------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus_sources(tmp_path_factory) -> list[Source]:
    """pydicom's instances and the crafted ones, found, made and read once per
    session; each sender gets its own copy with fresh UIDs (`build_corpus`)."""
    return sources(tmp_path_factory.mktemp("corpus-extras"))


def test_courier_to_orthanc_stores_every_file_or_names_it(
    courier_site, orthanc, corpus_sources, tmp_path
):
    corpus = build_corpus(tmp_path / "courier", corpus_sources)
    reference = build_corpus(tmp_path / "dcmsend", corpus_sources)
    site = courier_site().migrate()
    dicom_target(site, "orthanc", orthanc.dicom_port, orthanc.aet)

    output, named = courier_send(site, "orthanc", tmp_path / "courier")
    courier = orthanc_results(orthanc, corpus, named)
    theirs_named = dcmsend(orthanc.dicom_port, orthanc.aet, tmp_path / "dcmsend",
                           tmp_path)  # fmt: skip
    theirs = orthanc_results(orthanc, reference, theirs_named)

    problems = report(
        f"Courier -> Orthanc ({len(corpus)} files)",
        corpus, courier, {"dcmsend +dly": theirs},
        said=f"send_series said:\n{output[-4000:]}",
    )  # fmt: skip
    assert not problems, summary(problems)


def test_courier_to_an_uncompressed_only_storescp_converts_keeping_identity(
    courier_site, storescp_uncompressed, corpus_sources, tmp_path
):
    peer = storescp_uncompressed
    corpus = build_corpus(tmp_path / "courier", corpus_sources)
    reference = build_corpus(tmp_path / "dcmsend", corpus_sources)
    site = courier_site().migrate()
    dicom_target(site, "plain", peer.port, peer.aet)

    output, named = courier_send(site, "plain", tmp_path / "courier")
    courier = storescp_results(peer, corpus, named)
    theirs_named = dcmsend(peer.port, peer.aet, tmp_path / "dcmsend", tmp_path)
    theirs = storescp_results(peer, reference, theirs_named)

    problems = report(
        f"Courier -> storescp accepting only uncompressed syntaxes ({len(corpus)} "
        "files)",
        corpus, courier, {"dcmsend +dly": theirs},
        said=f"send_series said:\n{output[-4000:]}", known=BEYOND_PYTHON_DECODERS,
    )  # fmt: skip
    assert not problems, summary(problems)


def test_dcmtk_and_pynetdicom_into_courier_receiver(
    courier_site, storescp, corpus_sources, tmp_path, monkeypatch
):
    """What dcmtk (and pynetdicom, sending the files' bytes unchanged) sends,
    Courier's receiver stores under its own UID with its pixel values; it takes at
    least what dcmtk's own storescp (all syntaxes) takes from the same sender."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    by_storescu = build_corpus(tmp_path / "storescu", corpus_sources)
    by_dcmsend = build_corpus(tmp_path / "dcmsend", corpus_sources)
    by_raw = build_corpus(tmp_path / "raw", corpus_sources)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()

    def reference():
        """The same senders, the same files, into dcmtk's storescp."""
        return (
            storescp_results(
                storescp,
                by_storescu,
                storescu(storescp.port, storescp.aet, by_storescu, reference_dir),
            ),
            storescp_results(
                storescp,
                by_dcmsend,
                dcmsend(
                    storescp.port, storescp.aet, tmp_path / "dcmsend", reference_dir
                ),
            ),
            storescp_results(
                storescp,
                by_raw,
                raw_send(storescp.port, storescp.aet, by_raw, timeout=3),
            ),
        )

    # The reference runs beside Courier's side: storescp keeps waiting (the 3 s
    # timeout) for the rest of a few datasets, time Courier's side can use.
    with ThreadPoolExecutor(1) as pool:
        references = pool.submit(reference)
        site = courier_site(
            env={"COURIER_SERIES_QUIET_SECONDS": "3600", "COURIER_MIN_FREE_BYTES": "0"}
        ).migrate()
        rx = ReceiverProcess(site).start()
        try:
            storescu_named = storescu(rx.port, "COURIER", by_storescu, tmp_path)
            dcmsend_named = dcmsend(rx.port, "COURIER", tmp_path / "dcmsend", tmp_path)
            raw_named = raw_send(rx.port, "COURIER", by_raw)
        finally:
            rx.stop()
        ref_storescu, ref_dcmsend, ref_raw = references.result()
    log = rx.log_path.read_text(errors="replace")
    likes = storescp_files(storescp)
    via_storescu = spool_results(
        site.spool,
        by_storescu,
        {**storescu_named, **receiver_refusals(log, by_storescu)},
        likes,
    )
    via_dcmsend = spool_results(
        site.spool,
        by_dcmsend,
        {**dcmsend_named, **receiver_refusals(log, by_dcmsend)},
        likes,
    )
    via_raw = spool_results(
        site.spool, by_raw, {**raw_named, **receiver_refusals(log, by_raw)}, likes
    )

    problems = report(
        f"storescu -> Courier's receiver ({len(by_storescu)} files)",
        by_storescu, via_storescu, {"storescu -> storescp": ref_storescu},
    )  # fmt: skip
    problems += report(
        f"dcmsend -> Courier's receiver ({len(by_dcmsend)} files)",
        by_dcmsend, via_dcmsend, {"dcmsend -> storescp": ref_dcmsend},
    )  # fmt: skip
    problems += report(
        f"pynetdicom, file bytes as they are -> Courier's receiver ({len(by_raw)} "
        "files)",
        by_raw, via_raw, {"pynetdicom -> storescp": ref_raw},
        said=f"receiver log (end):\n{log[-4000:]}",
    )  # fmt: skip
    assert not problems, summary(problems)

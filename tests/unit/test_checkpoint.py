"""Tests for libvms.checkpoint: signed notes, checkpoints and inclusion receipts."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from libvms.checkpoint import (
    MAX_PROOF_HASHES,
    MAX_SIGNATURES,
    MAX_SIZE,
    TLOG_PROOF_HEADER,
    Checkpoint,
    InclusionReceipt,
    Note,
    NoteSignature,
    checkpoint_signing,
    open_checkpoint,
    sign_checkpoint,
    sign_note,
)
from libvms.errors import LibVMSError, TamperError
from libvms.keys import Keypair, VerifierKey, key_id

# --- vectors -------------------------------------------------------------------------------------

# The example key pair and note of the Go signed-note implementation's documentation
# (golang.org/x/mod/sumdb/note), which the C2SP signed-note format was written from.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG_LINE = (
    "— PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
PETER_NOTE = PETER_TEXT + "\n" + PETER_SIG_LINE
# The same note cosigned by a key we do not know (also from that documentation).
ENOCH_SIG_LINE = (
    "— EnochRoot "
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)

# The example note of c2sp.org/signed-note: its text holds a blank line of its own.
QUASIMODO_NOTE = (
    "Ognuno sta solo sul cuor della terra\n"
    "trafitto da un raggio di sole:\n"
    "\n"
    "ed è subito sera.\n"
    "\n"
    "— quasimodo.example/salvatore "
    "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
)

# The example checkpoint of c2sp.org/tlog-checkpoint.
SOFA_NOTE = (
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "— example.com/behind-the-sofa "
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)


def _peter_seed() -> bytes:
    prefix, kw, name, hex_id, material = PETER_SKEY.split("+", 4)
    assert (prefix, kw, name, hex_id) == ("PRIVATE", "KEY", "PeterNeumann", "c74f20a3")
    raw = base64.b64decode(material)
    assert raw[0] == 0x01  # Ed25519
    return raw[1:]


# --- signed-note vectors -------------------------------------------------------------------------


def test_go_example_note_verifies() -> None:
    vkey = VerifierKey.parse(PETER_VKEY)
    note = Note.parse(PETER_NOTE)
    assert note.text == PETER_TEXT
    assert len(note.signatures) == 1
    assert note.signatures[0].name == "PeterNeumann"
    assert note.signatures[0].key_id == bytes.fromhex("c74f20a3")
    assert note.verify([vkey]) == [vkey]
    assert note.to_bytes() == PETER_NOTE.encode()
    assert Note.parse(PETER_NOTE.encode()) == note


def test_go_example_resigned_identically() -> None:
    seed = _peter_seed()
    signer = Keypair.from_private_bytes(seed)
    assert signer.public_key == VerifierKey.parse(PETER_VKEY).public_key
    note = sign_note(PETER_TEXT, signer, "PeterNeumann")
    assert note.to_bytes().decode() == PETER_NOTE
    assert note.signatures[0].to_line() == PETER_SIG_LINE


def test_unknown_cosignature_is_ignored() -> None:
    vkey = VerifierKey.parse(PETER_VKEY)
    note = Note.parse(PETER_NOTE + ENOCH_SIG_LINE)
    assert [s.name for s in note.signatures] == ["PeterNeumann", "EnochRoot"]
    assert note.verify([vkey]) == [vkey]


def test_spec_example_note_parses_with_inner_blank_line() -> None:
    note = Note.parse(QUASIMODO_NOTE)
    assert note.text.endswith("\n\ned è subito sera.\n")
    assert note.signatures[0].name == "quasimodo.example/salvatore"
    assert note.to_bytes() == QUASIMODO_NOTE.encode()
    with pytest.raises(TamperError):
        note.verify([VerifierKey.parse(PETER_VKEY)])  # only an unknown signature


def test_spec_example_checkpoint_parses() -> None:
    note = Note.parse(SOFA_NOTE)
    cp = Checkpoint.parse(note.text)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert cp.to_bytes().decode() == note.text


# --- note verification ---------------------------------------------------------------------------


@pytest.fixture
def signer() -> Keypair:
    return Keypair.from_private_bytes(bytes(range(32)))


def _vkey(kp: Keypair, name: str) -> VerifierKey:
    return VerifierKey(name, kp.public_key)


def test_unknown_key_only(signer: Keypair) -> None:
    note = sign_note("hello\n", signer, "log.example")
    other = Keypair.generate()
    with pytest.raises(TamperError, match="no valid signature"):
        note.verify([_vkey(other, "log.example")])  # same name, other key id
    with pytest.raises(TamperError, match="no valid signature"):
        note.verify([_vkey(signer, "other.example")])  # same key, other name


def test_known_key_bad_signature_rejected_even_with_a_good_one(signer: Keypair) -> None:
    good = sign_note("hello\n", signer, "log.example")
    forged = NoteSignature("log.example", key_id("log.example", signer.public_key), bytes(64))
    note = Note(good.text, (*good.signatures, forged))
    with pytest.raises(TamperError, match="does not verify"):
        note.verify([_vkey(signer, "log.example")])


def test_verify_returns_every_signing_key(signer: Keypair) -> None:
    second = Keypair.generate()
    a, b = _vkey(signer, "a.example"), _vkey(second, "b.example")
    sig_a = sign_note("t\n", signer, "a.example").signatures[0]
    sig_b = sign_note("t\n", second, "b.example").signatures[0]
    note = Note("t\n", (sig_b, sig_a))
    assert note.verify([a, b]) == [a, b]
    assert note.verify([b, a, b]) == [b, a]
    unrelated = _vkey(Keypair.generate(), "c.example")
    assert note.verify([unrelated, b]) == [b]


def test_verify_needs_keys(signer: Keypair) -> None:
    with pytest.raises(ValueError):
        sign_note("t\n", signer, "a").verify([])


def test_verify_rejects_ambiguous_keys(signer: Keypair) -> None:
    note = sign_note("t\n", signer, "a")
    real = _vkey(signer, "a")

    # Two different keys share a name and key id only by a 2^-32 chance; simulate it.
    class SameIdKey(VerifierKey):
        @property
        def key_id(self) -> bytes:
            return real.key_id

    with pytest.raises(ValueError, match="ambiguous"):
        note.verify([real, SameIdKey("a", Keypair.generate().public_key)])


def test_flipped_bit_in_text(signer: Keypair) -> None:
    vkey = _vkey(signer, "log.example")
    data = bytearray(sign_note("hello world\n", signer, "log.example").to_bytes())
    data[0] ^= 0x01  # 'h' -> 'i'
    with pytest.raises(TamperError):
        Note.parse(bytes(data)).verify([vkey])


@given(st.integers(min_value=0, max_value=64 * 8 - 1))
def test_flipped_bit_in_signature(bit: int) -> None:
    kp = Keypair.from_private_bytes(bytes(range(32)))
    vkey = _vkey(kp, "log.example")
    sig = sign_note("hello\n", kp, "log.example").signatures[0]
    raw = bytearray(sig.signature)
    raw[bit // 8] ^= 1 << (bit % 8)
    note = Note("hello\n", (NoteSignature(sig.name, sig.key_id, bytes(raw)),))
    with pytest.raises(TamperError):
        Note.parse(note.to_bytes()).verify([vkey])


def test_flipped_bit_in_key_id_makes_signature_unknown(signer: Keypair) -> None:
    sig = sign_note("hello\n", signer, "log.example").signatures[0]
    bad_id = bytes([sig.key_id[0] ^ 0x80]) + sig.key_id[1:]
    note = Note("hello\n", (NoteSignature(sig.name, bad_id, sig.signature),))
    with pytest.raises(TamperError, match="no valid signature"):
        note.verify([_vkey(signer, "log.example")])


# --- note parser rejections ----------------------------------------------------------------------


def _peter_with(text: str = PETER_TEXT, sigs: str = PETER_SIG_LINE) -> str:
    return text + "\n" + sigs


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(PETER_NOTE.replace("\n", "\r\n"), id="crlf"),
        pytest.param(_peter_with(PETER_TEXT.replace("problem,", "problem,\r")), id="cr-in-text"),
        pytest.param(PETER_NOTE[:-1] + "\r\n", id="cr-in-signature"),
        pytest.param(_peter_with(PETER_TEXT.replace(" ", "\t", 1)), id="tab"),
        pytest.param(_peter_with(PETER_TEXT.replace(" ", "\x00", 1)), id="nul"),
        pytest.param(_peter_with(PETER_TEXT.replace(" ", "\x1b", 1)), id="escape"),
        pytest.param(PETER_TEXT + PETER_SIG_LINE, id="no-blank-line"),
        pytest.param(PETER_TEXT, id="no-signatures-no-blank"),
        pytest.param(PETER_TEXT + "\n", id="no-signatures"),
        pytest.param(PETER_NOTE + "\n", id="trailing-blank-line"),
        pytest.param(PETER_NOTE[:-1], id="no-final-newline"),
        pytest.param(PETER_NOTE.replace("— ", "- "), id="hyphen-not-em-dash"),
        pytest.param(PETER_NOTE.replace("— ", "—"), id="no-space-after-dash"),
        pytest.param(PETER_NOTE.replace("PeterNeumann ", "PeterNeumann  "), id="two-spaces"),
        pytest.param(PETER_NOTE.replace("PeterNeumann ", "Peter+Neumann "), id="plus-in-name"),
        pytest.param(PETER_NOTE.replace("— PeterNeumann ", "—  "), id="empty-name"),
        pytest.param(PETER_NOTE.replace("x08go/", "x08go!"), id="bad-base64-char"),
        pytest.param(PETER_NOTE.replace("JnAM=", "JnAM"), id="missing-padding"),
        pytest.param(PETER_NOTE.replace("JnAM=", "JnAN="), id="non-canonical-base64"),
        pytest.param(_peter_with(sigs="— PeterNeumann x08gow==\n"), id="key-id-only"),
        pytest.param(_peter_with(sigs="— PeterNeumann\n"), id="no-signature-field"),
        pytest.param(_peter_with(sigs=PETER_SIG_LINE + "junk\n"), id="junk-line"),
        pytest.param("\n", id="just-newline"),
        pytest.param("", id="empty"),
    ],
)
def test_note_parse_rejects(data: str) -> None:
    with pytest.raises(TamperError):
        Note.parse(data)


def test_last_blank_line_separates_text() -> None:
    # A blank line between two signature lines makes the first one part of the text.
    note = Note.parse(_peter_with(sigs=PETER_SIG_LINE + "\n" + PETER_SIG_LINE))
    assert note.text == PETER_NOTE
    assert len(note.signatures) == 1
    with pytest.raises(TamperError, match="does not verify"):
        note.verify([VerifierKey.parse(PETER_VKEY)])


def test_note_parse_rejects_invalid_utf8() -> None:
    with pytest.raises(TamperError):
        Note.parse(PETER_NOTE.encode().replace(b"problem", b"probl\xffm"))
    with pytest.raises(TamperError):
        Note.parse(PETER_NOTE.replace("problem", "probl\udcffm"))


def test_tamper_error_is_libvms_error() -> None:
    with pytest.raises(LibVMSError):
        Note.parse("nonsense")


def test_signature_count_limit() -> None:
    at_limit = _peter_with(sigs=PETER_SIG_LINE + ENOCH_SIG_LINE * (MAX_SIGNATURES - 1))
    note = Note.parse(at_limit)
    assert len(note.signatures) == MAX_SIGNATURES
    assert note.verify([VerifierKey.parse(PETER_VKEY)])
    with pytest.raises(TamperError, match="more than"):
        Note.parse(at_limit + ENOCH_SIG_LINE)


def test_note_constructor_validation(signer: Keypair) -> None:
    sig = sign_note("t\n", signer, "a").signatures[0]
    with pytest.raises(ValueError):
        Note("no newline", (sig,))
    with pytest.raises(ValueError):
        Note("cr\r\n", (sig,))
    with pytest.raises(ValueError):
        Note("t\n", ())
    with pytest.raises(ValueError):
        Note("t\n", (sig,) * (MAX_SIGNATURES + 1))
    with pytest.raises(ValueError):
        NoteSignature("a b", b"\x00" * 4, b"s")
    with pytest.raises(ValueError):
        NoteSignature("a", b"\x00" * 3, b"s")
    with pytest.raises(ValueError):
        sign_note("t", signer, "a")
    with pytest.raises(ValueError):
        sign_note("t\n", signer, "a+b")


# --- checkpoints ---------------------------------------------------------------------------------

ROOT = bytes(range(32))
ROOT_B64 = base64.b64encode(ROOT).decode()
URL_B64_ROOT = base64.urlsafe_b64encode(b"\xff" * 32).decode()


def test_checkpoint_to_bytes() -> None:
    cp = Checkpoint("example.com/log", 5, ROOT, ("ext one", "ext two"))
    assert cp.to_bytes() == f"example.com/log\n5\n{ROOT_B64}\next one\next two\n".encode()
    assert Checkpoint.parse(cp.to_bytes()) == cp
    assert Checkpoint.parse(cp.to_bytes().decode()) == cp


def test_checkpoint_extremes() -> None:
    for size in (0, 1, MAX_SIZE):
        cp = Checkpoint("o", size, ROOT)
        assert Checkpoint.parse(cp.to_bytes()) == cp


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(f"o\n5\n{ROOT_B64}", id="no-final-newline"),
        pytest.param(f"o\r\n5\n{ROOT_B64}\n", id="cr"),
        pytest.param(f"o\n5\n{ROOT_B64}\r\n", id="cr-after-root"),
        pytest.param(f"o\n5\n{ROOT_B64}\n\n", id="empty-extension"),
        pytest.param(f"o\n5\n{ROOT_B64}\nx\n\ny\n", id="empty-line-between-extensions"),
        pytest.param(f"\n5\n{ROOT_B64}\n", id="empty-origin"),
        pytest.param("o\n5\n", id="two-lines"),
        pytest.param("", id="empty"),
        pytest.param(f"o\n05\n{ROOT_B64}\n", id="leading-zero"),
        pytest.param(f"o\n00\n{ROOT_B64}\n", id="double-zero"),
        pytest.param(f"o\n+5\n{ROOT_B64}\n", id="plus-sign"),
        pytest.param(f"o\n-1\n{ROOT_B64}\n", id="negative"),
        pytest.param(f"o\n 5\n{ROOT_B64}\n", id="space"),
        pytest.param(f"o\n5_0\n{ROOT_B64}\n", id="underscore"),
        pytest.param(f"o\n５\n{ROOT_B64}\n", id="fullwidth-digit"),
        pytest.param(f"o\n{MAX_SIZE + 1}\n{ROOT_B64}\n", id="size-too-big"),
        pytest.param(f"o\n{'9' * 40}\n{ROOT_B64}\n", id="size-far-too-big"),
        pytest.param(f"o\nfive\n{ROOT_B64}\n", id="size-not-number"),
        pytest.param("o\n5\n!!!!\n", id="root-bad-base64"),
        pytest.param(f"o\n5\n{ROOT_B64.rstrip('=')}\n", id="root-unpadded"),
        pytest.param(f"o\n5\n{base64.b64encode(bytes(31)).decode()}\n", id="root-31-bytes"),
        pytest.param(f"o\n5\n{base64.b64encode(bytes(33)).decode()}\n", id="root-33-bytes"),
        pytest.param(f"o\n5\n{URL_B64_ROOT}\n", id="url-b64"),
        pytest.param(f"o\x00\n5\n{ROOT_B64}\n", id="nul-in-origin"),
        pytest.param(f"o\n5\n{ROOT_B64}\next\x07\n", id="bell-in-extension"),
    ],
)
def test_checkpoint_parse_rejects(body: str) -> None:
    with pytest.raises(TamperError):
        Checkpoint.parse(body)


def test_checkpoint_parse_rejects_invalid_utf8() -> None:
    with pytest.raises(TamperError):
        Checkpoint.parse(b"\xff\n5\n" + ROOT_B64.encode() + b"\n")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        ("o", -1, ROOT, ()),
        ("o", MAX_SIZE + 1, ROOT, ()),
        ("o", True, ROOT, ()),
        ("o", 1, ROOT[:31], ()),
        ("o", 1, ROOT, ("",)),
        ("o", 1, ROOT, ("a\nb",)),
    ],
)
def test_checkpoint_constructor_validation(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        Checkpoint(origin, size, root, extensions)


line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30
)


@given(
    line_text,
    st.integers(min_value=0, max_value=MAX_SIZE),
    st.binary(min_size=32, max_size=32),
    st.lists(line_text, max_size=3).map(tuple),
)
def test_checkpoint_roundtrip(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    cp = Checkpoint(origin, size, root, extensions)
    assert Checkpoint.parse(cp.to_bytes()) == cp


# --- signed checkpoints --------------------------------------------------------------------------


def test_sign_and_open_checkpoint(signer: Keypair) -> None:
    cp = Checkpoint("example.com/log", 42, ROOT)
    text = sign_checkpoint(cp, signer)
    assert text.startswith(cp.to_bytes().decode() + "\n— example.com/log ")
    vkey = VerifierKey("example.com/log", signer.public_key)
    assert open_checkpoint(text, vkey) == cp
    assert open_checkpoint(text.encode(), vkey) == cp


@pytest.mark.parametrize("name", [None, "example.com/other"])
@given(size=st.integers(min_value=0, max_value=MAX_SIZE), root=st.binary(min_size=32, max_size=32))
def test_checkpoint_signing_parts_make_the_same_note(
    name: str | None, size: int, root: bytes
) -> None:
    # What the store's writer process assembles equals sign_checkpoint's note.
    signer = Keypair.from_private_bytes(bytes(range(32)))
    cp = Checkpoint("example.com/log", size, root)
    text, head, kid = checkpoint_signing(cp, signer.public_key, name)
    assembled = head + base64.b64encode(kid + signer.sign(text)) + b"\n"
    assert assembled.decode() == sign_checkpoint(cp, signer, name)
    with pytest.raises(ValueError, match="key name"):
        checkpoint_signing(cp, signer.public_key, "bad name")


def test_open_checkpoint_origin_must_match_key_name(signer: Keypair) -> None:
    cp = Checkpoint("example.com/log", 42, ROOT)
    text = sign_checkpoint(cp, signer, name="example.com/other")
    vkey = VerifierKey("example.com/other", signer.public_key)
    assert Note.parse(text).verify([vkey]) == [vkey]
    with pytest.raises(TamperError, match="origin"):
        open_checkpoint(text, vkey)


def test_open_checkpoint_wrong_key(signer: Keypair) -> None:
    text = sign_checkpoint(Checkpoint("example.com/log", 42, ROOT), signer)
    with pytest.raises(TamperError):
        open_checkpoint(text, VerifierKey("example.com/log", Keypair.generate().public_key))


def test_open_checkpoint_signed_non_checkpoint(signer: Keypair) -> None:
    text = sign_note("example.com/log\nnot a size\nxyz\n", signer, "example.com/log")
    with pytest.raises(TamperError, match="malformed checkpoint"):
        open_checkpoint(text.to_bytes(), VerifierKey("example.com/log", signer.public_key))


def test_open_checkpoint_tampered_size(signer: Keypair) -> None:
    text = sign_checkpoint(Checkpoint("example.com/log", 42, ROOT), signer)
    with pytest.raises(TamperError, match="does not verify"):
        open_checkpoint(
            text.replace("\n42\n", "\n43\n"), VerifierKey("example.com/log", signer.public_key)
        )


def test_sign_checkpoint_rejects_origin_unfit_as_key_name(signer: Keypair) -> None:
    with pytest.raises(ValueError):
        sign_checkpoint(Checkpoint("has space", 1, ROOT), signer)


key_names = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="+"
    ),
    min_size=1,
    max_size=40,
)


@given(
    key_names,
    st.integers(min_value=0, max_value=MAX_SIZE),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
)
def test_sign_open_roundtrip(origin: str, size: int, root: bytes, seed: bytes) -> None:
    assume(not any(ch.isspace() for ch in origin))
    kp = Keypair.from_private_bytes(seed)
    cp = Checkpoint(origin, size, root)
    vkey = VerifierKey.parse(VerifierKey(origin, kp.public_key).to_text())
    assert open_checkpoint(sign_checkpoint(cp, kp), vkey) == cp


# --- inclusion receipts --------------------------------------------------------------------------


@pytest.fixture
def signed_cp(signer: Keypair) -> str:
    return sign_checkpoint(Checkpoint("example.com/log", 8, ROOT), signer)


def test_receipt_layout(signed_cp: str) -> None:
    h1, h2 = bytes(32), b"\xff" * 32
    receipt = InclusionReceipt(5, (h1, h2), signed_cp)
    b1, b2 = base64.b64encode(h1).decode(), base64.b64encode(h2).decode()
    assert receipt.to_text() == f"{TLOG_PROOF_HEADER}\nindex 5\n{b1}\n{b2}\n\n{signed_cp}"
    assert InclusionReceipt.parse(receipt.to_text()) == receipt
    assert InclusionReceipt.parse(receipt.to_text().encode()) == receipt


def test_receipt_empty_proof(signed_cp: str) -> None:
    receipt = InclusionReceipt(0, (), signed_cp)
    assert receipt.to_text() == f"{TLOG_PROOF_HEADER}\nindex 0\n\n{signed_cp}"
    assert InclusionReceipt.parse(receipt.to_text()) == receipt


@given(
    st.integers(min_value=0, max_value=MAX_SIZE),
    st.lists(st.binary(min_size=32, max_size=32), max_size=MAX_PROOF_HASHES).map(tuple),
)
def test_receipt_roundtrip(index: int, proof: tuple[bytes, ...]) -> None:
    kp = Keypair.from_private_bytes(bytes(32))
    cp_text = sign_checkpoint(Checkpoint("log.example", MAX_SIZE, ROOT), kp)
    receipt = InclusionReceipt(index, proof, cp_text)
    assert InclusionReceipt.parse(receipt.to_text()) == receipt


def _receipt(index: str = "index 3", proof: str = "", cp: str = "") -> str:
    return f"{TLOG_PROOF_HEADER}\n{index}\n{proof}\n{cp}"


HASH_LINE = base64.b64encode(bytes(32)).decode() + "\n"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda cp: _receipt(cp=cp).replace("@v1", "@v2"), id="wrong-header"),
        pytest.param(lambda cp: _receipt(cp=cp).replace("\n", "\r\n", 1), id="cr-header"),
        pytest.param(lambda cp: _receipt("extra AAAA\nindex 3", cp=cp), id="extra-line"),
        pytest.param(lambda cp: _receipt("index 03", cp=cp), id="leading-zero"),
        pytest.param(lambda cp: _receipt("index -3", cp=cp), id="negative"),
        pytest.param(lambda cp: _receipt("index  3", cp=cp), id="two-spaces"),
        pytest.param(lambda cp: _receipt("index", cp=cp), id="no-number"),
        pytest.param(lambda cp: _receipt("idx 3", cp=cp), id="wrong-keyword"),
        pytest.param(lambda cp: _receipt(f"index {MAX_SIZE + 1}", cp=cp), id="index-too-big"),
        pytest.param(lambda cp: _receipt(proof="!!!\n", cp=cp), id="bad-base64"),
        pytest.param(lambda cp: _receipt(proof="AAAA\n", cp=cp), id="short-hash"),
        pytest.param(lambda cp: _receipt(proof=HASH_LINE[:-1] + "\r\n", cp=cp), id="cr-hash"),
        pytest.param(
            lambda cp: _receipt(proof=HASH_LINE * (MAX_PROOF_HASHES + 1), cp=cp), id="long-proof"
        ),
        pytest.param(lambda cp: _receipt(cp=""), id="no-checkpoint"),
        pytest.param(lambda cp: _receipt(cp="nonsense\n"), id="bad-checkpoint"),
        pytest.param(lambda cp: _receipt(cp=cp + "\n"), id="checkpoint-trailing-blank"),
        pytest.param(lambda cp: _receipt(proof=HASH_LINE, cp=cp).rstrip("\n"), id="truncated"),
        pytest.param(lambda cp: f"{TLOG_PROOF_HEADER}\nindex 3\n{HASH_LINE}", id="no-blank"),
        pytest.param(lambda cp: TLOG_PROOF_HEADER, id="header-only"),
        pytest.param(lambda cp: "", id="empty"),
    ],
)
def test_receipt_parse_rejects(signed_cp: str, mutate: Callable[[str], str]) -> None:
    with pytest.raises(TamperError):
        InclusionReceipt.parse(mutate(signed_cp))


def test_receipt_sanity_of_rejection_helper(signed_cp: str) -> None:
    assert InclusionReceipt.parse(_receipt(proof=HASH_LINE, cp=signed_cp)).index == 3


def test_receipt_constructor_validation(signed_cp: str) -> None:
    with pytest.raises(ValueError):
        InclusionReceipt(-1, (), signed_cp)
    with pytest.raises(ValueError):
        InclusionReceipt(0, (bytes(31),), signed_cp)
    with pytest.raises(ValueError):
        InclusionReceipt(0, (bytes(32),) * (MAX_PROOF_HASHES + 1), signed_cp)
    with pytest.raises(ValueError):
        InclusionReceipt(0, (), "not a note")

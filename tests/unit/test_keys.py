"""Tests for libvms.keys: key pairs, key files, user ids, verifier keys, ledger URLs."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libvms.errors import LibVMSError
from libvms.keys import (
    KEY_FILE_HEADER,
    Keypair,
    VerifierKey,
    is_signed_user_id,
    is_valid_key_name,
    key_id,
    ledger_url,
    parse_ledger_url,
    public_key_from_user_id,
    same_ledger,
    user_id_for,
    verifier_key_text,
    verify_signature,
)

# The example verifier key of the Go signed-note implementation (golang.org/x/mod/sumdb/note).
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"

keys_32 = st.binary(min_size=32, max_size=32)
seeds = st.binary(min_size=32, max_size=32)
key_names = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="+"
    ),
    min_size=1,
    max_size=40,
).filter(lambda s: not any(ch.isspace() for ch in s))


# --- key pairs -----------------------------------------------------------------------------------


def test_generate_sign_verify() -> None:
    kp = Keypair.generate()
    assert len(kp.public_key) == 32
    assert len(kp.private_bytes) == 32
    sig = kp.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(kp.public_key, b"hello", sig)
    assert not verify_signature(kp.public_key, b"hello!", sig)
    assert not verify_signature(Keypair.generate().public_key, b"hello", sig)


def test_two_generated_keys_differ() -> None:
    assert Keypair.generate().public_key != Keypair.generate().public_key


def test_signing_is_deterministic() -> None:
    kp = Keypair.from_private_bytes(bytes(range(32)))
    assert kp.sign(b"m") == kp.sign(b"m")
    assert Keypair.from_private_bytes(kp.private_bytes).public_key == kp.public_key


def test_rfc8032_test_vector_1() -> None:
    # RFC 8032 §7.1, TEST 1: empty message.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    kp = Keypair.from_private_bytes(seed)
    assert kp.public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert kp.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33])
def test_from_private_bytes_rejects_wrong_length(seed: bytes) -> None:
    with pytest.raises(ValueError):
        Keypair.from_private_bytes(seed)


def test_repr_does_not_leak_seed() -> None:
    kp = Keypair.generate()
    text = repr(kp)
    assert kp.user_id in text
    assert base64.b64encode(kp.private_bytes).decode() not in text
    assert kp.private_bytes.hex() not in text


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (b"", b"\x00" * 64),
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 32, b""),
        (b"\x00" * 32, b"\x00" * 63),
        (b"\xff" * 32, b"\xff" * 64),
    ],
)
def test_verify_signature_never_raises(public_key: bytes, signature: bytes) -> None:
    assert verify_signature(public_key, b"msg", signature) is False


def test_verify_signature_rejects_non_bytes() -> None:
    kp = Keypair.generate()
    sig = kp.sign(b"m")
    assert verify_signature(kp.public_key, "m", sig) is False  # type: ignore[arg-type]
    assert verify_signature(kp.public_key.hex(), b"m", sig) is False  # type: ignore[arg-type]


@given(seeds, st.binary(max_size=200))
def test_sign_verify_roundtrip(seed: bytes, message: bytes) -> None:
    kp = Keypair.from_private_bytes(seed)
    assert verify_signature(kp.public_key, message, kp.sign(message))


# --- key files -----------------------------------------------------------------------------------


def test_save_creates_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "key"
    Keypair.generate().save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert stat.S_ISREG(os.stat(path).st_mode)


def test_save_mode_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Keypair.generate().save(tmp_path / "key")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "key").st_mode & 0o777 == 0o600


def test_save_format(tmp_path: Path) -> None:
    kp = Keypair.from_private_bytes(b"\x01" * 32)
    kp.save(str(tmp_path / "key"))
    seed = base64.b64encode(b"\x01" * 32).decode()
    assert (tmp_path / "key").read_text("ascii") == f"{KEY_FILE_HEADER}\n{seed}\n"


def test_save_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("precious")
    with pytest.raises(LibVMSError, match="overwrite"):
        Keypair.generate().save(path)
    assert path.read_text() == "precious"


def test_save_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(LibVMSError):
        Keypair.generate().save(link)
    assert not target.exists()


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LibVMSError):
        Keypair.generate().save(tmp_path / "nope" / "key")


def test_load_roundtrip(tmp_path: Path) -> None:
    kp = Keypair.generate()
    kp.save(tmp_path / "key")
    loaded = Keypair.load(tmp_path / "key")
    assert loaded.private_bytes == kp.private_bytes
    assert loaded.public_key == kp.public_key
    assert loaded.user_id == kp.user_id


def test_load_accepts_missing_final_newline(tmp_path: Path) -> None:
    kp = Keypair.generate()
    seed = base64.b64encode(kp.private_bytes).decode()
    (tmp_path / "key").write_text(f"{KEY_FILE_HEADER}\n{seed}")
    assert Keypair.load(tmp_path / "key").public_key == kp.public_key


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LibVMSError, match="does not exist"):
        Keypair.load(tmp_path / "absent")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(LibVMSError):
        Keypair.load(tmp_path)


_GOOD_SEED = base64.b64encode(b"\x07" * 32).decode()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        f"{KEY_FILE_HEADER}\n".encode(),
        f"{KEY_FILE_HEADER}\n\n".encode(),
        f"{KEY_FILE_HEADER}\nnot base64!\n".encode(),
        f"{KEY_FILE_HEADER}\n{base64.b64encode(b'x' * 31).decode()}\n".encode(),
        f"{KEY_FILE_HEADER}\n{base64.b64encode(b'x' * 33).decode()}\n".encode(),
        f"{KEY_FILE_HEADER}\n{_GOOD_SEED}\nextra\n".encode(),
        f"{KEY_FILE_HEADER}\r\n{_GOOD_SEED}\r\n".encode(),
        f"libvms-ed25519-private-key-v2\n{_GOOD_SEED}\n".encode(),
        f"{KEY_FILE_HEADER}\n {_GOOD_SEED}\n".encode(),
        b"\xff\xfe\n",
        b"x" * 10_000,
    ],
)
def test_load_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(LibVMSError, match="not a libvms private key"):
        Keypair.load(path)


def test_load_good_seed_sanity(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{KEY_FILE_HEADER}\n{_GOOD_SEED}\n")
    assert Keypair.load(tmp_path / "key").private_bytes == b"\x07" * 32


# --- user ids ------------------------------------------------------------------------------------


def test_user_id_form() -> None:
    kp = Keypair.from_private_bytes(b"\x00" * 32)
    uid = kp.user_id
    assert uid.startswith("ed25519:")
    assert len(uid) == len("ed25519:") + 43
    assert "=" not in uid
    assert uid == user_id_for(kp.public_key)
    assert public_key_from_user_id(uid) == kp.public_key
    assert is_signed_user_id(uid)


@given(keys_32)
def test_user_id_roundtrip(public_key: bytes) -> None:
    uid = user_id_for(public_key)
    assert public_key_from_user_id(uid) == public_key
    assert is_signed_user_id(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "alice",
        "ed25519:",
        "ed25519:" + "A" * 42,
        "ed25519:" + "A" * 44,
        "ed25519:" + "A" * 42 + "=",
        "ed25519:" + "A" * 42 + "B",  # non-zero spare bits: not canonical
        "ed25519:" + "A" * 42 + "+",  # standard, not url-safe, alphabet
        "ED25519:" + "A" * 43,
        "ed25519: " + "A" * 43,
        "rsa:" + "A" * 43,
    ],
)
def test_bad_user_ids(uid: str) -> None:
    assert not is_signed_user_id(uid)
    with pytest.raises(ValueError):
        public_key_from_user_id(uid)


def test_is_signed_user_id_non_string() -> None:
    assert not is_signed_user_id(None)  # type: ignore[arg-type]


def test_user_id_for_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        user_id_for(b"\x00" * 31)


# --- verifier keys -------------------------------------------------------------------------------


def test_key_id_formula() -> None:
    pk = bytes(range(32))
    expected = hashlib.sha256(b"example.com/log\n\x01" + pk).digest()[:4]
    assert key_id("example.com/log", pk) == expected


def test_go_example_vkey_parses() -> None:
    vkey = VerifierKey.parse(PETER_VKEY)
    assert vkey.name == "PeterNeumann"
    assert vkey.key_id == bytes.fromhex("c74f20a3")
    assert vkey.to_text() == PETER_VKEY


def test_vkey_text_for_keypair() -> None:
    kp = Keypair.generate()
    text = verifier_key_text("example.com/log", kp.public_key)
    vkey = VerifierKey.parse(text)
    assert vkey == VerifierKey("example.com/log", kp.public_key)
    assert vkey.verify(b"m", kp.sign(b"m"))
    assert not vkey.verify(b"n", kp.sign(b"m"))


def test_vkey_uppercase_hex_accepted() -> None:
    name, hex_id, material = PETER_VKEY.split("+", 2)
    assert VerifierKey.parse(f"{name}+{hex_id.upper()}+{material}").to_text() == PETER_VKEY


@given(key_names, keys_32)
def test_vkey_roundtrip(name: str, public_key: bytes) -> None:
    vkey = VerifierKey(name, public_key)
    assert VerifierKey.parse(vkey.to_text()) == vkey


def _vkey_with(name: str, hex_id: str, material: bytes) -> str:
    return f"{name}+{hex_id}+{base64.b64encode(material).decode()}"


def test_vkey_wrong_key_id() -> None:
    pk = bytes(range(32))
    good = key_id("n", pk)
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ValueError, match="does not match"):
        VerifierKey.parse(_vkey_with("n", bad.hex(), b"\x01" + pk))


def test_vkey_key_id_bound_to_name() -> None:
    rest = PETER_VKEY.split("+", 1)[1]
    with pytest.raises(ValueError, match="does not match"):
        VerifierKey.parse("PaulNeumann+" + rest)


def test_vkey_wrong_algorithm_byte() -> None:
    pk = bytes(range(32))
    # A key id computed for the other algorithm byte, so only the algorithm is wrong.
    hex_id = hashlib.sha256(b"n\n\x02" + pk).digest()[:4].hex()
    with pytest.raises(ValueError, match="algorithm"):
        VerifierKey.parse(_vkey_with("n", hex_id, b"\x02" + pk))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "PeterNeumann",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+c74f20a3+",
        "PeterNeumann+c74f20a3+!!!!",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T",  # truncated
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW ",
        "PeterNeumann+c74f20a3+ ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a33+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+zzzzzzzz+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_vkey_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        VerifierKey.parse(text)


def test_vkey_every_truncation_rejected() -> None:
    for end in range(len(PETER_VKEY)):
        with pytest.raises(ValueError):
            VerifierKey.parse(PETER_VKEY[:end])


def test_vkey_wrong_key_length() -> None:
    short = b"\x01" + bytes(31)
    hex_id = hashlib.sha256(b"n\n" + short).digest()[:4].hex()
    with pytest.raises(ValueError):
        VerifierKey.parse(_vkey_with("n", hex_id, short))


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\tb", "a\nb", "a\x00b", "a\u00a0b", "a\x7fb"])
def test_bad_key_names(name: str) -> None:
    assert not is_valid_key_name(name)
    with pytest.raises(ValueError):
        VerifierKey(name, bytes(32))


def test_verifier_key_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError):
        VerifierKey("n", bytes(33))


# --- ledger URLs ---------------------------------------------------------------------------------


def test_ledger_url_without_location() -> None:
    pk = bytes(range(32))
    url = ledger_url(pk)
    assert url.startswith("libvms:")
    assert len(url) == len("libvms:") + 43
    assert parse_ledger_url(url) == (None, pk)


def test_ledger_url_with_location() -> None:
    pk = bytes(range(32))
    url = ledger_url(pk, "https://example.com/ledgers/alice")
    assert url.startswith("https://example.com/ledgers/alice#")
    assert parse_ledger_url(url) == ("https://example.com/ledgers/alice", pk)
    url = ledger_url(pk, "http://127.0.0.1:8080/")
    assert parse_ledger_url(url) == ("http://127.0.0.1:8080/", pk)


locations = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True),
    st.sampled_from(["", ":80", ":8443"]),
    st.from_regex(r"(/[A-Za-z0-9._~-]{0,10}){0,4}(\?[a-z=&]{0,10})?", fullmatch=True),
)


@given(keys_32, st.none() | locations)
def test_ledger_url_roundtrip(public_key: bytes, location: str | None) -> None:
    url = ledger_url(public_key, location)
    assert parse_ledger_url(url) == (location, public_key)
    assert same_ledger(url, ledger_url(public_key))


@pytest.mark.parametrize(
    "location",
    [
        "ftp://example.com/",
        "example.com/ledger",
        "https://",
        "https:///path",
        "https://example.com/#frag",
        "https://example.com/a b",
        "https://example.com/\n",
        "libvms:x",
    ],
)
def test_ledger_url_bad_location(location: str) -> None:
    with pytest.raises(ValueError):
        ledger_url(bytes(32), location)


def test_ledger_url_wrong_key_length() -> None:
    with pytest.raises(ValueError):
        ledger_url(bytes(31))


_KEY43 = ledger_url(bytes(range(32))).removeprefix("libvms:")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "libvms:",
        "libvms:" + _KEY43[:-1],
        "libvms:" + _KEY43 + "A",
        "libvms:" + _KEY43 + "=",
        "libvms:" + _KEY43 + "#x",
        "https://example.com/",
        "https://example.com/#",
        "https://example.com/#" + _KEY43[:-1],
        "https://example.com/#" + _KEY43 + "#" + _KEY43,
        "ftp://example.com/#" + _KEY43,
        "mailto:x#" + _KEY43,
        _KEY43,
        "ed25519:" + _KEY43,
    ],
)
def test_parse_ledger_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_ledger_url(url)


def test_same_ledger() -> None:
    a, b = bytes(range(32)), bytes(range(1, 33))
    assert same_ledger(ledger_url(a), ledger_url(a, "https://one.example/"))
    assert same_ledger(ledger_url(a, "https://one.example/"), ledger_url(a, "http://two.example/"))
    assert not same_ledger(ledger_url(a), ledger_url(b))
    assert not same_ledger(ledger_url(a), "not a url")
    assert not same_ledger("libvms:", "libvms:")

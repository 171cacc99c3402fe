"""The JSON-RPC message model: parsing requests and replies, error mapping, handshake, bodies."""

import base64
import json

import pytest

from libvms.errors import LimitExceeded, QueueFullError, RPCError, TamperError, VMCallError
from libvms.keys import Keypair, ledger_url, verifier_key_text
from libvms.rpc.protocol import (
    PROTOCOL,
    BackendInfo,
    ErrorCode,
    Rejection,
    Request,
    error_text,
    exception_for,
    format_entries,
    format_proof,
    parse_entries,
    parse_proof,
    parse_request,
    parse_response,
    request_text,
    result_text,
)


def test_a_request_parses():
    text = '{"jsonrpc":"2.0","id":3,"method":"foo","params":[1,"a",null]}'
    assert parse_request(text) == Request(3, "foo", [1, "a", None])
    bare = parse_request('{"jsonrpc":"2.0","id":"x","method":"foo"}')
    assert bare == Request("x", "foo", [])
    assert parse_request('{"jsonrpc":"2.0","id":"x","method":"foo","params":null}') == bare
    note = parse_request('{"jsonrpc":"2.0","method":"foo"}')
    assert isinstance(note, Request) and note.notification and note.id is None
    null_id = parse_request('{"jsonrpc":"2.0","id":null,"method":"foo"}')
    assert isinstance(null_id, Request) and not null_id.notification
    extras = parse_request('{"jsonrpc":"2.0","id":1,"method":"f","user":"bob","signed":{}}')
    assert isinstance(extras, Request)
    assert (extras.user, extras.signed) == ("bob", {})


@pytest.mark.parametrize(
    ("text", "code", "request_id"),
    [
        ("", ErrorCode.PARSE_ERROR, None),
        ("{", ErrorCode.PARSE_ERROR, None),
        ("[" * 65 + "]" * 65, ErrorCode.PARSE_ERROR, None),
        ("[]", ErrorCode.INVALID_REQUEST, None),
        ("1", ErrorCode.INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":true,"method":"f"}', ErrorCode.INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":1.5,"method":"f"}', ErrorCode.INVALID_REQUEST, None),
        ('{"id":1,"method":"f"}', ErrorCode.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":""}', ErrorCode.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","params":{}}', ErrorCode.INVALID_PARAMS, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","params":"x"}', ErrorCode.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","user":""}', ErrorCode.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","user":"' + "u" * 257 + '"}', -32600, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","signed":[]}', ErrorCode.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":"f","extra":1}', ErrorCode.INVALID_REQUEST, 1),
    ],
)
def test_bad_requests_are_rejected(text, code, request_id):
    rejection = parse_request(text)
    assert isinstance(rejection, Rejection)
    assert (rejection.code, rejection.id) == (code, request_id)
    reply = json.loads(rejection.to_text())
    assert reply["id"] == request_id
    assert reply["error"]["code"] == code
    assert reply["error"]["data"]["message"] == rejection.message


def test_a_request_over_the_size_limit_is_a_parse_error():
    text = request_text(1, "f", ["x" * 100])
    assert isinstance(parse_request(text, max_bytes=len(text)), Request)
    rejection = parse_request(text, max_bytes=len(text) - 1)
    assert isinstance(rejection, Rejection) and rejection.code == ErrorCode.PARSE_ERROR


def test_request_text_round_trips():
    text = request_text(4, "add", (1, 2), user="alice", signed={"nonce": "n"})
    assert json.loads(text) == {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "add",
        "params": [1, 2],
        "user": "alice",
        "signed": {"nonce": "n"},
    }
    assert parse_request(text) == Request(4, "add", [1, 2], "alice", {"nonce": "n"})
    with pytest.raises(ValueError):
        request_text(1, "f", [float("nan")])


def test_replies_round_trip():
    ok = parse_response(result_text(1, {"a": [1]}, receipt={"entry": "{}", "proof": "p"}))
    assert (ok.id, ok.result, ok.error) == (1, {"a": [1]}, None)
    assert ok.receipt == {"entry": "{}", "proof": "p"}
    text = error_text("z", ErrorCode.SCRIPT_ERROR, "boom", {"name": "TypeError", "message": "boom"})
    failed = parse_response(text)
    assert failed.id == "z"
    assert isinstance(failed.error, VMCallError)
    assert (failed.error.name, failed.error.message) == ("TypeError", "boom")
    default = json.loads(error_text(None, ErrorCode.NONCE_REUSED, "again"))
    assert default["error"]["data"] == {"name": "NonceReused", "message": "again"}


def test_error_codes_map_to_exceptions():
    script = exception_for(-32000, "m", {"name": "RangeError", "message": "too far"})
    assert type(script) is VMCallError and script.name == "RangeError"
    limit = exception_for(-32001, "m", {"name": "TimeLimit", "message": "slow"})
    assert isinstance(limit, LimitExceeded) and limit.message == "slow"
    full = exception_for(-32002, "busy", {"name": "QueueFullError", "message": "busy"})
    assert isinstance(full, QueueFullError)
    other = exception_for(-32601, "nope", {"name": "MethodNotFound", "message": "nope"})
    assert isinstance(other, RPCError) and other.code == -32601 and other.message == "nope"
    no_data = exception_for(-32000, "m")
    assert isinstance(no_data, RPCError)
    assert {int(c) for c in ErrorCode} >= {-32700, -32600, -32601, -32602, -32603}
    assert all(-32099 <= c <= -32000 for c in ErrorCode if c > -32600)


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        "[]",
        '{"id":1,"result":1}',
        '{"jsonrpc":"2.0","result":1}',
        '{"jsonrpc":"2.0","id":1}',
        '{"jsonrpc":"2.0","id":1,"result":1,"error":{}}',
        '{"jsonrpc":"2.0","id":1,"error":"bad"}',
        '{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}',
        '{"jsonrpc":"2.0","id":1,"result":1,"receipt":"r"}',
        '{"jsonrpc":"2.0","id":1,"result":1,"more":1}',
    ],
)
def test_malformed_replies_are_value_errors(text):
    with pytest.raises(ValueError):
        parse_response(text)


def handshake(**change):
    log, files = Keypair.generate().public_key, Keypair.generate().public_key
    result = {
        "methods": ["foo", "bar"],
        "callLogUrl": ledger_url(log, "http://127.0.0.1:1/log"),
        "filesArchiveUrl": ledger_url(files, "http://127.0.0.1:1/files"),
        "callLogKey": verifier_key_text(ledger_url(log), log),
        "filesArchiveKey": verifier_key_text(ledger_url(files), files),
        "protocol": PROTOCOL,
    }
    result.update(change)
    return result


def test_backend_info_from_a_handshake():
    result = handshake()
    info = BackendInfo.from_handshake(result)
    assert info.methods == ["foo", "bar"]
    assert info.to_handshake() == result
    assert info["files_archive_url"] == info["filesArchiveUrl"] == result["filesArchiveUrl"]
    assert info.get("callLogKey") == result["callLogKey"]
    assert info.get("nope", 5) == 5
    assert "call_log_url" in info and "nope" not in info
    assert info.keys()[0] == "methods"
    assert info.call_log_public_key == info.call_log_verifier.public_key


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"protocol": "libvms/2"}, "protocol"),
        ({"methods": "foo"}, "methods"),
        ({"methods": ["a", "a"]}, "methods"),
        ({"methods": [""]}, "methods"),
        ({"callLogUrl": None}, "URL is missing"),
        ({"callLogUrl": "http://x/log"}, "call log"),
        ({"filesArchiveKey": "junk"}, "files archive"),
    ],
)
def test_bad_handshakes_are_refused(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        BackendInfo.from_handshake(handshake(**change))


def test_a_handshake_whose_keys_do_not_match_its_urls_is_refused():
    one, two = handshake(), handshake()
    with pytest.raises(ValueError, match="does not match"):
        BackendInfo.from_handshake({**one, "callLogKey": two["callLogKey"]})
    with pytest.raises(ValueError, match="not an object"):
        BackendInfo.from_handshake([])


def test_proof_bodies():
    hashes = [bytes([i]) * 32 for i in range(3)]
    body = format_proof(hashes)
    assert body.split(b"\n")[0] == base64.b64encode(hashes[0])
    assert parse_proof(body) == hashes
    assert parse_proof(b"") == []
    for bad in (body[:-1], b"!!!\n", base64.b64encode(b"short") + b"\n", body * 30):
        with pytest.raises(TamperError):
            parse_proof(bad)


def test_entries_bodies():
    entries = [b'{"a":1}', b"{}"]
    body = format_entries(entries)
    assert body == b'{"a":1}\n{}\n'
    assert parse_entries(body, most=2) == entries
    assert parse_entries(b"", most=2) == []
    with pytest.raises(TamperError, match="truncated"):
        parse_entries(body[:-1], most=2)
    with pytest.raises(TamperError, match="more than"):
        parse_entries(body, most=1)

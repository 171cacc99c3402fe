"""A host edits its own call-log database: every edit is caught on open or read."""

import pytest

from libvms import merkle
from libvms.errors import TamperError
from libvms.keys import Keypair
from libvms.log import KEY_FILENAME, CallLog

from .helpers import db_path, flip_bytes_in_file, sql


async def make_log(tmp_path):
    log = await CallLog.create(tmp_path, "exports.x = 1", "libvms:files")
    for i in range(10):
        await log.append_call(method_name="m", args=[i], res=f"result-{i:04d}", files_version=1)
    await log.close()


async def test_honest_log_reopens(tmp_path):
    await make_log(tmp_path)
    log = await CallLog.open(tmp_path)
    assert log.length == 11
    await log.close()


async def test_changed_entry_is_caught_on_open(tmp_path):
    await make_log(tmp_path)
    sql(
        tmp_path,
        "UPDATE call_log_entries SET data = "
        "CAST(replace(data, 'result-0003', 'result-9999') AS BLOB)",
    )
    with pytest.raises(TamperError, match="entry 4 does not match"):
        await CallLog.open(tmp_path)


async def test_changed_entry_with_recomputed_leaf_hash_is_caught(tmp_path):
    await make_log(tmp_path)
    import sqlite3

    conn = sqlite3.connect(db_path(tmp_path))
    (data,) = conn.execute("SELECT data FROM call_log_entries WHERE seq = 4").fetchone()
    forged = bytes(data).replace(b"result-0003", b"result-9999")
    conn.execute(
        "UPDATE call_log_entries SET data = ?, leaf = ? WHERE seq = 4",
        (forged, merkle.leaf_hash(forged)),
    )
    conn.commit()
    conn.close()
    with pytest.raises(TamperError, match="signed checkpoint"):
        await CallLog.open(tmp_path)


@pytest.mark.parametrize("value", ["'abc'", "X'00'", "42"])
async def test_a_mangled_public_key_is_caught(tmp_path, value):
    await make_log(tmp_path)
    sql(tmp_path, f"UPDATE meta SET value = {value} WHERE key = 'call_log.public_key'")
    with pytest.raises(TamperError, match="public key"):
        await CallLog.open(tmp_path)


async def test_dropped_last_entry_is_caught(tmp_path):
    await make_log(tmp_path)
    sql(tmp_path, "DELETE FROM call_log_entries WHERE seq = 10")
    with pytest.raises(TamperError, match="checkpoint"):
        await CallLog.open(tmp_path)


async def test_dropped_middle_entry_is_caught(tmp_path):
    await make_log(tmp_path)
    sql(tmp_path, "DELETE FROM call_log_entries WHERE seq = 5")
    with pytest.raises(TamperError, match="missing"):
        await CallLog.open(tmp_path)


async def test_forged_checkpoint_signature_is_caught(tmp_path):
    await make_log(tmp_path)
    sql(
        tmp_path,
        "UPDATE meta SET value = CAST(replace(value, char(10) || '11' || char(10), "
        "char(10) || '12' || char(10)) AS BLOB) WHERE key = 'call_log.checkpoint'",
    )
    with pytest.raises(TamperError):
        await CallLog.open(tmp_path)


async def test_checkpoint_signed_by_another_key_is_caught(tmp_path):
    await make_log(tmp_path)
    (tmp_path / KEY_FILENAME).unlink()
    Keypair.generate().save(tmp_path / KEY_FILENAME)
    with pytest.raises(TamperError):
        await CallLog.open(tmp_path)


async def test_flipped_bit_in_the_database_file_is_caught(tmp_path):
    await make_log(tmp_path)
    flip_bytes_in_file(db_path(tmp_path), b"result-0007")
    with pytest.raises(TamperError):
        await CallLog.open(tmp_path)


async def test_entry_changed_after_open_is_caught_on_read(tmp_path):
    await make_log(tmp_path)
    log = await CallLog.open(tmp_path)
    sql(
        tmp_path,
        "UPDATE call_log_entries SET data = "
        "CAST(replace(data, 'result-0002', 'result-7777') AS BLOB)",
    )
    with pytest.raises(TamperError, match="changed on disk"):
        await log.get(3)
    with pytest.raises(TamperError):
        await log.list()
    assert (await log.get(2))["result"]["res"] == "result-0001"
    await log.close()


async def test_entry_stored_as_text_is_caught(tmp_path):
    await make_log(tmp_path)
    sql(tmp_path, "UPDATE call_log_entries SET data = replace(data, 'result-0003', 'result-9')")
    with pytest.raises(TamperError, match="not stored as bytes"):
        await CallLog.open(tmp_path)

"""A host edits its files-archive database: altered blobs or entries are caught."""

import sqlite3

import pytest

from libvms.archive import FilesArchive
from libvms.errors import TamperError

from .helpers import db_path, flip_bytes_in_file, sql


async def make_archive(tmp_path):
    archive = await FilesArchive.create(tmp_path, "t")
    await archive.write_file("/secret.txt", "the original content of the file")
    await archive.write_file("/other.txt", "something else entirely")
    await archive.close()


async def test_blob_changed_on_disk_is_caught_on_open(tmp_path):
    await make_archive(tmp_path)
    flip_bytes_in_file(db_path(tmp_path), b"the original content")
    with pytest.raises(TamperError, match="blob"):
        await FilesArchive.open(tmp_path)


async def test_blob_changed_after_open_is_caught_on_read(tmp_path):
    await make_archive(tmp_path)
    archive = await FilesArchive.open(tmp_path)
    sql(tmp_path, "UPDATE blobs SET data = CAST('forged' AS BLOB)")
    with pytest.raises(TamperError, match="does not match its hash"):
        await archive.read_file("/secret.txt")
    await archive.close()


async def test_missing_blob_is_caught(tmp_path):
    await make_archive(tmp_path)
    sql(tmp_path, "DELETE FROM blobs")
    with pytest.raises(TamperError, match="missing"):
        await FilesArchive.open(tmp_path)


async def test_entry_pointing_to_another_blob_is_caught(tmp_path):
    await make_archive(tmp_path)
    conn = sqlite3.connect(db_path(tmp_path))
    rows = conn.execute("SELECT seq, data FROM files_archive_entries").fetchall()
    conn.close()
    assert len(rows) == 3
    sql(
        tmp_path,
        "UPDATE files_archive_entries SET data = replace(data, '/other.txt', '/other.TXT')",
    )
    with pytest.raises(TamperError):
        await FilesArchive.open(tmp_path)


async def test_every_zeroed_page_of_a_vms_database_is_a_clear_error_or_harmless(tmp_path):
    # Whatever page a disk loses, reopening says so as a LibVMSError (or the page
    # held nothing the VM reads): never a raw sqlite3 error, never changed history.
    import shutil

    from libvms.errors import LibVMSError
    from libvms.vm import BackendVM

    code = "exports.put = async (p, c) => { await System.files.writeFile(p, c); return p }"
    source = tmp_path / "vm"
    vm = BackendVM(code)
    await vm.deploy(dir=source)
    for i in range(40):
        await vm.execute_call("put", [f"/f{i}", "q" * (i * 12)])
    await vm.close()
    pages = (source / "libvms.db").stat().st_size // 4096
    outcomes = set()
    for page in range(1, pages):
        copy = tmp_path / f"page{page}"
        shutil.copytree(source, copy)
        with open(copy / "libvms.db", "r+b") as db:
            db.seek(page * 4096)
            db.write(bytes(4096))
        again = BackendVM(code)
        try:
            await again.deploy(dir=copy)
        except LibVMSError as exc:
            outcomes.add(type(exc).__name__)
            continue
        assert await again.files_archive.read_file("/f39") == "q" * 468
        assert again.call_log.length == 41
        await again.close()
        outcomes.add("reopened")
    assert "TamperError" in outcomes

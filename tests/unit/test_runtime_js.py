"""The JavaScript runtime: exports, calls, determinism, host bridge, sandbox, limits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from libvms.encoding import MAX_DEPTH, canonical
from libvms.errors import EncodingError, LimitExceeded, ScriptError, VMCallError
from libvms.runtime import (
    ENGINE_NAME,
    ENGINE_VERSION,
    PRELUDE_VERSION,
    CallOutcome,
    HostError,
    JSRuntime,
)

TS = 1_700_000_000_000


class FakeHost:
    """Records every request; answers from a table of op -> value or callable."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = answers or {}
        self.requests: list[tuple[str, list[Any]]] = []

    async def __call__(self, op: str, args: list[Any]) -> Any:
        self.requests.append((op, args))
        answer = self.answers.get(op)
        if callable(answer):
            answer = answer(args)
            if asyncio.iscoroutine(answer):
                answer = await answer
        if isinstance(answer, Exception):
            raise answer
        return answer


def runtime(code: str, **kwargs: Any) -> JSRuntime:
    rt = JSRuntime(**kwargs)
    rt.load(code, timestamp_ms=TS, seed=b"load")
    return rt


async def call(
    rt: JSRuntime,
    method: str,
    *args: Any,
    host: Any = None,
    caller_id: str | None = None,
    timestamp_ms: int = TS,
    seed: bytes = b"seed",
) -> CallOutcome:
    return await rt.call(
        method,
        list(args),
        caller_id=caller_id,
        timestamp_ms=timestamp_ms,
        seed=seed,
        host=host if host is not None else FakeHost(),
    )


async def value(rt: JSRuntime, method: str, *args: Any, **kwargs: Any) -> Any:
    outcome = await call(rt, method, *args, **kwargs)
    assert outcome.error is None, outcome.error
    assert outcome.has_value
    return outcome.value


def test_engine_constants() -> None:
    assert ENGINE_NAME == "quickjs-ng"
    assert ENGINE_VERSION and ENGINE_VERSION[0].isdigit()
    assert PRELUDE_VERSION


# ----------------------------------------------------------------------- exports


def test_export_names_in_key_order() -> None:
    rt = runtime(
        """
        exports.b = () => 1;
        exports.a = 42;
        exports[2] = 'two';
        exports.c = async function () {};
        exports.d = {x: [1, 2]};
        Object.defineProperty(exports, 'hidden', {value: () => 1, enumerable: false});
        Object.defineProperty(exports, 'getter', {
          get() { throw new Error('ran'); },
          enumerable: true,
        });
        """
    )
    assert rt.export_names() == [
        ("2", False),
        ("b", True),
        ("a", False),
        ("c", True),
        ("d", False),
        ("getter", False),
    ]
    assert rt.export_value("a") == 42
    assert rt.export_value("2") == "two"
    assert rt.export_value("d") == {"x": [1, 2]}
    with pytest.raises(EncodingError):
        rt.export_value("b")
    with pytest.raises(EncodingError):
        rt.export_value("getter")
    with pytest.raises(VMCallError) as info:
        rt.export_value("missing")
    assert info.value.name == "NotFound"


def test_module_exports_replacement() -> None:
    rt = runtime(
        """
        exports.lost = () => 'lost';
        module.exports = { second: () => 2, first: () => 1, version: '1.0', nan: NaN };
        """
    )
    assert rt.export_names() == [
        ("second", True),
        ("first", True),
        ("version", False),
        ("nan", False),
    ]
    assert rt.export_value("version") == "1.0"
    with pytest.raises(EncodingError, match="NaN"):
        rt.export_value("nan")


async def test_this_at_top_level_is_exports() -> None:
    rt = runtime("this.viaThis = () => 'this'; exports.same = () => this === module.exports;")
    assert await value(rt, "viaThis") == "this"
    assert await value(rt, "same") is True


async def test_unknown_or_non_function_method() -> None:
    rt = runtime(
        "exports.v = 1; exports.f = () => 1; Object.defineProperty(exports, 'h', {value: () => 1});"
    )
    for name in ("missing", "v", "h", "toString", "__proto__", "constructor"):
        with pytest.raises(VMCallError) as info:
            await call(rt, name)
        assert info.value.name == "MethodNotFound"
    assert not rt.broken
    assert await value(rt, "f") == 1


async def test_method_names_with_nul_and_surrogates() -> None:
    rt = runtime("exports['a\\u0000b'] = () => 'nul'; exports['\\ud800'] = () => 'lone';")
    assert await value(rt, "a\x00b") == "nul"
    assert await value(rt, "\ud800") == "lone"
    with pytest.raises(VMCallError):
        await call(rt, "a")


# ------------------------------------------------------------------------- calls


async def test_sync_async_and_closures() -> None:
    rt = runtime(
        """
        let count = 0;
        exports.add = (a, b) => a + b;
        exports.inc = () => ++count;
        exports.asyncAdd = async (a, b) => { await null; return a + b; };
        exports.echo = (...args) => args;
        exports.nothing = () => {};
        exports.asyncNothing = async () => {};
        """
    )
    assert await value(rt, "add", 1, 2) == 3
    assert await value(rt, "add", "a", "b") == "ab"
    assert await value(rt, "inc") == 1
    assert await value(rt, "inc") == 2
    assert await value(rt, "asyncAdd", 2, 3) == 5
    assert await value(rt, "echo", {"a": [1, None, "x\x00y"]}, "é😀", 2**53 - 1, 0.5) == [
        {"a": [1, None, "x\x00y"]},
        "é😀",
        2**53 - 1,
        0.5,
    ]
    for name in ("nothing", "asyncNothing"):
        outcome = await call(rt, name)
        assert outcome == CallOutcome()


async def test_errors_and_rejections() -> None:
    rt = runtime(
        """
        class MyError extends Error { constructor(m) { super(m); this.name = 'MyError'; } }
        exports.throwType = () => { throw new TypeError('bad type'); };
        exports.throwCustom = () => { throw new MyError('mine'); };
        exports.reject = async () => { throw new RangeError('async bad'); };
        exports.rejectLater = () =>
          new Promise((_, rej) => setTimeout(() => rej(new Error('later')), 5));
        exports.throwString = () => { throw 'plain string'; };
        exports.throwNumber = () => Promise.reject(42);
        exports.throwObject = () => { throw {name: 'NotAnError', message: 'm'}; };
        exports.throwUnprintable = () => { throw {toString() { throw new Error('no') }}; };
        exports.lone = () => { throw new Error('\\ud800'); };
        """
    )
    expected = {
        "throwType": ("TypeError", "bad type"),
        "throwCustom": ("MyError", "mine"),
        "reject": ("RangeError", "async bad"),
        "rejectLater": ("Error", "later"),
        "throwString": ("Error", "plain string"),
        "throwNumber": ("Error", "42"),
        "throwObject": ("Error", "[object Object]"),
        "throwUnprintable": ("Error", "<the thrown value could not be converted to a string>"),
        "lone": ("Error", "\ufffd"),
    }
    for name, error in expected.items():
        outcome = await call(rt, name)
        assert outcome.error == error, name
        assert not outcome.has_value
    assert not rt.broken


async def test_non_json_results_are_errors() -> None:
    rt = runtime("exports.r = (src) => (0, eval)(src);")
    bad = {
        "NaN": "NaN",
        "[1, Infinity]": "Infinity",
        "10n": "BigInt",
        "({a: {b: 1n}})": "result.a.b",
        "[undefined]": "undefined inside an array",
        "[function () {}]": "function",
        "({f() {}})": "result.f",
        "({s: Symbol()})": "symbol",
        "(() => { const a = {}; a.a = a; return a; })()": "cycle",
        "new Map()": "Map",
        "({s: new Set()})": "Set",
        "new Uint8Array(2)": "binary",
        "new Error('e')": "Error",
        "/re/": "RegExp",
        "'\\udc00'": "lone surrogate",
        "({'\\ud800': 1})": "lone surrogate",
        "[new Number(NaN)]": "NaN",
        f"(() => {{ let v = 1; for (let i = 0; i <= {MAX_DEPTH}; i++) v = [v]; return v; }})()": (
            "nested deeper"
        ),
    }
    for src, fragment in bad.items():
        outcome = await call(rt, "r", src)
        assert outcome.error is not None, src
        assert outcome.error[0] == "EncodingError", (src, outcome.error)
        assert fragment in outcome.error[1], (src, outcome.error)
    good = {
        "({a: 1, b: undefined})": {"a": 1},
        "new Date(0)": "1970-01-01T00:00:00.000Z",
        "({toJSON() { return [1]; }})": [1],
        "new (class { constructor() { this.x = 1; } })()": {"x": 1},
        "Object.assign(Object.create(null), {k: 'v'})": {"k": "v"},
        "-0": 0,
        "2 ** 60": float(2**60),
        "'\\\\ud800 is an escaped backslash'": "\\ud800 is an escaped backslash",
        f"(() => {{ let v = 1; for (let i = 0; i < {MAX_DEPTH}; i++) v = [v]; return v; }})()": (
            None
        ),
    }
    for src, expected in good.items():
        outcome = await call(rt, "r", src)
        assert outcome.error is None, (src, outcome.error)
        if expected is not None:
            assert outcome.value == expected, src
        canonical(outcome.value)
    assert (await call(rt, "r", "({toJSON() { return undefined; }})")) == CallOutcome()


async def test_large_values_cross_every_path() -> None:
    # Long strings built by concatenation are ropes inside the engine.
    rt = runtime(
        """
        const big = () => Array.from({length: 3000}, (_, i) => ({i, s: 'x'.repeat(i % 7)}));
        exports.sync = () => big();
        exports.async = async () => big();
        exports.logs = () => { console.log('y'.repeat(5000) + 'z'); return 1; };
        exports.request = async () => (await System.oracles.echo(big())).length;
        """
    )
    expected = [{"i": i, "s": "x" * (i % 7)} for i in range(3000)]
    assert await value(rt, "sync") == expected
    assert await value(rt, "async") == expected
    assert await value(rt, "logs") == 1
    host = FakeHost({"oracle": lambda args: args[1][0]})
    assert await value(rt, "request", host=host) == 3000
    assert host.requests[0][1][1][0] == expected


# ---------------------------------------------------------------- clock & random

CLOCK_SCRIPT = """
exports.now = () => [Date.now(), new Date().getTime(), typeof Date(), Date()];
exports.utc = () => {
  const d = new Date(2021, 6, 4, 23, 30, 15, 250);
  return [d.getTime(), d.getHours(), d.getUTCHours(), d.getDate(), d.getDay(), d.getMonth(),
          d.getFullYear(), d.getMinutes(), d.getSeconds(), d.getMilliseconds(), d.getYear(),
          d.getTimezoneOffset(), d.toString(), d.toDateString(), d.toTimeString(),
          d.toLocaleString(), d.toLocaleDateString(), d.toLocaleTimeString('de-DE'),
          d.toUTCString(), d.toISOString(), JSON.stringify(d), String(d), `${d}`];
};
exports.parse = (s) => Date.parse(s);
exports.setters = () => {
  const d = new Date(0);
  d.setHours(5); d.setMinutes(6); d.setDate(7); d.setMonth(8); d.setFullYear(1999); d.setYear(98);
  return [d.toISOString(), new Date(NaN).toString(), String(new Date(NaN).getTimezoneOffset())];
};
exports.subclass = () => {
  class D extends Date {}
  const d = new D(5);
  return [d instanceof Date, d.getTime()];
};
"""


async def test_virtual_clock() -> None:
    rt = runtime(CLOCK_SCRIPT)
    now = await value(rt, "now", timestamp_ms=TS)
    assert now[:3] == [TS, TS, "string"]
    assert now[3] == "Tue Nov 14 2023 22:13:20 GMT+0000"
    assert (await value(rt, "now", timestamp_ms=5))[0] == 5


async def test_date_is_utc_only() -> None:
    rt = runtime(CLOCK_SCRIPT)
    utc = await value(rt, "utc")
    assert utc == [
        1625441415250,
        23,
        23,
        4,
        0,
        6,
        2021,
        30,
        15,
        250,
        121,
        0,
        "Sun Jul 04 2021 23:30:15 GMT+0000",
        "Sun Jul 04 2021",
        "23:30:15 GMT+0000",
        "07/04/2021, 11:30:15 PM",
        "07/04/2021",
        "11:30:15 PM",
        "Sun, 04 Jul 2021 23:30:15 GMT",
        "2021-07-04T23:30:15.250Z",
        '"2021-07-04T23:30:15.250Z"',
        "Sun Jul 04 2021 23:30:15 GMT+0000",
        "Sun Jul 04 2021 23:30:15 GMT+0000",
    ]
    assert await value(rt, "setters") == ["1998-09-07T05:06:00.000Z", "Invalid Date", "NaN"]
    assert await value(rt, "subclass") == [True, 5]


async def test_date_parse_without_zone_is_utc() -> None:
    rt = runtime(CLOCK_SCRIPT)
    ten = 1577872800000  # 2020-01-01T10:00:00Z
    cases = {
        "2020-01-01T10:00": ten,
        "2020-01-01T10:00:00": ten,
        "2020-01-01 10:00": ten,
        "2020-01-01T10:00:00Z": ten,
        "2020-01-01T15:00:00+05:00": ten,
        "Jan 1 2020 10:00": ten,
        "Wed, 01 Jan 2020 10:00:00 GMT": ten,
        "Wed Jan 01 2020 10:00:00 GMT+0000": ten,
        "Wed Jan 01 2020 05:00:00 GMT-0500 (Eastern Standard Time)": ten,
        "Jan 1, 2020 10:00 AM": ten,
        "1/1/2020 10:00": ten,
        "2020/01/01 10:00": ten,
        "Jan 1 2020 05:00 EST": ten,
        "2020-01-01": ten - 10 * 3600_000,
    }
    for text, expected in cases.items():
        assert await value(rt, "parse", text) == expected, text
    assert (await call(rt, "parse", "not a date")).value is None  # NaN is not JSON
    assert (await call(rt, "parse", "not a date")).error is not None


async def test_random_depends_on_seed_only() -> None:
    code = "exports.r = () => [Math.random(), Math.random(), Math.random()];"
    rt1, rt2 = runtime(code), runtime(code)
    a = await value(rt1, "r", seed=b"one")
    assert await value(rt1, "r", seed=b"one") == a  # reseeded for every call
    assert await value(rt2, "r", seed=b"one", timestamp_ms=1) == a
    b = await value(rt1, "r", seed=b"two")
    assert a != b
    assert all(0 <= x < 1 for x in a + b)
    assert len(set(a)) == 3


async def test_random_at_load_is_seeded() -> None:
    code = "const r = Math.random(); exports.r = () => r;"
    rt1 = JSRuntime()
    rt1.load(code, timestamp_ms=0, seed=b"x")
    rt2 = JSRuntime()
    rt2.load(code, timestamp_ms=0, seed=b"x")
    rt3 = JSRuntime()
    rt3.load(code, timestamp_ms=0, seed=b"y")
    assert await value(rt1, "r") == await value(rt2, "r") != await value(rt3, "r")


# ------------------------------------------------------------------------ timers


async def test_timers_run_in_virtual_time_order() -> None:
    rt = runtime(
        """
        exports.order = () => new Promise((resolve) => {
          const seen = [];
          const at = (tag) => () => seen.push(tag + '@' + (Date.now() - START));
          const START = Date.now();
          setTimeout(at('c30'), 30);
          setTimeout(at('a10'), 10);
          setTimeout(at('b10'), 10);
          setTimeout(() => { at('n20')(); setTimeout(at('nested+5'), 5); }, 20);
          setTimeout(at('zero'), 0);
          setTimeout(at('neg'), -5);
          const cancelled = setTimeout(at('cancelled'), 15);
          clearTimeout(cancelled);
          queueMicrotask(() => seen.push('micro'));
          Promise.resolve().then(() => seen.push('then'));
          setTimeout(() => resolve(seen), 100);
        });
        exports.interval = () => new Promise((resolve) => {
          const ticks = [];
          const START = Date.now();
          const id = setInterval(() => {
            ticks.push(Date.now() - START);
            if (ticks.length === 4) { clearInterval(id); resolve(ticks); }
          }, 0);
        });
        exports.withArgs = () => new Promise((resolve) => setTimeout(resolve, 7, 'arg'));
        """
    )
    assert await value(rt, "order") == [
        "micro",
        "then",
        "zero@0",
        "neg@0",
        "a10@10",
        "b10@10",
        "n20@20",
        "nested+5@25",
        "c30@30",
    ]
    outcome = await call(rt, "order")
    assert outcome.virtual_ms == 100
    assert await value(rt, "interval") == [1, 2, 3, 4]
    outcome = await call(rt, "withArgs")
    assert outcome.value == "arg"
    assert outcome.virtual_ms == 7


async def test_timers_do_not_outlive_their_call() -> None:
    rt = runtime(
        """
        let fired = 0;
        setTimeout(() => { fired += 100; }, 1);          // at load: never fires
        exports.arm = () => {
          setTimeout(() => { fired++; }, 1);
          setInterval(() => { fired++; }, 1);
        };
        exports.settleFirst = async () => { setTimeout(() => { fired++; }, 0); return 'done'; };
        exports.wait = () => new Promise((r) => setTimeout(() => r(fired), 50));
        """
    )
    assert (await call(rt, "arm")).virtual_ms == 0
    assert (await call(rt, "settleFirst")).value == "done"
    outcome = await call(rt, "wait")
    assert outcome.value == 0
    assert outcome.virtual_ms == 50


async def test_unsettled_promise_is_an_error() -> None:
    rt = runtime(
        """
        exports.never = () => new Promise(() => {});
        exports.afterTimers = () => new Promise(() => { setTimeout(() => {}, 40); });
        exports.throwInTimer = () =>
          new Promise(() => { setTimeout(() => { throw new Error('t'); }, 1); });
        """
    )
    outcome = await call(rt, "never")
    assert outcome.error is not None and outcome.error[0] == "UnsettledError"
    outcome = await call(rt, "afterTimers")
    assert outcome.error is not None and outcome.error[0] == "UnsettledError"
    assert outcome.virtual_ms == 40
    outcome = await call(rt, "throwInTimer")
    assert outcome.error is not None and outcome.error[0] == "UnsettledError"
    assert not rt.broken


# ---------------------------------------------------------------------- the host


async def test_host_requests_in_fifo_order() -> None:
    rt = runtime(
        """
        exports.many = async () => {
          const a = System.files.readFile('/a');
          const b = System.oracles.price('BTC', 2);
          const c = (async () => { await null; return System.files.stat('/c'); })();
          const d = new Promise((r) => setTimeout(r, 5)).then(() => System.files.readdir('/'));
          const e = System.files.writeFile('/e', 'text');
          return Promise.all([a, b, c, d, e]).then((all) => all.map((x) => typeof x));
        };
        """
    )
    host = FakeHost(
        {
            "files.readFile": "A",
            "oracle": 7,
            "files.stat": {"type": "file", "size": 1, "mtime": 0},
            "files.readdir": ["a"],
            "files.writeFile": None,
        }
    )
    assert await value(rt, "many", host=host) == ["string", "number", "object", "object", "object"]
    assert host.requests == [
        ("files.readFile", ["/a", "utf8"]),
        ("oracle", ["price", ["BTC", 2]]),
        ("files.writeFile", ["/e", "text", "utf8"]),
        ("files.stat", ["/c"]),
        ("files.readdir", ["/"]),
    ]


async def test_requests_are_served_one_at_a_time() -> None:
    rt = runtime(
        """
        exports.chain = async () => {
          const order = [];
          const one = System.oracles.slow().then((v) => {
            order.push(v);
            return System.oracles.after1();
          });
          const two = System.oracles.fast().then((v) => order.push(v));
          await Promise.all([one, two]);
          return order;
        };
        """
    )
    active = 0
    seen: list[str] = []

    async def answer(args: list[Any]) -> str:
        nonlocal active
        active += 1
        assert active == 1
        await asyncio.sleep(0.001)
        active -= 1
        seen.append(args[0])
        return str(args[0])

    host = FakeHost({"oracle": answer})
    assert await value(rt, "chain", host=host) == ["slow", "fast"]
    # after1 was asked after slow settled, behind fast that was already queued.
    assert seen == ["slow", "fast", "after1"]


async def test_host_error_rejects_with_named_error() -> None:
    rt = runtime(
        """
        exports.read = async (path) => {
          try { return await System.files.readFile(path); }
          catch (e) { return [e instanceof Error, e.name, e.message]; }
        };
        exports.uncaught = () => System.files.readFile('/nope');
        """
    )
    host = FakeHost({"files.readFile": HostError("NotFoundError", "/nope does not exist")})
    assert await value(rt, "read", "/nope", host=host) == [
        True,
        "NotFoundError",
        "/nope does not exist",
    ]
    outcome = await call(rt, "uncaught", host=host)
    assert outcome.error == ("NotFoundError", "/nope does not exist")
    assert not rt.broken


async def test_host_bug_propagates_and_breaks() -> None:
    rt = runtime("exports.f = () => System.oracles.x();")
    host = FakeHost({"oracle": KeyError("bug")})
    with pytest.raises(KeyError):
        await call(rt, "f", host=host)
    assert rt.broken
    with pytest.raises(RuntimeError):
        await call(rt, "f")


async def test_host_result_not_json_breaks() -> None:
    rt = runtime("exports.f = () => System.oracles.x();")
    with pytest.raises(EncodingError):
        await call(rt, "f", host=FakeHost({"oracle": float("nan")}))
    assert rt.broken


async def test_files_api_conversions() -> None:
    rt = runtime(
        """
        exports.stat = async () => {
          const s = await System.files.stat('/f');
          const d = await System.files.stat('/d');
          return [s.size, s.isFile(), s.isDirectory(), s.mtime instanceof Date, s.mtime.getTime(),
                  d.isFile(), d.isDirectory(), Object.keys(s), JSON.parse(JSON.stringify(s))];
        };
        exports.read = async () => {
          const text = await System.files.readFile('/f');
          const text2 = await System.files.readFile('/f', {encoding: 'utf-8'});
          const bin = await System.files.readFile('/f', 'binary');
          const b64 = await System.files.readFile('/f', {encoding: 'base64'});
          const hex = await System.files.readFile('/f', 'hex');
          return [text, text2, bin instanceof Uint8Array, Array.from(bin), b64, hex];
        };
        exports.write = async () => {
          await System.files.writeFile('/a', 'text');
          await System.files.writeFile('/b', 'aGk=', 'base64');
          await System.files.writeFile('/c', '6869', {encoding: 'hex'});
          await System.files.writeFile('/d', new Uint8Array([0, 1, 255]));
          await System.files.writeFile('/e', new Uint16Array([1]).buffer);
          await System.files.writeFile('/f', new DataView(new Uint8Array([9, 8, 7]).buffer, 1, 2));
          const errs = [];
          for (const bad of [() => System.files.writeFile('/g', 42),
                             () => System.files.writeFile('/g', 'x', 'binary'),
                             () => System.files.readFile('/g', 'latin9')]) {
            try { await bad(); } catch (e) { errs.push(e.name); }
          }
          return errs;
        };
        exports.other = async () => [
          await System.files.getInfo(),
          await System.files.readdir('/', {stat: true}),
          await System.files.mkdir('/m'),
          await System.files.unlink('/u'),
          await System.files.rmdir('/r', {recursive: true}),
          await System.files.history({start: 0}),
        ];
        """
    )

    def stat(args: list[Any]) -> dict[str, Any]:
        if args[0] == "/d":
            return {"type": "directory", "size": 0, "mtime": 0}
        return {"type": "file", "size": 3, "mtime": 1000}

    def read(args: list[Any]) -> Any:
        return {"utf8": "hi\x00", "binary": b"\x00hi", "base64": "AGhp", "hex": "006869"}[args[1]]

    host = FakeHost(
        {
            "files.stat": stat,
            "files.readFile": read,
            "files.getInfo": {"title": "t", "version": 3},
            "files.readdir": [{"name": "a", "stat": {"type": "file", "size": 1, "mtime": 5}}],
        }
    )
    assert await value(rt, "stat", host=host) == [
        3,
        True,
        False,
        True,
        1000,
        False,
        True,
        ["type", "size", "mtime"],
        {"type": "file", "size": 3, "mtime": "1970-01-01T00:00:01.000Z"},
    ]
    assert await value(rt, "read", host=host) == [
        "hi\x00",
        "hi\x00",
        True,
        [0, 104, 105],
        "AGhp",
        "006869",
    ]
    assert [args[1] for op, args in host.requests if op == "files.readFile"] == [
        "utf8",
        "utf8",
        "binary",
        "base64",
        "hex",
    ]
    host.requests.clear()
    assert await value(rt, "write", host=host) == ["TypeError", "TypeError", "TypeError"]
    assert host.requests == [
        ("files.writeFile", ["/a", "text", "utf8"]),
        ("files.writeFile", ["/b", "aGk=", "base64"]),
        ("files.writeFile", ["/c", "6869", "hex"]),
        ("files.writeFile", ["/d", b"\x00\x01\xff", "binary"]),
        ("files.writeFile", ["/e", b"\x01\x00", "binary"]),
        ("files.writeFile", ["/f", b"\x08\x07", "binary"]),
    ]
    host.requests.clear()
    other = await value(rt, "other", host=host)
    assert other[0] == {"title": "t", "version": 3}
    assert other[1] == [
        {"name": "a", "stat": {"type": "file", "size": 1, "mtime": "1970-01-01T00:00:00.005Z"}}
    ]
    assert host.requests[1:] == [
        ("files.readdir", ["/", {"stat": True}]),
        ("files.mkdir", ["/m"]),
        ("files.unlink", ["/u"]),
        ("files.rmdir", ["/r", {"recursive": True}]),
        ("files.history", [{"start": 0}]),
    ]


async def test_bytes_markers_are_unambiguous() -> None:
    rt = runtime(
        """
        exports.send = () => System.oracles.o(
          {$bytes: 'not bytes'}, {$object: 1}, new Uint8Array([1]),
          [{$bytes: new Uint8Array([2])}]);
        exports.back = async () => {
          const v = await System.oracles.o();
          return [v.a instanceof Uint8Array, Array.from(v.a), v.b, v.c];
        };
        exports.badArg = async () => {
          try { await System.oracles.o(NaN); } catch (e) { return [e.name, e.message]; }
        };
        """
    )
    host = FakeHost({"oracle": None})
    await call(rt, "send", host=host)
    assert host.requests == [
        ("oracle", ["o", [{"$bytes": "not bytes"}, {"$object": 1}, b"\x01", [{"$bytes": b"\x02"}]]])
    ]
    host = FakeHost({"oracle": {"a": b"\x05\x06", "b": {"$bytes": "x"}, "c": {"$object": [1]}}})
    assert await value(rt, "back", host=host) == [True, [5, 6], {"$bytes": "x"}, {"$object": [1]}]
    host = FakeHost()
    assert await value(rt, "badArg", host=host) == [
        "EncodingError",
        "arguments is not JSON: NaN is not a JSON number at arguments[1][0]",
    ]
    assert host.requests == []


async def test_caller_id() -> None:
    rt = runtime(
        """
        exports.who = async () => {
          await null;
          return [System.caller.id ?? null, 'id' in System.caller];
        };
        exports.atLoad = () => atLoad;
        const atLoad = System.caller.id === undefined;
        """
    )
    assert await value(rt, "who", caller_id="alice") == ["alice", True]
    assert await value(rt, "who", caller_id=None) == [None, False]
    assert await value(rt, "who", caller_id="b\x00é") == ["b\x00é", True]
    assert await value(rt, "atLoad") is True


async def test_requests_at_load_are_refused() -> None:
    rt = runtime(
        """
        let refused = null;
        System.files.readFile('/x').catch((e) => { refused = [e.name, e.message]; });
        exports.refused = () => refused;
        """
    )
    refused = await value(rt, "refused")
    assert refused[0] == "UnavailableError"


async def test_console_reaches_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="libvms.vm"):
        rt = runtime("console.log('loading', 1); exports.f = () => { console.log('calling'); };")
        await call(rt, "f")
    assert [r.getMessage() for r in caplog.records if r.name == "libvms.vm"] == [
        "console.log: loading 1",
        "console.log: calling",
    ]


async def test_console_levels_and_bound(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("libvms.test.console2")
    rt = JSRuntime(logger=logger)
    rt.load(
        """
        exports.levels = async () => {
          console.log('a', {x: 1}, [1, 2], null, undefined, 3n);
          console.info('b'); console.warn('c'); console.error(new TypeError('d'));
          await null;
          console.debug('e');
          return 1;
        };
        exports.flood = () => { for (let i = 0; i < 1500; i++) console.log('line ' + i); };
        """,
        timestamp_ms=0,
        seed=b"",
    )
    with caplog.at_level(logging.DEBUG, logger="libvms.test.console2"):
        await call(rt, "levels")
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert records[0] == (logging.INFO, 'console.log: a {"x":1} [1,2] null undefined 3')
    assert records[1] == (logging.INFO, "console.info: b")
    assert records[2] == (logging.WARNING, "console.warn: c")
    assert records[3][0] == logging.ERROR and records[3][1].startswith(
        "console.error: TypeError: d"
    )
    assert records[4] == (logging.DEBUG, "console.debug: e")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="libvms.test.console2"):
        await call(rt, "flood")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1001
    assert messages[999] == "console.log: line 999"
    assert "500 more console lines were dropped" in messages[1000]


# ------------------------------------------------------------------------ sandbox

ALLOWED_GLOBALS = {
    "AggregateError", "Array", "ArrayBuffer", "AsyncDisposableStack", "BigInt", "BigInt64Array",
    "BigUint64Array", "Boolean", "DOMException", "DataView", "Date", "DisposableStack", "Error",
    "EvalError", "Float16Array", "Float32Array", "Float64Array", "Function", "Infinity",
    "Int16Array", "Int32Array", "Int8Array", "InternalError", "Iterator", "JSON", "Map", "Math",
    "NaN", "Number", "Object", "Promise", "Proxy", "RangeError", "ReferenceError", "Reflect",
    "RegExp", "Set", "String", "SuppressedError", "Symbol", "SyntaxError", "System", "TypeError",
    "URIError", "Uint16Array", "Uint32Array", "Uint8Array", "Uint8ClampedArray", "WeakMap",
    "WeakSet", "atob", "btoa", "clearInterval", "clearTimeout", "console", "decodeURI",
    "decodeURIComponent", "encodeURI", "encodeURIComponent", "escape", "eval", "globalThis",
    "isFinite", "isNaN", "parseFloat", "parseInt", "queueMicrotask", "setInterval",
    "setTimeout", "undefined", "unescape", "setImmediate", "clearImmediate",
}  # fmt: skip


async def test_sandbox_globals() -> None:
    rt = runtime(
        """
        exports.names = () => Object.getOwnPropertyNames(globalThis);
        exports.symbols = () => Object.getOwnPropertySymbols(globalThis).map(String);
        exports.removed = () => ['require', 'process', 'std', 'os', 'WeakRef',
          'FinalizationRegistry', 'SharedArrayBuffer', 'Atomics', 'performance', 'print',
          'scriptArgs', 'module', 'exports'].map((n) => typeof globalThis[n]);
        """
    )
    names = await value(rt, "names")
    assert set(names) <= ALLOWED_GLOBALS, set(names) - ALLOWED_GLOBALS
    assert {"System", "console", "setTimeout", "Date", "Math"} <= set(names)
    assert await value(rt, "symbols") == ["Symbol(Symbol.toStringTag)"]
    assert set(await value(rt, "removed")) == {"undefined"}


async def test_dynamic_import_is_rejected() -> None:
    rt = runtime(
        """
        exports.imp = async (path) => {
          try { await import(path); return 'loaded'; } catch (e) { return e.name; }
        };
        exports.evalImp = async (path) => {
          try { await (0, eval)('import(' + JSON.stringify(path) + ')'); return 'loaded'; }
          catch (e) { return e.name; }
        };
        """
    )
    here = str(Path(__file__).resolve())
    for path in (here, "os", "std", "./x.js"):
        assert await value(rt, "imp", path) != "loaded"
        assert await value(rt, "evalImp", path) != "loaded"


async def test_bridge_is_unreachable_and_unforgeable() -> None:
    rt = runtime(
        """
        const hits = Object.create(null);
        const captured = Object.create(null);
        let ncaptured = 0;
        const spy = (proto, name) => {
          const orig = proto[name];
          proto[name] = function (...args) {
            hits[name] = (hits[name] || 0) + 1;
            return Reflect.apply(orig, this, args);
          };
        };
        const holdsFunction = (o, depth) => {
          if (typeof o === 'function') return true;
          if (o === null || typeof o !== 'object' || depth > 2) return false;
          return Reflect.ownKeys(o).some((k) => {
            const d = Reflect.getOwnPropertyDescriptor(o, k);
            return d && 'value' in d && holdsFunction(d.value, depth + 1);
          });
        };
        exports.attack = async () => {
          for (const [proto, name] of [[Map.prototype, 'get'], [Map.prototype, 'set'],
              [Map.prototype, 'delete'], [Promise.prototype, 'then'], [Array.prototype, 'push'],
              [JSON, 'parse'], [JSON, 'stringify'], [String.prototype, 'slice'],
              [Promise, 'resolve'], [Object, 'keys']]) {
            spy(proto, name);
          }
          // Setters and getters that see whatever the engine or the prelude touches.
          const trap = function () { captured[ncaptured++] = this; };
          Object.defineProperty(Array.prototype, '0', {set: trap, configurable: true});
          Object.defineProperty(Object.prototype, 'toJSON', {get: trap, configurable: true});
          Object.defineProperty(Object.prototype, 'then', {get: trap, configurable: true});
          let v;
          try {
            v = await System.oracles.value(1, [2]);
          } finally {
            delete Array.prototype[0];
            delete Object.prototype.toJSON;
            delete Object.prototype.then;
          }
          const found = [];
          for (const o of [globalThis, System, System.files, console, Date, Math]) {
            for (const k of Reflect.ownKeys(o)) {
              const name = String(k);
              if (/bridge|dispatch|outbox|settle|pending|host/i.test(name)) found.push(name);
            }
          }
          let leaked = 0;
          for (let i = 0; i < ncaptured; i++) if (holdsFunction(captured[i], 0)) leaked++;
          return {found, v, hits: Object.assign({}, hits), leaked, captured: ncaptured};
        };
        """
    )
    host = FakeHost({"oracle": {"real": True}})
    result = await value(rt, "attack", host=host)
    assert result["found"] == []
    assert result["v"] == {"real": True}
    # The prelude never went through a patched built-in, and nothing it handed
    # to a getter or setter holds a function (the promise resolvers stay hidden).
    assert result["hits"] == {}
    assert result["leaked"] == 0
    assert result["captured"] > 0  # the traps did fire
    assert host.requests == [("oracle", ["value", [1, [2]]])]


async def test_stack_hooks_cannot_reach_the_prelude() -> None:
    # CallSite.getFunction() would hand out the prelude's functions; the hook is
    # locked, and sloppy-mode `caller` gives nothing either.
    rt = runtime(
        """
        exports.hook = async () => {
          const seen = [];
          Error.prepareStackTrace = (e, sites) => { seen.push(sites); return 'hooked'; };
          let defined = true;
          try {
            Object.defineProperty(Error, 'prepareStackTrace', {value: () => 'hooked'});
          } catch (e) {
            defined = false;
          }
          let stack;
          try { await System.oracles.fail(); } catch (e) { stack = e.stack; }
          return [seen.length, defined, typeof Error.prepareStackTrace, stack === 'hooked'];
        };
        exports.sloppy = function sloppy() {
          return [typeof sloppy.caller, typeof arguments.callee.caller];
        };
        """
    )
    host = FakeHost({"oracle": HostError("Nope", "no")})
    assert await value(rt, "hook", host=host) == [0, False, "undefined", False]
    assert await value(rt, "sloppy") == ["undefined", "undefined"]


async def test_proxy_exports() -> None:
    rt = runtime(
        """
        const target = {f: () => 'via proxy', v: 3};
        module.exports = new Proxy(target, {
          getOwnPropertyDescriptor(t, k) {
            if (k === 'boom') throw new TypeError('trap');
            return Reflect.getOwnPropertyDescriptor(t, k);
          },
        });
        """
    )
    assert rt.export_names() == [("f", True), ("v", False)]
    assert await value(rt, "f") == "via proxy"
    outcome = await call(rt, "boom")
    assert outcome.error == ("TypeError", "trap")
    assert not rt.broken
    rt = runtime("module.exports = new Proxy({}, {ownKeys() { throw new Error('keys'); }});")
    with pytest.raises(ScriptError, match="keys"):
        rt.export_names()


async def test_bad_call_arguments_do_not_break() -> None:
    rt = runtime("exports.f = (x) => x;")
    with pytest.raises(EncodingError):
        await call(rt, "f", float("nan"))
    with pytest.raises(EncodingError):
        await call(rt, "f", {1, 2})
    assert not rt.broken
    assert await value(rt, "f", "ok") == "ok"


@pytest.mark.parametrize(
    "bad",
    [2**53, float("inf"), {1: "int key"}, {"set": {1}}, object()],
)
async def test_host_results_must_be_exact_json(bad: Any) -> None:
    rt = runtime("exports.f = () => System.oracles.x();")
    with pytest.raises(EncodingError):
        await call(rt, "f", host=FakeHost({"oracle": lambda args: bad}))
    assert rt.broken


async def test_reentrant_call_is_refused() -> None:
    rt = runtime("exports.f = () => System.oracles.x(); exports.g = () => 1;")

    async def reenter(args: list[Any]) -> Any:
        return await call(rt, "g")

    with pytest.raises(RuntimeError, match="already running"):
        await call(rt, "f", host=FakeHost({"oracle": reenter}))
    assert rt.broken


def test_numeric_locale_is_checked_and_forced_to_c(monkeypatch: pytest.MonkeyPatch) -> None:
    import locale

    from libvms.runtime import js

    state = {"numeric": "de_DE.UTF-8"}
    forced: list[tuple[int, str]] = []
    examined: list[str] = []

    def query(category: int, name: str | None = None) -> str:
        assert category == locale.LC_NUMERIC
        if name is not None:
            forced.append((category, name))
            state["numeric"] = name
        return state["numeric"]

    def localeconv() -> dict[str, str]:
        examined.append(state["numeric"])
        return {"decimal_point": "," if state["numeric"].startswith("de") else "."}

    monkeypatch.setattr(js, "_query_locale", query)
    monkeypatch.setattr(locale, "setlocale", query)
    monkeypatch.setattr(locale, "localeconv", localeconv)
    monkeypatch.setattr(js, "_numeric_locale_ok", None)
    js._ensure_c_numeric_locale()
    assert forced == [(locale.LC_NUMERIC, "C")]
    js._ensure_c_numeric_locale()  # a locale found good is not examined again
    assert examined == ["de_DE.UTF-8"]
    state["numeric"] = "de_DE.UTF-8"  # the host changed it again
    js._ensure_c_numeric_locale()
    assert forced == [(locale.LC_NUMERIC, "C")] * 2


def _comma_locale(directory: Path) -> str | None:
    """A locale whose decimal point is ",", compiled into ``directory`` (LOCPATH)."""
    import shutil

    if shutil.which("localedef") is None:
        return None
    done = subprocess.run(
        ["localedef", "-i", "de_DE", "-f", "UTF-8", str(directory / "de_DE.UTF-8")],
        capture_output=True,
    )
    return (
        "de_DE.UTF-8"
        if (directory / "de_DE.UTF-8").is_dir() and done.returncode in (0, 1)
        else None
    )


async def test_numbers_parse_alike_after_the_host_changes_its_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON.parse reads numbers with the C library: a host (an oracle, a framework)
    that switches LC_NUMERIC to a "," locale after the runtime exists must not
    change what the script reads (3.75 read as 3 would not replay)."""
    import locale

    from libvms.runtime import js

    rt = runtime("exports.echo = (x) => [x, JSON.parse('{\"a\": 0.5}').a]")
    name = _comma_locale(tmp_path)
    before = locale.setlocale(locale.LC_NUMERIC)
    try:
        if name is not None:
            monkeypatch.setenv("LOCPATH", str(tmp_path))
            locale.setlocale(locale.LC_NUMERIC, name)
            assert locale.localeconv()["decimal_point"] == ","
        else:  # no locale compiler here: say the C library answers ","
            monkeypatch.setattr(js, "_numeric_locale_ok", None)
            monkeypatch.setattr(js, "_query_locale", lambda cat, n=None: n or "xx_XX")
            monkeypatch.setattr(locale, "localeconv", lambda: {"decimal_point": ","})
            monkeypatch.setattr(locale, "setlocale", lambda cat, n=None: n or "xx_XX")
        assert await value(rt, "echo", 3.75) == [3.75, 0.5]
        if name is not None:
            assert locale.localeconv()["decimal_point"] == "."
    finally:
        monkeypatch.undo()
        locale.setlocale(locale.LC_NUMERIC, before)


async def test_a_limit_in_a_timer_or_microtask_ends_the_call() -> None:
    """Timer callbacks' and microtasks' errors go to the console, but not the
    machine's limits: swallowed, they would let a run under other limits go on
    to another result instead of seeing the limit."""
    code = """
    let state = [];
    exports.timer = (n) => new Promise(r => {
      setTimeout(() => {
        const a = []; for (let i = 0; i < n; i++) a.push({i, s: 'x' + i}); state = a
      }, 0);
      setTimeout(() => r(state.length), 1);
    });
    exports.micro = (n) => {
      let ok = false;
      queueMicrotask(() => { const a = []; for (let i = 0; i < n; i++) a.push({i}); ok = true });
      return new Promise(r => setTimeout(() => r(ok), 0));
    };
    exports.deep = () => new Promise(r => {
      const f = (x) => f(x + 1) + 1;
      setTimeout(() => f(0), 0);
      setTimeout(() => r(2), 5);
    });
    exports.nul = () => new Promise(r => {
      setTimeout(() => { throw null }, 0);
      setTimeout(() => r(1), 5);
    });
    exports.plain = () => new Promise(r => {
      setTimeout(() => { throw new TypeError('only a bug') }, 0);
      queueMicrotask(() => { throw new RangeError('not a limit') });
      setTimeout(() => r(3), 5);
    });
    """
    big = await value(runtime(code), "timer", 20_000)
    assert big == 20_000  # within the limit: no error at all
    with pytest.raises(LimitExceeded) as caught:
        await call(runtime(code, memory_limit=4 << 20), "micro", 200_000)
    assert caught.value.name == "MemoryLimitExceeded"
    with pytest.raises(LimitExceeded) as caught:
        await call(runtime(code), "deep")
    assert caught.value.name == "StackOverflow"
    # Memory exhausted past making an error: the thrown null, as from the call itself.
    try:
        starved = await call(runtime(code, memory_limit=4 << 20), "timer", 200_000)
    except LimitExceeded as exc:
        assert exc.name == "MemoryLimitExceeded"
    else:
        assert starved.error == ("Error", "null")
    rt = runtime(code)
    assert (await call(rt, "nul")).error == ("Error", "null")
    # Ordinary errors still only reach the console, and the runtime goes on.
    assert await value(rt, "plain") == 3
    assert await value(rt, "timer", 10) == 10


async def test_a_limit_met_converting_a_thrown_value_is_the_limit() -> None:
    """A thrown value whose conversion to text runs out of memory or stack gives
    the limit, not a placeholder message that a run under other limits would not
    log."""
    code = """
    exports.big = () => { throw { toString() { return 'x'.repeat(1 << 20).repeat(64) } } };
    exports.deep = () => { throw { toString() { const f = () => f() + 1; return f() } } };
    exports.odd = () => { throw { toString() { throw new TypeError('no text') } } };
    """
    for method, name in (("big", "MemoryLimitExceeded"), ("deep", "StackOverflow")):
        with pytest.raises(LimitExceeded) as caught:
            await call(runtime(code, memory_limit=16 << 20), method)
        assert caught.value.name == name
    outcome = await call(runtime(code), "odd")
    assert outcome.error == ("Error", "<the thrown value could not be converted to a string>")


def test_script_cannot_escape_module_scope() -> None:
    rt = runtime("}); globalThis.escaped = 1; (function () {")
    assert rt.export_names() == []


# ------------------------------------------------------------------------- loading


def test_script_errors_at_load() -> None:
    with pytest.raises(ScriptError, match="SyntaxError"):
        JSRuntime().load("exports.f = () => {", timestamp_ms=0, seed=b"")
    with pytest.raises(ScriptError, match=r"Error: top\n.*:2:"):
        JSRuntime().load("\nthrow new Error('top');", timestamp_ms=0, seed=b"")
    with pytest.raises(ScriptError, match="TypeError"):
        JSRuntime().load("null.x;", timestamp_ms=0, seed=b"")


def test_load_twice_is_refused() -> None:
    rt = runtime("exports.a = 1;")
    with pytest.raises(RuntimeError):
        rt.load("exports.b = 1;", timestamp_ms=0, seed=b"")


# -------------------------------------------------------------------------- limits

LIMIT_SCRIPT = """
exports.loop = () => { while (true) {} };
exports.timerLoop = () => new Promise(() => setTimeout(() => { for (;;) {} }, 10));
exports.spin = () => new Promise(() => setInterval(() => {}, 1));
exports.bomb = () => { const a = []; for (;;) a.push(new Array(1e6).fill(0)); };
exports.strings = () => { let s = 'x'; for (;;) s = s.repeat(2); };
exports.ropes = () => { let s = 'x'; for (;;) s = s + s; };
exports.recurse = () => { const f = (n) => f(n + 1) + 1; return f(0); };
exports.asyncRecurse = async () => { const f = async (n) => (await f(n + 1)) + 1; return f(0); };
exports.ok = () => 'ok';
"""


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("loop", "TimeLimitExceeded"),
        ("timerLoop", "TimeLimitExceeded"),
        ("spin", "TimeLimitExceeded"),
        ("bomb", "MemoryLimitExceeded"),
        ("strings", "MemoryLimitExceeded"),
        ("ropes", "MemoryLimitExceeded"),
        ("recurse", "StackOverflow"),
        ("asyncRecurse", "StackOverflow"),
    ],
)
async def test_limits(method: str, name: str) -> None:
    # A memory or stack limit must strike first however slow a loaded machine is.
    timeout = 0.4 if name == "TimeLimitExceeded" else 10.0
    rt = runtime(LIMIT_SCRIPT, call_timeout=timeout, memory_limit=32 * 2**20)
    start = time.monotonic()
    with pytest.raises(LimitExceeded) as info:
        await call(rt, method)
    assert info.value.name == name
    # The engine limit counts CPU time: on a loaded machine the wall time stretches.
    assert time.monotonic() - start < timeout + 3.0
    assert rt.broken
    with pytest.raises(RuntimeError):
        await call(rt, "ok")
    # The process is fine: a fresh runtime works.
    assert await value(runtime(LIMIT_SCRIPT), "ok") == "ok"


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("for (;;) {}", "TimeLimitExceeded"),
        ("const a = []; for (;;) a.push(new Array(1e6).fill(0));", "MemoryLimitExceeded"),
        ("function f() { return f() + 1; } f();", "StackOverflow"),
    ],
)
def test_limits_at_load(code: str, name: str) -> None:
    rt = JSRuntime(
        call_timeout=0.4 if name == "TimeLimitExceeded" else 10.0, memory_limit=32 * 2**20
    )
    with pytest.raises(LimitExceeded) as info:
        rt.load(code, timestamp_ms=0, seed=b"")
    assert info.value.name == name
    assert rt.broken


async def test_slow_host_counts_toward_the_time_limit() -> None:
    rt = runtime("exports.f = () => System.oracles.slow();", call_timeout=0.2)

    async def slow(args: list[Any]) -> int:
        await asyncio.sleep(0.3)
        return 1

    with pytest.raises(LimitExceeded) as info:
        await call(rt, "f", host=FakeHost({"oracle": slow}))
    assert info.value.name == "TimeLimitExceeded"
    assert rt.broken


async def test_close() -> None:
    rt = runtime("exports.f = () => 1;")
    rt.close()
    with pytest.raises(RuntimeError):
        await call(rt, "f")


# ------------------------------------------------------------------- determinism

DETERMINISM_DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    from libvms.runtime import JSRuntime, HostError

    SCRIPT = r'''
    let state = 0;
    exports.run = async (n) => {
      state += n;
      const out = [Date.now(), new Date().getHours(), new Date().toString(), new Date().getDate(),
                   new Date(2020, 5, 15, 12).getTime(), Date.parse('2020-06-15T12:00'),
                   new Date().toLocaleString(), new Date().getTimezoneOffset(),
                   Math.random(), (1234.5).toLocaleString(), 0.1 + 0.2, parseFloat('3.25'),
                   (1e21).toString(), (123.456).toFixed(2), 'ä'.localeCompare('z'),
                   [3, 1, 2].sort(), String(-0), JSON.stringify({b: 1, a: [1.5e-7]})];
      const ticks = [];
      await new Promise((r) => setTimeout(r, 15));
      out.push(Date.now());
      const id = setInterval(() => ticks.push(Date.now()), 3);
      const results = await Promise.all([
        new Promise((r) => setTimeout(() => r('t1@' + Date.now()), 7)),
        System.files.readFile('/a'),
        System.oracles.rand(Math.random()),
        new Promise((r) => setTimeout(() => r(new Date().toISOString()), 2)).then(async (x) => {
          return [x, await System.files.stat('/b')];
        }),
        (async () => {
          try { await System.files.readFile('/missing'); } catch (e) { return e.name; }
        })(),
      ]);
      clearInterval(id);
      out.push(results, ticks, state, Math.random());
      console.log('run', n, Date.now());
      return out;
    };
    '''

    async def main():
        seen = []

        async def host(op, args):
            seen.append([op, args])
            if args and args[0] == '/missing':
                raise HostError('NotFoundError', 'missing')
            if op == 'files.stat':
                return {'type': 'file', 'size': 1, 'mtime': 1}
            return op + ':' + json.dumps(args)

        rt = JSRuntime()
        rt.load(SCRIPT, timestamp_ms=1_600_000_000_000, seed=b'load')
        outcomes = []
        for i in range(3):
            o = await rt.call('run', [i], caller_id='c',
                              timestamp_ms=1_700_000_000_000 + i * 3_600_000,
                              seed=bytes([i]) * 32, host=host)
            outcomes.append([o.value, o.has_value, o.error, o.virtual_ms])
        sys.stdout.write(json.dumps([outcomes, seen], sort_keys=True))

    asyncio.run(main())
    """
)


def test_replay_is_identical_across_time_zones_and_hash_seeds() -> None:
    outputs = []
    for tz, hashseed, lang in (
        ("America/New_York", "1", "C"),
        ("Asia/Kolkata", "4242", "C.UTF-8"),
        ("UTC", "random", "POSIX"),
    ):
        env = dict(os.environ, TZ=tz, PYTHONHASHSEED=hashseed, LC_ALL=lang, LANG=lang)
        done = subprocess.run(
            [sys.executable, "-c", DETERMINISM_DRIVER],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    outcomes, seen = json.loads(outputs[0])
    first = outcomes[0][0]
    assert first[0] == 1_700_000_000_000
    assert first[1] == 22  # UTC hours, whatever TZ says
    assert first[7] == 0
    assert outcomes[1][0][0] == 1_700_000_000_000 + 3_600_000
    assert all(o[2] is None and o[3] == 22 for o in outcomes)  # 15 ms + 7 ms of timers
    assert [op for op, _ in seen[:4]] == [
        "files.readFile",
        "oracle",
        "files.readFile",
        "files.stat",
    ]


# ------------------------------------------------------- event loop order and fast paths

ORDER_SCRIPT = r"""
const ev = [];
const log = (x) => { ev.push(x); console.log(x); };
exports.mixed = async () => {
  ev.length = 0;
  const p1 = System.files.readFile('/1').then((v) => {
    log('r1:' + v);
    return System.files.readFile('/3');
  });
  Promise.resolve().then(() => {
    log('job1');
    return System.files.readFile('/2').then((v) => log('r2:' + v));
  });
  queueMicrotask(() => {
    log('micro');
    System.files.writeFile('/w', 'x').then(() => log('wrote'));
  });
  setTimeout(() => { log('timer0'); System.files.readFile('/t0').then((v) => log('t0:' + v)); }, 0);
  setTimeout(() => log('timer5'), 5);
  log('sync');
  const v3 = await p1;
  log('after p1:' + v3);
  await new Promise((r) => setTimeout(r, 3));
  log('after 3ms');
  log('r4:' + await System.files.readFile('/4'));
  return ev.slice();
};
exports.late = async () => {
  ev.length = 0;
  await null;
  log('after null');
  const all = Promise.all([1, 2, 3].map(async (i) => {
    await Promise.resolve();
    log('ask' + i);
    const v = await System.oracles.o(i);
    log('got' + i + ':' + v);
    await null;
    log('then' + i);
    return v;
  }));
  Promise.resolve().then(() => log('side'));
  log('waiting');
  const vs = await all;
  log('all:' + vs.join(','));
  return ev.slice();
};
exports.errors = async () => {
  ev.length = 0;
  const a = System.files.readFile('/missing').catch((e) => log('caught:' + e.name));
  const b = System.files.stat('/s').then((s) => log('stat:' + s.isFile()));
  const c = System.files.readFile('/missing2').then(() => log('no'), (e) => {
    log('caught2:' + e.name);
    return System.files.readFile('/5');
  });
  await Promise.all([a, b, c]);
  log('done');
  return ev.slice();
};
exports.thenGetter = async () => {
  // Settling a request with an object reads its "then": script code runs
  // inside the settlement, after the jobs the call left before it.
  ev.length = 0;
  Object.defineProperty(Object.prototype, 'then', {
    configurable: true,
    get() { log('then read'); return undefined; },
  });
  try {
    Promise.resolve().then(() => log('pending job'));
    const obj = System.oracles.obj();
    log('sync');
    const got = await obj;
    log('got:' + got.k);
  } finally {
    delete Object.prototype.then;
  }
  return ev.slice();
};
exports.syncLeaves = () => {
  ev.length = 0;
  System.files.writeFile('/left', 'v').then(() => log('left written'));
  Promise.resolve().then(() => System.files.readFile('/job').then((v) => log('job read:' + v)));
  log('returning');
  return 7;
};
exports.unsettled = async () => {
  ev.length = 0;
  System.files.readFile('/u').then((v) => log('u:' + v));
  setTimeout(() => log('t'), 10);
  await new Promise(() => {});
};
exports.events = () => ev.slice();
"""

UNSETTLED = (
    "UnsettledError",
    "the call's promise never settled: no job, host request or timer was left to settle it",
)

# (method, (value, has_value, error, virtual_ms), host requests and console lines in order)
ORDER_CASES: list[tuple[str, tuple[Any, bool, Any, int], list[tuple[Any, ...]]]] = [
    (
        "mixed",
        (
            [
                "sync",
                "job1",
                "micro",
                "r1:R/1",
                "r2:R/2",
                "wrote",
                "after p1:R/3",
                "timer0",
                "t0:R/t0",
                "after 3ms",
                "r4:R/4",
            ],
            True,
            None,
            3,
        ),
        [
            ("log", "sync"),
            ("log", "job1"),
            ("log", "micro"),
            ("host", "files.readFile", ["/1", "utf8"]),
            ("host", "files.readFile", ["/2", "utf8"]),
            ("log", "r1:R/1"),
            ("host", "files.writeFile", ["/w", "x", "utf8"]),
            ("log", "r2:R/2"),
            ("log", "wrote"),
            ("host", "files.readFile", ["/3", "utf8"]),
            ("log", "after p1:R/3"),
            ("log", "timer0"),
            ("host", "files.readFile", ["/t0", "utf8"]),
            ("log", "t0:R/t0"),
            ("log", "after 3ms"),
            ("host", "files.readFile", ["/4", "utf8"]),
            ("log", "r4:R/4"),
        ],
    ),
    (
        "late",
        (
            [
                "after null",
                "waiting",
                "ask1",
                "ask2",
                "ask3",
                "side",
                "got1:10",
                "then1",
                "got2:20",
                "then2",
                "got3:30",
                "then3",
                "all:10,20,30",
            ],
            True,
            None,
            0,
        ),
        [
            ("log", "after null"),
            ("log", "waiting"),
            ("log", "ask1"),
            ("log", "ask2"),
            ("log", "ask3"),
            ("log", "side"),
            ("host", "oracle", ["o", [1]]),
            ("host", "oracle", ["o", [2]]),
            ("log", "got1:10"),
            ("log", "then1"),
            ("host", "oracle", ["o", [3]]),
            ("log", "got2:20"),
            ("log", "then2"),
            ("log", "got3:30"),
            ("log", "then3"),
            ("log", "all:10,20,30"),
        ],
    ),
    (
        "errors",
        (["caught:NotFoundError", "stat:true", "caught2:NotFoundError", "done"], True, None, 0),
        [
            ("host", "files.readFile", ["/missing", "utf8"]),
            ("host", "files.stat", ["/s"]),
            ("log", "caught:NotFoundError"),
            ("host", "files.readFile", ["/missing2", "utf8"]),
            ("log", "stat:true"),
            ("log", "caught2:NotFoundError"),
            ("host", "files.readFile", ["/5", "utf8"]),
            ("log", "done"),
        ],
    ),
    (
        "thenGetter",
        (["sync", "pending job", "then read", "got:v"], True, None, 0),
        [
            ("log", "sync"),
            ("log", "pending job"),
            ("host", "oracle", ["obj", []]),
            ("log", "then read"),
            ("log", "got:v"),
        ],
    ),
    (
        "syncLeaves",
        (7, True, None, 0),
        [
            ("log", "returning"),
            ("host", "files.writeFile", ["/left", "v", "utf8"]),
            ("host", "files.readFile", ["/job", "utf8"]),
            ("log", "left written"),
            ("log", "job read:R/job"),
        ],
    ),
    (
        "unsettled",
        (None, False, UNSETTLED, 10),
        [("host", "files.readFile", ["/u", "utf8"]), ("log", "u:R/u"), ("log", "t")],
    ),
    # What ran after the unsettled call's outcome, before its timers were cleared.
    ("events", (["u:R/u", "t"], True, None, 0), []),
]


class _Trace(logging.Handler):
    def __init__(self, trace: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        self.trace.append(("log", record.getMessage().removeprefix("console.log: ")))


async def test_event_loop_order_is_stable() -> None:
    # Host requests, script jobs, timers and console lines interleave in one
    # fixed order; replays depend on it, so it is pinned here case by case:
    # requests made before the first await, requests made by jobs the call left
    # pending, requests made by settlements, timers, host errors, a settlement
    # running script code, a synchronous result leaving requests and jobs.
    trace: list[tuple[Any, ...]] = []
    logger = logging.getLogger("libvms.test.order")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = _Trace(trace)
    logger.addHandler(handler)

    async def host(op: str, args: list[Any]) -> Any:
        trace.append(("host", op, args))
        if op == "files.readFile":
            if args[0].startswith("/missing"):
                raise HostError("NotFoundError", args[0])
            return "R" + args[0]
        if op == "files.stat":
            return {"type": "file", "size": 1, "mtime": 0}
        if op == "oracle":
            return {"k": "v"} if args[0] == "obj" else args[1][0] * 10
        return None

    try:
        rt = runtime(ORDER_SCRIPT, logger=logger)
        for method, expected, expected_trace in ORDER_CASES:
            trace.clear()
            outcome = await call(rt, method, host=host, timestamp_ms=2000)
            got = (outcome.value, outcome.has_value, outcome.error, outcome.virtual_ms)
            assert got == expected, method
            assert trace == expected_trace, method
            assert not rt.broken
    finally:
        logger.removeHandler(handler)


async def test_sync_result_with_jobs_left() -> None:
    # A synchronous result with jobs still queued: the jobs run, their requests
    # are served, then the value is the outcome.
    rt = runtime(
        """
        let seen = [];
        exports.f = () => {
          Promise.resolve().then(() => System.files.readFile('/j')).then((v) => seen.push(v));
          queueMicrotask(() => console.log('micro'));
          return 1;
        };
        exports.g = () => { Promise.resolve().then(() => seen.push('job')); return 'x'; };
        exports.seen = () => seen;
        """
    )
    host = FakeHost({"files.readFile": "J"})
    outcome = await call(rt, "f", host=host)
    assert (outcome.value, outcome.has_value, outcome.error) == (1, True, None)
    assert host.requests == [("files.readFile", ["/j", "utf8"])]
    assert await value(rt, "g") == "x"
    assert await value(rt, "seen") == ["J", "job"]


NUMBERS_SCRIPT = """
const vals = [0, -0, -5, 123, 2 ** 53 - 1, -(2 ** 53 - 1), 2 ** 53, -(2 ** 53), 2 ** 60, 1e21,
  1e-7, 1234567890123456, 999999999999999, 0.5, '1234567890123456789',
  {k12345678901234567: 2 ** 60, n: [1, 22, 333]}];
exports.count = () => vals.length;
exports.one = (i) => vals[i];
exports.logged = (i) => { console.log('x'); return vals[i]; };
exports.later = async (i) => { await null; return vals[i]; };
exports.all = () => vals;
exports.viaHost = async () => System.oracles.echo(vals);
exports.arg = (x) => [x, typeof x];
"""

NUMBERS = [
    0,
    0,
    -5,
    123,
    2**53 - 1,
    -(2**53 - 1),
    float(2**53),
    float(-(2**53)),
    float(2**60),
    1e21,
    1e-7,
    1234567890123456,
    999999999999999,
    0.5,
    "1234567890123456789",
    {"k12345678901234567": float(2**60), "n": [1, 22, 333]},
]


async def test_numbers_cross_every_path() -> None:
    # An integer beyond the safe range is a double in JS and a float in Python,
    # on every path: a bare result, a final status, a host round trip.
    rt = runtime(NUMBERS_SCRIPT, logger=logging.getLogger("libvms.test.numbers"))
    assert await value(rt, "count") == len(NUMBERS)
    for i, expected in enumerate(NUMBERS):
        for method in ("one", "logged", "later"):
            got = await value(rt, method, i)
            assert got == expected and type(got) is type(expected), (method, i, got)
    for method in ("all", "viaHost"):
        got = await value(rt, method, host=FakeHost({"oracle": lambda args: args[1][0]}))
        assert got == NUMBERS
        assert [type(x) for x in got] == [type(x) for x in NUMBERS]
    assert await value(rt, "arg", 2**60) == [float(2**60), "number"]
    assert await value(rt, "arg", [1, [2, "x"]]) == [[1, [2, "x"]], "object"]


async def test_request_arguments_fast_and_slow_paths() -> None:
    rt = runtime(
        r"""
        const attempt = async (f) => {
          try { return ['ok', await f()]; } catch (e) { return [e.name, e.message]; }
        };
        exports.f = async () => [
          await attempt(() => System.files.writeFile('/a', 'x\ud800y')),
          await attempt(() => System.files.writeFile('/a\udc00', 'x')),
          await attempt(() => System.files.writeFile('/a', '\\ud800 is text')),
          await attempt(() => System.oracles.o(NaN)),
          await attempt(() => System.files.stat(Infinity)),
          await attempt(() => System.files.getInfo(null, true, 1.5, -0)),
          await attempt(() => System.files.writeFile('/s', '$bytes')),
          await attempt(() => System.files.readFile('/n', {encoding: 'HEX'})),
          await attempt(() => System.files.stat('/none')),
          await attempt(() => System.files.readdir('/none')),
        ];
        """
    )
    host = FakeHost()
    not_json = "arguments is not JSON: "
    assert await value(rt, "f", host=host) == [
        ["EncodingError", not_json + "a string holds a lone surrogate at arguments[1]"],
        ["EncodingError", not_json + "a string holds a lone surrogate at arguments[0]"],
        ["ok", None],
        ["EncodingError", not_json + "NaN is not a JSON number at arguments[1][0]"],
        ["EncodingError", not_json + "Infinity is not a JSON number at arguments[0]"],
        ["ok", None],
        ["ok", None],
        ["ok", None],
        ["ok", None],
        ["ok", None],
    ]
    assert host.requests == [
        ("files.writeFile", ["/a", "\\ud800 is text", "utf8"]),
        ("files.getInfo", [None, True, 1.5, 0]),
        ("files.writeFile", ["/s", "$bytes", "utf8"]),
        ("files.readFile", ["/n", "hex"]),
        ("files.stat", ["/none"]),
        ("files.readdir", ["/none"]),
    ]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([float("nan")], "nan cannot be represented in JSON"),
        ([{"a": float("inf")}], "inf cannot be represented in JSON"),
        ([b"x"], "bytes values cannot be represented in JSON"),
        (None, "nested deeper than"),
    ],
)
async def test_call_argument_errors(args: Any, error: str) -> None:
    rt = runtime("exports.f = (...a) => a;")
    if args is None:
        args = []
        args.append(args)
    with pytest.raises(EncodingError, match=error):
        await call(rt, "f", *args)
    assert not rt.broken
    assert await value(rt, "f", True, None, 1.5, "é\x00", float(2**60)) == [
        True,
        None,
        1.5,
        "é\x00",
        float(2**60),
    ]

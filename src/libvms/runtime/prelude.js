// libvms JavaScript prelude.
//
// Evaluated once in every fresh QuickJS context, before the backend script. The
// completion value of this file is a factory; the host calls it once with its
// configuration and keeps the returned dispatcher. Nothing of the bridge is ever
// stored on globalThis: the dispatcher and all bridge state live in this closure.
//
// What the prelude guarantees (the host drives everything, no real clock is read):
//   * Date, Date.now(), new Date() read a virtual clock; Date is UTC-only.
//   * Math.random is xoshiro128** seeded by the host for every call and at load.
//   * setTimeout/setInterval/clearTimeout/clearInterval run on virtual time and
//     never outlive the call that created them.
//   * console.* writes to a bounded buffer that the host drains into its logger.
//   * System.files.* and System.oracles.* queue requests that the host serves one
//     at a time, in the order the script made them.
//   * Non-deterministic or host-specific globals are removed.
//
// Internal state is only touched through intrinsics captured below, so a script
// that patches built-in prototypes cannot reach the bridge.
(function (config) {
  'use strict';

  // ---------------------------------------------------------------- intrinsics
  const G = globalThis;
  const apply = Reflect.apply;
  const construct = Reflect.construct;
  const defineProperty = Object.defineProperty;
  const getOwnPropertyDescriptor = Object.getOwnPropertyDescriptor;
  const getPrototypeOf = Object.getPrototypeOf;
  const setPrototypeOf = Object.setPrototypeOf;
  const freeze = Object.freeze;
  const objectKeys = Object.keys;
  const hasOwn = Object.hasOwn;
  const ObjectProto = Object.prototype;
  const isArray = Array.isArray;
  const JSONparse = JSON.parse;
  const JSONstringify = JSON.stringify;
  const PromiseCtor = Promise;
  const PromiseThen = PromiseCtor.prototype.then;
  const PromiseResolve = PromiseCtor.resolve;
  const PromiseReject = PromiseCtor.reject;
  const MapCtor = Map;
  const MapGet = MapCtor.prototype.get;
  const MapSet = MapCtor.prototype.set;
  const MapDelete = MapCtor.prototype.delete;
  const MapClear = MapCtor.prototype.clear;
  const SetCtor = Set;
  const WeakMapCtor = WeakMap;
  const WeakSetCtor = WeakSet;
  const RegExpCtor = RegExp;
  const RegExpExec = RegExpCtor.prototype.exec;
  const ErrorCtor = Error;
  const ErrorIsError = typeof Error.isError === 'function' ? Error.isError : null;
  const TypeErrorCtor = TypeError;
  const ArrayBufferCtor = ArrayBuffer;
  const DataViewCtor = DataView;
  const isView = ArrayBufferCtor.isView;
  const U8 = Uint8Array;
  const U8toBase64 = U8.prototype.toBase64;
  const U8fromBase64 = U8.fromBase64;
  const TypedArrayProto = getPrototypeOf(U8.prototype);
  const taBuffer = getOwnPropertyDescriptor(TypedArrayProto, 'buffer').get;
  const taByteOffset = getOwnPropertyDescriptor(TypedArrayProto, 'byteOffset').get;
  const taByteLength = getOwnPropertyDescriptor(TypedArrayProto, 'byteLength').get;
  const dvBuffer = getOwnPropertyDescriptor(DataViewCtor.prototype, 'buffer').get;
  const dvByteOffset = getOwnPropertyDescriptor(DataViewCtor.prototype, 'byteOffset').get;
  const dvByteLength = getOwnPropertyDescriptor(DataViewCtor.prototype, 'byteLength').get;
  const StringCtor = String;
  const NumberCtor = Number;
  const BooleanCtor = Boolean;
  const BooleanValueOf = BooleanCtor.prototype.valueOf;
  const strIsWellFormed = StringCtor.prototype.isWellFormed;
  const strToWellFormed = StringCtor.prototype.toWellFormed;
  const strSlice = StringCtor.prototype.slice;
  const strToLowerCase = StringCtor.prototype.toLowerCase;
  const strCharCodeAt = StringCtor.prototype.charCodeAt;
  const strPadStart = StringCtor.prototype.padStart;
  const strIndexOf = StringCtor.prototype.indexOf;
  const numIsFinite = NumberCtor.isFinite;
  const mathFloor = Math.floor;
  const mathTrunc = Math.trunc;
  const mathMax = Math.max;
  const imul = Math.imul;
  const nativeQueueMicrotask = G.queueMicrotask;
  const NativeDate = Date;
  const DP = NativeDate.prototype;
  const dateUTC = NativeDate.UTC;
  const dateGetTime = DP.getTime;
  const dateSetTime = DP.setTime;
  const dateGetUTCFullYear = DP.getUTCFullYear;
  const dateGetUTCMonth = DP.getUTCMonth;
  const dateGetUTCDate = DP.getUTCDate;
  const dateGetUTCDay = DP.getUTCDay;
  const dateGetUTCHours = DP.getUTCHours;
  const dateGetUTCMinutes = DP.getUTCMinutes;
  const dateGetUTCSeconds = DP.getUTCSeconds;
  const dateSetUTCFullYear = DP.setUTCFullYear;
  const dateSetUTCHours = DP.setUTCHours;
  const SymbolToPrimitive = Symbol.toPrimitive;
  const ProxyCtor = Proxy;
  const indirectEval = eval;

  const MAX_DEPTH = config.maxDepth;
  const MAX_LOG_LINES = config.maxLogLines;
  const MAX_LOG_CHARS = config.maxLogChars;
  // The behaviour version of the log being run (docs/formats.md, "runtime"):
  // from 3 on, the machine's limits met in timers, microtasks and error
  // conversions end the call; version 2 logs keep version 2's behaviour.
  const LIMITS_END_CALLS = config.version >= 3;
  // From 3 on, the files API's errors carry the flag node-dat-archive's did
  // (e.notFound === true...), besides their name.
  const ERROR_FLAGS = config.version >= 3;

  // Arrays with no prototype: index writes and reads never reach a setter or
  // getter a script could have put on Array.prototype.
  function list() {
    const a = [];
    setPrototypeOf(a, null);
    return a;
  }
  function push(a, v) {
    a[a.length] = v;
  }
  function newMap() {
    return new MapCtor();
  }
  function def(obj, name, value) {
    defineProperty(obj, name, { value, writable: true, enumerable: false, configurable: true });
  }
  function wellFormed(s) {
    return apply(strToWellFormed, s, []);
  }

  // ------------------------------------------------------------- sandboxing
  // Globals that are non-deterministic (GC timing, shared memory, real clocks) or
  // host-specific. Dynamic import() is rejected by the engine (no module loader).
  const REMOVED = [
    'WeakRef', 'FinalizationRegistry', 'SharedArrayBuffer', 'Atomics', 'performance',
    'require', 'process', 'std', 'os', 'print', 'scriptArgs', 'gc', 'navigator',
    'setTimeout', 'setInterval', 'clearTimeout', 'clearInterval', 'queueMicrotask',
    'setImmediate', 'clearImmediate', 'console', 'System',
  ];
  for (let i = 0; i < REMOVED.length; i++) {
    delete G[REMOVED[i]];
  }
  // The V8-style stack hook would hand a script the CallSite of every frame,
  // and CallSite.getFunction() returns the function itself: the prelude's own
  // functions (the dispatcher included) are on the stack of every call. It
  // would also run script code in the middle of the prelude whenever it makes
  // an error. Lock it to undefined.
  defineProperty(ErrorCtor, 'prepareStackTrace', {
    value: undefined, writable: false, enumerable: false, configurable: false,
  });

  // ------------------------------------------------------- per-call state
  const PHASE_IDLE = 0;
  const PHASE_LOAD = 1;
  const PHASE_CALL = 2;
  let phase = PHASE_IDLE;
  let clockBase = 0; // the call's timestamp_ms
  let clockAdvance = 0; // virtual ms advanced by timers during the call
  let callerObject = freeze({ __proto__: ObjectProto });

  // A call's settlement: kind 0 = undefined, 1 = value (JSON text), 2 = error.
  let settled = false;
  let resultKind = 0;
  // The first limit error a timer callback or microtask of the current call met.
  let fatalPair = null;
  let resultText = '';
  let callToken = 0; // distinguishes the current call from reactions of older ones

  // ------------------------------------------------------------------ errors
  function errorPair(e) {
    let name = 'Error';
    let message = '';
    try {
      const isErr = (ErrorIsError !== null && ErrorIsError(e)) || e instanceof ErrorCtor;
      if (isErr) {
        name = StringCtor(e.name);
        message = StringCtor(e.message);
      } else {
        message = StringCtor(e);
      }
    } catch (inner) {
      name = 'Error';
      message = '<the thrown value could not be converted to a string>';
      // Converting it hit a limit: the limit, not the value, is what to report
      // (a run under other limits would convert it).
      if (!LIMITS_END_CALLS) {
        // version 2: the placeholder, whatever the conversion met
      } else if (inner === null) {
        message = 'null';
      } else {
        try {
          if (inner instanceof ErrorCtor) {
            const innerName = StringCtor(inner.name);
            const innerMessage = StringCtor(inner.message);
            if (isResourcePair([innerName, innerMessage])) {
              name = innerName;
              message = innerMessage;
            }
          }
        } catch (_) {
          // not an error that names a limit
        }
      }
    }
    const pair = list();
    push(pair, wellFormed(name));
    push(pair, wellFormed(message));
    return pair;
  }
  function makeError(name, message) {
    const e = new ErrorCtor(message);
    def(e, 'name', name);
    return e;
  }

  // ------------------------------------------------------- strict JSON
  // Follows JSON.stringify (toJSON is honoured, undefined object members are
  // dropped) but refuses every value JSON would silently change: NaN, Infinity,
  // BigInt, functions, symbols, undefined in arrays, cycles, Maps, Sets, binary
  // data, errors, regular expressions, lone surrogates, nesting deeper than the
  // canonical encoding accepts.
  const ENCODE_FAIL = { __proto__: null };
  let failReason = '';

  function keyText(key, parentIsArray) {
    if (parentIsArray) return '[' + key + ']';
    if (apply(RegExpExec, /^[A-Za-z_$][A-Za-z0-9_$]*$/, [key]) !== null) return '.' + key;
    return '[' + JSONstringify(wellFormed(key)) + ']';
  }
  function describeType(v) {
    if (v === null) return 'null';
    const t = typeof v;
    if (t !== 'object') {
      if (t === 'number') return StringCtor(v);
      return t;
    }
    if (v instanceof MapCtor) return 'a Map';
    if (v instanceof SetCtor) return 'a Set';
    if (v instanceof WeakMapCtor) return 'a WeakMap';
    if (v instanceof WeakSetCtor) return 'a WeakSet';
    if (v instanceof PromiseCtor) return 'a Promise';
    if (v instanceof RegExpCtor) return 'a RegExp';
    if (v instanceof ErrorCtor) return 'an Error';
    if (v instanceof ArrayBufferCtor || isView(v)) return 'binary data';
    return 'an object';
  }

  // Serialises with the native JSON.stringify (so toJSON, getters and key order
  // are exactly JSON.stringify's) through a replacer that fails where JSON would
  // silently change the value. With allowBytes, binary data becomes
  // {"$bytes": base64} and an object whose only key is "$bytes" or "$object" is
  // escaped as {"$object": [key, value]}.
  //
  // JSON.stringify walks depth first, so the objects from the root down to the
  // current holder form a stack: the replacer pops it back to its holder, which
  // gives depths and, on failure, the path.
  let encObjects = null; // objects being serialised, root first
  let encKeys = null; // the key of each of them in its holder
  let encAllowBytes = false;
  let encRoot = '';
  const LONE_SURROGATE_ESCAPE = /\\u[dD][89abcdefABCDEF]/;
  const RegExpTest = RegExpCtor.prototype.test;
  // Whether JSON text may hold an escaped lone surrogate. The regular
  // expression only runs on texts holding an escape at all, which are rare.
  function mayHoldLoneSurrogate(text) {
    return apply(strIndexOf, text, ['\\u']) >= 0 && apply(RegExpTest, LONE_SURROGATE_ESCAPE, [text]);
  }

  function encFail(holder, key, reason) {
    let path = encRoot;
    for (let i = 1; i < encObjects.length; i++) {
      path += keyText(encKeys[i], isArray(encObjects[i - 1]));
    }
    if (encObjects.length > 0) path += keyText(key, isArray(holder));
    failReason = reason + ' at ' + path;
    throw ENCODE_FAIL;
  }
  function replacer(key, v) {
    const t = typeof v;
    if (t === 'string' || t === 'boolean') return v; // lone surrogates: checked on the text
    const objects = encObjects;
    let n = objects.length;
    if (n > 0 && objects[n - 1] !== this) {
      // Back from a finished sibling subtree.
      while (n > 0 && objects[n - 1] !== this) n--;
      objects.length = n;
      encKeys.length = n;
    }
    if (t === 'number') {
      if (v - v !== 0) encFail(this, key, StringCtor(v) + ' is not a JSON number');
      return v;
    }
    if (t === 'undefined') {
      // Dropped from objects, as JSON.stringify does; never silently null.
      if (isArray(this)) encFail(this, key, 'undefined inside an array');
      return v;
    }
    if (t !== 'object') {
      return encFail(this, key, t === 'bigint' ? 'a BigInt' : 'a ' + t);
    }
    if (v === null) return v;
    if (n >= MAX_DEPTH) encFail(this, key, 'value nested deeper than ' + MAX_DEPTH + ' levels');
    let out = v;
    if (!isArray(v)) {
      const proto = getPrototypeOf(v);
      if (proto !== ObjectProto && proto !== null) {
        if (v instanceof NumberCtor) {
          const num = NumberCtor(v);
          if (num - num !== 0) encFail(this, key, StringCtor(num) + ' (a Number object) is not a JSON number');
        } else if (v instanceof ArrayBufferCtor || isView(v)) {
          if (!encAllowBytes) encFail(this, key, 'binary data (use an array or a string)');
          return { __proto__: null, $bytes: apply(U8toBase64, bytesView(v), []) };
        } else if (
          v instanceof MapCtor || v instanceof SetCtor || v instanceof WeakMapCtor ||
          v instanceof WeakSetCtor || v instanceof PromiseCtor || v instanceof RegExpCtor ||
          v instanceof ErrorCtor
        ) {
          encFail(this, key, describeType(v));
        }
      } else if (encAllowBytes) {
        const ks = objectKeys(v);
        if (ks.length === 1 && (ks[0] === '$bytes' || ks[0] === '$object')) {
          out = { __proto__: null, $object: [ks[0], v[ks[0]]] };
        }
      }
    }
    objects[n] = out;
    encKeys[n] = key;
    return out;
  }

  // Finds the first lone surrogate in parsed JSON (keys included); returns its
  // path or null.
  function findLoneSurrogate(v, path) {
    if (typeof v === 'string') return apply(strIsWellFormed, v, []) ? null : path;
    if (v === null || typeof v !== 'object') return null;
    if (isArray(v)) {
      for (let i = 0; i < v.length; i++) {
        const found = findLoneSurrogate(v[i], path + '[' + i + ']');
        if (found !== null) return found;
      }
      return null;
    }
    const ks = objectKeys(v);
    for (let i = 0; i < ks.length; i++) {
      const k = ks[i];
      if (!apply(strIsWellFormed, k, [])) return path + keyText(k, false) + ' (the key)';
      const found = findLoneSurrogate(v[k], path + keyText(k, false));
      if (found !== null) return found;
    }
    return null;
  }

  // JSON text of `value` (undefined when JSON.stringify gives undefined);
  // EncodingError when it is not JSON. Errors thrown by toJSON methods and
  // getters propagate.
  function encodeStrict(value, rootName, allowBytes) {
    const saved = [encObjects, encKeys, encAllowBytes, encRoot];
    encObjects = list();
    encKeys = list();
    encAllowBytes = allowBytes;
    encRoot = rootName;
    try {
      const text = JSONstringify(value, replacer);
      if (text !== undefined && mayHoldLoneSurrogate(text)) {
        // Maybe an escaped backslash followed by "ud8.."; look at the strings.
        const where = findLoneSurrogate(JSONparse(text), rootName);
        if (where !== null) {
          failReason = 'a string holds a lone surrogate at ' + where;
          throw ENCODE_FAIL;
        }
      }
      return text;
    } catch (e) {
      if (e === ENCODE_FAIL) {
        throw makeError('EncodingError', rootName + ' is not JSON: ' + failReason);
      }
      if (e instanceof TypeErrorCtor && e.message === 'circular reference') {
        throw makeError('EncodingError', rootName + ' is not JSON: a cycle');
      }
      throw e;
    } finally {
      encObjects = saved[0];
      encKeys = saved[1];
      encAllowBytes = saved[2];
      encRoot = saved[3];
    }
  }

  // Wire decoding of host values: {"$bytes": b64} -> Uint8Array,
  // {"$object": [key, value]} -> {key: value}.
  function reviver(key, v) {
    if (v !== null && typeof v === 'object' && !isArray(v)) {
      const ks = objectKeys(v);
      if (ks.length === 1) {
        if (ks[0] === '$bytes') return U8fromBase64(v.$bytes);
        if (ks[0] === '$object') {
          const o = {};
          defineProperty(o, v.$object[0], {
            value: v.$object[1], writable: true, enumerable: true, configurable: true,
          });
          return o;
        }
      }
    }
    return v;
  }

  function bytesView(v) {
    if (v instanceof ArrayBufferCtor) return new U8(v);
    if (v instanceof DataViewCtor) {
      return new U8(apply(dvBuffer, v, []), apply(dvByteOffset, v, []), apply(dvByteLength, v, []));
    }
    return new U8(apply(taBuffer, v, []), apply(taByteOffset, v, []), apply(taByteLength, v, []));
  }
  function isBinary(v) {
    return v !== null && typeof v === 'object' && (v instanceof ArrayBufferCtor || isView(v));
  }

  // ----------------------------------------------------------------- console
  let logs = list();
  let logCount = 0;
  let logDropped = 0;

  function formatValue(v, depth) {
    switch (typeof v) {
      case 'string':
        return v;
      case 'function':
        return '[Function: ' + (StringCtor(v.name) || '(anonymous)') + ']';
      case 'symbol':
      case 'bigint':
      case 'number':
      case 'boolean':
      case 'undefined':
        return StringCtor(v);
      default:
        break;
    }
    if (v === null) return 'null';
    if ((ErrorIsError !== null && ErrorIsError(v)) || v instanceof ErrorCtor) {
      const stack = v.stack;
      const head = StringCtor(v.name) + ': ' + StringCtor(v.message);
      return typeof stack === 'string' && stack.length ? head + '\n' + stack : head;
    }
    try {
      const text = JSONstringify(v);
      if (typeof text === 'string') return text;
    } catch (_) {
      // fall through
    }
    return StringCtor(v);
  }
  function addLog(level, text) {
    if (logCount >= MAX_LOG_LINES) {
      logDropped++;
      return;
    }
    logCount++;
    let line = wellFormed(text);
    if (line.length > MAX_LOG_CHARS) {
      line = apply(strSlice, line, [0, MAX_LOG_CHARS]) + '... (' + line.length + ' characters)';
    }
    push(logs, '[' + JSONstringify(level) + ',' + JSONstringify(line) + ']');
  }
  function consoleMethod(level) {
    return function () {
      let text = '';
      try {
        for (let i = 0; i < arguments.length; i++) {
          if (i) text += ' ';
          text += formatValue(arguments[i], 0);
        }
      } catch (e) {
        text += '<unprintable: ' + errorPair(e)[1] + '>';
      }
      addLog(level, text);
    };
  }
  // JSON text of the buffered lines. Lines are kept as JSON texts and joined
  // by hand: JSON.stringify of an object pushes it on an internal array, where
  // a setter on Array.prototype could see it.
  function takeLogsJSON(final) {
    if (final && logDropped > 0) {
      push(logs, '["warn",' + JSONstringify(logDropped + ' more console lines were dropped (at most ' +
        MAX_LOG_LINES + ' per call)') + ']');
      logDropped = 0;
    }
    if (logs.length === 0) return '0';
    let text = '[';
    for (let i = 0; i < logs.length; i++) text += (i ? ',' : '') + logs[i];
    logs = list();
    return text + ']';
  }
  function pairJSON(pair) {
    return '[' + JSONstringify(pair[0]) + ',' + JSONstringify(pair[1]) + ']';
  }

  const consoleObject = { __proto__: ObjectProto };
  const CONSOLE_LEVELS = ['log', 'info', 'warn', 'error', 'debug', 'trace'];
  for (let i = 0; i < CONSOLE_LEVELS.length; i++) {
    const lv = CONSOLE_LEVELS[i];
    def(consoleObject, lv, consoleMethod(lv === 'trace' ? 'debug' : lv));
  }
  def(consoleObject, 'dir', consoleMethod('log'));
  freeze(consoleObject);
  def(G, 'console', consoleObject);

  // ------------------------------------------------------------------ PRNG
  // xoshiro128** (Blackman & Vigna). The host derives the state from the seed:
  // SHA-256(seed)[0:16] as four little-endian uint32.
  let s0 = 1, s1 = 0, s2 = 0, s3 = 0;
  function reseed(words) {
    s0 = words[0] >>> 0;
    s1 = words[1] >>> 0;
    s2 = words[2] >>> 0;
    s3 = words[3] >>> 0;
    if ((s0 | s1 | s2 | s3) === 0) s0 = 1;
  }
  function nextU32() {
    const x = imul(s1, 5);
    const result = imul((x << 7) | (x >>> 25), 9) >>> 0;
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = (s3 << 11) | (s3 >>> 21);
    return result;
  }
  // 53 random bits: 27 from the first draw, 26 from the second.
  def(Math, 'random', function random() {
    const hi = nextU32() >>> 5;
    const lo = nextU32() >>> 6;
    return (hi * 67108864 + lo) / 9007199254740992;
  });

  // ------------------------------------------------------------------ Date
  function nowMs() {
    return clockBase + clockAdvance;
  }
  const WEEKDAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  const MONTH_NAMES = ['january', 'february', 'march', 'april', 'may', 'june', 'july', 'august',
    'september', 'october', 'november', 'december'];
  const DAY_NAMES = ['sunday', 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday'];
  const ZONES = { __proto__: null, est: -300, edt: -240, cst: -360, cdt: -300, mst: -420, mdt: -360,
    pst: -480, pdt: -420 };

  function pad(n, width) {
    return apply(strPadStart, StringCtor(n), [width, '0']);
  }
  function yearText(y) {
    return y >= 0 ? pad(y, 4) : '-' + pad(-y, 4);
  }
  function fieldsOf(d) {
    const t = apply(dateGetTime, d, []);
    if (t !== t) return null;
    return {
      __proto__: null,
      y: apply(dateGetUTCFullYear, d, []),
      m: apply(dateGetUTCMonth, d, []),
      d: apply(dateGetUTCDate, d, []),
      wd: apply(dateGetUTCDay, d, []),
      h: apply(dateGetUTCHours, d, []),
      mi: apply(dateGetUTCMinutes, d, []),
      s: apply(dateGetUTCSeconds, d, []),
    };
  }
  function dateText(f) {
    return WEEKDAYS[f.wd] + ' ' + MONTHS[f.m] + ' ' + pad(f.d, 2) + ' ' + yearText(f.y);
  }
  function timeText(f) {
    return pad(f.h, 2) + ':' + pad(f.mi, 2) + ':' + pad(f.s, 2) + ' GMT+0000';
  }
  function localeDate(f) {
    return pad(f.m + 1, 2) + '/' + pad(f.d, 2) + '/' + yearText(f.y);
  }
  function localeTime(f) {
    const h12 = f.h % 12 === 0 ? 12 : f.h % 12;
    return pad(h12, 2) + ':' + pad(f.mi, 2) + ':' + pad(f.s, 2) + (f.h < 12 ? ' AM' : ' PM');
  }

  // UTC time value from fields; the year is taken literally (no 0-99 mapping).
  function makeTime(y, mo, d, h, mi, s, ms) {
    const date = new NativeDate(0);
    apply(dateSetUTCFullYear, date, [y, mo, d]);
    apply(dateSetUTCHours, date, [h, mi, s, ms]);
    return apply(dateGetTime, date, []);
  }

  const ISO_RE = /^\s*([+-]\d{6}|\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?(Z|[+-]\d\d(?::?\d\d)?)?\s*$/;

  function parseOffset(text) {
    // "+hh", "+hhmm", "+hh:mm" -> minutes east of UTC
    const sign = text[0] === '-' ? -1 : 1;
    let digits = '';
    for (let i = 1; i < text.length; i++) if (text[i] !== ':') digits += text[i];
    const hh = NumberCtor(apply(strSlice, digits, [0, 2]));
    const mm = digits.length > 2 ? NumberCtor(apply(strSlice, digits, [2, 4])) : 0;
    if (hh > 23 || mm > 59) return NaN;
    return sign * (hh * 60 + mm);
  }

  function parseISO(s) {
    const m = apply(RegExpExec, ISO_RE, [s]);
    if (m === null) return undefined;
    if (m[1] === '-000000') return NaN;
    const y = NumberCtor(m[1]);
    const mo = m[2] === undefined ? 1 : NumberCtor(m[2]);
    const d = m[3] === undefined ? 1 : NumberCtor(m[3]);
    if (mo < 1 || mo > 12 || d < 1 || d > 31) return NaN;
    let h = 0, mi = 0, sec = 0, ms = 0;
    if (m[4] !== undefined) {
      h = NumberCtor(m[4]);
      mi = NumberCtor(m[5]);
      sec = m[6] === undefined ? 0 : NumberCtor(m[6]);
      if (m[7] !== undefined) ms = NumberCtor(apply(strSlice, m[7] + '00', [0, 3]));
      if (mi > 59 || sec > 59 || h > 24 || (h === 24 && (mi || sec || ms))) return NaN;
    }
    let offset = 0;
    if (m[8] !== undefined && m[8] !== 'Z') {
      offset = parseOffset(m[8]);
      if (offset !== offset) return NaN;
    }
    return makeTime(y, mo - 1, d, h, mi, sec, ms) - offset * 60000;
  }

  function isDigit(c) {
    return c >= 48 && c <= 57;
  }
  function isAlpha(c) {
    return (c >= 65 && c <= 90) || (c >= 97 && c <= 122);
  }
  function prefixIndex(word, names) {
    for (let i = 0; i < names.length; i++) {
      if (apply(strSlice, names[i], [0, word.length]) === word) return i;
    }
    return -1;
  }

  // The informal formats (toString, toUTCString, "Jan 1, 2020 10:00 PM", "1/2/2020"...).
  // A time without a zone is UTC, whatever the host's time zone.
  function parseLegacy(s) {
    const n = s.length;
    let i = 0;
    let year, month, day, hour, minute = 0, second = 0, ms = 0, ampm, tz;
    let yearDigits = 4;
    const nums = list();
    const code = (j) => apply(strCharCodeAt, s, [j]);
    const readDigits = () => {
      const start = i;
      while (i < n && isDigit(code(i))) i++;
      return apply(strSlice, s, [start, i]);
    };
    while (i < n) {
      const c = code(i);
      if (c === 32 || c === 9 || c === 10 || c === 13 || c === 44 || c === 46) {
        i++;
        continue;
      }
      if (c === 40) {
        // parenthesised comment, e.g. "(Coordinated Universal Time)"
        let depth = 0;
        while (i < n) {
          const cc = code(i++);
          if (cc === 40) depth++;
          else if (cc === 41 && --depth === 0) break;
        }
        continue;
      }
      if (isAlpha(c)) {
        const start = i;
        while (i < n && isAlpha(code(i))) i++;
        const word = apply(strToLowerCase, apply(strSlice, s, [start, i]), []);
        if (word === 'am' || word === 'pm') {
          if (ampm !== undefined) return NaN;
          ampm = word;
        } else if (word === 'z' || word === 'gmt' || word === 'utc' || word === 'ut') {
          if (tz !== undefined) return NaN;
          tz = 0;
        } else if (ZONES[word] !== undefined) {
          if (tz !== undefined) return NaN;
          tz = ZONES[word];
        } else if (word === 't' && hour === undefined) {
          // ISO-like date/time separator
        } else if (word.length >= 3 && prefixIndex(word, MONTH_NAMES) >= 0) {
          if (month !== undefined) return NaN;
          month = prefixIndex(word, MONTH_NAMES);
        } else if (word.length >= 3 && prefixIndex(word, DAY_NAMES) >= 0) {
          // weekday names carry no information
        } else {
          return NaN;
        }
        continue;
      }
      if (c === 43 || c === 45) {
        const sign = c === 45 ? -1 : 1;
        i++;
        const digits = readDigits();
        if (!digits.length) return NaN;
        if (hour !== undefined || tz !== undefined) {
          // a zone offset: +h, +hh, +hhmm, +hh:mm
          let hh, mm = 0;
          if (digits.length <= 2) {
            hh = NumberCtor(digits);
            if (i < n && code(i) === 58) {
              i++;
              const m2 = readDigits();
              if (m2.length !== 2) return NaN;
              mm = NumberCtor(m2);
            }
          } else if (digits.length === 4) {
            hh = NumberCtor(apply(strSlice, digits, [0, 2]));
            mm = NumberCtor(apply(strSlice, digits, [2, 4]));
          } else {
            return NaN;
          }
          if (hh > 23 || mm > 59) return NaN;
          tz = (tz === undefined ? 0 : tz) + sign * (hh * 60 + mm);
        } else if (sign < 0 && year === undefined) {
          year = -NumberCtor(digits);
          yearDigits = 4;
        } else {
          return NaN;
        }
        continue;
      }
      if (isDigit(c)) {
        const digits = readDigits();
        const next = i < n ? code(i) : -1;
        if (next === 58) {
          // time hh:mm[:ss[.fff]]
          if (hour !== undefined) return NaN;
          hour = NumberCtor(digits);
          i++;
          const mdig = readDigits();
          if (mdig.length !== 2) return NaN;
          minute = NumberCtor(mdig);
          if (i < n && code(i) === 58) {
            i++;
            const sdig = readDigits();
            if (sdig.length !== 2) return NaN;
            second = NumberCtor(sdig);
            if (i < n && code(i) === 46 && i + 1 < n && isDigit(code(i + 1))) {
              i++;
              const fdig = readDigits();
              ms = NumberCtor(apply(strSlice, fdig + '00', [0, 3]));
            }
          }
          continue;
        }
        if ((next === 47 || next === 45) && i + 1 < n && isDigit(code(i + 1))) {
          // numeric date: y/m/d, y-m-d or m/d/y
          if (year !== undefined || month !== undefined || day !== undefined) return NaN;
          const sep = next;
          const parts = list();
          push(parts, digits);
          while (i < n && code(i) === sep && i + 1 < n && isDigit(code(i + 1))) {
            i++;
            push(parts, readDigits());
          }
          if (parts.length === 3 && parts[0].length >= 3) {
            year = NumberCtor(parts[0]);
            yearDigits = parts[0].length;
            month = NumberCtor(parts[1]) - 1;
            day = NumberCtor(parts[2]);
          } else if (parts.length === 3) {
            month = NumberCtor(parts[0]) - 1;
            day = NumberCtor(parts[1]);
            year = NumberCtor(parts[2]);
            yearDigits = parts[2].length;
          } else if (parts.length === 2 && parts[0].length <= 2) {
            month = NumberCtor(parts[0]) - 1;
            day = NumberCtor(parts[1]);
          } else {
            return NaN;
          }
          continue;
        }
        push(nums, digits);
        continue;
      }
      return NaN;
    }
    for (let j = 0; j < nums.length; j++) {
      const digits = nums[j];
      if (day === undefined && digits.length <= 2 && month !== undefined) {
        day = NumberCtor(digits);
      } else if (year === undefined) {
        year = NumberCtor(digits);
        yearDigits = digits.length;
      } else if (day === undefined && digits.length <= 2) {
        day = NumberCtor(digits);
      } else {
        return NaN;
      }
    }
    if (year === undefined || month === undefined) return NaN;
    if (day === undefined) day = 1;
    if (yearDigits <= 2 && year >= 0) year += year < 50 ? 2000 : 1900;
    if (month < 0 || month > 11 || day < 1 || day > 31) return NaN;
    if (hour === undefined) hour = 0;
    if (ampm !== undefined) {
      if (hour < 1 || hour > 12) return NaN;
      hour = (hour % 12) + (ampm === 'pm' ? 12 : 0);
    }
    if (hour > 24 || minute > 59 || second > 59) return NaN;
    if (hour === 24 && (minute || second || ms)) return NaN;
    return makeTime(year, month, day, hour, minute, second, ms) - (tz === undefined ? 0 : tz) * 60000;
  }

  function parseDate(s) {
    const iso = parseISO(s);
    if (iso !== undefined) return iso;
    return parseLegacy(s);
  }

  function toPrimitive(v) {
    const exotic = v[SymbolToPrimitive];
    if (exotic !== undefined && exotic !== null) {
      const r = apply(exotic, v, ['default']);
      if (r !== null && (typeof r === 'object' || typeof r === 'function')) {
        throw new TypeErrorCtor('cannot convert object to primitive value');
      }
      return r;
    }
    const methods = ['valueOf', 'toString'];
    for (let i = 0; i < 2; i++) {
      const f = v[methods[i]];
      if (typeof f === 'function') {
        const r = apply(f, v, []);
        if (r === null || (typeof r !== 'object' && typeof r !== 'function')) return r;
      }
    }
    throw new TypeErrorCtor('cannot convert object to primitive value');
  }
  function thisTimeValue(v) {
    try {
      return apply(dateGetTime, v, []);
    } catch (_) {
      return undefined;
    }
  }

  function DateShim(...args) {
    if (new.target === undefined) {
      const f = fieldsOf(new NativeDate(nowMs()));
      return f === null ? 'Invalid Date' : dateText(f) + ' ' + timeText(f);
    }
    let t;
    if (args.length === 0) {
      t = nowMs();
    } else if (args.length === 1) {
      let v = args[0];
      const tv = v !== null && typeof v === 'object' ? thisTimeValue(v) : undefined;
      if (tv !== undefined) {
        t = tv;
      } else {
        if (v !== null && (typeof v === 'object' || typeof v === 'function')) v = toPrimitive(v);
        t = typeof v === 'string' ? parseDate(v) : NumberCtor(v);
      }
    } else {
      t = apply(dateUTC, undefined, args);
    }
    return construct(NativeDate, [t], new.target);
  }
  defineProperty(DateShim, 'prototype', { value: DP, writable: false, enumerable: false, configurable: false });
  defineProperty(DateShim, 'length', { value: 7, configurable: true });
  defineProperty(DateShim, 'name', { value: 'Date', configurable: true });
  def(DateShim, 'UTC', dateUTC);
  def(DateShim, 'now', function now() {
    return nowMs();
  });
  def(DateShim, 'parse', function parse(s) {
    return parseDate(StringCtor(s));
  });
  def(DP, 'constructor', DateShim);

  const UTC_FIELDS = ['FullYear', 'Month', 'Date', 'Day', 'Hours', 'Minutes', 'Seconds', 'Milliseconds'];
  for (let i = 0; i < UTC_FIELDS.length; i++) {
    const f = UTC_FIELDS[i];
    def(DP, 'get' + f, DP['getUTC' + f]);
    if (f !== 'Day') def(DP, 'set' + f, DP['setUTC' + f]);
  }
  def(DP, 'getTimezoneOffset', function getTimezoneOffset() {
    const t = apply(dateGetTime, this, []);
    return t !== t ? NaN : 0;
  });
  def(DP, 'getYear', function getYear() {
    return apply(dateGetUTCFullYear, this, []) - 1900;
  });
  def(DP, 'setYear', function setYear(year) {
    const y = NumberCtor(year);
    if (y !== y) {
      return apply(dateSetTime, this, [NaN]);
    }
    const yi = mathTrunc(y);
    return apply(dateSetUTCFullYear, this, [yi >= 0 && yi <= 99 ? 1900 + yi : y]);
  });
  function dateFormatter(name, render) {
    def(DP, name, {
      [name]() {
        const f = fieldsOf(this);
        return f === null ? 'Invalid Date' : render(f);
      },
    }[name]);
  }
  dateFormatter('toString', (f) => dateText(f) + ' ' + timeText(f));
  dateFormatter('toDateString', dateText);
  dateFormatter('toTimeString', timeText);
  dateFormatter('toLocaleString', (f) => localeDate(f) + ', ' + localeTime(f));
  dateFormatter('toLocaleDateString', localeDate);
  dateFormatter('toLocaleTimeString', localeTime);
  def(G, 'Date', DateShim);

  // ------------------------------------------------------------------ timers
  // Virtual timers, fired by the host only while the call's promise is pending
  // and nothing else can run, in (deadline, creation order). Timers never
  // outlive the call (or load) that created them.
  let timerIds = 0; // ids are unique over the runtime's life
  let timerSeq = 0;
  let timerCount = 0;
  const timers = newMap(); // id -> record
  let heap = list(); // records ordered by (due, seq); stale entries are skipped

  function heapLess(a, b) {
    return a.due < b.due || (a.due === b.due && a.seq < b.seq);
  }
  function heapPush(entry) {
    let j = heap.length;
    heap[j] = entry;
    while (j > 0) {
      const p = (j - 1) >> 1;
      if (!heapLess(heap[j], heap[p])) break;
      const tmp = heap[p];
      heap[p] = heap[j];
      heap[j] = tmp;
      j = p;
    }
  }
  function heapPop() {
    const top = heap[0];
    const last = heap[heap.length - 1];
    heap.length = heap.length - 1;
    if (heap.length > 0) {
      heap[0] = last;
      let j = 0;
      for (;;) {
        const l = 2 * j + 1;
        const r = l + 1;
        let m = j;
        if (l < heap.length && heapLess(heap[l], heap[m])) m = l;
        if (r < heap.length && heapLess(heap[r], heap[m])) m = r;
        if (m === j) break;
        const tmp = heap[m];
        heap[m] = heap[j];
        heap[j] = tmp;
        j = m;
      }
    }
    return top;
  }
  function clearAllTimers() {
    if (timerCount === 0 && heap.length === 0) return;
    apply(MapClear, timers, []);
    heap = list();
    timerCount = 0;
  }
  function toDelay(delay, minimum) {
    let d = NumberCtor(delay);
    if (!(d >= 0)) d = 0; // NaN and negatives
    if (d === Infinity) d = 2147483647;
    d = mathFloor(d);
    return mathMax(d, minimum);
  }
  function addTimer(fn, delay, args, repeat) {
    if (typeof fn !== 'function') {
      throw new TypeErrorCtor('the callback must be a function');
    }
    const id = ++timerIds;
    const interval = repeat ? toDelay(delay, 1) : 0;
    const rec = {
      __proto__: null,
      id,
      fn,
      args,
      interval,
      due: nowMs() + (repeat ? interval : toDelay(delay, 0)),
      seq: ++timerSeq,
    };
    apply(MapSet, timers, [id, rec]);
    timerCount++;
    heapPush({ __proto__: null, due: rec.due, seq: rec.seq, rec });
    return id;
  }
  function removeTimer(id) {
    if (typeof id !== 'number') return;
    if (apply(MapDelete, timers, [id])) timerCount--;
  }
  // Fires the next due timer; returns false when none is left.
  function fireNextTimer() {
    while (heap.length > 0) {
      const entry = heapPop();
      const rec = entry.rec;
      if (apply(MapGet, timers, [rec.id]) !== rec || rec.seq !== entry.seq) continue;
      if (entry.due > nowMs()) clockAdvance = entry.due - clockBase;
      if (rec.interval > 0) {
        rec.due = entry.due + rec.interval;
        rec.seq = ++timerSeq;
        heapPush({ __proto__: null, due: rec.due, seq: rec.seq, rec });
      } else {
        apply(MapDelete, timers, [rec.id]);
        timerCount--;
      }
      try {
        apply(rec.fn, undefined, rec.args);
      } catch (e) {
        reportUncaught('timer callback', e);
      }
      return true;
    }
    return false;
  }
  function reportUncaught(where, e) {
    const pair = errorPair(e);
    if (LIMITS_END_CALLS && fatalPair === null && isResourcePair(pair)) fatalPair = pair;
    addLog('error', 'Uncaught exception in ' + where + ': ' + pair[0] + ': ' + pair[1]);
  }
  // Errors that say where the machine's limits struck, not what the script did:
  // out of memory, a string too long, a stack overflow, and the null QuickJS
  // throws when memory runs out so completely that it cannot make its error.
  function isResourcePair(pair) {
    const name = pair[0];
    const message = pair[1];
    return (name === 'InternalError' && (message === 'out of memory' || message === 'string too long')) ||
      (name === 'RangeError' && message === 'Maximum call stack size exceeded') ||
      (name === 'Error' && message === 'null');
  }

  def(G, 'setTimeout', function setTimeout(fn, delay, ...args) {
    return addTimer(fn, delay, args, false);
  });
  def(G, 'setInterval', function setInterval(fn, delay, ...args) {
    return addTimer(fn, delay, args, true);
  });
  def(G, 'clearTimeout', function clearTimeout(id) {
    removeTimer(id);
  });
  def(G, 'clearInterval', function clearInterval(id) {
    removeTimer(id);
  });
  if (config.version >= 3) {
    // Node's, which the seed's sandbox had: a callback once no job is pending,
    // with the timers due now, in creation order.
    def(G, 'setImmediate', function setImmediate(fn, ...args) {
      return addTimer(fn, 0, args, false);
    });
    def(G, 'clearImmediate', function clearImmediate(id) {
      removeTimer(id);
    });
  }
  def(G, 'queueMicrotask', function queueMicrotask(fn) {
    if (typeof fn !== 'function') {
      throw new TypeErrorCtor('the callback must be a function');
    }
    nativeQueueMicrotask(() => {
      try {
        fn();
      } catch (e) {
        reportUncaught('microtask', e);
      }
    });
  });

  // ------------------------------------------------------------ host requests
  let requestIds = 0;
  const pending = newMap(); // id -> [resolve, reject, convert]
  let outbox = list(); // wire texts "[id,op,args]"

  // JSON text of a list the prelude built, when every item is a string, a
  // finite number, a boolean or null: then JSON.stringify reads no toJSON and
  // gives what encodeStrict would. Undefined for any other list.
  function flatListText(args) {
    for (let i = 0; i < args.length; i++) {
      const v = args[i];
      const t = typeof v;
      if (t === 'string' || t === 'boolean' || v === null || (t === 'number' && v - v === 0)) continue;
      return undefined;
    }
    return JSONstringify(args);
  }

  // `op` is one of the prelude's own operation names (plain ASCII, nothing to
  // escape); `args` a prototype-less list.
  function request(op, args, convert) {
    if (phase !== PHASE_CALL) {
      return apply(PromiseReject, PromiseCtor, [makeError('UnavailableError',
        'System.' + (op === 'oracle' ? 'oracles' : op) + ' can only be used during a call, ' +
        'not while the script loads')]);
    }
    let wire;
    try {
      wire = flatListText(args);
      if (wire === undefined || mayHoldLoneSurrogate(wire)) {
        // The general encoder; it fails the same way for a lone surrogate.
        wire = encodeStrict(args, 'arguments', true);
      }
    } catch (e) {
      return apply(PromiseReject, PromiseCtor, [e]);
    }
    const id = ++requestIds;
    let res, rej;
    const promise = new PromiseCtor((a, b) => {
      res = a;
      rej = b;
    });
    const entry = list();
    entry[0] = res;
    entry[1] = rej;
    entry[2] = convert;
    apply(MapSet, pending, [id, entry]);
    outbox[outbox.length] = '[' + id + ',"' + op + '",' + wire + ']';
    return promise;
  }

  function settleRequest(msg) {
    // msg: [id, 1, value] or [id, 0, name, message] for a HostError.
    const id = msg[0];
    if (msg[1] !== 0) {
      resolveRequest(id, msg[2]);
      return;
    }
    const entry = apply(MapGet, pending, [id]);
    if (entry === undefined) return;
    apply(MapDelete, pending, [id]);
    const name = StringCtor(msg[2]);
    const error = makeError(name, StringCtor(msg[3]));
    const flag = ERROR_FLAGS ? errorFlag(name) : undefined;
    if (flag !== undefined) error[flag] = true;
    entry[1](error);
  }
  function errorFlag(name) {
    switch (name) {
      case 'NotFoundError': return 'notFound';
      case 'NotAFileError': return 'notAFile';
      case 'NotAFolderError': return 'notAFolder';
      case 'EntryAlreadyExistsError': return 'entryAlreadyExists';
      case 'ParentFolderDoesntExistError': return 'parentFolderDoesntExist';
      case 'DestDirectoryNotEmpty': return 'destDirectoryNotEmpty';
      case 'InvalidPathError': return 'invalidPath';
      case 'ArchiveNotWritableError': return 'archiveNotWritable';
      default: return undefined;
    }
  }
  function resolveRequest(id, value) {
    const entry = apply(MapGet, pending, [id]);
    if (entry === undefined) return;
    apply(MapDelete, pending, [id]);
    if (entry[2] !== null) {
      try {
        value = entry[2](value);
      } catch (e) {
        entry[1](e);
        return;
      }
    }
    entry[0](value);
  }

  function normEncoding(opts, fallback) {
    if (opts === undefined) return fallback; // every fallback is already normalised
    let enc = opts;
    if (opts !== null && typeof opts === 'object') enc = opts.encoding;
    if (enc === undefined || enc === null) enc = fallback;
    enc = apply(strToLowerCase, StringCtor(enc), []);
    if (enc === 'utf-8') enc = 'utf8';
    if (enc !== 'utf8' && enc !== 'binary' && enc !== 'base64' && enc !== 'hex') {
      throw new TypeErrorCtor('unsupported encoding ' + JSONstringify(StringCtor(enc)));
    }
    return enc;
  }
  function toDate(v) {
    if (typeof v === 'number' || typeof v === 'string') return new DateShim(v);
    return v;
  }
  const StatProto = { __proto__: ObjectProto };
  function Stat() {}
  defineProperty(Stat, 'prototype', { value: StatProto });
  def(StatProto, 'constructor', Stat);
  def(StatProto, 'isFile', function isFile() {
    return this._type === 'file';
  });
  def(StatProto, 'isDirectory', function isDirectory() {
    return this._type === 'directory';
  });
  function makeStat(raw) {
    if (raw === null || typeof raw !== 'object' || isArray(raw)) return raw;
    const st = new Stat();
    let type = raw.type;
    if (type === undefined) {
      if (raw.isDirectory === true) type = 'directory';
      else if (raw.isFile === true || raw.isDirectory === false) type = 'file';
    }
    def(st, '_type', type === undefined ? null : StringCtor(type));
    const ks = objectKeys(raw);
    for (let i = 0; i < ks.length; i++) {
      const k = ks[i];
      if (k === 'isFile' || k === 'isDirectory') continue;
      let v = raw[k];
      if (k === 'mtime' || k === 'ctime') v = toDate(v);
      defineProperty(st, k, { value: v, writable: true, enumerable: true, configurable: true });
    }
    return st;
  }
  function convertReaddir(v) {
    if (!isArray(v)) return v;
    for (let i = 0; i < v.length; i++) {
      const item = v[i];
      if (item !== null && typeof item === 'object' && item.stat !== undefined) {
        item.stat = makeStat(item.stat);
      }
    }
    return v;
  }
  // Argument lists without a prototype: serialising them never reaches a toJSON
  // a script could have put on Array.prototype or Object.prototype.
  function args1(a) {
    const l = list();
    l[0] = a;
    return l;
  }
  function args2(a, b) {
    const l = list();
    l[0] = a;
    l[1] = b;
    return l;
  }
  function args3(a, b, c) {
    const l = list();
    l[0] = a;
    l[1] = b;
    l[2] = c;
    return l;
  }
  function trimArgs(args) {
    const out = list();
    let n = args.length;
    while (n > 0 && args[n - 1] === undefined) n--;
    for (let i = 0; i < n; i++) out[i] = args[i];
    return out;
  }
  function generic(op, convert) {
    return function () {
      return request('files.' + op, trimArgs(arguments), convert);
    };
  }
  function rejected(e) {
    return apply(PromiseReject, PromiseCtor, [e]);
  }

  const files = { __proto__: ObjectProto };
  def(files, 'getInfo', generic('getInfo', null));
  def(files, 'stat', function stat(path) {
    return request('files.stat', args1(path), makeStat);
  });
  def(files, 'readFile', function readFile(path, opts) {
    let enc;
    try {
      enc = normEncoding(opts, 'utf8');
    } catch (e) {
      return rejected(e);
    }
    return request('files.readFile', args2(path, enc), null);
  });
  def(files, 'readdir', generic('readdir', convertReaddir));
  def(files, 'writeFile', function writeFile(path, data, opts) {
    try {
      if (isBinary(data)) {
        return request('files.writeFile', args3(path, data, 'binary'), null);
      }
      if (typeof data !== 'string') {
        throw new TypeErrorCtor('writeFile: data must be a string, a Uint8Array or an ArrayBuffer');
      }
      const enc = normEncoding(opts, 'utf8');
      if (enc === 'binary') {
        throw new TypeErrorCtor("writeFile: the 'binary' encoding needs a Uint8Array or an ArrayBuffer");
      }
      return request('files.writeFile', args3(path, data, enc), null);
    } catch (e) {
      return rejected(e);
    }
  });
  def(files, 'mkdir', generic('mkdir', null));
  def(files, 'unlink', generic('unlink', null));
  def(files, 'rmdir', generic('rmdir', null));
  def(files, 'history', generic('history', null));
  freeze(files);

  // Any string property is an oracle, except the names the language itself
  // probes (then, toJSON...), so the object is never mistaken for a thenable.
  const NOT_ORACLES = { __proto__: null, then: 1, toJSON: 1, toString: 1, valueOf: 1, constructor: 1,
    inspect: 1 };
  const oracleFns = newMap();
  const oracles = new ProxyCtor({ __proto__: null }, {
    __proto__: null,
    get(target, name) {
      if (typeof name !== 'string' || NOT_ORACLES[name] === 1) return undefined;
      let fn = apply(MapGet, oracleFns, [name]);
      if (fn === undefined) {
        fn = {
          [name]() {
            return request('oracle', args2(name, trimArgs(arguments)), null);
          },
        }[name];
        apply(MapSet, oracleFns, [name, fn]);
      }
      return fn;
    },
    has(target, name) {
      return typeof name === 'string' && NOT_ORACLES[name] !== 1;
    },
    set() {
      return false;
    },
    defineProperty() {
      return false;
    },
    deleteProperty() {
      return false;
    },
    setPrototypeOf() {
      return false;
    },
    preventExtensions() {
      return false;
    },
  });

  const System = { __proto__: ObjectProto };
  defineProperty(System, 'caller', {
    get() {
      return callerObject;
    },
    enumerable: true,
    configurable: false,
  });
  defineProperty(System, 'files', { value: files, enumerable: true });
  defineProperty(System, 'oracles', { value: oracles, enumerable: true });
  freeze(System);
  def(G, 'System', System);

  // ------------------------------------------------------------- calls
  let moduleExports = undefined;

  function leaveCall() {
    // Only the host knows when no job is left, so the phase stays CALL (jobs
    // that run after the settlement may still make requests) until an entry
    // that runs outside calls.
    phase = PHASE_IDLE;
    callerObject = freeze({ __proto__: ObjectProto });
  }
  function settleValue(token, value) {
    if (token !== callToken || settled) return;
    settled = true;
    switch (typeof value) {
      case 'undefined':
        resultKind = 0;
        return;
      case 'number':
        if (numIsFinite(value)) {
          resultText = '' + value; // a finite number's JSON is its ToString
          resultKind = 1;
          return;
        }
        break;
      case 'boolean':
        resultText = value ? 'true' : 'false';
        resultKind = 1;
        return;
      case 'string':
        if (apply(strIsWellFormed, value, [])) {
          resultText = JSONstringify(value);
          resultKind = 1;
          return;
        }
        break;
      default:
        if (value === null) {
          resultText = 'null';
          resultKind = 1;
          return;
        }
    }
    try {
      const text = encodeStrict(value, 'result', false);
      // A toJSON method may turn the value into undefined: no value, as
      // JSON.stringify would give.
      resultKind = text === undefined ? 0 : 1;
      resultText = text === undefined ? '' : text;
    } catch (e) {
      settleError(token, e);
    }
  }
  function settleError(token, e) {
    if (token !== callToken) return;
    settled = true;
    resultKind = 2;
    resultText = pairJSON(errorPair(e));
  }
  function startCall(fn, self, args) {
    settled = false;
    resultKind = 0;
    resultText = '';
    const token = ++callToken;
    let r;
    try {
      r = apply(fn, self, args);
    } catch (e) {
      settleError(token, e);
      return;
    }
    if (r !== null && (typeof r === 'object' || typeof r === 'function')) {
      let then;
      try {
        then = r.then;
      } catch (e) {
        settleError(token, e);
        return;
      }
      if (typeof then === 'function') {
        const p = apply(PromiseResolve, PromiseCtor, [r]);
        apply(PromiseThen, p, [
          (v) => settleValue(token, v),
          (e) => settleError(token, e),
        ]);
        return;
      }
    }
    settleValue(token, r);
  }
  function status(code, body) {
    return code + '[' + body + (body === '' ? '' : ',') + takeLogsJSON(false) + ']';
  }
  function doneStatus() {
    // Timers never outlive the call that created them.
    clearAllTimers();
    const res = resultKind === 0 ? '0' : resultText;
    return 'D[' + resultKind + ',' + res + ',' + clockAdvance + ',' + takeLogsJSON(true) + ']';
  }

  let lastCaller = null;
  let lastCallerObject = callerObject;

  // The hot path: one entry per call. Strings the host could not pass safely
  // as C strings (NUL, lone surrogates) arrive JSON-encoded, flagged in `flags`.
  function begin(method, argsText, ts, w0, w1, w2, w3, caller, flags) {
    if (flags & 1) method = JSONparse(method);
    if (flags & 2) caller = JSONparse(caller);
    const exp = moduleExports;
    if (exp === null || (typeof exp !== 'object' && typeof exp !== 'function')) return 'X';
    // The call's state is set before the lookup: a Proxy's traps are script code.
    phase = PHASE_CALL;
    clockBase = ts;
    clockAdvance = 0;
    s0 = w0 >>> 0;
    s1 = w1 >>> 0;
    s2 = w2 >>> 0;
    s3 = w3 >>> 0;
    if ((s0 | s1 | s2 | s3) === 0) s0 = 1;
    if (caller !== lastCaller) {
      lastCaller = caller;
      lastCallerObject = freeze(caller === null ? { __proto__: ObjectProto } : { __proto__: ObjectProto, id: caller });
    }
    callerObject = lastCallerObject;
    logCount = 0;
    logDropped = 0;
    fatalPair = null;
    // Callable exports are own, enumerable data properties holding a function,
    // exactly what export_names() reports as functions.
    let desc;
    try {
      desc = getOwnPropertyDescriptor(exp, method);
    } catch (e) {
      settled = false;
      settleError(++callToken, e);
      return doneStatus();
    }
    if (desc === undefined || desc.enumerable !== true || !hasOwn(desc, 'value') ||
        typeof desc.value !== 'function') {
      return 'X';
    }
    startCall(desc.value, exp, argsText === null ? [] : JSONparse(argsText));
    if (outbox.length > 0) {
      // The requests the call made before its first await go out at once. Jobs
      // may still be pending: the host runs them and takes the requests they
      // made (TAKE) before it serves any of these.
      return status('R', takeRequests());
    }
    if (settled) {
      if (resultKind === 1 && clockAdvance === 0 && logs.length === 0 && logDropped === 0 &&
          timerCount === 0 && heap.length === 0) {
        return resultText; // fast path: the bare JSON text of the value
      }
      return doneStatus();
    }
    return status('P', '');
  }

  // JSON array of the queued request texts, in the order they were made; empties the outbox.
  function takeRequests() {
    const taken = outbox;
    if (taken.length === 0) return '[]';
    outbox = list();
    let body = taken[0];
    for (let i = 1; i < taken.length; i++) body += ',' + taken[i];
    return '[' + body + ']';
  }

  function poll() {
    if (fatalPair !== null) {
      // A timer callback or a microtask hit a limit: the call ends with that
      // error, as if it had thrown it (a swallowed limit would let a replay
      // under other limits reproduce another result, not see the limit).
      settled = true;
      resultKind = 2;
      resultText = pairJSON(fatalPair);
      fatalPair = null;
      // The call's requests not yet taken die with it (those the host took
      // before were served), and so do their promises: at the end of a call
      // every request taken has been answered, so all that is pending is theirs.
      outbox = list();
      apply(MapClear, pending, []);
      callToken++; // and its late reactions are ignored
      return doneStatus();
    }
    if (outbox.length > 0) return status('R', takeRequests());
    if (settled) return doneStatus();
    if (timerCount > 0 && fireNextTimer()) return status('T', '');
    // Nothing can make progress: the promise will never settle.
    clearAllTimers();
    const text = 'U[' + clockAdvance + ',' + takeLogsJSON(true) + ']';
    callToken++;
    return text;
  }

  function load(text) {
    const msg = JSONparse(text);
    const code = msg[0];
    phase = PHASE_LOAD;
    clockBase = msg[1];
    clockAdvance = 0;
    reseed(msg[2]);
    logCount = 0;
    logDropped = 0;
    settled = false;
    fatalPair = null;
    const token = ++callToken;
    try {
      // The wrapper keeps the script's own line numbers. A body that closes the
      // wrapper early only runs its extra code at global scope, where there is
      // nothing more to reach than from inside it.
      const wrapper = indirectEval('(function (exports, module) {' + code + '\n})');
      const module = { __proto__: ObjectProto, exports: {} };
      apply(wrapper, module.exports, [module.exports, module]);
      moduleExports = module.exports;
      settled = true;
      resultKind = 0;
    } catch (e) {
      settleError(token, e);
      let stack;
      try {
        stack = e !== null && typeof e === 'object' ? e.stack : undefined;
      } catch (_) {
        stack = undefined;
      }
      if (typeof stack === 'string') {
        const pair = JSONparse(resultText);
        resultText = '[' + JSONstringify(pair[0]) + ',' + JSONstringify(pair[1]) + ',' +
          JSONstringify(scriptFrames(stack)) + ']';
      }
    }
    return doneStatus();
  }

  // The frames of a load error that belong to the script: everything before
  // the first native frame (the prelude's own frames follow it).
  function scriptFrames(stack) {
    let out = '';
    let start = 0;
    while (start < stack.length) {
      let end = apply(strIndexOf, stack, ['\n', start]);
      if (end < 0) end = stack.length;
      let line = apply(strSlice, stack, [start, end]);
      start = end + 1;
      if (apply(strIndexOf, line, ['(native)']) >= 0) break;
      if (line.length) out += (out.length ? '\n' : '') + line;
    }
    return wellFormed(out);
  }

  function exportNames() {
    leaveCall();
    const exp = moduleExports;
    let out = '[';
    if (exp !== null && (typeof exp === 'object' || typeof exp === 'function')) {
      try {
        const ks = objectKeys(exp);
        for (let i = 0; i < ks.length; i++) {
          const desc = getOwnPropertyDescriptor(exp, ks[i]);
          const isFn = desc !== undefined && hasOwn(desc, 'value') && typeof desc.value === 'function';
          out += (i ? ',' : '') + '[' + JSONstringify(ks[i]) + ',' + (isFn ? 'true' : 'false') + ']';
        }
      } catch (e) {
        return 'E' + pairJSON(errorPair(e)); // a Proxy's trap threw
      }
    }
    return out + ']';
  }

  function exportValue(text) {
    leaveCall();
    const name = JSONparse(text);
    const exp = moduleExports;
    if (exp === null || (typeof exp !== 'object' && typeof exp !== 'function')) return 'X';
    let desc;
    try {
      desc = getOwnPropertyDescriptor(exp, name);
    } catch (e) {
      return 'E' + pairJSON(errorPair(e));
    }
    if (desc === undefined || !desc.enumerable) return 'X';
    if (!hasOwn(desc, 'value')) {
      return 'E[' + JSONstringify('EncodingError') + ',' +
        JSONstringify('export ' + name + ' is an accessor property') + ']';
    }
    if (typeof desc.value === 'function') return 'F';
    try {
      if (desc.value === undefined) return 'U';
      const text = encodeStrict(desc.value, 'export ' + name, false);
      return text === undefined ? 'U' : 'V' + text;
    } catch (e) {
      return 'E' + pairJSON(errorPair(e));
    }
  }

  // Long concatenations are rope strings, which the quickjs wrapper cannot
  // convert; slicing gives a flat copy.
  function flat(text) {
    return text.length > 256 ? apply(strSlice, text, [0]) : text;
  }

  // The host's only handle on the prelude.
  return function dispatch(cmd, payload, p2, p3, p4, p5, p6, p7, p8, p9) {
    return flat(run(cmd, payload, p2, p3, p4, p5, p6, p7, p8, p9));
  };
  function run(cmd, payload, p2, p3, p4, p5, p6, p7, p8, p9) {
    switch (cmd) {
      case 1:
        return begin(payload, p2, p3, p4, p5, p6, p7, p8, p9);
      case 2:
        return poll();
      case 3:
        settleRequest(JSONparse(payload));
        return status('T', '');
      case 7:
        settleRequest(JSONparse(payload, reviver));
        return status('T', '');
      case 8:
        return status('R', takeRequests());
      case 9:
        // A request resolved to null; the payload is its id.
        resolveRequest(NumberCtor(payload), null);
        return status('T', '');
      case 4:
        return load(payload);
      case 5:
        return exportNames();
      case 6:
        return exportValue(payload);
      default:
        throw new TypeErrorCtor('unknown command');
    }
  }
})

"""Script runtimes of a VM. The JavaScript one is :mod:`libvms.runtime.js`."""

from .js import (
    ENGINE_NAME,
    ENGINE_VERSION,
    PRELUDE_VERSION,
    CallOutcome,
    HostError,
    HostHandler,
    JSRuntime,
)

__all__ = [
    "ENGINE_NAME",
    "ENGINE_VERSION",
    "PRELUDE_VERSION",
    "CallOutcome",
    "HostError",
    "HostHandler",
    "JSRuntime",
]

"""The wire between the grader and a student's kernel: the hidden checks run outside the kernel.

The hidden checks run in the grader's own process, with the reference; the student's names stay
in the student's kernel. The two talk over a Unix socket. The grader asks the kernel to call a
student's function, to read or set an attribute, to look a name up in the notebook; the kernel
answers with the result:

- **by value** when it is plain data: ``None``, booleans, numbers, strings, bytes, lists,
  tuples, dicts, ``Counter``, sets, tensors, dtypes, devices, ``torch.Generator`` states;
- **as a handle** otherwise (a student's model, a bound method): the object stays in the kernel,
  and the grader holds a :class:`Remote` proxy whose calls and attributes cross the wire again.

Nothing crosses by pickle: the decoder builds only the plain types above, so whatever a hostile
kernel sends is data, never code, and the comparisons in the grader's process run on that data
with the grader's own ``torch``. The reference outputs and the hidden tests' source never enter
the kernel.

Either side may hand the other an object it keeps. The grader swaps a reference part into the
student's namespace this way (``llmcourse.grading.swapped``); when the student's code calls it,
it runs in the grader and only its result crosses. Gradients cross too: a result that requires
grad comes back through :class:`_Bridge`, an autograd function whose backward asks the other
side for the input gradients (and so fills the student's parameter gradients there).

In place changes to arguments are written back (a list the student sorted, a tensor it modified,
a generator it drew from), so checks that a function leaves its input alone, or that it drew the
right number of samples, still see what happened.

Wire format: one message is an 8-byte header (JSON length, number of binary blobs), the JSON,
then each blob with an 8-byte length. Tensors and bytes travel as blobs.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import traceback
from collections import Counter, OrderedDict
from collections.abc import MutableMapping

MAX_JSON = 64 << 20          # a message bigger than these is refused, not parsed
MAX_BYTES = 1 << 30
MAX_BLOBS = 1 << 20
SOCKET_ENV = "LLMCOURSE_CHECK_SOCKET"   # set by the grader in a kernel whose checks run outside

NAMESPACE = 0                 # handle 0 on the kernel side: the notebook's globals()


class WireError(ConnectionError):
    """The other side broke the protocol or went away (a dead or interrupted kernel)."""


class RemoteError(RuntimeError):
    """An exception raised on the other side whose type has no local counterpart."""


# Exception types that keep their type when they cross (a check may expect one of them).
_EXCEPTIONS = {cls.__name__: cls for cls in (
    ArithmeticError, AssertionError, AttributeError, EOFError, FloatingPointError, ImportError,
    IndexError, KeyError, LookupError, MemoryError, ModuleNotFoundError, NameError,
    NotImplementedError, OSError, OverflowError, PermissionError, RecursionError, RuntimeError,
    StopIteration, TimeoutError, TypeError, UnboundLocalError, UnicodeError, ValueError,
    ZeroDivisionError,
)}


# --- framing -----------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 22))
        if not chunk:
            raise WireError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_message(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    parts = [struct.pack("!II", len(text), len(blobs)), text]
    for blob in blobs:
        parts += [struct.pack("!Q", len(blob)), blob]
    sock.sendall(b"".join(parts))


def recv_message(sock: socket.socket) -> tuple[dict, list[bytes]]:
    n_text, n_blobs = struct.unpack("!II", _recv_exact(sock, 8))
    if n_text > MAX_JSON or n_blobs > MAX_BLOBS:
        raise WireError(f"message too large ({n_text} bytes of JSON, {n_blobs} blobs)")
    header = json.loads(_recv_exact(sock, n_text))
    blobs, total = [], n_text
    for _ in range(n_blobs):
        (size,) = struct.unpack("!Q", _recv_exact(sock, 8))
        total += size
        if total > MAX_BYTES:
            raise WireError(f"message too large (over {MAX_BYTES} bytes)")
        blobs.append(_recv_exact(sock, size))
    if not isinstance(header, dict):
        raise WireError("malformed message")
    return header, blobs


# --- the proxy for an object kept on the other side ---------------------------------------------

class Remote:
    """An object that lives on the other side of the wire (a student's object, seen from the
    grader; a reference part, seen from the kernel). Calls, attributes, items, ``len`` and
    iteration cross the wire; the result comes back by value or as another ``Remote``."""

    __slots__ = ("_peer", "_handle", "_type", "_pure", "_memo", "__weakref__")

    def __init__(self, peer: Peer, handle: int, type_name: str, pure=()):
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_pure", frozenset(pure))
        object.__setattr__(self, "_memo", {})

    def __call__(self, *args, **kwargs):
        self._memo.clear()
        return self._peer.request("call", self._handle, list(args), kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in self._pure:
            key = ("attr", name)
            if key in self._memo:
                return self._memo[key]
            value = self._peer.request("getattr", self._handle, name)
            if isinstance(value, Remote):
                value = _PureMethod(self, name, value)
            self._memo[key] = value
            return value
        value = self._peer.request("getattr", self._handle, name)
        if isinstance(value, Remote):  # a method or a part: it may change the object
            self._memo.clear()
        return value

    def __setattr__(self, name, value):
        self._memo.clear()
        self._peer.request("setattr", self._handle, name, value)

    def __getitem__(self, key):
        return self._peer.request("getitem", self._handle, key)

    def __setitem__(self, key, value):
        self._peer.request("setitem", self._handle, key, value)

    def __len__(self):
        return self._peer.request("len", self._handle)

    def __iter__(self):
        return iter(self._peer.request("list", self._handle))

    def __next__(self):  # an iterator on the other side (``next(model.parameters())``)
        return self._peer.request("next", self._handle)

    def __contains__(self, item):
        return self._peer.request("contains", self._handle, item)

    def __repr__(self):
        try:
            return self._peer.request("repr", self._handle)
        except Exception:
            return f"<{self._type} in the student's kernel>"

    @property
    def remote_type(self) -> str:
        """The class name of the object on the other side."""
        return self._type


class _PureMethod:
    """A method or attribute the lender declared pure (a query such as ``prob``, or ``vocab``):
    its answers to the same plain arguments are remembered until something else that may change
    the object is done to it. This saves the round trips of student code that asks a lent
    reference model the same question many times."""

    __slots__ = ("owner", "name", "method")

    def __init__(self, owner: Remote, name: str, method: Remote):
        self.owner, self.name, self.method = owner, name, method

    def __call__(self, *args, **kwargs):
        memo = self.owner._memo
        try:
            key = (self.name, json.dumps([args, sorted(kwargs.items())]))
        except (TypeError, ValueError):
            key = None
        if key is not None and key in memo:
            return memo[key]
        result = self.method(*args, **kwargs)
        if key is not None and type(result) in (float, int, str, bool, type(None)):
            memo[key] = result
        return result


class RemoteNamespace(MutableMapping):
    """The notebook's ``globals()`` in the kernel, as the hidden checks see it."""

    def __init__(self, peer: Peer):
        self._peer = peer

    @property
    def peer(self) -> Peer:
        return self._peer

    def __getitem__(self, name):
        if not self._peer.request("ns_has", NAMESPACE, name):
            raise KeyError(name)
        return self._peer.request("ns_get", NAMESPACE, name)

    def __setitem__(self, name, value):
        self._peer.request("ns_set", NAMESPACE, name, value)

    def __delitem__(self, name):
        if not self._peer.request("ns_del", NAMESPACE, name):
            raise KeyError(name)

    def __contains__(self, name):
        return self._peer.request("ns_has", NAMESPACE, name)

    def __iter__(self):
        return iter(self._peer.request("ns_keys", NAMESPACE))

    def __len__(self):
        return len(self._peer.request("ns_keys", NAMESPACE))


# --- one side of the wire -----------------------------------------------------------------------

class Peer:
    """One end of the wire. ``request`` sends an operation and waits for its answer, serving the
    other side's requests meanwhile (a reference part called back from student code, a backward
    pass), so calls may nest in both directions.

    ``namespace`` is the notebook's globals on the kernel side (None on the grader's).
    ``trusted_side`` is True on the grader's: there, the other side may only call, read and set
    public attributes of the objects it was handed, never reach their internals.
    """

    def __init__(self, sock: socket.socket | None, namespace: dict | None = None, trusted_side: bool = False):
        self.sock = sock
        self.direct: Peer | None = None   # set by Loopback: the other side, answered in this thread
        self.namespace = namespace
        self.trusted_side = trusted_side
        self._objects: dict[int, object] = {}     # handle -> object we keep for the other side
        self._handles: dict[int, int] = {}        # id(object) -> handle, so identity survives
        self._proxies: dict[int, Remote] = {}     # the other side's handle -> our proxy
        self._graphs: dict[int, tuple] = {}       # autograd graphs kept for the other side
        self._forbids: dict[int, object] = {}     # forbid() blocks open on this (the kernel's) side
        self._own_seen: set | None = None          # ids of our objects that a message handed back
        self._next = 1
        self._next_id = 1
        self.calls = 0    # requests this side sent
        self.served = 0   # requests of the other side this side answered
        self.pure: dict[type, tuple[str, ...]] = {}   # methods of lent objects that are queries

    # -- encoding --------------------------------------------------------------------------------

    def _export(self, obj) -> int:
        key = id(obj)
        handle = self._handles.get(key)
        if handle is None or self._objects.get(handle) is not obj:
            handle = self._next
            self._next += 1
            self._objects[handle] = obj
            self._handles[key] = handle
        return handle

    def encode(self, obj, blobs: list, depth: int = 0):
        t = type(obj)
        if t is str or t is float or obj is None or t is bool:
            return obj
        if t is int:
            return obj if -2**53 < obj < 2**53 else {"$int": str(obj)}
        if t is tuple:
            return {"$tu": [self.encode(x, blobs, depth + 1) for x in obj]}
        if depth > 200:
            raise ValueError("structure nested too deeply to send")
        if isinstance(obj, bool):
            return bool(obj) if obj is not None else None
        if isinstance(obj, int):
            value = int(obj)
            return value if abs(value) < 2**53 else {"$int": str(value)}
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str.__str__(obj)
        if isinstance(obj, Remote) and obj._peer is self:
            return {"$own": obj._handle}
        if t is _ByHandle:
            return {"$ref": self._export(obj.value), "type": type(obj.value).__name__}
        if t is _LentModule:
            module = obj.module
            return {"$mod": self._export(module), "type": type(module).__name__,
                    "params": [[n, self.encode(v, blobs, depth + 1)] for n, v in module.named_parameters()],
                    "buffers": [[n, self.encode(v, blobs, depth + 1)] for n, v in module.named_buffers()],
                    "training": bool(module.training)}
        if t in (list, tuple) or isinstance(obj, (list, tuple)) and not _is_namedtuple(obj) \
                and type(obj).__module__ != "torch":
            items = [self.encode(x, blobs, depth + 1) for x in obj]
            return items if isinstance(obj, list) else {"$tu": items}
        if isinstance(obj, Counter):
            return {"$c": [[self.encode(k, blobs, depth + 1), self.encode(v, blobs, depth + 1)]
                           for k, v in dict.items(obj)]}
        if isinstance(obj, dict):
            tag = "$od" if isinstance(obj, OrderedDict) else "$d"
            return {tag: [[self.encode(k, blobs, depth + 1), self.encode(v, blobs, depth + 1)]
                          for k, v in dict.items(obj)]}
        if isinstance(obj, (set, frozenset)):
            tag = "$fs" if isinstance(obj, frozenset) else "$s"
            return {tag: [self.encode(x, blobs, depth + 1) for x in obj]}
        if isinstance(obj, (bytes, bytearray)):
            blobs.append(bytes(obj))
            return {"$b": len(blobs) - 1, "mutable": isinstance(obj, bytearray)}
        if isinstance(obj, complex):
            return {"$cx": [obj.real, obj.imag]}
        if obj is Ellipsis:
            return {"$ell": 1}
        if isinstance(obj, slice):
            return {"$sl": [self.encode(x, blobs, depth + 1) for x in (obj.start, obj.stop, obj.step)]}
        if isinstance(obj, range):
            return {"$rg": [obj.start, obj.stop, obj.step]}
        torch = _torch()
        if torch is not None:
            if isinstance(obj, torch.Tensor):
                return self._encode_tensor(obj, blobs)
            if isinstance(obj, torch.dtype):
                return {"$dt": str(obj).removeprefix("torch.")}
            if isinstance(obj, torch.device):
                return {"$dev": str(obj)}
            if isinstance(obj, torch.Size):
                return {"$sz": [int(x) for x in obj]}
            if isinstance(obj, torch.Generator):
                blobs.append(_tensor_bytes(obj.get_state()))
                return {"$g": {"device": str(obj.device), "state": len(blobs) - 1}}
        numpy = _numpy()
        if numpy is not None and isinstance(obj, numpy.ndarray) and obj.dtype.kind in "biufc":
            blobs.append(numpy.ascontiguousarray(obj).tobytes())
            return {"$np": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": len(blobs) - 1}}
        if numpy is not None and isinstance(obj, numpy.generic) and obj.dtype.kind in "biuf":
            return obj.item()
        ref = {"$ref": self._export(obj), "type": type(obj).__name__}
        if self.pure:
            names = {n for cls in type(obj).__mro__ for n in self.pure.get(cls, ())}
            if names:
                ref["pure"] = sorted(names)
        return ref

    def _encode_tensor(self, t, blobs):
        torch = _torch()
        kind = "param" if isinstance(t, torch.nn.Parameter) else "tensor"
        meta = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "device": str(t.device), "rg": bool(t.requires_grad), "kind": kind}
        if t.device.type != "meta":
            blobs.append(_tensor_bytes(t))
            meta["data"] = len(blobs) - 1
            if t.is_leaf and t.grad is not None:  # a parameter read after backward(), or one to clip
                blobs.append(_tensor_bytes(t.grad))
                meta["grad"] = {"dtype": str(t.grad.dtype).removeprefix("torch."), "shape": list(t.grad.shape),
                                "device": str(t.grad.device), "data": len(blobs) - 1}
        found = getattr(blobs, "tensors", None)
        if found is not None:
            found.append(t)
        return {"$t": meta}

    def decode(self, data, blobs: list, leaves: list | None = None):
        """Plain data back from JSON; ``leaves`` collects the decoded tensors that require grad."""
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.decode(x, blobs, leaves) for x in data]
        if not isinstance(data, dict) or len(data) < 1:
            raise WireError(f"malformed value {str(data)[:80]}")
        tag = next(iter(data))
        body = data[tag]
        if tag == "$tu":
            return tuple(self.decode(x, blobs, leaves) for x in body)
        if tag in ("$d", "$od", "$c"):
            pairs = [(_hashable(self.decode(k, blobs, leaves)), self.decode(v, blobs, leaves)) for k, v in body]
            return {"$d": dict, "$od": OrderedDict, "$c": Counter}[tag](dict(pairs))
        if tag in ("$s", "$fs"):
            items = [_hashable(self.decode(x, blobs, leaves)) for x in body]
            return set(items) if tag == "$s" else frozenset(items)
        if tag == "$int":
            return int(body)
        if tag == "$b":
            return bytearray(blobs[body]) if data.get("mutable") else bytes(blobs[body])
        if tag == "$cx":
            return complex(*body)
        if tag == "$ell":
            return Ellipsis
        if tag == "$sl":
            return slice(*(self.decode(x, blobs, leaves) for x in body))
        if tag == "$rg":
            return range(*(int(x) for x in body))
        if tag == "$own":
            if body not in self._objects:
                raise WireError(f"unknown handle {body}")
            if self._own_seen is not None:
                self._own_seen.add(id(self._objects[body]))
            return self._objects[body]
        if tag == "$mod":
            if self.trusted_side:
                raise WireError("the grader takes no module from the kernel")
            decoded = {k: [(str(n), self.decode(v, blobs)) for n, v in data.get(k, [])] for k in ("params", "buffers")}
            return _mirror_module(self, int(body), str(data.get("type", "Module"))[:100], decoded["params"],
                                  decoded["buffers"], bool(data.get("training", True)))
        if tag == "$ref":
            proxy = self._proxies.get(body)
            if proxy is None:
                pure = [str(n) for n in data.get("pure", ())] if not self.trusted_side else ()
                proxy = self._proxies[body] = Remote(self, int(body), str(data.get("type", "object"))[:100], pure)
            return proxy
        torch = _torch()
        if tag == "$t":
            return self._decode_tensor(body, blobs, leaves)
        if tag == "$dt":
            dtype = getattr(torch, str(body), None)
            if not isinstance(dtype, torch.dtype):
                raise WireError(f"unknown dtype {body!r}")
            return dtype
        if tag == "$dev":
            return torch.device(str(body))
        if tag == "$sz":
            return torch.Size(int(x) for x in body)
        if tag == "$g":
            g = torch.Generator(device=body["device"])
            g.set_state(_bytes_tensor(blobs[body["state"]], torch.uint8, [-1], "cpu"))
            return g
        if tag == "$np":
            numpy = _numpy()
            return numpy.frombuffer(blobs[body["data"]], dtype=numpy.dtype(body["dtype"])) \
                .reshape(body["shape"]).copy()
        raise WireError(f"unknown tag {tag!r}")

    def _decode_tensor(self, meta, blobs, leaves):
        torch = _torch()
        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise WireError(f"unknown dtype {meta['dtype']!r}")
        shape = [int(x) for x in meta["shape"]]
        device = str(meta["device"])
        if "data" not in meta:
            t = torch.empty(shape, dtype=dtype, device="meta")
        else:
            t = _bytes_tensor(blobs[meta["data"]], dtype, shape, device)
        if meta.get("kind") == "param":
            t = torch.nn.Parameter(t, requires_grad=bool(meta.get("rg")))
        elif meta.get("rg") and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        if t.requires_grad and leaves is not None:  # the sender's parameters are leaves too
            leaves.append(t)
        grad = meta.get("grad")
        if isinstance(grad, dict) and t.requires_grad and "data" in grad:
            t.grad = self._decode_tensor({k: v for k, v in grad.items() if k != "grad"}, blobs, None)
        return t

    # -- requests --------------------------------------------------------------------------------

    def request(self, op: str, target: int, *args):
        """Run ``op`` on the other side's object ``target`` with ``args``; return its result."""
        torch = _torch()
        blobs = _Blobs()
        message = {"op": op, "target": target, "args": self.encode(list(args), blobs),
                   "id": self._next_id, "grad": bool(torch.is_grad_enabled()) if torch else True}
        sent_leaves = [a for a in blobs.tensors if a.requires_grad]
        self._next_id += 1
        self.calls += 1
        if self.direct is not None:  # the other side in this thread: same messages, no socket
            reply, rblobs = self.direct._answer(json.loads(json.dumps(message)), blobs)
            reply = json.loads(json.dumps(reply))
        else:
            send_message(self.sock, message, blobs)
            reply, rblobs = self._wait(message["id"])
        if "error" in reply:
            raise _exception(reply["error"])
        result = self.decode(reply["result"], rblobs)
        self._write_back(_mutable_args(op, list(args)), reply.get("mutated") or {}, rblobs)
        if reply.get("graph") is not None and torch is not None:
            result = _Bridge.wrap(self, int(reply["graph"]), sent_leaves, result)
        return result

    def _wait(self, request_id: int):
        while True:
            header, blobs = recv_message(self.sock)
            if "op" in header:
                self._serve_one(header, blobs)
                continue
            if header.get("reply") != request_id:
                raise WireError("out-of-order reply")
            return header, blobs

    def serve(self, until_done: bool = True):
        """Answer the other side's requests until it sends ``{"done": ...}``; return that message."""
        while True:
            header, blobs = recv_message(self.sock)
            if "op" in header:
                self._serve_one(header, blobs)
            elif "done" in header:
                return header
            else:
                raise WireError("unexpected message")

    def _serve_one(self, header: dict, blobs: list[bytes]) -> None:
        reply, out_blobs = self._answer(header, blobs)
        send_message(self.sock, reply, out_blobs)

    def _answer(self, header: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        torch = _torch()
        self.served += 1
        reply: dict = {"reply": header.get("id")}
        out_blobs = _Blobs()
        try:
            leaves: list = []
            self._own_seen = own = set()
            try:
                args = self.decode(header.get("args", []), blobs, leaves)
            finally:
                self._own_seen = None
            if not isinstance(args, list):
                raise WireError("malformed arguments")
            op = str(header.get("op"))
            # Our own objects handed back by handle are changed in place: the caller holds a
            # Remote (which it does not count as mutable), so both sides count the same arguments.
            mutable = [a for a in _mutable_args(op, args) if id(a) not in own]
            before = self._fingerprints(mutable)
            target = header.get("target")
            grad = bool(header.get("grad", True))
            if torch is not None and grad != torch.is_grad_enabled():
                with torch.set_grad_enabled(grad):
                    result = self._perform(op, target, args)
            else:
                result = self._perform(op, target, args)
            reply["result"] = self.encode(result, out_blobs)
            # A module's parameter crosses as a copy (with its .grad): gradients flow back
            # through what student code computes, not through a parameter read as an attribute.
            outs = [t for t in out_blobs.tensors if t.requires_grad and not isinstance(t, torch.nn.Parameter)]
            if outs:
                reply["graph"] = self._next
                self._graphs[self._next] = (outs, leaves)
                self._next += 1
            mutated = self._mutations(mutable, before, out_blobs)
            if mutated:
                reply["mutated"] = mutated
        except BaseException as err:  # everything goes back: the other side decides what it means
            if isinstance(err, (KeyboardInterrupt, SystemExit, WireError)):
                raise
            out_blobs = []
            reply = {"reply": header.get("id"), "error": _describe_error(err)}
        return reply, out_blobs

    def _perform(self, op: str, target, args: list):
        if op.startswith("ns_"):
            if self.namespace is None or target != NAMESPACE:
                raise PermissionError("no namespace on this side")
            ns = self.namespace
            if op == "ns_has":
                return args[0] in ns
            if op == "ns_get":
                return ns[args[0]]
            if op == "ns_set":
                ns[args[0]] = args[1]
                return None
            if op == "ns_del":
                return ns.pop(args[0], _MISSING) is not _MISSING
            if op == "ns_keys":
                return [k for k in ns if isinstance(k, str)]
        if op == "backward":
            return self._backward(int(target), args[0])
        if op in ("forbid_enter", "forbid_exit", "kernel_object", "isinstance"):
            if self.namespace is None:
                raise PermissionError(f"the grader answers no {op!r} to the kernel")
            if op == "forbid_enter":
                return self._forbid_enter(*args)
            if op == "forbid_exit":
                return self._forbid_exit(int(args[0]))
            from .grading import resolve_object_name

            found = resolve_object_name(args[0]) if isinstance(args[0], dict) else None
            if op == "kernel_object":
                return found
            if target not in self._objects:
                raise WireError(f"unknown handle {target}")
            return isinstance(found, type) and isinstance(self._objects[target], found)
        if target not in self._objects:
            raise WireError(f"unknown handle {target}")
        obj = self._objects[target]
        if op == "call":
            positional, keywords = args
            result = obj(*positional, **keywords)
            torch = _torch()
            if self.trusted_side and isinstance(obj, type) and torch is not None \
                    and isinstance(result, torch.nn.Module):
                return _LentModule(result)  # a part the kernel builds into the student's module
            return result
        if op == "module_call":  # the kernel's mirror of a lent module, run here on its tensors
            torch = _torch()
            if not self.trusted_side or torch is None or not isinstance(obj, torch.nn.Module):
                raise PermissionError("module_call is for modules the grader lent")
            tensors, positional, keywords, training = args
            obj.train(bool(training))
            return torch.func.functional_call(obj, dict(tensors), tuple(positional), dict(keywords))
        if op == "map":  # many calls in one round trip; stops at the first exception
            results = []
            for positional in args[0]:
                try:
                    results.append({"ok": obj(*positional)})
                except Exception as err:  # noqa: BLE001  goes back to the caller, as one call's would
                    results.append({"error": _describe_error(err)})
                    break
            return results
        if op in ("getattr", "setattr"):
            name = str(args[0])
            if self.trusted_side and name.startswith("_"):
                raise PermissionError(f"no access to {name!r} of an object the grader lent")
            if op == "getattr":
                return getattr(obj, name)
            setattr(obj, name, args[1])
            return None
        if op == "getitem":
            return obj[args[0]]
        if op == "setitem":
            obj[args[0]] = args[1]
            return None
        if op == "len":
            return len(obj)
        if op == "list":
            return list(obj)
        if op == "contains":
            return args[0] in obj
        if op == "next":
            return next(obj)
        if op == "repr":
            text = repr(obj)
            return text if len(text) <= 2000 else text[:2000] + "..."
        raise WireError(f"unknown operation {op!r}")

    def _forbid_enter(self, targets: list, reason: str) -> int:
        """The kernel's side of a hidden check's ``forbid`` block: the student's code runs here."""
        from contextlib import ExitStack

        from .grading import _CHECKS_PEER, forbid, resolve_object_name

        resolved = [resolve_object_name(t, as_name=True) for t in targets if isinstance(t, dict)]
        stack = ExitStack()
        # In a Loopback both sides share this thread: this block guards here, not over the wire again.
        peer, _CHECKS_PEER.peer = getattr(_CHECKS_PEER, "peer", None), None
        try:
            stack.enter_context(forbid(*[t for t in resolved if t is not None], reason=str(reason)))
        finally:
            _CHECKS_PEER.peer = peer
        handle = self._next
        self._next += 1
        self._forbids[handle] = stack
        return handle

    def _forbid_exit(self, handle: int) -> str | None:
        """End a ``forbid`` block; return the violation the student's code caught, if any."""
        from .grading import ForbiddenCallError

        stack = self._forbids.pop(handle, None)
        if stack is None:
            raise WireError(f"unknown forbid block {handle}")
        try:
            stack.close()
        except ForbiddenCallError as err:
            return str(err)
        return None

    def _backward(self, graph: int, grads: list):
        torch = _torch()
        outs, leaves = self._graphs.pop(graph)
        for leaf in leaves:  # a parameter arrives with the .grad it had: return this pass's only
            leaf.grad = None
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.device) for o, g in pairs])
        return [leaf.grad for leaf in leaves]

    # -- in-place changes to arguments -----------------------------------------------------------

    def _fingerprints(self, mutable: list) -> list:
        torch = _torch()
        prints = []
        for arg in mutable:
            if torch is not None and isinstance(arg, torch.Tensor):
                grad = arg.grad if arg.is_leaf else None
                prints.append((arg._version, None if grad is None else (id(grad), grad._version)))
            elif torch is not None and isinstance(arg, torch.Generator):
                prints.append(bytes(_tensor_bytes(arg.get_state())))
            else:
                scratch: list = []
                prints.append((json.dumps(self.encode(arg, scratch)), scratch))
        return prints

    def _mutations(self, mutable: list, before: list, blobs: list) -> dict:
        changed = {}
        for i, (arg, old) in enumerate(zip(mutable, before, strict=True)):
            if self._fingerprints([arg])[0] != old:
                changed[str(i)] = self.encode(arg, blobs)
        return changed

    def _write_back(self, targets: list, mutated: dict, blobs: list) -> None:
        for key, data in mutated.items():
            i = int(key)
            if not 0 <= i < len(targets):
                raise WireError("write-back to an unknown argument")
            _write_into(targets[i], self.decode(data, blobs))

    def close(self) -> None:
        self._objects.clear()
        self._handles.clear()
        self._graphs.clear()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


_MISSING = object()


class _Blobs(list):
    """The binary parts of one message; ``tensors`` collects the tensors encoded into it."""

    def __init__(self):
        super().__init__()
        self.tensors: list = []


def _mutable_args(op: str, args: list) -> list:
    """The arguments whose in-place changes are written back: the top-level positional and
    keyword arguments of a call, or the arguments of any other operation."""
    if op == "call" and len(args) == 2:
        flat = list(args[0]) + list(args[1].values())   # (positional, keywords)
    elif op == "module_call" and len(args) == 4:        # (the module's tensors, positional, keywords, mode)
        flat = list(args[1]) + list(args[2].values())
    else:
        flat = list(args)
    flat = [a for a in flat if type(a) not in _IMMUTABLE]
    if not flat:
        return flat
    torch = _torch()
    kinds = (list, dict, set, bytearray)
    if torch is not None:
        kinds = kinds + (torch.Tensor, torch.Generator)
    return [a for a in flat if isinstance(a, kinds) and not (torch is not None and isinstance(a, torch.Tensor)
                                                            and a.device.type == "meta")]


_IMMUTABLE = {str, int, float, bool, type(None), tuple, bytes, frozenset, Remote}


def _write_into(local, new) -> None:
    """Make ``local`` (an argument as the caller holds it) what the callee changed it into: lists,
    dicts, sets and bytearrays in place (tensors in a list stay the caller's own objects), tensors'
    data and ``.grad`` in place, generators' states."""
    torch = _torch()
    is_tensor = torch is not None and isinstance(local, torch.Tensor) and isinstance(new, torch.Tensor)
    if isinstance(local, list) and isinstance(new, list):
        if len(local) == len(new) and all(isinstance(a, type(b)) or isinstance(b, type(a))
                                          for a, b in zip(local, new, strict=True)):
            for k, (a, b) in enumerate(zip(local, new, strict=True)):
                if torch is not None and isinstance(a, torch.Tensor) and a.shape == b.shape:
                    _write_into(a, b)
                else:
                    local[k] = b
        else:
            local[:] = new
    elif isinstance(local, dict) and isinstance(new, dict):
        local.clear()
        local.update(new)
    elif isinstance(local, set) and isinstance(new, set):
        local.clear()
        local.update(new)
    elif isinstance(local, bytearray) and isinstance(new, (bytes, bytearray)):
        local[:] = new
    elif torch is not None and isinstance(local, torch.Generator) and isinstance(new, torch.Generator):
        local.set_state(new.get_state())
    elif is_tensor:
        with torch.no_grad():
            if local.shape == new.shape:
                unchanged = local.device.type == "meta" or (
                    local.dtype == new.dtype and torch.equal(local.detach().cpu(), new.detach().cpu()))
                if not unchanged:  # (only .grad may have changed: keep the data's version)
                    local.copy_(new.to(local.device))
            else:
                local.data = new.to(local.device).to(local.dtype)
        if local.is_leaf and local.requires_grad:
            local.grad = None if new.grad is None else new.grad.to(local.device)


class _Bridge:
    """Backpropagation across the wire: the result of a remote call that requires grad is tied
    to the local tensors that were sent (and to a dummy leaf, so that gradients with respect to
    the other side's parameters flow even when no local tensor required grad)."""

    @staticmethod
    def wrap(peer: Peer, graph: int, sent_leaves: list, result):
        torch = _torch()
        outs = [t for t in _tensors(result) if t.requires_grad]
        if not outs:
            return result
        anchor = torch.zeros((), requires_grad=True)
        fn = _bridge_function()
        linked = fn.apply(peer, graph, len(sent_leaves), len(outs), anchor, *sent_leaves,
                          *[o.detach() for o in outs])
        linked = (linked,) if isinstance(linked, torch.Tensor) else linked
        replace = {id(o): n for o, n in zip(outs, linked, strict=True)}
        return _rebuild(result, replace)


_BRIDGE_FN = None


def _bridge_function():
    global _BRIDGE_FN
    if _BRIDGE_FN is None:
        torch = _torch()

        class Bridge(torch.autograd.Function):
            @staticmethod
            def forward(ctx, peer, graph, n_in, n_out, anchor, *tensors):
                ctx.peer, ctx.graph, ctx.n_in = peer, graph, n_in
                ctx.devices = [t.device for t in tensors[:n_in]]
                return tuple(t.clone() for t in tensors[n_in:])

            @staticmethod
            def backward(ctx, *grads):
                in_grads = ctx.peer.request("backward", ctx.graph, list(grads))
                in_grads = [None if g is None else g.to(d) for g, d in zip(in_grads, ctx.devices, strict=True)]
                return (None, None, None, None, None, *in_grads, *([None] * len(grads)))

        _BRIDGE_FN = Bridge
    return _BRIDGE_FN


def _tensors(obj, depth: int = 0) -> list:
    torch = _torch()
    if torch is None or depth > 50:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x, depth + 1)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x, depth + 1)]
    return []


def _rebuild(obj, replace: dict):
    if id(obj) in replace:
        return replace[id(obj)]
    if isinstance(obj, list):
        return [_rebuild(x, replace) for x in obj]
    if isinstance(obj, tuple) and not _is_namedtuple(obj):
        return tuple(_rebuild(x, replace) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v, replace)) for k, v in obj.items())
    return obj


def _is_namedtuple(obj) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _hashable(x):
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    if isinstance(x, set):
        return frozenset(x)
    return x


def _tensor_bytes(t) -> bytes:
    torch = _torch()
    flat = t.detach()
    if flat.is_conj():
        flat = flat.resolve_conj()
    flat = flat.cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _bytes_tensor(data: bytes, dtype, shape, device):
    torch = _torch()
    numel = 1
    for s in shape:
        numel *= max(s, 0) if s != -1 else 1
    if not data:
        return torch.empty([0] if shape == [-1] else shape, dtype=dtype).to(device)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def _describe_error(err: BaseException) -> dict:
    frames = traceback.extract_tb(err.__traceback__)
    here = os.path.abspath(__file__)
    shown = [f for f in frames if os.path.abspath(f.filename) != here]
    return {"type": type(err).__name__, "message": str(err)[:4000],
            "trace": "".join(traceback.format_list(shown[-5:]))[:4000],
            "grading": type(err).__name__ in ("GradingFailure", "ForbiddenCallError")}


def _exception(info) -> BaseException:
    if not isinstance(info, dict):
        return WireError("malformed error")
    name, message = str(info.get("type", "Exception")), str(info.get("message", ""))
    if info.get("grading"):
        from .grading import ForbiddenCallError, GradingFailure

        cls = ForbiddenCallError if name == "ForbiddenCallError" else GradingFailure
        err = cls(message)
    elif name in _EXCEPTIONS:
        err = _EXCEPTIONS[name](message)
    else:
        err = RemoteError(f"{name}: {message}")
    err.remote_type = name
    err.remote_trace = str(info.get("trace", ""))
    return err


_TORCH: list = []


def _torch():
    if not _TORCH:
        try:
            import torch
        except ImportError:  # the wire itself needs no torch
            torch = None
        _TORCH.append(torch)
    return _TORCH[0]


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


class _LentModule:
    """A module the grader built for the kernel (the kernel called a lent class): it crosses as
    a mirror, see ``_mirror_module``."""

    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module


_MIRROR_CLASS: list = []


def _mirror_module(peer: Peer, handle: int, type_name: str, params: list, buffers: list, training: bool):
    """The kernel's stand-in for a module the grader lent (a reference part built into the
    student's model): a real ``nn.Module`` that holds the parameters and buffers, so the student's
    model, optimizer and ``state_dict`` own them, while ``forward`` runs the grader's code on them
    (``torch.func.functional_call``), gradients flowing back to these parameters."""
    torch = _torch()
    if not _MIRROR_CLASS:
        class LentModule(torch.nn.Module):
            def __init__(self, peer, handle, type_name):
                super().__init__()
                object.__setattr__(self, "_lender", (peer, handle, type_name))

            def forward(self, *args, **kwargs):
                peer, handle, _ = self._lender
                tensors = [[n, t] for n, t in self.named_parameters()] + [[n, t] for n, t in self.named_buffers()]
                return peer.request("module_call", handle, tensors, list(args), kwargs, self.training)

            def __getattr__(self, name):
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    if name.startswith("_") or not self.__dict__.get("_ready"):
                        raise
                    peer, handle, _ = self.__dict__["_lender"]
                    return peer.request("getattr", handle, name)  # a setting such as hidden_size

            def extra_repr(self):
                return f"lent by the grader: {self._lender[2]}"

        _MIRROR_CLASS.append(LentModule)
    mirror = _MIRROR_CLASS[0](peer, handle, type_name)
    for kind, items in (("param", params), ("buffer", buffers)):
        for name, value in items:
            owner = mirror
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, torch.nn.Module())
                owner = owner._modules[part]
            if kind == "param":
                owner.register_parameter(leaf, value if isinstance(value, torch.nn.Parameter)
                                         else torch.nn.Parameter(value))
            else:
                owner.register_buffer(leaf, value)
    mirror.train(training)
    object.__setattr__(mirror, "_ready", True)
    return mirror


class _ByHandle:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def by_handle(value):
    """``value``, to be sent as a handle, never by value, when a hidden check reaches the student
    over the wire: for what the other side only passes back (a KV cache, say), so that it does not
    cross at every step. Where the check runs in the student's process, ``value`` itself."""
    from .grading import _checks_peer

    return _ByHandle(value) if _checks_peer() is not None else value


def call_many(fn: Remote, calls: list) -> list:
    """``[fn(*args) for args in calls]`` in one round trip; raises what the first failing call
    raised (after the calls before it)."""
    out = []
    for item in fn._peer.request("map", fn._handle, [list(a) for a in calls]):
        if "error" in item:
            err = _exception(item["error"])
            err.calls_done = len(out)
            raise err
        out.append(item["ok"])
    return out


# --- the kernel's side: run one hidden check -----------------------------------------------------

def run_remote_check(socket_path: str, unit: str, check: str, namespace: dict) -> None:
    """In a grading kernel: ask the grader to run ``check`` of ``unit`` against ``namespace`` (the
    notebook's globals), answer its requests, and raise its verdict as a ``GradingFailure``."""
    from .grading import GradingFailure

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as err:
        raise GradingFailure(f"the grader's check service is not reachable ({err})") from None
    peer = Peer(sock, namespace=namespace)
    # The kernel's other threads (IOPub, heartbeat) would make each answer wait up to the default
    # 5 ms GIL switch interval; a check makes hundreds of round trips.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 1e-4))
    try:
        send_message(sock, {"run_check": check, "unit": unit}, [])
        done = peer.serve()
    finally:
        sys.setswitchinterval(interval)
        peer.close()
    if done.get("done") != "passed":
        raise GradingFailure(str(done.get("message", "the hidden tests failed")))


# --- both sides in one process, for the course's own tests ---------------------------------------

class Loopback:
    """Both sides of the wire in this process: every message is encoded to JSON and blobs and
    decoded on the other side, exactly as over the socket, but answered by a direct call. The
    hidden checks' tests run every check through it, so a check that relies on sharing objects
    with the student's code fails there too.

        with Loopback(ns) as remote_ns:
            check(remote_ns)
    """

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.peer = Peer(None, trusted_side=True)
        self.kernel = Peer(None, namespace=namespace)
        self.peer.direct, self.kernel.direct = self.kernel, self.peer

    def __enter__(self) -> RemoteNamespace:
        return RemoteNamespace(self.peer)

    def __exit__(self, *exc):
        self.peer.close()
        self.kernel.close()
        return False

"""Grading helpers: what the visible and hidden tests are built from.

- ``assert_close`` / ``assert_equal``: comparisons whose failure says what was compared, on which
  input, the shapes, and how far off the answer was.
- ``on_each_device``: run a check on the CPU and on every accelerator present.
- ``forbid``: make the library calls that would do a student's work raise while their code runs.
  It works at the level of ``torch.overrides.TorchFunctionMode`` and ``TorchDispatchMode``, so a
  name bound before the guard, a thin wrapper or a low-level twin is caught too.
- ``hidden_tests``: load a unit's hidden tests (they live with the autograder, not in the
  student's package) and run them so that a failure never shows their source.
- ``reference``: a unit's reference module, exported from its solution notebook, for lectures and
  the graders of later units. Like the hidden tests it lives in the course repository only.
- ``student`` / ``swapped``: read a graded name from the notebook, and swap in the reference for a
  part graded elsewhere, so one mistake costs once.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

MAX_REPR = 300


class GradingFailure(AssertionError):
    """A test failed; the message says why. Raised without the hidden test's traceback."""


class ForbiddenCallError(PermissionError):
    """A graded function called a library routine that would do the work for it."""


def describe(value, limit: int = MAX_REPR) -> str:
    """A short, readable repr of a test input or output (tensors show shape and dtype)."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        text = f"{type(value).__name__}(shape={tuple(shape)}, dtype={value.dtype}"
        device = getattr(value, "device", None)
        text += f", device={device})" if device is not None else ")"
        return text
    if isinstance(value, Mapping) and any(_is_tensor_like(v) for v in value.values()):
        text = "{" + ", ".join(f"{k!r}: {describe(v, limit)}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple)) and any(_is_tensor_like(v) for v in value):
        text = "(" + ", ".join(describe(v, limit) for v in value) + ")"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


def _where(what: str, inputs) -> str:
    head = what or "value"
    if inputs is not None:
        head += f" on input {describe(inputs)}"
    return head


def _is_tensor_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, what: str = "",
                 inputs=None, check_dtype: bool = False, equal_nan: bool = False) -> None:
    """Assert ``actual`` is within ``atol + rtol * |expected|`` of ``expected``, elementwise.

    Works for numbers, tensors and arrays of any shape (shapes must match), and for sequences or
    mappings of those. ``inf`` must match ``inf`` of the same sign; NaN never matches, unless
    ``equal_nan`` (for tensors: a composite compared with a formula built from the student's own
    parts, which may produce NaN consistently).
    """
    where = _where(what, inputs)
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            raise GradingFailure(f"{where}: expected a mapping, got {describe(actual)}")
        _same_keys(actual, expected, where)
        for key in expected:
            assert_close(actual[key], expected[key], atol=atol, rtol=rtol,
                         what=f"{what}[{key!r}]", inputs=inputs, check_dtype=check_dtype, equal_nan=equal_nan)
        return
    if _is_tensor_like(expected) or _is_tensor_like(actual):
        _assert_close_arrays(actual, expected, atol, rtol, where, check_dtype, equal_nan)
        return
    if isinstance(expected, Sequence) and not isinstance(expected, str):
        if not isinstance(actual, Sequence) or isinstance(actual, str):
            raise GradingFailure(f"{where}: expected a sequence, got {describe(actual)}")
        if len(actual) != len(expected):
            raise GradingFailure(f"{where}: expected length {len(expected)}, got {len(actual)}")
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, atol=atol, rtol=rtol, what=f"{what}[{i}]", inputs=inputs,
                         check_dtype=check_dtype, equal_nan=equal_nan)
        return
    try:
        a, e = float(actual), float(expected)
    except (TypeError, ValueError):
        raise GradingFailure(f"{where}: expected a number close to {expected!r}, "
                             f"got {describe(actual)}") from None
    if math.isinf(e) or math.isinf(a):
        if a != e:
            raise GradingFailure(f"{where}: expected {e}, got {a}")
        return
    if math.isnan(a) or math.isnan(e) or abs(a - e) > atol + rtol * abs(e):
        raise GradingFailure(f"{where}: expected {e!r}, got {a!r} (abs error {abs(a - e):.3g}, "
                             f"allowed {atol + rtol * abs(e):.3g})")


def _assert_close_arrays(actual, expected, atol, rtol, where, check_dtype, equal_nan=False):
    import torch

    if not _is_tensor_like(actual):
        raise GradingFailure(f"{where}: expected a tensor like {describe(expected)}, "
                             f"got {describe(actual)}")
    a = torch.as_tensor(actual).detach()
    e = torch.as_tensor(expected).detach()
    if tuple(a.shape) != tuple(e.shape):
        raise GradingFailure(f"{where}: shape mismatch: got {tuple(a.shape)}, "
                             f"expected {tuple(e.shape)}")
    if check_dtype and a.dtype != e.dtype:
        raise GradingFailure(f"{where}: dtype mismatch: got {a.dtype}, expected {e.dtype}")
    if getattr(expected, "device", None) is not None and getattr(actual, "device", None) is not None:
        if actual.device != expected.device:
            raise GradingFailure(f"{where}: device mismatch: got a tensor on {actual.device}, "
                                 f"expected one on {expected.device}")
    a64 = a.cpu().to(torch.float64) if not a.is_complex() else a.cpu()
    e64 = e.cpu().to(torch.float64) if not e.is_complex() else e.cpu()
    if a64.numel() == 0:
        return
    ok = torch.isclose(a64, e64, atol=atol, rtol=rtol, equal_nan=equal_nan)
    if bool(ok.all()):
        return
    diff = (a64 - e64).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a64.shape))
    n_bad = int((~ok).sum())
    raise GradingFailure(
        f"{where}: {n_bad} of {a64.numel()} elements differ (shape {tuple(a64.shape)}); "
        f"max abs error {float(diff.flatten()[worst]):.3g} at index {index}: got "
        f"{float(a64.flatten()[worst]):.6g}, expected {float(e64.flatten()[worst]):.6g} "
        f"(atol={atol}, rtol={rtol})"
    )


def _same_keys(actual: Mapping, expected: Mapping, where: str) -> None:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {describe(missing[:5])}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {describe(extra[:5])}")
        raise GradingFailure(f"{where}: " + "; ".join(parts))


def assert_gradients(pairs, *, what: str, atol: float, rtol: float, of: str = "the result") -> None:
    """After the student's output was backpropagated: every ``(name, leaf, expected_grad)`` in
    ``pairs`` has a gradient, and it is close to ``expected_grad`` (same shape as ``leaf``)."""
    for name, leaf, expected in pairs:
        if leaf.grad is None:
            raise GradingFailure(f"{what}: {of} does not depend on {name} (its gradient is None)")
        assert_close(leaf.grad, expected, atol=atol, rtol=rtol, what=f"{what}: the gradient with respect to {name}")


def assert_equal(actual, expected, *, what: str = "", inputs=None) -> None:
    """Assert exact equality; on failure, show the first differences rather than two big reprs."""
    if actual == expected:
        return
    where = _where(what, inputs)
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        _same_keys(actual, expected, where)
        diffs = [k for k in expected if actual[k] != expected[k]]
        shown = ", ".join(f"{k!r}: got {actual[k]!r}, expected {expected[k]!r}" for k in diffs[:5])
        raise GradingFailure(f"{where}: {len(diffs)} value(s) differ, e.g. {shown}")
    if (isinstance(expected, Sequence) and isinstance(actual, Sequence)
            and not isinstance(expected, str)):
        for i, (a, e) in enumerate(zip(actual, expected, strict=False)):
            if a != e:
                raise GradingFailure(f"{where}: first difference at position {i}: got {a!r}, "
                                     f"expected {e!r} (lengths {len(actual)} and {len(expected)})")
        raise GradingFailure(f"{where}: got length {len(actual)}, expected {len(expected)}; "
                             f"the shorter one is a prefix of the longer")
    raise GradingFailure(f"{where}: got {describe(actual)}, expected {describe(expected)}")


def on_each_device(check) -> None:
    """Run ``check(device)`` on the CPU and on each accelerator present; name the device on failure."""
    from .runtime import available_devices

    for device in available_devices():
        try:
            check(device)
        except Exception as err:
            if device.type == "mps" and _MPS_NO_FLOAT64 in str(err):
                continue  # a float64 case: the CPU run has graded it, Apple GPUs cannot run it
            if isinstance(err, GradingFailure):
                raise GradingFailure(f"[on {device}] {err}") from None
            raise GradingFailure(f"[on {device}] {type(err).__name__}: {err}") from err


_MPS_NO_FLOAT64 = "MPS framework doesn't support float64"  # PyTorch's error for float64 on an Apple GPU


# --- reading the notebook's names -------------------------------------------------------------

def student(ns: Mapping, name: str):
    """The student's definition of ``name`` from the notebook namespace ``ns``."""
    if name not in ns:
        raise GradingFailure(f"`{name}` is not defined: run the cell that defines it, and keep "
                             f"the name exactly as given")
    return ns[name]


def call_student(fn, *args, what: str, **kwargs):
    """Call student code; turn an exception into a failure that names the input.

    ``NotImplementedError`` (an untouched stub) and ``GradingFailure`` pass through unchanged.
    """
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, GradingFailure):
        raise
    except Exception as err:
        raise GradingFailure(f"{what}: your code raised {type(err).__name__}: {err}") from err


def call_each(fn, calls, *, what) -> list:
    """``[fn(*args) for args in calls]``, each failure turned into one that names its input, as
    ``call_student`` does (``what(*args)`` describes a call). When ``fn`` lives in the student's
    kernel, all the calls cross the wire in one round trip."""
    from .wire import Remote, call_many

    calls = [tuple(a) for a in calls]
    if isinstance(fn, Remote):
        try:
            return call_many(fn, calls)
        except (NotImplementedError, GradingFailure):
            raise
        except Exception as err:
            done = getattr(err, "calls_done", None)
            failing = calls[done] if done is not None and done < len(calls) else None
            where = what(*failing) if failing is not None else what(*calls[0]) if calls else "a call"
            raise GradingFailure(f"{where}: your code raised {type(err).__name__}: {err}") from err
    return [call_student(fn, *args, what=what(*args)) for args in calls]


@contextmanager
def swapped(ns: dict, **replacements):
    """Temporarily rebind names in the notebook namespace, e.g. the reference of a part graded
    elsewhere, so that a mistake in that part does not cost points here too."""
    saved = {k: ns[k] for k in replacements if k in ns}
    ns.update(replacements)
    try:
        yield
    finally:
        for k in replacements:
            if k in saved:
                ns[k] = saved[k]
            else:
                ns.pop(k, None)


# --- the forbidden-call guard -----------------------------------------------------------------

def _call_name(func) -> str:
    name = getattr(func, "__name__", None)
    if name is None and hasattr(func, "overloadpacket"):
        name = func.overloadpacket.__name__
    return str(name)


class _Guard:
    """State of one ``forbid`` block: what is forbidden and what was called anyway."""

    def __init__(self, names: set[str], ids: set[int], reason: str):
        self.names, self.ids, self.reason = names, ids, reason
        self.violations: list[str] = []

    def hit(self, func) -> bool:
        if id(func) in self.ids:
            return True
        name = _call_name(func)
        return name in self.names or name.split(".")[0] in self.names

    def fail(self, what: str):
        self.violations.append(what)
        msg = f"Forbidden call: {what}. {self.reason}".strip()
        raise ForbiddenCallError(msg)


@contextmanager
def forbid(*targets, reason: str = "Implement it yourself from basic operations."):
    """Make calls to ``targets`` raise ``ForbiddenCallError`` inside the block.

    A target is a torch function or op name (``F.scaled_dot_product_attention``, ``"layer_norm"``),
    a class (its construction and ``forward`` raise: ``nn.LSTM``) or a plain Python function
    (its code is swapped, so aliases bound earlier are caught too). Torch calls are intercepted by
    a ``TorchFunctionMode`` and, below autograd, a ``TorchDispatchMode`` matching aten op names.
    A violation swallowed by a ``try/except`` inside the block is re-raised when the block ends.
    """
    names: set[str] = set()
    ids: set[int] = set()
    patches: list[tuple[object, str, object]] = []
    code_swaps: list[tuple[object, object]] = []
    guard = _Guard(names, ids, reason)

    for target in targets:
        if isinstance(target, str):
            names.add(target)
        elif isinstance(target, type):
            _patch_class(target, guard, patches)
        elif hasattr(target, "__code__") and not getattr(target, "__closure__", None):
            label = getattr(target, "__qualname__", target.__name__)
            msg = f"Forbidden call: {label}. {reason}"
            raiser = {}
            exec(f"def _forbidden(*args, **kwargs):\n    raise PermissionError({msg!r})\n", raiser)
            code_swaps.append((target, target.__code__))
            target.__code__ = raiser["_forbidden"].__code__
        else:  # torch builtins and other callables: match by identity and by name
            ids.add(id(target))
            names.add(_call_name(target))

    remote = _checks_peer()
    kernel_guard = swallowed = None
    try:
        if remote is not None:  # the student's code runs in the kernel: guard it there too
            kernel_guard = remote.request("forbid_enter", 0, [object_name(t) for t in targets], reason)
        if names or ids:
            with _torch_modes(guard):
                yield guard
        else:
            yield guard
    finally:
        if kernel_guard is not None:
            swallowed = _leave_kernel_guard(remote, kernel_guard)
        for obj, attr, old in reversed(patches):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        for func, code in code_swaps:
            func.__code__ = code
    if guard.violations:
        raise ForbiddenCallError(
            f"Forbidden call: {guard.violations[0]} (even though the error was caught). {reason}"
        )
    if swallowed:  # the kernel's guard saw it
        raise ForbiddenCallError(swallowed)


def _leave_kernel_guard(remote, kernel_guard) -> str | None:
    """End the kernel's side of a ``forbid`` block; return the violation its code swallowed."""
    from .wire import WireError

    try:
        return remote.request("forbid_exit", 0, kernel_guard)
    except (WireError, OSError):  # the kernel went away: the check fails on that already
        return None


def object_name(target) -> dict:
    """How a library object (a ``forbid`` target, a class, a function) is named to the student's
    kernel, which resolves it to its own copy there (``resolve_object_name``)."""
    if isinstance(target, str):
        return {"name": target}
    where = {"module": str(getattr(target, "__module__", None) or ""),
             "qualname": str(getattr(target, "__qualname__", None) or "")}
    if isinstance(target, type) or hasattr(target, "__code__"):
        return where
    return {"name": _call_name(target), **where}  # a builtin (torch.rand): forbid() matches its name


def resolve_object_name(spec: dict, as_name: bool = False):
    """The kernel's own object for one named by ``object_name`` (None if it has none: a
    reference that is not in the kernel cannot be called from it either); with ``as_name``, a
    builtin's name, as ``forbid`` matches it."""
    if "name" in spec and (as_name or not spec.get("qualname")):
        return str(spec["name"])
    module_name, qualname = str(spec.get("module", "")), str(spec.get("qualname", ""))
    module = sys.modules.get(module_name)
    if module is None and module_name.startswith("autograder.references."):
        # a later unit's kernel loads an earlier unit's shipped reference under this name
        module = sys.modules.get("llmcourse_reference_" + module_name.rsplit(".", 1)[1])
    if module is None and module_name.split(".")[0] in ("torch", "llmcourse", "numpy"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None or part == "<locals>":
            # a builtin's qualname may name a private class (torch.rand: _VariableFunctionsClass.rand)
            obj = getattr(module, qualname.rsplit(".", 1)[-1], None) if module is not None else None
            if obj is None or "<locals>" in qualname:
                return None
            break
    # a decorated function (``@torch.no_grad()``): its code is what the grader's forbid() swaps
    while not isinstance(obj, type) and hasattr(obj, "__wrapped__") and \
            (not hasattr(obj, "__code__") or getattr(obj, "__closure__", None)):
        obj = obj.__wrapped__
    return obj


_CHECKS_PEER = threading.local()


def _checks_peer():
    """The wire to the student's kernel while a hidden check runs in the grader, else None."""
    return getattr(_CHECKS_PEER, "peer", None)


def beside(student_obj, library_obj):
    """``library_obj`` (a torch, numpy or llmcourse class or function) as it is where
    ``student_obj`` lives: the kernel's own copy when the check reaches the student over the
    wire, so that, e.g., an optimizer made with it steps the student's parameters in place;
    else ``library_obj`` itself.

        Adam = beside(model, torch.optim.Adam)
        optimizer = Adam(model.parameters(), lr=0.01)
    """
    from .wire import Remote

    if not isinstance(student_obj, Remote):
        return library_obj
    found = student_obj._peer.request("kernel_object", 0, object_name(library_obj))
    if found is None:
        raise GradingFailure(f"{getattr(library_obj, '__qualname__', library_obj)} is not available "
                             f"in your kernel")
    return found


def manual_seed(seed: int, near=None) -> None:
    """``torch.manual_seed(seed)`` here and, when ``near`` is a student's object reached over the
    wire, in the kernel too: a student's module is initialized from the kernel's generator."""
    import torch

    torch.manual_seed(seed)
    kernel_seed = torch.manual_seed if near is None else beside(near, torch.manual_seed)
    if kernel_seed is not torch.manual_seed:
        kernel_seed(seed)


def load_weights(model, state: dict):
    """Copy the tensors of ``state`` ({parameter name: tensor}) into ``model``'s parameters in
    place (a student's module here or in the kernel); return ``model``."""
    model.load_state_dict(state, strict=False)
    return model


def call_on_a_generator(fn, items: list, *args):
    """``fn(a generator over items, *args)``: student code that must read an iterable once. Call
    it through ``beside(fn, call_on_a_generator)`` so that the generator is made where ``fn`` runs
    and what ``fn`` does to ``items`` (their ``.grad``, say) comes back."""
    return fn((item for item in items), *args)


def repeated_calls(fn, args: list, n: int) -> list:
    """``[fn(*args) for _ in range(n)]``: many runs of student code on the same inputs (a seeded
    generator among them advancing), made where that code runs (``beside(fn, repeated_calls)``), so
    that a statistical check costs one round trip, not one per run."""
    return [fn(*args) for _ in range(int(n))]


def _nothing() -> None:
    return None


def round_trip_seconds(student_obj, n: int = 200) -> float:
    """What one call from the student's kernel into the grader costs in wire time alone, measured
    on ``n`` calls of a function that does nothing; 0 when the student's code runs here. A check
    that times student code which calls back into the grader subtracts it (``served_calls``)."""
    import time

    from .wire import Remote

    if not isinstance(student_obj, Remote):
        return 0.0
    repeat = beside(student_obj, repeated_calls)
    repeat(_nothing, [], 10)  # warm-up
    start = time.perf_counter()
    repeat(_nothing, [], n)
    return (time.perf_counter() - start) / n


@contextmanager
def single_thread_where(student_obj):
    """One torch thread in the student's kernel for the block (a timing compared with a reference
    timed under ``runtime.single_thread`` here); nothing when the student's code runs here."""
    import torch

    get_threads = beside(student_obj, torch.get_num_threads)
    if get_threads is torch.get_num_threads:
        yield
        return
    before = get_threads()
    set_threads = beside(student_obj, torch.set_num_threads)
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)


def served_calls(student_obj) -> int:
    """How many calls from the student's kernel into the grader have been answered so far."""
    from .wire import Remote

    return student_obj._peer.served if isinstance(student_obj, Remote) else 0


def is_shared(obj, first: str, second: str) -> bool:
    """Whether the attributes at the dotted paths ``first`` and ``second`` of a student's object
    are one object (a tied weight: ``is_shared(model, "lm_head.weight", "wte.weight")``), here or
    in the kernel (where the parameters are; they cross the wire as copies)."""
    return bool(beside(obj, same_attribute)(obj, first, second))


def same_attribute(obj, first: str, second: str) -> bool:
    """``obj.<first> is obj.<second>`` for dotted paths (False if either is missing)."""
    import operator

    try:
        return operator.attrgetter(first)(obj) is operator.attrgetter(second)(obj)
    except AttributeError:
        return False


def type_name(obj) -> str:
    """The class name of a student's object, here or in the kernel."""
    from .wire import Remote

    return obj.remote_type if isinstance(obj, Remote) else type(obj).__name__


def is_instance(obj, cls: type) -> bool:
    """``isinstance(obj, cls)`` for a student's object, here or in the kernel (``cls`` from torch)."""
    from .wire import Remote

    if not isinstance(obj, Remote):
        return isinstance(obj, cls)
    return bool(obj._peer.request("isinstance", obj._handle, object_name(cls)))


def _patch_class(cls: type, guard: _Guard, patches: list) -> None:
    def blocked(*args, **kwargs):
        guard.fail(f"{cls.__module__}.{cls.__qualname__}")

    for attr in ("__init__", "forward"):
        if attr == "forward" and not hasattr(cls, "forward"):
            continue
        patches.append((cls, attr, cls.__dict__.get(attr)))
        setattr(cls, attr, blocked)


@contextmanager
def _torch_modes(guard: _Guard):
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class FunctionGuard(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if guard.hit(func):
                guard.fail(f"torch function {_call_name(func)}")
            return func(*args, **(kwargs or {}))

    class DispatchGuard(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if guard.hit(func):
                guard.fail(f"aten op {_call_name(func)}")
            return func(*args, **(kwargs or {}))

    with FunctionGuard(), DispatchGuard():
        yield


# --- hidden tests ------------------------------------------------------------------------------

def autograder_root() -> Path | None:
    """The repository root that holds ``autograder/hidden``: ``LLMCOURSE_AUTOGRADER_ROOT`` or the
    nearest parent of the working directory that has it. None on a student's machine."""
    env = os.environ.get("LLMCOURSE_AUTOGRADER_ROOT")
    candidates = [Path(env)] if env else [Path.cwd(), *Path.cwd().parents]
    for root in candidates:
        if (root / "autograder" / "hidden").is_dir():
            return root.resolve()
    return None


class HiddenTests:
    """A unit's hidden test module, wrapped so that a failure shows its message, never its source."""

    def __init__(self, module):
        self._module = module
        self._hidden_dir = str(Path(module.__file__).resolve().parents[1])

    def __getattr__(self, name):
        check = getattr(self._module, name)

        def run(*args, **kwargs):
            from .wire import RemoteNamespace, WireError

            peer = next((a.peer for a in args if isinstance(a, RemoteNamespace)), None)
            _CHECKS_PEER.peer = peer
            try:
                check(*args, **kwargs)
            except WireError:  # the kernel went away: the caller says what that means
                raise
            except (GradingFailure, ForbiddenCallError, PermissionError) as err:
                raise GradingFailure(str(err)) from None
            except Exception as err:  # the student's code raised: show their frames only
                raise GradingFailure(self._student_error(err)) from None
            finally:
                _CHECKS_PEER.peer = None

        run.__name__ = name
        return run

    def _student_error(self, err: BaseException) -> str:
        remote_trace = getattr(err, "remote_trace", None)
        if remote_trace is not None:  # raised in the student's kernel, across the wire
            text = f"your code raised {getattr(err, 'remote_type', type(err).__name__)}: {err}"
            return text + ("\n" + remote_trace if remote_trace else "")
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if not f.filename.startswith(self._hidden_dir) and f.filename != __file__
                  and not f.filename.endswith("wire.py")]
        text = f"your code raised {type(err).__name__}: {err}"
        if frames:
            text += "\n" + "".join(traceback.format_list(frames[-5:]))
        return text


class RemoteHiddenTests:
    """In a grading kernel whose checks run outside it: ``check_x(globals())`` asks the grader to
    run ``check_x`` in its own process against this notebook's names (``llmcourse.wire``)."""

    def __init__(self, unit: str, socket_path: str):
        self._unit, self._socket_path = unit, socket_path

    def __getattr__(self, name):
        if not name.startswith("check_"):
            raise AttributeError(name)

        def run(ns):
            from .wire import run_remote_check

            run_remote_check(self._socket_path, self._unit, name, ns)

        run.__name__ = name
        return run


def hidden_tests(unit: str) -> HiddenTests | RemoteHiddenTests:
    """The hidden tests of ``unit`` (e.g. ``"01_ngrams"``), available only to the autograder.

    Under the autograder the checks of most units run in the grader's process, outside the
    student's kernel (the grader sets ``LLMCOURSE_CHECK_SOCKET``); otherwise they are imported
    from ``autograder/hidden`` and run here (the course's own tests, and units not yet ported).
    """
    from .wire import SOCKET_ENV

    socket_path = os.environ.get(SOCKET_ENV)
    if socket_path:
        return RemoteHiddenTests(unit, socket_path)
    root = autograder_root()
    if root is None:
        raise GradingFailure("The hidden tests run only under the course autograder.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return HiddenTests(importlib.import_module(f"autograder.hidden.unit{unit}"))


RELEASED_REFERENCES = "references"  # the folder, next to a later unit's notebook, of the copies it ships


def reference(unit: str):
    """The reference module of ``unit`` (e.g. ``"05_transformers"``): the solution notebook's graded
    code, exported to ``autograder/references/`` by ``make references`` (a test fails when stale).

    It is never part of the installed package, so a student of that unit can't import it (COURSE.md,
    "No leaks"). The course repository and the autograder load it from ``autograder/references``
    (so a submitted copy is never trusted); a student of a later unit gets a generated copy in
    ``references/`` next to that unit's notebook, and loads it from there.
    """
    root = autograder_root()
    if root is not None and (root / "autograder" / "references" / f"unit{unit}.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(f"autograder.references.unit{unit}")
    copy = Path.cwd() / RELEASED_REFERENCES / f"unit{unit}.py"
    if copy.is_file():
        name = f"llmcourse_reference_unit{unit}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, copy)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    raise ModuleNotFoundError(
        f"The reference of unit {unit} is not here. It ships with the course repository "
        f"(autograder/references) and, for students, with the later units that use it, in "
        f"{RELEASED_REFERENCES}/ next to their notebook: run the notebook from its own folder (on Colab, "
        f"upload {RELEASED_REFERENCES}/unit{unit}.py from the released assignment), or set LLMCOURSE_AUTOGRADER_ROOT.")

"""The wire between the grader and a student's kernel (``llmcourse.wire``), and the grader's
check service (``autograder.checks``): what crosses by value, what stays behind a handle, how
gradients and in-place changes come back, and what a hostile kernel cannot make the grader do.

Plain pytest and torch (no Jupyter), so it also runs on a GPU machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections import Counter, OrderedDict

import pytest
import torch

from llmcourse.wire import Loopback, Peer, Remote, WireError, call_many, recv_message, send_message


def _kernel(ns):
    """A loopback whose kernel side holds ``ns``; returns (loopback, remote namespace)."""
    loop = Loopback(ns)
    return loop, loop.__enter__()


@pytest.mark.parametrize("value", [
    None, True, 3, -2**70, 1.5, float("inf"), "héllo", b"\x00\xff", (1, "a", (2,)), [1, [2, 3]],
    {"a": 1, (1, 2): [3]}, Counter({("a", "b"): 2}), OrderedDict(b=1, a=2), {1, 2}, frozenset({"x"}),
    slice(1, None, 2), range(3, 9, 2), 2 + 3j, torch.float16, torch.device("cpu"), torch.Size([2, 3]),
])
def test_plain_values_cross_by_value_with_their_type(value):
    loop, ns = _kernel({"identity": lambda x: x})
    got = ns["identity"](value)
    assert type(got) is type(value) and got == value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool, torch.uint8, torch.complex64])
def test_tensors_cross_bit_for_bit(dtype):
    loop, ns = _kernel({"double": lambda t: (t, t * 2 if dtype != torch.bool else ~t)})
    x = (torch.randn(3, 4) * 10).to(dtype) if dtype != torch.bool else torch.rand(3, 4) > 0.5
    same, other = ns["double"](x)
    assert same.dtype == dtype and torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    assert torch.equal(other, x * 2 if dtype != torch.bool else ~x)
    empty, scalar = ns["double"](torch.empty(0, 3, dtype=dtype))[0], ns["double"](x[0, 0])[0]
    assert empty.shape == (0, 3) and scalar.shape == () and torch.equal(scalar, x[0, 0])
    meta = ns["double"](torch.empty(2, 5, device="meta", dtype=dtype))[0]
    assert meta.device.type == "meta" and meta.shape == (2, 5)


def test_objects_stay_behind_handles_and_keep_their_identity():
    class Model:
        def __init__(self):
            self.vocab = {"a"}

        def fit(self):
            self.vocab.add("b")
            return self

    loop, ns = _kernel({"Model": Model})
    model = ns["Model"]()
    assert isinstance(model, Remote) and model.remote_type == "Model"
    assert model.fit() is model, "the same kernel object comes back as the same proxy"
    assert model.vocab == {"a", "b"}
    model.vocab = {"z"}
    assert loop.namespace["Model"] is Model and model.vocab == {"z"}
    with pytest.raises(AttributeError):
        _ = model.missing


def test_in_place_changes_to_arguments_are_written_back():
    def mutate(items, table, tensor, generator):
        items.sort()
        table["new"] = 1
        tensor.mul_(2)
        torch.rand(5, generator=generator)

    loop, ns = _kernel({"mutate": mutate, "leave": lambda *a: None})
    items, table, tensor = [3, 1, 2], {}, torch.ones(3)
    mine, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ns["mutate"](items, table, tensor, mine)
    torch.rand(5, generator=theirs)
    assert items == [1, 2, 3] and table == {"new": 1} and torch.equal(tensor, torch.full((3,), 2.0))
    assert torch.equal(mine.get_state(), theirs.get_state()), "the draws in the kernel advance our generator"
    before = tensor._version
    ns["leave"](items, tensor)
    assert tensor._version == before, "an argument left alone is not touched"


def test_gradients_cross_the_wire_both_ways():
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def student_linear(x):  # runs in the "kernel", with its own parameter
        return x @ weight.T

    def reference_square(y):  # lent by the grader, called from student code
        return y ** 2

    def student_composite(x, part):
        return part(x @ weight.T).sum()

    loop, ns = _kernel({"student_linear": student_linear, "student_composite": student_composite})
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = ns["student_linear"](x)
    assert out.requires_grad
    (out * torch.arange(8.0, dtype=torch.float64).reshape(2, 4)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    ((x_ref @ w_ref.T) * torch.arange(8.0, dtype=torch.float64).reshape(2, 4)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad), "the kernel-side parameter got its gradient"

    weight.grad = None
    x2 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ns["student_composite"](x2, reference_square).backward()
    expected = torch.autograd.grad((x2 @ weight.T).pow(2).sum(), x2)[0]
    torch.testing.assert_close(x2.grad, expected)


def test_exceptions_keep_their_type_and_the_student_frames():
    def stub(*a):
        raise NotImplementedError("write me")

    def buggy(x):
        return [][x]

    loop, ns = _kernel({"stub": stub, "buggy": buggy})
    with pytest.raises(NotImplementedError, match="write me"):
        ns["stub"]()
    with pytest.raises(IndexError) as info:
        ns["buggy"](3)
    assert "buggy" in info.value.remote_trace


def test_call_many_is_one_round_trip():
    loop, ns = _kernel({"sq": lambda x: x * x})
    sq = ns["sq"]
    calls = loop.peer.calls
    assert call_many(sq, [(i,) for i in range(100)]) == [i * i for i in range(100)]
    assert loop.peer.calls == calls + 1


def test_a_kernel_cannot_reach_into_what_the_grader_lends():
    """Objects the grader lends (reference parts) may be called and their public attributes read;
    their internals, and through them the grader's modules and files, stay out of reach."""
    def reference_part(x):
        return x + 1

    def attack(part):
        return part.__globals__

    def attack_private(obj):
        return obj._secret

    class Lent:
        _secret = "reference source"
        public = 1

    loop, ns = _kernel({"attack": attack, "attack_private": attack_private})
    with pytest.raises((AttributeError, PermissionError)):  # never the globals
        ns["attack"](reference_part)
    with pytest.raises(PermissionError):
        ns["attack_private"](Lent())


def test_malformed_messages_are_refused_not_executed():
    grader, kernel = socket.socketpair()
    peer = Peer(grader, trusted_side=True)
    for bad in ({"$pickle": "cos\nsystem\n"}, {"$t": {"dtype": "__import__", "shape": [1], "device": "cpu"}},
                {"$own": 999}):
        with pytest.raises(WireError):
            peer.decode(bad, [])
    kernel.sendall(b"\xff\xff\xff\xff\x00\x00\x00\x00")  # claims 4 GB of JSON
    with pytest.raises(WireError, match="too large"):
        recv_message(grader)
    grader.close()
    kernel.close()


def test_check_service_runs_each_check_once_over_a_real_socket(tmp_path):
    """The service of unit 01 against a kernel in another process: the reference passes, and a
    kernel that asks for the same check again gets the first verdict."""
    from autograder import checks, notebooks

    service = checks.CheckService("01_ngrams", tmp_path / "checks.sock", timeout_s=60).start()
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(notebooks.ROOT)!r})\n"
        f"os.environ['LLMCOURSE_CHECK_SOCKET'] = {str(tmp_path / 'checks.sock')!r}\n"
        f"ns = {{'__name__': '__main__'}}\n"
        f"exec(open({str(notebooks.reference_path('01_ngrams'))!r}).read(), ns)\n"
        "from llmcourse.grading import hidden_tests\n"
        "hidden_tests('01_ngrams').check_ngram_counts_basic(ns)\n"
        "ns['ngram_counts'] = lambda sentences, n: __import__('collections').Counter()\n"
        "try:\n"
        "    hidden_tests('01_ngrams').check_ngram_counts_basic(ns)\n"
        "    print('SECOND-PASSED')\n"
        "except Exception as err:\n"
        "    print('SECOND-FAILED', err)\n"
        "try:\n"
        "    hidden_tests('01_ngrams').check_not_a_check(ns)\n"
        "except Exception as err:\n"
        "    print('UNKNOWN', err)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    verdicts = service.stop()
    assert run.returncode == 0, run.stderr
    assert verdicts["check_ngram_counts_basic"].passed
    assert "SECOND-PASSED" in run.stdout, "a second request replays the first verdict"
    assert "UNKNOWN no hidden check" in run.stdout
    assert set(verdicts) == {"check_ngram_counts_basic"}


def test_a_kernel_that_dies_mid_check_fails_the_check(tmp_path):
    from autograder import checks

    service = checks.CheckService("01_ngrams", tmp_path / "checks.sock", timeout_s=30).start()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(tmp_path / "checks.sock"))
    send_message(sock, {"run_check": "check_ngram_counts_basic", "unit": "01_ngrams"}, [])
    recv_message(sock)  # the grader's first request
    sock.close()        # and the kernel is gone
    threading.Event().wait(0.5)
    verdict = service.stop()["check_ngram_counts_basic"]
    assert not verdict.passed and "stopped answering" in verdict.message


def test_messages_are_json():
    """Every header is plain JSON: nothing in the protocol can carry code."""
    loop, ns = _kernel({"f": lambda x: {"k": [x, (x,)]}})
    sent = []
    original = loop.kernel._answer

    def spy(header, blobs):
        reply, out = original(header, blobs)
        sent.append(json.dumps(reply))
        return reply, out

    loop.kernel._answer = spy
    ns["f"](torch.ones(2))
    assert sent and all(json.loads(s) for s in sent)


def test_what_is_kept_by_handle_stays_behind_and_write_backs_line_up():
    """A KV cache the grader keeps (``by_handle``) crosses as a handle both ways, and an argument
    changed in place after it is still written back to the right argument."""
    from llmcourse.wire import by_handle

    class Lender:
        def make(self):
            return by_handle([])

        def step(self, cache, buffer):
            cache.append(len(cache))
            buffer.append("changed")
            return cache is kept[0]

    kept = []
    lender = Lender()
    original_make = lender.make

    def make():
        handle = original_make()
        kept.append(handle.value)
        return handle

    lender.make = make

    def kernel_side(lent):
        cache, buffer = lent.make(), ["mine"]
        same = [lent.step(cache, buffer) for _ in range(3)]
        return type(cache).__name__, len(cache), buffer, same

    from llmcourse import grading

    loop, ns = _kernel({"kernel_side": kernel_side})
    grading._CHECKS_PEER.peer = ns.peer   # as while a hidden check runs
    try:
        remote_type, length, buffer, same = ns["kernel_side"](lender)
    finally:
        grading._CHECKS_PEER.peer = None
    assert remote_type == "Remote" and length == 3 and kept[0] == [0, 1, 2]
    assert buffer == ["mine", "changed", "changed", "changed"] and same == [True] * 3
    assert by_handle(kept) is kept, "with no wire in between, the value itself"


def test_a_lent_module_class_builds_a_mirror_the_student_model_owns():
    """A reference part the grader lends as a class (``LSTM=ref.LSTM``): what the kernel builds
    with it is a real module there, whose parameters the student's model, optimizer and
    state_dict own, while its forward runs the grader's code; gradients reach those parameters."""
    import torch.nn as nn

    class Part(nn.Module):  # the grader's reference part
        def __init__(self, n):
            super().__init__()
            self.inner = nn.Linear(n, n)
            self.scale = nn.Parameter(torch.full((n,), 2.0))
            self.n = n

        def forward(self, x):
            return self.inner(x) * self.scale

    class Student(nn.Module):  # in the kernel, it uses whatever Part is in its namespace
        def __init__(self, n):
            super().__init__()
            self.part = ns_kernel["Part"](n)
            self.head = nn.Linear(n, 1)

        def forward(self, x):
            return self.head(self.part(x))

    ns_kernel = {"Student": Student, "Part": None}
    loop, ns = _kernel(ns_kernel)
    ns["Part"] = Part
    model = ns["Student"](3)
    names = sorted(n for n, _ in model.named_parameters())
    assert names == ["head.bias", "head.weight", "part.inner.bias", "part.inner.weight", "part.scale"]
    x = torch.randn(4, 3)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), grads
    # the same computation in one process
    local = Student.__new__(Student)
    nn.Module.__init__(local)
    local.part, local.head = Part(3), nn.Linear(3, 1)
    local.load_state_dict({n: p.detach() for n, p in model.named_parameters()})
    local(x).sum().backward()
    for n, p in local.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)
    assert model.part.n == 3, "a lent part's other attributes are read from the grader's"

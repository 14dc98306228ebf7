"""The grading helpers every unit's tests are built from."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcourse import grading, runtime
from llmcourse.grading import ForbiddenCallError, GradingFailure, assert_close, assert_equal, forbid


def test_assert_close_reports_shape_error_index_and_input():
    with pytest.raises(GradingFailure) as err:
        assert_close(torch.zeros(2, 3), torch.zeros(3, 2), what="attention", inputs={"q": torch.ones(4)})
    assert "shape mismatch: got (2, 3), expected (3, 2)" in str(err.value)
    assert "q': Tensor(shape=(4,)" in str(err.value)

    expected = torch.zeros(2, 3)
    actual = expected.clone()
    actual[1, 2] = 0.5
    with pytest.raises(GradingFailure) as err:
        assert_close(actual, expected, what="softmax")
    msg = str(err.value)
    assert "1 of 6 elements differ" in msg and "max abs error 0.5 at index (1, 2)" in msg


def test_assert_close_numbers_sequences_mappings_and_inf():
    assert_close(1.0 + 1e-9, 1.0)
    assert_close([1.0, float("-inf")], [1.0, float("-inf")])
    assert_close({"a": 1.0}, {"a": 1.0 + 1e-9})
    for actual, expected in [(1.1, 1.0), (float("nan"), 1.0), (float("inf"), 1.0), ([1.0], [1.0, 2.0]),
                             ({"a": 1.0}, {"b": 1.0}), ("x", 1.0)]:
        with pytest.raises(GradingFailure):
            assert_close(actual, expected)


def test_assert_close_checks_device_and_dtype():
    with pytest.raises(GradingFailure, match="dtype mismatch"):
        assert_close(torch.zeros(2), torch.zeros(2, dtype=torch.float64), check_dtype=True)
    with pytest.raises(GradingFailure, match="expected a tensor"):
        assert_close([0.0, 0.0], torch.zeros(2))


def test_assert_equal_shows_first_differences():
    with pytest.raises(GradingFailure, match=r"\('a', 'b'\): got 1, expected 2"):
        assert_equal({("a", "b"): 1}, {("a", "b"): 2}, what="counts")
    with pytest.raises(GradingFailure, match="first difference at position 2"):
        assert_equal([1, 2, 3], [1, 2, 4])
    with pytest.raises(GradingFailure, match="1 missing key"):
        assert_equal({}, {"x": 1})


def test_on_each_device_names_the_device():
    seen = []
    grading.on_each_device(seen.append)
    assert seen[0] == torch.device("cpu") and seen == runtime.available_devices()

    def broken(device):
        raise ValueError("created on the wrong device")

    with pytest.raises(GradingFailure, match=r"\[on cpu\] ValueError: created on the wrong device"):
        grading.on_each_device(broken)


def test_on_each_device_leaves_float64_cases_to_the_cpu_on_apple_gpus(monkeypatch):
    """MPS has no float64: a check with float64 cases grades them on the CPU and skips them there,
    while any other failure on MPS still counts."""
    monkeypatch.setattr(runtime, "available_devices", lambda: [torch.device("cpu"), torch.device("mps")])
    seen = []

    def float64_case(device):
        seen.append(device.type)
        if device.type == "mps":
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                            "support float64. Please use float32 instead.")

    grading.on_each_device(float64_case)
    assert seen == ["cpu", "mps"]
    with pytest.raises(GradingFailure, match=r"\[on mps\] ValueError: wrong"):
        grading.on_each_device(lambda device: (_ for _ in ()).throw(ValueError("wrong")) if device.type == "mps" else None)


# --- forbidden calls ---------------------------------------------------------------------------

SDPA = F.scaled_dot_product_attention  # a name bound before the guard


def sdpa_alias(q):
    return SDPA(q, q, q)


def sdpa_method_free(q):
    return (q @ q.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ q


def low_level_layer_norm(x):
    return torch.layer_norm(x, x.shape[-1:])


def module_layer_norm(x):
    return nn.LayerNorm(x.shape[-1])(x)


def swallowed(x):
    try:
        return torch.softmax(x, -1)
    except Exception:
        return x


@pytest.mark.parametrize("fn, targets", [
    (sdpa_alias, [F.scaled_dot_product_attention]),
    (low_level_layer_norm, ["layer_norm", "native_layer_norm"]),
    (module_layer_norm, ["layer_norm", "native_layer_norm"]),
    (swallowed, [torch.softmax]),
])
def test_forbid_catches_aliases_twins_modules_and_swallowed_errors(fn, targets):
    with pytest.raises(ForbiddenCallError, match="Forbidden call"):
        with forbid(*targets, reason="Write it from matmul and softmax."):
            fn(torch.randn(2, 3, 4))


def test_forbid_allows_honest_code_and_restores_everything():
    x = torch.randn(2, 3, 4)
    with forbid(F.scaled_dot_product_attention, nn.LSTM, "layer_norm"):
        sdpa_method_free(x)
    sdpa_alias(x), module_layer_norm(x), nn.LSTM(4, 4)(x)  # usable again after the block


def test_forbid_classes_even_when_built_before_the_guard():
    lstm = nn.LSTM(4, 5, batch_first=True)
    with pytest.raises(ForbiddenCallError, match="LSTM"):
        with forbid(nn.LSTM):
            lstm(torch.randn(2, 3, 4))
    with pytest.raises(ForbiddenCallError):
        with forbid(nn.LSTM):
            nn.LSTM(4, 5)


def reference_helper(x):
    return x + 1


def test_forbid_python_functions_through_any_alias():
    alias = reference_helper
    with pytest.raises(PermissionError, match="reference_helper"):
        with forbid(reference_helper):
            alias(1)
    assert alias(1) == 2


# --- notebook names and hidden tests ----------------------------------------------------------

def test_student_and_swapped():
    ns = {"f": 1}
    with pytest.raises(GradingFailure, match="`g` is not defined"):
        grading.student(ns, "g")
    with grading.swapped(ns, f=2, g=3):
        assert ns == {"f": 2, "g": 3}
    assert ns == {"f": 1}


SECRET = "reference_answer_must_stay_secret = 42"


@pytest.fixture
def fake_course(tmp_path, monkeypatch):
    hidden = tmp_path / "autograder" / "hidden"
    hidden.mkdir(parents=True)
    (tmp_path / "autograder" / "__init__.py").write_text("")
    (hidden / "__init__.py").write_text("")
    (hidden / "unit99_fake.py").write_text(textwrap.dedent(f"""
        {SECRET}
        def check_value(ns):
            assert ns["answer"]() == 42, "answer() should be 42"
        def check_crash(ns):
            ns["answer"]()
    """))
    monkeypatch.setenv("LLMCOURSE_AUTOGRADER_ROOT", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("autograder")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_hidden_failures_never_show_hidden_source(fake_course):
    hidden = grading.hidden_tests("99_fake")
    hidden.check_value({"answer": lambda: 42})
    with pytest.raises(GradingFailure) as err:
        hidden.check_value({"answer": lambda: 41})
    assert "answer() should be 42" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__

    def student_answer():
        return 1 / 0

    with pytest.raises(GradingFailure) as err:
        hidden.check_crash({"answer": student_answer})
    text = str(err.value)
    assert "ZeroDivisionError" in text and "student_answer" in text
    assert "unit99_fake.py" not in text and SECRET not in text


def test_hidden_tests_absent_on_a_students_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMCOURSE_AUTOGRADER_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GradingFailure, match="only under the course autograder"):
        grading.hidden_tests("01_ngrams")


def test_fast_mode_and_devices(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert not runtime.fast_mode() and runtime.pick(10, 1) == 10
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert runtime.fast_mode() and runtime.pick(10, 1) == 1
    monkeypatch.delenv("NBGRADER_EXECUTION")
    monkeypatch.setenv("CI", "false")
    assert not runtime.fast_mode()
    monkeypatch.setenv("CI", "true")
    assert runtime.fast_mode()
    assert runtime.get_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert runtime.get_device().type == expected
    rng = runtime.seed_everything(3)
    a = (rng.random(), torch.rand(1).item())
    rng = runtime.seed_everything(3)
    assert a == (rng.random(), torch.rand(1).item())


def test_assert_gradients_names_the_input_without_a_gradient_or_with_a_wrong_one():
    x, w = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    (2 * x).sum().backward()
    grading.assert_gradients([("x", x, torch.full((2,), 2.0))], what="f", atol=1e-6, rtol=1e-6)
    with pytest.raises(GradingFailure, match=r"f: the loss does not depend on w \(its gradient is None\)"):
        grading.assert_gradients([("x", x, torch.full((2,), 2.0)), ("w", w, torch.ones(2))], what="f",
                                 atol=1e-6, rtol=1e-6, of="the loss")
    with pytest.raises(GradingFailure, match="f: the gradient with respect to x"):
        grading.assert_gradients([("x", x, torch.ones(2))], what="f", atol=1e-6, rtol=1e-6)


def test_assert_close_equal_nan_only_when_asked():
    import torch

    a = torch.tensor([1.0, float("nan")])
    with pytest.raises(GradingFailure, match="differ"):
        assert_close(a, a.clone())
    assert_close(a, a.clone(), equal_nan=True)
    with pytest.raises(GradingFailure, match="differ"):
        assert_close(a, torch.tensor([1.0, 2.0]), equal_nan=True)

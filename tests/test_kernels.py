"""The optional Triton kernels (common/kernels/) against their PyTorch references.

No GPU is needed: under TRITON_INTERPRET=1, Triton runs @triton.jit kernels
on CPU tensors, one program after another, with numpy. Triton reads that
variable when a @triton.jit function is *defined* -- its own library
functions (tl.sum, tl.max, ...) included -- so it must be set before
`import triton` anywhere in the process: here at the top of this module, and
in tests/conftest.py for when an earlier test (torch.compile imports triton)
got there first.
"""
import importlib
import json
import os
import subprocess
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before anything below imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import common  # noqa: E402
import common.kernels as kernels  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.kernels import bench, cross_entropy_triton, rmsnorm_triton  # noqa: E402
from common.kernels.reference import cross_entropy_reference, rms_norm_reference  # noqa: E402
from common.paths import REPO_ROOT  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    from triton.runtime.interpreter import InterpretedFunction
    ready = isinstance(triton.language.standard.sum, InterpretedFunction) and rmsnorm_triton.INTERPRETED
    assert ready, ("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the "
                   "CPU: set it at the top of tests/conftest.py, or run pytest tests/test_kernels.py alone")
    previous = kernels.set_kernels("triton")
    yield
    kernels.set_kernels(previous)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which fallbacks were already announced, so each test sees its own first warning."""
    monkeypatch.setattr(kernels, "_warned", set())


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _rms_both(x, weight, eps=1e-6, seed=1):
    """Run the dispatcher and the reference on copies; return (out, ref, x grads, weight grads)."""
    xk, wk, xr, wr = _leaf(x), _leaf(weight), _leaf(x), _leaf(weight)
    y = kernels.rms_norm(xk, wk, eps)
    y_ref = rms_norm_reference(xr, wr, eps)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed)).to(y_ref.dtype)
    y.backward(dy)
    y_ref.backward(dy)
    return y, y_ref, (xk.grad, xr.grad), (wk.grad, wr.grad)


def _ce_both(logits, targets, **kwargs):
    lk, lr = _leaf(logits), _leaf(logits)
    loss = kernels.cross_entropy(lk, targets, **kwargs)
    loss_ref = cross_entropy_reference(lr, targets)
    loss.backward()
    loss_ref.backward()
    return loss, loss_ref, lk.grad, lr.grad


# --- RMSNorm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(15, 37), (2, 3, 100), (1, 64)])
def test_rms_norm_forward_and_backward_match_reference(shape):
    # hidden 37 and 100 are not powers of two: the masked tail of the block is
    # exercised; 15 rows over 4 backward programs leave 4, 4, 4 and 3 rows each.
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    weight = 1 + 0.5 * torch.randn(shape[-1])
    y, y_ref, (dx, dx_ref), (dw, dw_ref) = _rms_both(x, weight, eps=1e-5)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"  # the Triton path really ran
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    torch.testing.assert_close(dw, dw_ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_half_precision_within_one_rounding_of_reference(dtype):
    # float32 arithmetic inside, one rounding to bf16/fp16 at the end. The
    # interpreter rounds float32 -> bf16 by truncation where a GPU rounds to
    # nearest, so this allows one unit in the last place (torch's defaults).
    torch.manual_seed(0)
    x = torch.randn(9, 100).to(dtype)
    weight = (1 + 0.1 * torch.randn(100)).to(dtype)
    y, y_ref, (dx, dx_ref), (dw, dw_ref) = _rms_both(x, weight)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=2e-2, atol=2e-2)  # a sum over 9 rows, rounded once


def test_rms_norm_mixed_dtypes_and_frozen_weight():
    # Under autocast, activations are bf16 while the weight stays float32; a
    # frozen weight (requires_grad=False) gets no gradient.
    torch.manual_seed(0)
    x = _leaf(torch.randn(5, 100).to(torch.bfloat16))
    weight = 1 + 0.1 * torch.randn(100)
    y = kernels.rms_norm(x, weight)
    y.float().sum().backward()
    xr = _leaf(x)
    rms_norm_reference(xr, weight).float().sum().backward()
    assert y.dtype == torch.bfloat16 and weight.grad is None
    torch.testing.assert_close(y, rms_norm_reference(x.detach(), weight))
    torch.testing.assert_close(x.grad, xr.grad)


# --- Cross-entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("vocab, block", [(1000, None), (1000, 256), (1537, 256)])
def test_cross_entropy_matches_reference_with_ignored_rows(vocab, block, monkeypatch):
    # block=256 makes the online log-sum-exp cross 4 or 7 blocks, the last one
    # partial; None is the default block (one partial block of 1024).
    if block:
        monkeypatch.setattr(cross_entropy_triton, "MAX_BLOCK_V", block)
    torch.manual_seed(0)
    logits = torch.randn(3, 4, vocab) * 4
    targets = torch.randint(0, vocab, (3, 4))
    targets[0, 0], targets[1, 3] = 0, vocab - 1  # first and last class
    targets[0, 1] = targets[2, 2] = targets[2, 3] = -100  # ignored rows
    loss, loss_ref, grad, grad_ref = _ce_both(logits, targets)
    assert type(loss.grad_fn).__name__ == "CrossEntropyFunctionBackward"
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(grad, grad_ref, **TOL)
    assert torch.equal(grad[0, 1], torch.zeros(vocab)) and torch.equal(grad[2, 2:], torch.zeros(2, vocab))
    # mean over the 9 rows that count, not all 12
    per_row = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    assert loss.item() == pytest.approx(per_row.sum().item() / 9, rel=1e-5)


def test_cross_entropy_all_rows_ignored_is_zero_not_nan():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    targets = torch.full((5,), -100)
    loss, loss_ref, grad, grad_ref = _ce_both(logits, targets)
    assert loss.item() == 0.0 and loss_ref.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(logits)) and torch.equal(grad_ref, torch.zeros_like(logits))


def test_cross_entropy_extreme_logits_and_custom_ignore_index(monkeypatch):
    # Logits of +-3000 overflow exp() without the running max; a first block
    # that is entirely -inf (a masked part of the vocabulary) must not make NaN.
    monkeypatch.setattr(cross_entropy_triton, "MAX_BLOCK_V", 256)
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3000
    logits[:, :300] = -float("inf")
    targets = torch.tensor([300, 999, 7, 512])  # row 2's target is masked out: it is ignored below
    lk, lr = _leaf(logits), _leaf(logits)
    loss = kernels.cross_entropy(lk, targets, ignore_index=7)
    loss_ref = cross_entropy_reference(lr, targets, ignore_index=7)
    loss.backward()
    loss_ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(lk.grad).all()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(lk.grad, lr.grad, **TOL)


def test_cross_entropy_inplace_backward_reuses_the_logits_memory():
    torch.manual_seed(0)
    logits = torch.randn(6, 1537)
    targets = torch.tensor([3, -100, 1536, 0, 42, -100])
    loss, loss_ref, grad, grad_ref = _ce_both(logits, targets, inplace_backward=True)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(grad, grad_ref, **TOL)
    # The documented price: the logits now hold the gradient, in the same memory.
    lk = _leaf(logits)
    kernels.cross_entropy(lk, targets, inplace_backward=True).backward()
    assert lk.grad.data_ptr() == lk.data_ptr()
    assert torch.equal(lk.detach(), lk.grad)


def test_inplace_backward_fails_loudly_when_another_node_needs_the_logits():
    h = torch.randn(4, 8, requires_grad=True)
    logits = h @ torch.randn(8, 100)
    squares = (logits * logits).sum()  # saves the logits for its own backward, which runs after ours
    loss = kernels.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True) + squares
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_target_out_of_range_gives_nan():
    # The kernel cannot raise without a GPU->CPU sync; it must not read outside the row.
    loss = kernels.cross_entropy(torch.randn(3, 100), torch.tensor([1, 100, 2]))
    assert torch.isnan(loss)


def test_half_precision_cross_entropy_within_one_rounding():
    torch.manual_seed(0)
    logits = (torch.randn(6, 1000) * 2).to(torch.bfloat16)
    targets = torch.tensor([1, 2, -100, 999, 0, 500])
    loss, loss_ref, grad, grad_ref = _ce_both(logits, targets)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss_ref, **TOL)  # float32 loss from the same bf16 inputs
    torch.testing.assert_close(grad, grad_ref)


# --- Dispatch -----------------------------------------------------------------------------------

def test_non_contiguous_inputs_are_made_contiguous():
    torch.manual_seed(0)
    x = torch.randn(100, 12).t()  # (12, 100), stride (1, 12)
    weight = torch.randn(200)[::2]  # every other element
    assert not x.is_contiguous() and not weight.is_contiguous()
    y, y_ref, (dx, dx_ref), (dw, dw_ref) = _rms_both(x, weight)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    torch.testing.assert_close(dw, dw_ref, **TOL)

    logits = torch.randn(5, 2000)[:, ::2]  # (5, 1000), stride (2000, 2)
    targets = torch.tensor([[1, 2, 3, -100, 999]]).t()[:, 0]  # a non-contiguous view
    loss, loss_ref, grad, grad_ref = _ce_both(logits, targets)
    assert type(loss.grad_fn).__name__ == "CrossEntropyFunctionBackward"
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(grad, grad_ref, **TOL)


def test_unsupported_dtype_warns_once_and_matches_reference(fresh_warnings):
    torch.manual_seed(0)
    x, weight = torch.randn(4, 37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    logits, targets = torch.randn(4, 50, dtype=torch.float64), torch.tensor([1, -100, 3, 49])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count our own once-logic, not Python's
        for _ in range(3):
            y = kernels.rms_norm(x, weight)
            loss = kernels.cross_entropy(logits, targets)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "rms_norm" in messages[0] and "torch.float64" in messages[0]
    assert "cross_entropy" in messages[1] and "torch.float64" in messages[1]
    assert torch.equal(y, rms_norm_reference(x, weight))
    assert torch.equal(loss, cross_entropy_reference(logits, targets))


def test_row_wider_than_kernel_limit_warns_once_and_matches_reference(fresh_warnings):
    hidden = rmsnorm_triton.MAX_HIDDEN + 1
    x, weight = torch.randn(2, hidden), torch.randn(hidden)
    with pytest.warns(UserWarning, match=f"last dimension {hidden} exceeds"):
        y = kernels.rms_norm(x, weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        y2 = kernels.rms_norm(x, weight)
    assert torch.equal(y, rms_norm_reference(x, weight)) and torch.equal(y2, y)


def test_modes_auto_and_torch_use_the_reference_on_cpu():
    x, weight = torch.randn(3, 37, requires_grad=True), torch.randn(37)
    logits, targets = torch.randn(3, 50, requires_grad=True), torch.tensor([1, 2, 3])
    for mode in ("auto", "torch"):
        previous = kernels.set_kernels(mode)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the normal CPU path warns about nothing
                y = kernels.rms_norm(x, weight)
                loss = kernels.cross_entropy(logits, targets)
        finally:
            kernels.set_kernels(previous)
        assert "RMSNormFunction" not in type(y.grad_fn).__name__
        assert "CrossEntropyFunction" not in type(loss.grad_fn).__name__
        assert torch.equal(y, rms_norm_reference(x, weight))
        assert torch.equal(loss, cross_entropy_reference(logits, targets))


def test_bad_mode_bad_shapes_and_cpu_tensors_without_interpreter(monkeypatch):
    with pytest.raises(UserError, match="not one of auto, triton, torch"):
        kernels.set_kernels("cuda")
    with pytest.raises(ValueError, match="weight has shape"):
        kernels.rms_norm(torch.randn(2, 8), torch.randn(9))
    with pytest.raises(ValueError, match="targets shape"):
        kernels.cross_entropy(torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        kernels.cross_entropy(torch.randn(4, 10), torch.zeros(4))
    monkeypatch.setattr(rmsnorm_triton, "INTERPRETED", False)  # as on a machine without the interpreter
    with pytest.raises(UserError, match="run on CUDA tensors"):
        kernels.rms_norm(torch.randn(2, 8), torch.randn(8))


def test_import_without_triton_uses_pytorch_everywhere(monkeypatch):
    # As on macOS or Windows: `import triton` fails. Re-import the package
    # fresh; monkeypatch puts the original modules back afterwards.
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    for name in [n for n in sys.modules if n == "common.kernels" or n.startswith("common.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(common, "kernels", kernels)
    fresh = importlib.import_module("common.kernels")
    assert fresh is not kernels and fresh.TRITON_AVAILABLE is False
    assert "triton" in fresh.TRITON_IMPORT_ERROR  # ModuleNotFoundError: import of triton halted
    x, weight = torch.randn(3, 37), torch.randn(37)
    assert torch.equal(fresh.rms_norm(x, weight), rms_norm_reference(x, weight))
    logits, targets = torch.randn(3, 50), torch.tensor([1, -100, 3])
    assert torch.equal(fresh.cross_entropy(logits, targets), cross_entropy_reference(logits, targets))
    with pytest.raises(UserError, match="cannot run here"):
        fresh.set_kernels("triton")


# --- Compiled for a real GPU, and the benchmark's logic ----------------------------------------

def test_largest_kernel_configs_compile_for_h100_without_register_spills():
    # Compiles for sm_90 on this CPU machine and asks ptxas (shipped with
    # Triton) how many registers each kernel uses: interpretation cannot catch
    # a kernel that does not compile, or one that spills. Compiling needs a
    # process where Triton was imported *without* the interpreter, hence the
    # subprocess.
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    if not os.path.exists(nvidia.get_ptxas(90).path):
        pytest.skip("this Triton install has no ptxas for sm_90")
    script = ("import json; from common.kernels import registers as r, rmsnorm_triton as a, cross_entropy_triton as b\n"
              "largest = [c for c in r.launcher_configs() if c[1] in (a.MAX_HIDDEN, b.MAX_BLOCK_V)]\n"
              "print(json.dumps([[*c, r.register_usage(*c[:1], 'bf16', *c[1:])] for c in largest]))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(name, block) for name, block, _, _ in results] == [
        ("_rms_norm_forward_kernel", 8192), ("_rms_norm_backward_kernel", 8192),
        ("_cross_entropy_forward_kernel", 8192), ("_cross_entropy_backward_kernel", 8192)]
    for name, block, warps, usage in results:
        assert usage["spill_bytes"] == 0, (name, block, warps, usage)


def test_bench_without_cuda_says_so_and_returns(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine: no long run here
    result = bench.main([])
    assert result == {"skipped": "no CUDA GPU"}
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_logic_on_cpu_tiny_shapes():
    # The timing and table code, run through the interpreter with a wall-clock
    # timer (the real run needs CUDA): checks the byte counts, the correctness
    # columns and that every cell of the table is filled.
    report = bench.run_benchmarks([(8, 100)], [(6, 300)], "fp32", "cpu", bench.wall_timer, use_compile=False)
    rows = report["results"]
    assert [(r["kernel"], r["pass"]) for r in rows] == [
        ("rms_norm", "forward"), ("rms_norm", "forward+backward"),
        ("cross_entropy", "forward"), ("cross_entropy", "forward+backward")]
    assert bench.rms_norm_bytes(8, 100, 4, backward=False) == 2 * 8 * 100 * 4 + 100 * 4 + 8 * 4
    assert bench.cross_entropy_bytes(6, 300, 4, backward=True) == 3 * 6 * 300 * 4 + 6 * 8
    assert all(r["max_abs_err"][k] < 1e-5 for r in rows if "max_abs_err" in r for k in r["max_abs_err"])
    assert all(r["ms"]["eager"] > 0 and r["ms"]["triton"] > 0 and r["ms"]["compile"] is None for r in rows)
    assert rows[3]["ms"]["triton_inplace"] > 0
    table = bench.markdown(report)
    assert "| 8 x 100 | forward |" in table and "| 6 x 300 | forward+backward |" in table

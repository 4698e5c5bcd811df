"""The op layer's conventions: one backend table (``_backend.OP_BACKENDS``) applied by ``backend_for``,
one fake per op derived from its declared outputs, one rule for skipping the dispatcher."""
from pathlib import Path

import pytest
import torch

import fastalign
from fastalign import _backend
from fastalign.ops import (divergence, elementwise_divergence, group_stats, linear_divergence, linear_stats, policy_loss,
                           returns, token_stats)
from fastalign.ops._launch import runs_directly

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
MODULES = (divergence, elementwise_divergence, group_stats, linear_divergence, linear_stats, policy_loss, returns,
           token_stats)
DOC = Path(__file__).resolve().parent.parent / "docs" / "backends.md"


def _custom_ops():
    ops = {}
    for module in MODULES:
        for value in vars(module).values():
            if isinstance(value, torch._library.custom_ops.CustomOpDef) and value._namespace == "fastalign":
                ops[value._name] = value
    return ops


def _cuda_usable(monkeypatch, usable: bool):
    monkeypatch.setattr(_backend, "cuda_kernels_usable", lambda device: usable)


def test_every_custom_op_is_in_the_table():
    assert sorted(_custom_ops()) == sorted(_backend.OP_BACKENDS)
    for op, families in _backend.OP_BACKENDS.items():
        assert families and set(families) <= {"cpp", "triton", "cuda", "torch"}, op
        assert families[0] == "cpp", f"{op}: auto runs the C++ kernels on CPU tensors"


def _auto(op, device):
    try:
        return _backend.backend_for(op, device, "auto")
    except ValueError:
        return "-"


def _row(op, monkeypatch):
    _cuda_usable(monkeypatch, True)
    cpu, gpu = _auto(op, CPU), _auto(op, CUDA)
    _cuda_usable(monkeypatch, False)
    gpu_without = _auto(op, CUDA)
    return f"| `{op}` | {', '.join(_backend.OP_BACKENDS[op])} | {cpu} | {gpu} | {gpu_without} |"


def test_docs_table_is_the_declared_one(monkeypatch):
    """docs/backends.md lists each op's families and what ``auto`` runs, as backend_for applies them."""
    rows = [_row(op, monkeypatch) for op in _backend.OP_BACKENDS]
    text = DOC.read_text()
    start = text.index("| op | kernel families |")
    table = text[start:].split("\n\n")[0].splitlines()[2:]
    assert table == rows, "\n".join(rows)


@pytest.mark.parametrize("op", sorted(_backend.OP_BACKENDS))
def test_backend_for_applies_the_table(op, monkeypatch):
    families = _backend.OP_BACKENDS[op]
    assert _backend.backend_for(op, CPU, "auto") == "cpp"
    assert _backend.backend_for(op, CPU, "cpp") == "cpp"
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors only"):
        _backend.backend_for(op, CUDA, "cpp")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        _backend.backend_for(op, CPU, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.backend_for(op, CPU, "gpu")
    for usable in (True, False):
        _cuda_usable(monkeypatch, usable)
        runnable = [f for f in families if f in (("cuda", "triton", "torch") if usable else ("triton", "torch"))]
        for request in ("auto", "cuda", "triton"):
            if not runnable:
                with pytest.raises(ValueError, match=f"{op} has no kernels for tensors on cuda"):
                    _backend.backend_for(op, CUDA, request)
                continue
            got = _backend.backend_for(op, CUDA, request)
            assert got in runnable
            if request == "auto":
                assert got == runnable[0]
            elif request in families and request in runnable:
                assert got == request
            if request == "cuda" and not usable:
                assert got != "cuda"  # the Triton kernels (or plain torch) instead


@pytest.mark.parametrize("op", sorted(_backend.OP_BACKENDS))
def test_triton_on_cpu_needs_the_interpreter_only_for_triton_kernels(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen = _backend.backend_for(op, CPU, "triton")
    assert chosen == ("triton" if "triton" in _backend.OP_BACKENDS[op] else
                      "torch" if "torch" in _backend.OP_BACKENDS[op] else "cpp")
    monkeypatch.delenv("TRITON_INTERPRET")
    if chosen == "triton":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            _backend.backend_for(op, CPU, "triton")
    else:
        assert _backend.backend_for(op, CPU, "triton") == chosen


def test_resolve_is_the_request_check_of_the_public_functions(monkeypatch):
    assert _backend.resolve(CPU, "auto") == "cpp"
    _cuda_usable(monkeypatch, True)
    assert _backend.resolve(CUDA, "auto") == "triton" and _backend.resolve(CUDA, "cuda") == "cuda"
    _cuda_usable(monkeypatch, False)
    assert _backend.resolve(CUDA, "cuda") == "triton"


def test_request_keeps_auto_for_the_ops_own_families(monkeypatch):
    """Ops whose families differ from ALL_KERNELS get the request, not resolve's family: under ``auto`` on
    CUDA tensors the group, scan and selection ops run their CUDA kernels, as docs/backends.md says."""
    _cuda_usable(monkeypatch, True)
    assert _backend.request(CUDA) == "auto" and _backend.request(CPU, "cpp") == "cpp"
    for op in ("group_stats", "group_advantage", "reverse_scan", "cov_sums", "cov_select"):
        assert _backend.backend_for(op, CUDA, _backend.request(CUDA)) == "cuda", op
        assert _backend.backend_for(op, CUDA, _backend.resolve(CUDA)) != "cuda", op  # why request exists
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        _backend.request(CPU, "cuda")


def _record_requests(monkeypatch, seen, module, *names):
    for name in names:
        op = getattr(module, name)

        def recording(*args, _op=op, **kwargs):
            seen.append(kwargs["backend"] if "backend" in kwargs else args[-1])
            return _op(*args, **kwargs)
        monkeypatch.setattr(module, name, recording)


def test_public_functions_pass_the_request(monkeypatch):
    """group_advantages, the reverse scans and Clip-Cov / KL-Cov pass the call's request (``backend=``, else
    the setting in force) down to their ops."""
    from fastalign.advantages import sequence_level, token_level

    seen = []
    _record_requests(monkeypatch, seen, sequence_level, "call_group_advantage")
    _record_requests(monkeypatch, seen, token_level, "reverse_scan")
    _record_requests(monkeypatch, seen, policy_loss, "cov_sums", "cov_select")
    x, m = torch.randn(2, 4), torch.ones(2, 4)
    fastalign.group_advantages(torch.randn(4), torch.tensor([0, 0, 1, 1]))
    fastalign.reinforce_pp_advantages(x, m, gamma=0.9, backend="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastalign.use_backend("cpp"):
        fastalign.policy_loss(x, x, torch.randn(2), m, loss_type="clip_cov", backend="triton")
    assert seen == ["auto", "cpp", "triton", "triton"]


def test_ops_refuse_a_backend_they_cannot_run():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        returns.reverse_scan(x, x.new_empty(0), torch.ones(2, 3), 1.0, 0.0, 0, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        group_stats.group_advantage(x[0], torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64),
                                    torch.empty(0, dtype=torch.float64), 3, 0, True, 1e-6, False, "gpu")


def _op_cases():
    """One call of each custom op on small CPU tensors (C++ kernels)."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 5, 11, 4
    logits = torch.randn(1, B, V, generator=g)
    labels = torch.tensor([1, -100, 7])
    lp, ent, sp2, _amax, lse, log_c = token_stats.token_stats(logits, labels, 1.0, -100, True, True, True, "cpp",
                                                              False)
    h, w = torch.randn(B, H, generator=g), torch.randn(V, H, generator=g)
    llp, lent, lsp2, _amax, _amax_logit, llse, _mean, llog_c = linear_stats.linear_stats(
        h, w, None, None, None, labels, 1.0, 0.0, 1.0, -100, True, False, True, "cpp", 2, 4, 0.0)
    x, m = torch.randn(B, T, generator=g), (torch.rand(B, T, generator=g) > 0.3)
    m8 = m.to(torch.uint8)
    params = list(fastalign.PolicyConfig(kl_coef=0.1).kernel_params(entropy_in_kernel=True))
    cov_params = list(fastalign.PolicyConfig(loss_type="kl_cov").kernel_params(entropy_in_kernel=True))
    sums = policy_loss.cov_sums(x, x, m8, "cpp")
    scores, index = torch.randn(6, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])
    f64 = torch.empty(0, dtype=torch.float64)
    seed = torch.tensor([3])
    th, tw = torch.randn(B, 5, generator=g), torch.randn(V, 5, generator=g)
    div_args = (h, w, None, th, tw, None, torch.ones(B), labels, 1.0, 0.0, 1.0, 0.0, 1.0, "jsd", 0.5, -100)
    teacher = torch.randn(B, V, generator=g)
    tvd_state = divergence.token_divergence(logits[0], teacher, torch.ones(B), labels, 1.0, "tvd", 0.5, -100, True,
                                            "cpp", False)[3]
    jsd_state = divergence.token_divergence(logits[0], teacher, None, None, 1.0, "jsd", 0.5, -100, False, "cpp",
                                            False)[3]
    return {
        "token_stats": (token_stats.token_stats, (logits, labels, 1.0, -100, True, True, True, "cpp", False)),
        "token_stats_backward": (token_stats.token_stats_backward,
                                 (torch.ones(B), None, None, logits, labels, lse, log_c, ent, sp2, 1.0, -100, "cpp")),
        "token_stats_backward_": (token_stats.token_stats_backward_,
                                  (torch.ones(B), None, None, logits.clone(), labels, lse, log_c, ent, sp2, 1.0,
                                   -100, "cpp")),
        "linear_stats": (linear_stats.linear_stats,
                         (h, w, None, None, None, labels, 1.0, 0.0, 1.0, -100, True, False, True, "cpp", 2, 4, 0.0)),
        "linear_stats_backward": (linear_stats.linear_stats_backward,
                                  (torch.ones(B), None, None, h, w, None, None, None, labels, llse, lent, lsp2, 1.0,
                                   0.0, 1.0, -100, "cpp", 2, 4, 0.0, True, True, False, False, llog_c)),
        "policy_loss_rows": (policy_loss.policy_loss_rows,
                             (x, x, x, m8, x, x, None, None, None, None, params, "cpp")),
        "policy_loss_grads": (policy_loss.policy_loss_grads, (x, torch.randn(B, 11), m8, 0.01, True, False, "cpp")),
        "policy_loss_cov_rows": (policy_loss.policy_loss_cov_rows,
                                 (x, x, x, m8, None, None, None, None, None, seed, cov_params, True)),
        "cov_sums": (policy_loss.cov_sums, (x, x, m8, "cpp")),
        "cov_select": (policy_loss.cov_select, (x, x, x, m8, sums, sums[2:3].clone(), seed, 1, 0.2, -1.0, 5.0, 0.2,
                                                0.28, "cpp")),
        "group_stats": (group_stats.group_stats, (scores, index, f64, 1, "cpp")),
        "group_advantage": (group_stats.group_advantage, (scores, index, f64, f64, 1, 0, True, 1e-6, False, "cpp")),
        "reverse_scan": (returns.reverse_scan, (x, x, m.float(), 0.9, 0.95, returns.SCANS["gae"], "cpp")),
        "linear_divergence": (linear_divergence.linear_divergence, (*div_args, True, "cpp")),
        "linear_divergence_backward": (linear_divergence.linear_divergence_backward,
                                       (torch.ones(B), torch.ones(B), *div_args, "cpp", True, True, False)),
        "divergence_rows": (divergence.divergence_rows,
                            (logits[0].clone(), torch.randn(B, V, generator=g), torch.ones(B), labels, torch.ones(B),
                             torch.ones(B), 1.0, "jsd", 0.5, -100, True, "cpp")),
        "token_divergence": (divergence.token_divergence,
                             (logits[0], teacher, torch.ones(B), labels, 1.0, "tvd", 0.5, -100, True, "cpp", False)),
        "token_divergence_backward": (divergence.token_divergence_backward,
                                      (torch.ones(B), torch.ones(B), logits[0], teacher, torch.ones(B), labels,
                                       tvd_state, 1.0, "tvd", 0.5, -100, "cpp")),
        "token_divergence_backward_": (divergence.token_divergence_backward_,
                                       (torch.ones(B), None, logits[0].clone(), teacher, None, None, jsd_state, 1.0,
                                        "jsd", 0.5, -100, "cpp")),
        "elementwise_divergence": (elementwise_divergence.elementwise_divergence,
                                   (logits[0].log_softmax(-1), teacher.log_softmax(-1), torch.ones(B), 2, 0.3, 1e-10,
                                    False, "cpp")),
        "elementwise_divergence_backward": (elementwise_divergence.elementwise_divergence_backward,
                                            (torch.ones(B, V), logits[0], teacher, None, 5, 0.5, 1e-10, "cpp")),
    }


def test_each_fake_is_the_ops_declared_outputs():
    """The generic fake (the op's output declaration alone) matches what the op returns: shapes,
    dtypes, devices; and it is what FakeTensorMode traces through."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = _op_cases()
    assert sorted(cases) == sorted(_backend.OP_BACKENDS)
    for name, (op, args) in cases.items():
        real = op(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert len(real) == len(fake), name
        for r, f in zip(real, fake):
            if r is None:
                assert f is None, name
                continue
            assert type(f) is not torch.Tensor, name
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device), name


@pytest.mark.parametrize("name", sorted(_backend.OP_BACKENDS))
def test_opcheck_schema_and_fake(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_direct_implementation_equals_the_op():
    for name, (op, args) in _op_cases().items():
        if name in ("token_stats_backward_", "divergence_rows", "token_divergence_backward_"):  # write over an input
            continue
        a, b = op(*args), op.direct(*args)
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        for x, y in zip(a, b):
            assert torch.equal(x, y) or (x.dtype.is_floating_point and torch.allclose(x, y, equal_nan=True)), name


def test_kernels_launch_on_their_tensors_device(monkeypatch):
    """Triton and the CUDA kernels launch on the current CUDA device: tensors on cuda:1 while cuda:0 was current
    were read on the wrong device. ``on_device`` makes the first CUDA tensor's device current (fake CUDA tensors
    here); every kernel op and the live product enter it before any kernel runs."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastalign.ops import _launch, device_compaction

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with FakeTensorMode():
        on0, on1 = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")
    with _launch.on_device(1.0, None, torch.zeros(1), on1, on0):
        assert entered == [on1.device]
    with _launch.on_device(on0, on1), _launch.on_device(torch.zeros(1), 2):
        assert entered == [on1.device]  # the first CUDA tensor's device is current already; no CUDA tensor

    class Entered(Exception):
        pass

    def guard(*tensors):
        seen.append(tensors)
        raise Entered

    seen, cases = [], _op_cases()
    monkeypatch.setattr(_launch, "on_device", guard)
    for name, (op, args) in cases.items():
        with pytest.raises(Entered):
            op.direct(*args)
        assert seen[-1] == args, name
    monkeypatch.setattr(device_compaction, "on_device", guard)
    out = torch.zeros(2, 2)
    with pytest.raises(Entered):
        device_compaction.matmul_live(out, torch.ones(2, 3), torch.ones(3, 2), torch.tensor([1]), 0, False)
    assert seen[-1] == (out,)


def test_one_rule_for_skipping_the_dispatcher():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    x = torch.randn(3)
    assert runs_directly("cpp", x, None)
    assert not runs_directly("triton", x) and not runs_directly("torch", x)
    with FakeTensorMode() as mode:
        assert not runs_directly("cpp", mode.from_tensor(x))
    with TorchFunctionMode():
        assert not runs_directly("cpp", x)
    assert runs_directly("cpp", torch.nn.Parameter(x))  # a model's weight: a plain tensor to the kernels

    class Wrapped(torch.Tensor):  # any other subclass may override dispatch: it goes through the op
        pass

    assert not runs_directly("cpp", x.as_subclass(Wrapped))


def test_an_unknown_backend_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "bogus")
    msg = r"^backend must be one of .*, got 'bogus' \(from the FASTALIGN_BACKEND environment variable\)$"
    with pytest.raises(ValueError, match=msg):
        _backend.current()
    with pytest.raises(ValueError, match=msg):  # a public op with no backend argument reads the setting
        fastalign.token_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))
    # an argument (or use_backend) beats the variable, and its own bad value is not blamed on the variable
    with fastalign.use_backend("cpp"):
        assert _backend.current() == "cpp"
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got 'gpu'$"):
        _backend.backend_for("token_stats", CPU, "gpu")
    with pytest.raises(ValueError, match=r"^backend must be one of .*, got 'gpu'$"):
        with fastalign.use_backend("gpu"):
            pass
    monkeypatch.setenv("FASTALIGN_BACKEND", "")  # empty: auto
    assert _backend.current() == "auto"


def test_without_triton_a_triton_request_raises_and_auto_runs_the_rest(monkeypatch):
    """docs/backends.md: where the triton package is not installed, backend="triton" is a ValueError naming
    it (not an ImportError from inside the op), ``auto`` runs the C++ kernels on CPU tensors, and an op whose
    only CUDA kernels are Triton's says so."""
    monkeypatch.setattr(_backend, "triton_installed", lambda: False)
    x, y = torch.randn(3, 11), torch.randint(0, 11, (3,))
    for call in (lambda: fastalign.token_logprobs(x, y, backend="triton"),
                 lambda: fastalign.group_advantages(torch.randn(4), group_size=2, backend="triton")):
        with pytest.raises(ValueError, match="backend 'triton' needs the triton package"):
            call()
    want = torch.log_softmax(x.double(), -1).gather(-1, y[:, None])[:, 0]
    assert torch.allclose(fastalign.token_logprobs(x, y).logprobs.double(), want, atol=1e-6)
    assert _backend.backend_for("token_stats", CPU, "auto") == "cpp"
    _cuda_usable(monkeypatch, False)
    with pytest.raises(ValueError, match="triton is not installed"):
        _backend.backend_for("linear_stats", CUDA, "auto")

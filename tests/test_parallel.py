"""cdgfast.parallel in one process, and the rule that replaced run-time patching: no module of cdgfast
(cdgfast/kernels/ included) assigns attributes of another module while running. The data-parallel context is an
argument (`parallel=`), never a function swapped in on cdgfast.fisher / cdgfast.data / the methods.
The two-process behaviour is in tests/test_train_distributed.py."""
import ast
from pathlib import Path

import pytest
import torch

from cdgfast import parallel as P
from cdgfast.data import generate_replay_pool
from cdgfast.diffusion import DiffusionLoss, NoiseSchedule, make_batch
from cdgfast.fisher import diag_fisher, rank1_fisher

ROOT = Path(__file__).resolve().parent.parent


def module_patches(source: str, filename: str = "<src>"):
    """Places where `source` changes another module's (or an object's other than its own) attributes:
    setattr / delattr / object.__setattr__ on anything but `self`, an assignment to `<imported module>.x`,
    writes through globals() / vars() / sys.modules, and unittest.mock."""
    tree = ast.parse(source, filename=filename)
    imported = set()  # names bound by an import: modules, and the functions / classes taken from them
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    bad = []

    def where(node, what):
        bad.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ("setattr", "delattr", "__setattr__", "__delattr__") and node.args:
                target = node.args[0]
                if not (isinstance(target, ast.Name) and target.id == "self"):
                    where(node, f"{name} on {ast.unparse(target)}")
            if name == "update" and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Call) \
                    and getattr(f.value.func, "id", "") in ("globals", "vars"):
                where(node, f"{ast.unparse(node)}")
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in imported:
                where(node, f"assignment to {ast.unparse(t)} (an imported name)")
            if isinstance(t, ast.Subscript):
                base = ast.unparse(t.value)
                if base in ("sys.modules",) or base.startswith(("globals()", "vars(")):
                    where(node, f"write to {base}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unittest") or \
                isinstance(node, ast.Import) and any(a.name.startswith("unittest.mock") for a in node.names):
            where(node, "unittest.mock")
    return bad


def test_no_module_patching_in_the_library():
    bad = []
    for base in (ROOT / "cdgfast",):
        for path in sorted(base.rglob("*.py")):
            bad += module_patches(path.read_text(), str(path.relative_to(ROOT)))
    assert not bad, "run-time patching of modules (pass a context or an argument instead):\n" + "\n".join(bad)


def test_the_patching_rule_catches_what_was_there():
    # the shapes of the deleted sharded_estimators / _method_bars, and the allowed ones
    src = ("import cdgfast.methods._deps as deps\nimport cdgfast.fisher as fisher_mod\nfrom . import _deps\n"
           "def f(fn):\n    setattr(deps, 'rank1_fisher', fn)\n    for mod, n, g in [(fisher_mod, 'x', fn)]:\n"
           "        setattr(mod, n, g)\n    fisher_mod.diag_fisher = fn\n    _deps.local_rows = fn\n"
           "    globals()['x'] = 1\n    globals().update(y=2)\n    import sys\n    sys.modules['a'] = fn\n"
           "class A:\n    def g(self, k, v):\n        setattr(self, k, v)\n        object.__setattr__(self, k, v)\n"
           "        self.x = v\n        v.forward = k\n")
    found = module_patches(src)
    assert sorted(int(ln.split(":")[1]) for ln in found) == [5, 7, 8, 9, 10, 11, 13], found


# ----------------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(9, 9)

    def forward(self, x, t, class_labels=None):
        return self.lin(x.flatten(1)).view_as(x)


def _batches():
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule()
    return [make_batch(torch.randn(n, 1, 3, 3, generator=g), None, sched, g) for n in (3, 2, 4)]


def test_local_context_gives_the_numbers_without_a_context():
    torch.manual_seed(0)
    model, loss_fn, batches = _Net().double(), DiffusionLoss(NoiseSchedule()), _batches()
    model.double()
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    a, b = rank1_fisher(model, loss_fn, batches), rank1_fisher(model, loss_fn, batches, parallel=P.LOCAL)
    assert torch.equal(a.mean_grad, b.mean_grad) and a.coeff == b.coeff and a.num_samples == b.num_samples
    assert torch.equal(diag_fisher(model, loss_fn, batches), diag_fisher(model, loss_fn, batches, parallel=P.LOCAL))
    for fn in (rank1_fisher, diag_fisher):
        with pytest.raises(ValueError, match="parallel"):
            fn(model, loss_fn, batches, parallel="gloo")


def test_replay_pool_refuses_a_bad_context():
    from cdgfast.models.unet import tiny_unet

    with pytest.raises(ValueError, match="parallel"):
        generate_replay_pool(tiny_unet(num_classes=2, sample_size=8), [0], 1, schedule=NoiseSchedule(), num_steps=1,
                             parallel=object())


class _TwoRanks(P.DataParallel):
    """Rank 0 of two, the other rank's contribution to every all-reduce fixed in advance."""

    def __init__(self, other):
        super().__init__(0, 2)
        self.other = other

    def all_reduce_sum(self, t):
        return t.add_(self.other.to(t))


def test_average_gradients_writes_the_mean():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    a.grad = torch.tensor([1.0, 1.0])  # b has no grad: it counts as zero
    _TwoRanks(torch.tensor([3.0, 5.0, 7.0])).average_gradients([a, b, frozen])
    assert a.grad.tolist() == [2.0, 3.0] and b.grad.tolist() == [3.5] and frozen.grad is None
    assert _TwoRanks(torch.tensor([3.0, 5.0])).sum_counts(4, 1) == (7, 6)  # the other rank counted 3 and 5


def test_gather_round_robin_puts_chunks_back_in_order():
    # 7 rows in chunks of 2: chunks 0 and 2 on rank 0 (rows 0-1, 4-5), 1 and 3 on rank 1 (rows 2-3, 6)
    rows = torch.arange(7.0)[:, None]
    r1 = torch.cat([rows[2:4], rows[6:7]])

    class Rank0(P.DataParallel):
        def gather_cat(self, t):
            return torch.cat([t, r1])

    out = Rank0(0, 2).gather_round_robin(torch.cat([rows[0:2], rows[4:6]]), 7, 2)
    assert torch.equal(out, rows)


def test_method_setup_takes_the_context_and_progress():
    import cdgfast.methods as M

    m = M.create("rank1+gd")
    ctx = P.DataParallel(0, 1)
    m.setup(num_classes=2, parallel=ctx, progress=True)
    assert all(x.parallel is ctx and x.progress for x in m.members)
    fresh = M.create("dsc")
    assert fresh.parallel is P.LOCAL and fresh.progress is False  # quiet library default
    with pytest.raises(ValueError, match="parallel"):
        M.create("ewc").setup(num_classes=2, parallel=2)
    with pytest.raises(ValueError, match="progress"):
        M.create("ewc").setup(num_classes=2, progress="yes")


@pytest.mark.parametrize("progress", [False, True])
def test_dsc_bar_follows_progress(progress, monkeypatch):
    import tqdm.std

    import cdgfast.methods as M
    from cdgfast.models.unet import tiny_unet

    shown = []
    real_init = tqdm.std.tqdm.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        shown.append((k.get("desc"), not self.disable))

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", spy)
    torch.manual_seed(0)
    model = tiny_unet(num_classes=2, sample_size=8)
    dsc = M.create("dsc", iterations=50)
    dsc.setup(num_classes=2, progress=progress)
    data = [(torch.rand(1, 1, 8, 8), torch.tensor([0]))]
    for k in range(2):
        dsc.begin_task(model, type("T", (), {"classes": [k], "index": k})())
        dsc.steps_in_task = 1
        dsc.end_task(model, data)
        dsc.post_task_phase(model, data)
    assert ("DSC", progress) in shown and ("DSC", not progress) not in shown

"""benchmarks/gpu_check.py (`make gpu-check`): its comparisons run on the CPU here (Triton interpreted);
the CUDA-parametrized checks are collected everywhere and skipped without a GPU."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check as G  # noqa: E402

NO_CUDA = "no CUDA device: these run on a GPU (make gpu-check)"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@cuda_only
@pytest.mark.parametrize("check", sorted(G.CHECKS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_against_cpu_composite(check, dtype):
    if dtype not in G.dtypes_for("cuda"):
        pytest.skip(f"{dtype} not supported on {torch.cuda.get_device_name()}")
    rows = G.run_checks("cuda", [dtype], {check: G.CHECKS[check]})
    bad = [r for r in rows if not r["passed"]]
    assert not bad, bad


@pytest.mark.parametrize("check", sorted(G.CHECKS))
def test_dry_run_on_cpu_fp32(check):
    """The same checks on CPU tensors (the Triton launchers in the interpreter) pass in float32."""
    rows = G.run_checks("cpu", ["float32"], {check: G.CHECKS[check]})
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]


def test_comparison_catches_wrong_raising_and_misplaced_results():
    def wrong(device, dtype, gen):
        ref = torch.arange(1.0, 5.0, dtype=torch.float64)
        return {"ok": (ref.float(), ref), "off": (ref.float() * (1 + 1e-3), ref),
                "shape": (ref[:3].float(), ref), "nan": (ref.float() * float("nan"), ref)}

    def raises(device, dtype, gen):
        raise RuntimeError("kernel launch failed")

    rows = G.run_checks("cpu", ["float32"], {"wrong": wrong, "raises": raises})
    by = {r["output"]: r for r in rows}
    assert by["ok"]["passed"] and by["ok"]["error"] == 0
    assert not by["off"]["passed"] and by["off"]["error"] == pytest.approx(1e-3, rel=1e-3)
    assert not by["shape"]["passed"] and not by["nan"]["passed"]
    assert not by["(raised)"]["passed"] and "kernel launch failed" in by["(raised)"]["note"]
    # a result left on another device than the one checked fails too
    rows = G.run_checks("cuda", ["float32"], {"wrong": wrong})
    assert rows[0]["output"] == "ok" and rows[0]["error"] == 0 and not rows[0]["passed"]
    assert "expected cuda" in rows[0]["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_no_gpu_exits_cleanly_with_a_message(capsys):
    assert G.main([]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "nothing checked" in out


def test_cpu_dry_run_needs_an_out_folder():
    with pytest.raises(SystemExit):
        G.main(["--device", "cpu"])


def test_dry_run_writes_the_tables(tmp_path):
    rows = G.run_checks("cpu", ["float32"], {"fisher_update": G.CHECKS["fisher_update"]})
    md = G.write_rows(str(tmp_path), rows, "header")
    assert (tmp_path / "checks.csv").read_text().startswith("check,dtype,output")
    assert md.startswith("header") and "fisher_update_ (triton)" in md


def test_benchmarks_md_section_is_replaced_between_markers(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# title\n\ntext\n")
    G.update_benchmarks_md("## GPU check: A\nfirst", str(path))
    G.update_benchmarks_md("## GPU check: B\nsecond", str(path))
    text = path.read_text()
    assert text.startswith("# title\n\ntext\n") and text.count(G.MARK_BEGIN) == 1
    assert "second" in text and "first" not in text

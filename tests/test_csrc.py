"""The hand-written CUDA sources compile with nvcc for sm_80 and sm_90, every one of them is loaded by a
launcher (no orphan that only a test compiles), the docs name only sources and kernel files that exist,
and a non-editable install ships them in `cdgfast.csrc`, the Triton kernels in `cdgfast.kernels`, and no
top-level `kernels` module."""
import ast
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files in {CSRC}"


def loaded_sources():
    """source name -> "file:line" of each `get_kernel(<source>, ...)` call in cdgfast/ (cdgfast/kernels/ included), the
    source given as a string or as a module-level string constant of the calling module."""
    found = {}
    for base in (ROOT / "cdgfast",):
        for path in sorted(base.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            consts = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                      and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                      for t in node.targets if isinstance(t, ast.Name)}
            for node in ast.walk(tree):
                func = getattr(node, "func", None)
                called = getattr(func, "attr", None) or getattr(func, "id", None)
                if not (isinstance(node, ast.Call) and node.args and called == "get_kernel"):
                    continue
                arg = node.args[0]
                name = arg.value if isinstance(arg, ast.Constant) else consts.get(getattr(arg, "id", None))
                if isinstance(name, str):
                    found.setdefault(name, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_cuda_source_is_loaded_by_a_launcher():
    loaded = loaded_sources()
    assert "fisher_update.cu" in loaded  # the scan itself finds the Fisher update's launcher
    orphans = [s.name for s in SOURCES if s.name not in loaded]
    assert not orphans, f"csrc sources that no launcher loads (compiled by the tests only): {orphans}"
    missing = {name: where for name, where in loaded.items() if not (CSRC / name).is_file()}
    assert not missing, f"launchers load sources that are not in csrc/: {missing}"


def test_docs_name_only_files_that_exist():
    """Every `path` the README, DEVELOPING and BENCHMARKS name under csrc/, kernels/, cdgfast/, tests/,
    benchmarks/ or examples/ matches a file (globs allowed)."""
    bad = []
    for doc in ("README.md", "DEVELOPING.md", "BENCHMARKS.md"):
        for token in re.findall(r"`([^`\s]+)`", (ROOT / doc).read_text()):
            if re.fullmatch(r"(csrc|kernels|cdgfast|tests|benchmarks|examples)/[\w./*-]+", token) \
                    and not any(ROOT.glob(token)):
                bad.append(f"{doc}: {token}")
    assert not bad, f"the docs name files that do not exist: {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): CUDA sources not compile-checked")
def test_every_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]

    def compile_one(job):
        src, arch = job
        out = tmp_path / f"{src.stem}.{arch}.cubin"
        # --cubin: front end + ptxas for the architecture (resource errors are caught) without the host
        # compiler pass of -c, which has nothing to check in kernel-only sources and triples the time
        cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings", "--cubin", str(src),
               "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return job, cmd, proc, out

    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 2)) as pool:
        results = list(pool.map(compile_one, jobs))
    failures = [f"{src.name} [{arch}]: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
                for (src, arch), cmd, proc, out in results if proc.returncode != 0 or not out.exists()]
    assert not failures, "\n\n".join(failures)
    # the entry points the Fisher launcher asks for are in the binaries (extern "C": unmangled names)
    from cdgfast.kernels.fisher_update import CUDA_KERNELS, CUDA_SOURCE

    for (src, arch), _, _, out in results:
        if src.name == CUDA_SOURCE:
            binary = out.read_bytes()
            absent = [name for name in CUDA_KERNELS.values() if b"\0" + name.encode() + b"\0" not in binary]
            assert not absent, f"{src.name} [{arch}]: no kernel symbol {absent}"


def _copy_source_tree(dst: Path) -> Path:
    """What setup.py needs, without .venv/.git/build outputs, so the build never writes into the checkout."""
    tree = dst / "src"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build", "dist")
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    for name in ("cdgfast", "csrc"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    return tree


def test_non_editable_install_layout(tmp_path):
    pytest.importorskip("setuptools")
    tree = _copy_source_tree(tmp_path)
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_TARGET", "PIP_PREFIX")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "--target", str(target), str(tree)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert not (target / "kernels").exists(), "a top-level `kernels` package was installed"
    installed_kernels = target / "cdgfast" / "kernels"
    for src in sorted((ROOT / "cdgfast" / "kernels").glob("*.py")):
        assert (installed_kernels / src.name).is_file(), f"cdgfast/kernels/{src.name} missing from the install"
    for src in SOURCES:
        assert (target / "cdgfast" / "csrc" / src.name).read_text() == src.read_text(), f"cdgfast/csrc/{src.name}"

    # A clean interpreter: no site-packages (-S: neither the venv's editable finder nor user site), only
    # the install target on the path, run outside the checkout. cdgfast imports nothing heavy at import time.
    code = ("import importlib.util, importlib.resources, sys\n"
            "import cdgfast.kernels, cdgfast.csrc\n"
            "assert importlib.util.find_spec('kernels') is None, 'top-level kernels importable'\n"
            "cu = sorted(p.name for p in importlib.resources.files('cdgfast.csrc').iterdir() if p.name.endswith('.cu'))\n"
            "print(cdgfast.kernels.__file__); print(','.join(cu))\n")
    clean_env = {"PYTHONPATH": str(target), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=clean_env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels_file, cu = proc.stdout.strip().splitlines()
    assert Path(kernels_file).resolve().is_relative_to(target.resolve())
    assert cu.split(",") == [s.name for s in SOURCES]


def root_folders_shadowing_installed_modules(root: Path, installed_top_level) -> List[str]:
    """Folders at `root` that Python can import under a name some installed distribution also provides.
    `python -m pytest` and `python -m cdgfast.train` put the checkout's root first on sys.path, so such a
    folder hides the real module from every library that imports it (a root-level `kernels/` broke
    transformers 5.25, which imports Hugging Face's `kernels`)."""
    own = {"cdgfast"}
    bad = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isidentifier()):
        # a regular package, or a folder of .py files (importable as a namespace package)
        importable = (folder / "__init__.py").is_file() or any(folder.glob("*.py"))
        if importable and folder.name not in own and folder.name in installed_top_level:
            bad.append(f"{folder.name}/ shadows the installed {installed_top_level[folder.name]}")
    return bad


def test_no_root_folder_shadows_an_installed_module():
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    bad = root_folders_shadowing_installed_modules(ROOT, installed)
    assert not bad, "move these folders inside cdgfast/ or rename them: " + "; ".join(bad)


def test_the_shadowing_rule_catches_a_root_kernels_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "dc.py").write_text("")
    (tmp_path / "data").mkdir()  # not importable: no .py files
    (tmp_path / "cdgfast").mkdir()
    (tmp_path / "cdgfast" / "__init__.py").write_text("")
    installed = {"kernels": ["kernels"], "data": ["somedist"], "cdgfast": ["cdgfast"]}
    assert root_folders_shadowing_installed_modules(tmp_path, installed) == ["kernels/ shadows the installed ['kernels']"]


TRITON_AOT = r"""
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from cdgfast.kernels import bregman as kb, dc as kd, fisher_update as kf, penalties as kp

def compile_for(fn, sig, const, arch):
    sig = dict(sig, **{k: "constexpr" for k in const})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    assert ".entry" in triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]

f = "*fp32"
for arch in (80, 90):
    compile_for(kp._rank1_fwd_kernel, dict(theta_ptr="*bf16", anchors_ptr=f, dirs_ptr="*fp16", partial_ptr=f, P="i32",
                K="i32", stride_a="i32", stride_d="i64"), dict(BLOCK=1024, ACC=tl.float32), arch)
    compile_for(kp._rank1_bwd_kernel, dict(theta_ptr=f, anchors_ptr=f, dirs_ptr=f, g_ptr=f, coeffs_ptr=f, s_ptr=f,
                gs_ptr=f, gtheta_ptr=f, ganch_ptr=f, gdir_ptr=f, P="i32", K="i32", stride_a="i32", stride_d="i32"),
                dict(HAS_GS=True, NEED_THETA=True, NEED_A=True, NEED_D=True, BLOCK=1024, ACC=tl.float32), arch)
    compile_for(kp._diag_bwd_kernel, dict(theta_ptr=f, anchor_ptr=f, fisher_ptr=f, r_ptr=f, g_ptr=f, gtheta_ptr=f,
                ganch_ptr=f, gfish_ptr=f, P="i64"), dict(HAS_R=False, NEED_THETA=True, NEED_A=True, NEED_F=True,
                BLOCK=1024, ACC=tl.float64), arch)
    compile_for(kp._diag_fwd_kernel, dict(theta_ptr=f, anchor_ptr="*fp16", fisher_ptr=f, partial_ptr=f, r_ptr=f,
                P="i64"), dict(WRITE_R=True, BLOCK=1024, ACC=tl.float32), arch)
    compile_for(kf._fisher_update_kernel, dict(dst_ptr=f, src_ptr="*bf16", n="i32", gamma_hi="fp32", gamma_lo="fp32",
                scale_hi="fp32", scale_lo="fp32"), dict(SQUARE=True, DECAY=True, BLOCK=2048, ACC=tl.float32), arch)
    for acc_f64, fl in ((False, f), (True, "*fp64")):
        for mode in (0, 1, 2):
            compile_for(kd._dc_reduce_kernel, dict(partial_ptr=fl, q_ptr=fl, err_ptr=f, logp_ptr=f, loss_ptr=f,
                        coef_ptr=fl, K="i32", T="i32", inv_n_hi="fp32", inv_n_lo="fp32", inv_tau_hi="fp32",
                        inv_tau_lo="fp32"), dict(MODE=mode, ACC_F64=acc_f64, BLOCK_K=8, BLOCK_T=64), arch)
            compile_for(kd._dc_fused_kernel, dict(pred_ptr="*fp16", eps_ptr="*fp16", q_ptr=fl, err_ptr=f, logp_ptr=f,
                        loss_ptr=f, gpred_ptr="*fp16", geps_ptr="*fp16", K="i32", N="i32", inv_n_hi="fp32",
                        inv_n_lo="fp32", inv_tau_hi="fp32", inv_tau_lo="fp32"),
                        dict(MODE=mode, ACC_F64=acc_f64, BLOCK_K=8, BLOCK_S=256), arch)
        compile_for(kb._bregman_kernel, dict(s_ptr=fl, t_ptr=fl, h_ptr=fl, hpart_ptr=fl, grad_ptr=fl, lpart_ptr=fl,
                    N="i32", T="i32", CHUNK="i32", kappa_hi="fp32", kappa_lo="fp32", inv_n_hi="fp32",
                    inv_n_lo="fp32", gs_hi="fp32", gs_lo="fp32", tiny="fp32"),
                    dict(HAS_H=True, ACC_F64=acc_f64, BLOCK_S=256, BLOCK_T=16), arch)
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    """The interpreter does not run Triton's compiler: compile the kernels ahead of time to PTX (no GPU
    needed; Triton ships ptxas) in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", TRITON_AOT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout + proc.stderr

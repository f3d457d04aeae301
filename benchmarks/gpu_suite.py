"""Every GPU test and check in one command (one device call): CI has no GPU, so this is how they run.

    python benchmarks/gpu_suite.py [--out benchmarks/results/gpu_suite_<card>.json] [--skip-checks | --checks-only]
                                   [--cuda-only]

On an H100 the pytest part takes about 6 minutes (fla's first calls autotune) and the checks several more: within
the device tool's 10-minute calls, run `--skip-checks` in one call and `--checks-only` in the next.

1. The whole pytest suite on the CUDA machine: the CUDA-only tests (fla kernels against the references, CUDA-graph
   decode and streaming, flash window attention, bf16 attention) run there and nowhere else; the CPU tests run
   too, on that machine's transformers. `--cuda-only`: only the tests marked `cuda` (`python -m pytest -m cuda`,
   every test that needs a CUDA device), a few minutes where the whole suite takes six.
2. `check_kernels.py` (every fla path against the PyTorch references in bf16, fla's tolerances) and
   `check_gpu_model.py` (whole converted models), each writing its own report beside this one.
Writes a dated report (command, card, versions, pytest counts and the names of the CUDA tests that ran, each
check's exit status) and exits non-zero when anything failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_output, report_header, require_fla  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA_WORDS = ("cuda", "graph", "flash", "fla", "bf16", "kernel", "compile")  # in the names of the CUDA tests
CUDA_MARKERS = ("needs CUDA", "need CUDA", "on CUDA", "a CUDA device", "need a GPU", "CUDA graphs need")


def run(command: list[str], log: Path) -> tuple[int, str]:
    """Run a command from the repository root, its output both shown and kept."""
    print("$", " ".join(command), flush=True)
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        lines = []
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    log.write_text("".join(lines))
    return process.returncode, "".join(lines)


def pytest_counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return {kind: int(count) for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="report path (default results/gpu_suite_<card>.json)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--skip-checks", action="store_true", help="pytest only, not the two check scripts")
    which.add_argument("--checks-only", action="store_true", help="the two check scripts only, not pytest")
    parser.add_argument(
        "--cuda-only", action="store_true", help="pytest runs only the tests marked cuda, not the whole suite"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_suite.py runs the CUDA tests: it needs a CUDA device.")
    device = torch.device("cuda")
    require_fla(device, cpu_hint=False)  # without fla its tests would skip and the report read as passed
    out = args.out or default_output("gpu_suite", device, quick=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = report_header("gpu_suite", None, device)
    failed = False
    if not args.checks_only:
        failed |= run_pytest(report, out, cuda_only=args.cuda_only)
    if not args.skip_checks:
        report["checks"] = {}
        for script in ("check_kernels", "check_gpu_model"):
            target = out.with_name(f"{script}_{out.stem.removeprefix('gpu_suite_')}.json")
            code, _ = run(
                [sys.executable, f"benchmarks/{script}.py", "--out", str(target)],
                out.with_suffix(f".{script}.log"),
            )
            report["checks"][script] = {"exit_code": code, "report": target.name}
            failed |= code != 0
    report["ok"] = not failed
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({key: report[key] for key in ("device", "date", "ok")}, indent=2))
    sys.exit(1 if failed else 0)


def run_pytest(report: dict, out: Path, cuda_only: bool = False) -> bool:
    """The whole suite (or the tests marked cuda); its counts, the CUDA tests that passed and those skipped for
    want of CUDA go in the report. True when anything failed."""
    # -rA lists every test's outcome, so the report can name the CUDA tests (they skip everywhere else)
    selection = ["-m", "cuda"] if cuda_only else []
    code, output = run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *selection],
        out.with_suffix(".pytest.log"),
    )
    report["pytest_selection"] = "tests marked cuda" if cuda_only else "the whole suite"
    passed = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("PASSED ")]
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED ")]
    report["pytest"] = {
        "exit_code": code,
        "counts": pytest_counts(output),
        "cuda_tests_passed": passed
        if cuda_only
        else [name for name in passed if any(word in name for word in CUDA_WORDS)],
        "skipped_for_want_of_cuda": [line for line in skipped if any(m in line for m in CUDA_MARKERS)],
    }
    return code != 0


if __name__ == "__main__":
    main()

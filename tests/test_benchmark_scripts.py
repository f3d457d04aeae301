"""The benchmark scripts run end to end on CPU with the tiny model (their GPU results are in benchmarks/results)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_script(name: str, monkeypatch):
    """A benchmark script imported as a module (benchmarks/ is not a package), for this test only."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_stages_times_every_variant(tmp_path, monkeypatch):
    out = tmp_path / "train_stages.json"
    argv = ["--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--lengths", "64"]
    monkeypatch.setattr(sys, "argv", ["train_stages.py", *argv, "--out", str(out)])
    script = benchmark_script("train_stages", monkeypatch)
    script.main()
    report = json.loads(out.read_text())
    runs = {name: lengths["64"] for name, lengths in report["runs"].items()}
    # Stages 2 and 3 against stock first (64 is the tiny config's packed length), then stage 1; opt-in ones not.
    assert list(runs) == [name for name in script.VARIANTS if name not in script.OPT_IN]
    for name, result in runs.items():
        assert result["tokens_per_s"] > 0 and result["trainable_params"] > 0, name
        assert len(result["step_s"]) == 1 and len(result["warmup_step_s"]) == 1, name
        assert 0 < result["model_tflop_per_step"] and 0 < result["mfu"], name
    assert runs["stage3_lora_packed8"]["packed_samples"] == 8
    # The recipes' checkpointing: on for 1b, 2 and 3 (and their stock baselines), off for 1a.
    assert runs["stage2_sft"]["gradient_checkpointing"] and runs["stock_lora"]["gradient_checkpointing"]
    assert not runs["stage1a_layerwise"]["gradient_checkpointing"]
    assert 0 < runs["stage1b_end_to_end"]["teacher_forward_s"] < runs["stage1b_end_to_end"]["median_step_s"]
    # The same trainable sets: adapters of the same rank on the same linear layers' kinds; SFT trains more in
    # the hybrid (its mixers are larger than the attention they replace).
    assert runs["stage3_lora"]["trainable_params"] > runs["stock_lora"]["trainable_params"] > 0
    assert runs["stage2_sft"]["trainable_params"] > runs["stock_sft"]["trainable_params"]
    assert report["command"].startswith("python benchmarks/train_stages.py --config tiny")
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} | 64" in table for name in runs) and out.with_suffix(".png").is_file()


def test_train_stages_retries_out_of_memory_with_checkpointing(monkeypatch):
    script = benchmark_script("train_stages", monkeypatch)
    attempts = []

    def run_variant(name, length, checkpointing, *args):
        attempts.append((name, checkpointing))
        if not checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return {"gradient_checkpointing": checkpointing}

    monkeypatch.setattr(script, "run_variant", run_variant)
    device = torch.device("cpu")
    retried = script.measure("stock_converted_attention", 64, None, None, None, device, None)
    assert retried == {"gradient_checkpointing": True, "retried_after_oom": True}
    # Stage 1a's forward runs without gradients: checkpointing would change nothing, so no second try.
    assert script.measure("stage1a_layerwise", 64, None, None, None, device, None)["error"] == "oom"
    stock = "stock_converted_attention"
    assert attempts == [(stock, False), (stock, True), ("stage1a_layerwise", False)]


def test_attention_pairs_count_causal_pairs_within_window_and_sample(monkeypatch):
    pairs = benchmark_script("train_stages", monkeypatch).attention_pairs
    assert pairs([4], None) == 1 + 2 + 3 + 4 and pairs([4], 2) == 1 + 2 + 2 + 2
    assert pairs([4, 4], None) == 2 * pairs([4], None) < pairs([8], None)


@pytest.mark.skipif(
    not os.environ.get("HYBRIDIZE_DDP_TEST"),
    reason="starts three Python interpreters (~40 s on 2 CPU cores); set HYBRIDIZE_DDP_TEST=1 to run it",
)
def test_two_processes_give_the_losses_of_one(tmp_path):
    out = tmp_path / "comparison.json"
    command = [sys.executable, str(BENCHMARKS / "distributed_loss_match.py"), "--config", "tiny"]
    command += ["--accelerator", "cpu", "--precision", "64-true", "--both", "--devices", "2", "--steps", "5"]
    result = subprocess.run(
        [*command, "--work-dir", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads(out.read_text())["comparison"]
    assert comparison["devices"] == [1, 2] and comparison["match"]
    assert comparison["initial_params_max_abs_diff"] == 0
    assert comparison["loss_max_rel_diff"] < 1e-9  # fp64: only the all-reduce's order of additions differs


def test_streaming_fps_streams_both_models(tmp_path, monkeypatch, capsys):
    out = tmp_path / "streaming.json"
    argv = [
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--frames",
        "14",
        "--frame-size",
        "56",
        "--ask-tokens",
        "2",
        "--profile",
        "2",
        "--recurrent-max-tokens",
        "300",
    ]
    from hybridize.mixers.ops import backends

    monkeypatch.setattr(
        backends, "FLA_RECURRENT_MAX_TOKENS", backends.FLA_RECURRENT_MAX_TOKENS
    )  # restored after
    benchmark_script("streaming_fps", monkeypatch).main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["fla_recurrent_max_tokens"] == backends.FLA_RECURRENT_MAX_TOKENS == 300
    hybrid, stock = report["variants"]["hybrid"], report["variants"]["stock"]
    assert hybrid["frames"] == stock["frames"] == 14 and len(hybrid["latency_ms"]) == 14
    # --profile 2: two more frames profiled whole and their vision encoding alone (CPU: operators, no kernels)
    for part in ("frame", "vision"):
        assert hybrid["profile"][part]["steps"] == 2 and hybrid["profile"][part]["top"][0]["self_ms"] > 0
    assert "profile, vision (per frame): 0 kernels" in out.with_suffix(".md").read_text()
    assert hybrid["windows"][0]["frames"] == [10, 14] and hybrid["windows"][0]["fps"] > 0
    assert hybrid["ask"]["tokens"] == 2 and stock["tokens"] == hybrid["tokens"]
    assert stock["state_mib"] > hybrid["state_mib"]  # window 64: the hybrid already dropped keys
    assert report["command"].startswith("python benchmarks/streaming_fps.py --config tiny")
    check = report["one_shot_check"]
    assert check["frames"] == 12 and check["same_argmax"] and check["logits_rel_rms"] < 1e-4
    assert set(check["state_rel_rms"]) >= {"keys", "values", "recurrent"}
    assert max(check["state_rel_rms"].values()) < 1e-4
    # the one forward against the same in float64: fp32 rounding, so small but not nothing; the stream is off by
    # no more than that rounding itself (1e-5 against 3e-6 here)
    scale = check["precision_scale"]
    assert scale["dtype"] == "float64" and set(scale["state_rel_rms"]) == set(check["state_rel_rms"])
    assert 0 < scale["logits_rel_rms"] < 1e-4 and 0 < max(scale["state_rel_rms"].values()) < 1e-4
    assert check["logits_rel_rms"] < 3 * scale["logits_rel_rms"]
    assert "against the same in float64" in out.with_suffix(".md").read_text()
    assert "| 10-14 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").is_file()
    assert "One-shot check (hybrid)" in out.with_suffix(".md").read_text()
    # a report of variants since renamed (2026-12-07's hybrid_overlapped) keeps its checks when redrawn
    variants = {"hybrid_overlapped": hybrid, **report["variants"]}
    renamed = {**report, "variants": variants, "one_shot_check_hybrid_overlapped": check}
    text = benchmark_script("streaming_fps", monkeypatch).markdown(renamed)
    assert "One-shot check (hybrid)" in text and "One-shot check (hybrid_overlapped)" in text
    assert hybrid["overlap_encoder"] is False  # no CUDA graphs on the CPU: one stream
    # the one-stream variant only differs with CUDA graphs: refused on the CPU
    with pytest.raises(SystemExit):
        benchmark_script("streaming_fps", monkeypatch).parse_args([*argv, "--variants", "hybrid_one_stream"])
    assert "hybrid_one_stream is hybrid without its second CUDA stream" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["attention_kernels", "gdn_backends"])
def test_kernel_timings_refuse_to_run_without_cuda(script, tmp_path, monkeypatch):
    out = tmp_path / "kernels.json"
    with pytest.raises(SystemExit, match="run it on a GPU"):
        benchmark_script(script, monkeypatch).main(["--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("script", ["decode_latency", "streaming_fps", "prefill_throughput", "train_stages"])
def test_cuda_runs_refuse_to_measure_without_fla(script, tmp_path, monkeypatch):
    """Without fla's kernels a CUDA run would time the hybrid's PyTorch references under the kernels' name: it
    stops with the install hint before it builds a model or writes a report."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = benchmark_script(script, monkeypatch)
    monkeypatch.setattr(sys.modules["common"], "fla_available", lambda: False)
    out = tmp_path / "report.json"
    argv = ["--device", "cuda", "--out", str(out)]
    if script == "train_stages":  # its main() reads sys.argv
        monkeypatch.setattr(sys, "argv", ["train_stages.py", *argv])
        argv = None
    with pytest.raises(SystemExit, match="hybridize\\[cuda\\]"):
        module.main() if argv is None else module.main(argv)
    assert not out.exists()


def test_decode_throughput_measures_both_models_and_stops_at_out_of_memory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = benchmark_script("decode_throughput", monkeypatch)
    out = tmp_path / "throughput.json"
    argv = ["--config", "tiny", "--device", "cpu", "--contexts", "32", "--batches", "1", "2", "4"]
    argv += ["--steps", "2", "--repeats", "1", "--warmup", "1", "--out", str(out)]
    real_measure = script.measure

    def measure(args, name, model, context, batch, device):  # the stock model "runs out of memory" at batch 4
        if name == "stock_static_graph" and batch == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_measure(args, name, model, context, batch, device)

    monkeypatch.setattr(script, "measure", measure)
    script.main(argv)
    report = json.loads(out.read_text())
    stock, hybrid = report["runs"]["stock_static_graph"]["32"], report["runs"]["hybrid_static_graph"]["32"]
    assert stock["4"] == {"oom": True} and all(hybrid[b]["tokens_per_s"] > 0 for b in ("1", "2", "4"))
    # Throughput counts every row: tokens/s = batch / step time.
    assert hybrid["2"]["tokens_per_s"] == pytest.approx(2e3 / hybrid["2"]["ms_per_step"])
    row = report["summary"]["32"]
    assert row["hybrid_static_graph"]["tokens_per_s"] == max(r["tokens_per_s"] for r in hybrid.values())
    assert row["hybrid_over_stock"] == pytest.approx(
        row["hybrid_static_graph"]["tokens_per_s"] / row["stock_static_graph"]["tokens_per_s"]
    )
    assert report["command"].startswith("python benchmarks/decode_throughput.py --config tiny")
    assert "| 32 | 4 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").is_file()


def test_prefill_throughput_tunes_the_chunk_and_stops_the_stock_model(tmp_path, monkeypatch):
    """The chunk sweep, the hybrid at every context, the stock model until it runs out of memory (simulated at the
    longest context) or until its projected time (quadratic in the context) leaves the budget."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = benchmark_script("prefill_throughput", monkeypatch)
    out = tmp_path / "prefill.json"
    argv = ["--config", "tiny", "--device", "cpu", "--contexts", "32", "64", "128", "--chunk", "32"]
    argv += ["--chunk-sweep", "16", "32", "--chunk-sweep-context", "64", "--repeats", "1", "--out", str(out)]
    real_prefill = script.prefill

    def prefill(args, model, context, device, chunk, warm=False):
        if chunk is None and context == 128:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_prefill(args, model, context, device, chunk, warm)

    monkeypatch.setattr(script, "prefill", prefill)
    script.main(argv)
    report = json.loads(out.read_text())
    hybrid, stock = report["runs"]["hybrid"], report["runs"]["stock"]
    assert set(report["chunk_sweep"]) == {"16", "32"} and report["summary"]["best_chunk"] in (16, 32)
    assert all(hybrid[c]["tokens_per_s"] > 0 for c in ("32", "64", "128"))
    assert stock["128"] == {"oom": True} and stock["64"]["tokens_per_s"] > 0
    assert report["summary"]["hybrid_over_stock"]["64"] == pytest.approx(
        hybrid["64"]["tokens_per_s"] / stock["64"]["tokens_per_s"]
    )
    assert "| 64 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").is_file()
    # a budget the next stock run would overrun: it is skipped, and every longer one
    script.main([*argv, "--time-budget-s", "0"])
    stock = json.loads(out.read_text())["runs"]["stock"]
    assert "tokens_per_s" in stock["32"] and stock["64"]["skipped"].startswith("skipped (projected")
    assert stock["128"] == stock["64"]
    # --warmup first: an untimed run only before each model's first prefill
    real_hybrid_prefill, hybrid_prefills = script.StaticDecoder.prefill, []

    def counted(decoder, ids, **kwargs):
        hybrid_prefills.append(ids.shape[1])
        return real_hybrid_prefill(decoder, ids, **kwargs)

    monkeypatch.setattr(script.StaticDecoder, "prefill", counted)
    short = ["--contexts", "32", "64", "--chunk-sweep", "--warmup", "first"]  # later flags win
    script.main([*argv, *short])
    runs = json.loads(out.read_text())["runs"]
    untimed = {
        name: {context: result["untimed_first"] for context, result in runs[name].items()} for name in runs
    }
    assert untimed == {"hybrid": {"32": True, "64": False}, "stock": {"32": True, "64": False}}
    assert hybrid_prefills == [32, 32, 64]  # 32 untimed and timed, 64 timed only


def test_prefill_throughput_projects_the_forwards_the_next_stock_point_runs(monkeypatch):
    """A stock point's projected time is the last point's seconds per forward, grown quadratically, times the
    forwards the next point runs: under --warmup first one timed forward, not an untimed one as well (the 512K
    run of 2026-12-07 was skipped at a projected 199 s that was one 99 s forward)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = benchmark_script("prefill_throughput", monkeypatch)
    last = (128, 12.4 / script.forwards(argparse.Namespace(repeats=1), True))  # 128K: untimed + timed, 12.4 s
    first, each = (argparse.Namespace(repeats=1, warmup=warmup) for warmup in ("first", "each"))
    assert script.projected_seconds(first, last, 512) == pytest.approx(6.2 * 16)
    assert script.projected_seconds(each, last, 512) == pytest.approx(2 * 6.2 * 16)
    assert script.projected_seconds(
        argparse.Namespace(repeats=3, warmup="first"), last, 256
    ) == pytest.approx(3 * 6.2 * 4)


def test_train_stages_resumes_a_sweep_over_several_calls(tmp_path, monkeypatch):
    """--resume keeps what an earlier call measured and measures what it skipped; other settings are refused."""
    out = tmp_path / "sweep.json"
    common = ["--config", "tiny", "--device", "cpu", "--warmup", "1", "--lengths", "32", "--out", str(out)]
    common += ["--variants", "stage3_lora", "stock_lora"]

    def call(*extra):
        monkeypatch.setattr(sys, "argv", ["train_stages.py", *common, *extra])
        benchmark_script("train_stages", monkeypatch).main()
        return json.loads(out.read_text())

    first = call("--steps", "1", "--time-budget-s", "0")  # nothing starts within the budget
    assert all(run["32"] == {"error": "skipped (time budget)"} for run in first["runs"].values())
    second = call("--steps", "1", "--resume")
    assert all(run["32"]["tokens_per_s"] > 0 for run in second["runs"].values())
    assert len(second["commands"]) == 2 and "--resume" in second["commands"][1]
    third = call("--steps", "1", "--resume")  # everything measured already: kept as it was
    assert third["runs"] == second["runs"]
    # a call naming another variant adds it; the runs of the variants it does not name stay
    fourth = call("--steps", "1", "--resume", "--variants", "stage1b_end_to_end_no_ckpt")
    assert {name: fourth["runs"][name] for name in second["runs"]} == second["runs"]
    added = fourth["runs"]["stage1b_end_to_end_no_ckpt"]["32"]
    assert added["tokens_per_s"] > 0 and added["gradient_checkpointing"] is False
    # --remeasure measures a finished run again and keeps the others
    fifth = call("--steps", "1", "--resume", "--remeasure", "stock_lora@32")
    assert fifth["runs"]["stage3_lora"] == second["runs"]["stage3_lora"]
    assert fifth["runs"]["stock_lora"]["32"]["tokens_per_s"] > 0
    assert fifth["runs"]["stock_lora"]["32"] != second["runs"]["stock_lora"]["32"]  # its own timings
    # a call stopped after its first run (a time limit, a lost machine) has kept every earlier run, the one it
    # was to measure again too
    script = benchmark_script("train_stages", monkeypatch)
    measure = script.measure
    calls = []

    def measure_once(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[:2])
        return measure(*args, **kwargs)

    monkeypatch.setattr(script, "measure", measure_once)
    again = ["--lengths", "16", "32", "--remeasure", "stock_lora@32"]
    monkeypatch.setattr(sys, "argv", ["train_stages.py", *common, "--steps", "1", "--resume", *again])
    with pytest.raises(KeyboardInterrupt):
        script.main()
    stopped = json.loads(out.read_text())
    assert calls == [("stage3_lora", 16)] and stopped["lengths"] == [16, 32]
    assert {name: stopped["runs"][name]["32"] for name in fifth["runs"]} == {
        name: run["32"] for name, run in fifth["runs"].items()
    }
    assert (
        stopped["runs"]["stage3_lora"]["16"]["tokens_per_s"] > 0 and "16" not in stopped["runs"]["stock_lora"]
    )
    for bad in (["--remeasure", "stock_lora@32"], ["--resume", "--remeasure", "stage2_sft@32"]):
        with pytest.raises(SystemExit, match="remeasure"):
            call("--steps", "1", *bad)
    with pytest.raises(SystemExit, match="other settings.*timed_steps"):
        call("--steps", "2", "--resume")


def test_gdn_backends_times_short_prefills_in_both_forms(monkeypatch):
    """--short-lengths: chunked and fused recurrent prefill of the same inputs, the recurrent's output and state
    against the chunked's, eagerly and replayed from a CUDA graph, in the report and its table (on CPU through the
    PyTorch references, untimed; the graph a stand-in that replays the captured call)."""
    script = benchmark_script("gdn_backends", monkeypatch)
    modes, captured = [], []

    def capture_cuda_graph(fn):
        captured.append(fn()[0].shape[1])
        return argparse.Namespace(replay=lambda: fn() and None), None

    def call(tensors, mode="chunk"):
        modes.append((tensors["q"].shape[1], mode))
        return script.gated_delta_rule(**tensors, output_final_state=True, backend="torch", mode=mode)

    monkeypatch.setattr(script, "call", call)
    monkeypatch.setattr(script, "capture_cuda_graph", capture_cuda_graph)
    monkeypatch.setattr(script, "median_ms", lambda fn, warmup, repeats: (fn() or 1) and 2.0)
    args = argparse.Namespace(lengths=[], short_lengths=[8, 24], warmup=1, repeats=1, seed=0, graphs=True)
    report = {"command": "gdn_backends.py", "device": "cpu", "date": "today", "versions": {}, "runs": {}}
    report["short_prefill"] = {}
    script.measure(args, report, torch.device("cpu"), lambda: None)
    assert sorted(set(modes)) == [(8, "chunk"), (8, "recurrent"), (24, "chunk"), (24, "recurrent")]
    assert captured == [8, 8, 24, 24]  # each form of each length captured once
    for length in ("8", "24"):
        result = report["short_prefill"][length]
        assert result["recurrent_over_chunk_time"] == 1.0 and result["chunk"]["prefill_tokens_per_s"] > 0
        assert result["recurrent_over_chunk_graph_time"] == 1.0 and result["recurrent"]["graph_ms"] == 2.0
        assert set(result["recurrent"]["error"]) == {"out", "state"}
        assert 0 < max(result["recurrent"]["error"].values()) < 1e-2  # two bf16 forms of one scan
    assert "| 24 | 2.000 | 2.000 | 1.00 | 2.000 | 2.000 | 1.00 |" in script.markdown(report)
    args.graphs = False  # --no-graphs: eager only
    script.measure(args, report, torch.device("cpu"), lambda: None)
    assert "graph_ms" not in report["short_prefill"]["8"]["chunk"] and captured == [8, 8, 24, 24]
    assert "| 24 | 2.000 | 2.000 | 1.00 | not timed | |  |" in script.markdown(report)

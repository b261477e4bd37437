"""llama.cpp's prompt-processing and generation speed on the real model, as llama-bench's pp512/tg128.

llama-bench (``tools/llama-bench/llama-bench.cpp``): ``pp512`` decodes 512 tokens in one batch from
an empty cache, ``tg128`` decodes 128 tokens one at a time from an empty cache; random tokens, a
warm-up run first, 5 repetitions (``-r 5``), ``llama_synchronize`` before the clock stops. The same
here through llama-cpp-python (:mod:`scalellm.llama_cpp_run`), every layer offloaded on a GPU
(``n_gpu_layers=-1``), as many threads as the process has cores on cpu. The figures are stored as samples and
compared with the noise-aware rule (median ratio and its bootstrap interval), as the model tier's
prefill/decode figures, under the same table names (``prefill_tok_s:gguf-q4_1``...).
"""

from __future__ import annotations

import os

import pytest

from scalellm import llama_cpp_run, llama_cpp_worker, tables
from scalellm.baselines import Tolerance
from suites.helpers.gguf_cases import method_name

pytestmark = [pytest.mark.gguf, pytest.mark.throughput]

#: Speed is measured on the shipped type and the most used requantization; Q8_0 under ``slow``.
TYPES = ("Q4_1", "Q4_K_M")
SLOW_TYPES = ("Q8_0",)
TYPE_PARAMS = [pytest.param(t, id=t) for t in TYPES] + [pytest.param(t, id=t, marks=pytest.mark.slow)
                                                         for t in SLOW_TYPES]
PP_TOKENS, TG_TOKENS = 512, 128  # llama-bench -p 512 -n 128
SAMPLES = 5  # llama-bench -r 5
#: One tg128 run may take this long before the test stops with the rate it reached. tg ~115-150 tok/s on
#: these 2 cores (~1 s a run; docs/evidence.md: llama.cpp speed on 2 cores); measured here, n_threads=2
#: while another job kept both cores busy: 1.1 tok/s (ggml's thread barriers spin and wait on a
#: descheduled thread), which would hold the suite for 10 minutes to record a figure about the
#: neighbours.
TG_BUDGET_S = 30.0
#: A spent budget is a failure unless other processes hold the cores: a 1-minute load average at least
#: one runnable thread above this process's own threads (which spin, so they count). There the figure
#: is not measured (a skip saying so): measured 2026-12-03, two CI runs on these 2 cores gave 1.26 tok/s
#: at load average 4.9, where a quiet run gives ~80.
NEIGHBOUR_THREADS = 1.0
#: As the model tier's throughput tolerances (suites/model/test_generation.py): the noise-aware rule
#: flags a regression only when the whole 95% interval of the median ratio is worse than this.
#: Devices where a batch of 512 must beat one-token steps. On a GPU batching is the point (H100: pp512
#: ~50k vs tg128 ~0.8k tok/s). On a CPU it is not a law: without a GEMM kernel for the type (ggml's
#: AVX2 path has none for K-quants or Q4_1), a prompt token costs a vector-dot pass like a generated
#: one plus attention over a longer context. Measured on an AMD EPYC with AVX2 only, 2 cores
#: (llama-cpp-python 0.3.36, 2026-12-03): Q4_K_M pp512 53-65 vs tg128 79-88 tok/s; earlier Q4_1
#: 79 vs 94. There the figures are recorded and compared with their class baselines only.
BATCH_BEATS_STEPS = ("cuda", "mps")
THROUGHPUT_TOL = {
    "cpu": Tolerance(rel=0.5, why="cpu: 2 shared cores; tg 115-150 and pp 330-860 tok/s between runs "
                                  "under load (docs/evidence.md: llama.cpp speed on 2 cores)"),
    "cuda": Tolerance(rel=0.25, why="cuda: N=3 runs on the H100 (2026-11-26), run medians within 13% "
                                    "(Q8_0 pp512 49.3k-55.9k tok/s, tg128 758-801)"),
    "mps": Tolerance(rel=0.3, why="mps: shared unified memory, untested here; wide until measured"),
}


@pytest.mark.parametrize("ftype", TYPE_PARAMS)
def test_pp512_and_tg128(ftype, device, llama_cpp_files, record_metric):
    """Prompt processing and generation tokens/s as repeated samples; on a GPU a batch of 512 beats 1-token steps."""
    llm = llama_cpp_files.load(ftype, device)
    try:
        prompt = llama_cpp_run.bench_tokens(llm, PP_TOKENS, seed=0)
        gen = llama_cpp_run.bench_tokens(llm, TG_TOKENS, seed=1)
        # one warm-up run of each (as llama-bench), then the samples
        pp = [PP_TOKENS / llama_cpp_run.prompt_seconds(llm, prompt) for _ in range(1 + SAMPLES)][1:]
        tg = [TG_TOKENS / llama_cpp_run.generation_seconds(llm, gen, TG_BUDGET_S) for _ in range(1 + SAMPLES)][1:]
    except TimeoutError as exc:
        cores, load = llama_cpp_worker.usable_cores(), os.getloadavg()[0]
        where = f"tg{TG_TOKENS} on {device} with {cores} threads: {exc}; load average {load:.1f}"
        if device == "cpu" and load >= cores + NEIGHBOUR_THREADS:
            pytest.skip(f"not measured: {where}: other processes hold the cores, so the figure would be theirs")
        pytest.fail(f"{where}: the host is not oversubscribed, so llama.cpp itself is this slow", pytrace=False)
    finally:
        llm.close()
    tolerance = THROUGHPUT_TOL[device]
    method = method_name(ftype)
    record_metric(tables.metric_name("prefill_tok_s", method), sorted(pp)[SAMPLES // 2], unit="tok/s",
                  better="higher", tolerance=tolerance, samples=pp)
    record_metric(tables.metric_name("decode_tok_s", method), sorted(tg)[SAMPLES // 2], unit="tok/s",
                  better="higher", tolerance=tolerance, samples=tg)
    assert min(pp) > 0 and min(tg) > 0
    if device in BATCH_BEATS_STEPS:
        assert sorted(pp)[SAMPLES // 2] > sorted(tg)[SAMPLES // 2], (
            f"{ftype} on {device}: pp{PP_TOKENS} median {sorted(pp)[SAMPLES // 2]:.1f} tok/s is not above "
            f"tg{TG_TOKENS} median {sorted(tg)[SAMPLES // 2]:.1f}: batching gains nothing (pp {pp}, tg {tg})")

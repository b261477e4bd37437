"""Where each figure's baseline applies: its *scope* (``scalellm.baselines``: levels).

A scope is the widest set of machines on which a figure must agree, given the same library stack:
``any`` device, one device ``kind`` (cpu, cuda, mps), or one device ``class`` (a hardware model).
Each rule below was chosen from measured agreement and says so. The machines compared:

- **Intel** cpu: a 2-core Intel Xeon VM with AVX512-BF16/AMX (class ``cpu-intel-xeon-amx-2c``),
  torch 2.13.0+cpu, transformers 5.24, bitsandbytes 0.50.2; the committed cpu baselines, 2026-11;
- **AMD** cpu: a 2-core AMD EPYC VM with AVX2 only (``cpu-amd-epyc-avx2-2c``), same stack, 2026-12-03;
- **H100**: the lent NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, transformers 5.17, 2026-11;
- **H200**: the lent NVIDIA H200, same stack as the H100: all 163 figures compared by hand agreed
  with the H100's within their tolerances (2026-12), so ``kind`` holds across the two.

Rules match a figure by its baseline file stem (``model.test_quality``) and its metric name before
any ``:`` (``perplexity`` of ``perplexity:nf4``), with shell wildcards; the first match wins. A figure
no rule names is ``class``: compared only on the hardware that recorded it, which can never raise a
false alarm on another machine (``suites/harness/test_scopes.py`` holds every stored figure to a rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from scalellm.baselines import file_stem


@dataclass(frozen=True)
class Rule:
    module: str  # baseline file stem, shell wildcards
    metric: str  # metric name before any ':', shell wildcards
    scope: str  # "any", "kind" or "class"
    why: str  # the measured agreement (or disagreement) that chose it


SPEED = ("throughput, time and bandwidth are properties of the chip: Intel vs AMD cpu prefill differed 15x, "
         "H100 vs cpu 10-200x")

RULES = (
    # ---- conformance: the reference codec against the library
    Rule("conformance.test_blockwise_4bit", "rel_rmse_*", "any",
         "seeded N(0,1) round trip: Intel cpu and H100 agree to 3e-13 (NF4 0.0920, FP4 0.1219)"),
    Rule("conformance.test_blockwise_4bit", "*", "kind",
         "share and size of code differences from the reference: a property of the device's kernels"),
    Rule("conformance.test_double_quant", "dq_code_disagreement", "class",
         "bnb's native CPU kernel picks the farther 8-bit code for 0.18% of blocks on the Intel AVX512 box, "
         "0 on the H100: it follows the kernel path the CPU flags select"),
    Rule("conformance.test_int8", "*", "kind",
         "LLM.int8 codes and errors: Intel cpu and H100 agree within tolerance, but code mismatches "
         "(0 vs 7.7e-5 of 1e-4) sit near the edge: held per kind"),
    # ---- GGUF: numpy reference blocks, llama.cpp kernels
    Rule("gguf.test_block_formats", "*", "any", "pure numpy reference on seeded data: no device involved"),
    Rule("gguf.test_llama_cpp_quality", "bits_per_weight", "any", "file arithmetic of the tensor types chosen"),
    Rule("gguf.test_llama_cpp_quality", "bytes_per_param", "any", "file arithmetic of the tensor types chosen"),
    Rule("gguf.test_llama_cpp_quality", "*", "kind",
         "ggml's CUDA and CPU kernels differ: Q4_1 KLD 0.0032 on cpu vs 0.0139 on the H100"),
    Rule("gguf.test_conversion", "*", "kind", "llama.cpp vs transformers max |dlogit|: 5e-5 on cpu, 0.045-0.063 on the H100"),
    Rule("gguf.test_llama_cpp_speed", "*", "class", SPEED),
    # ---- GPTQ
    Rule("gptq.test_reference", "*", "any", "seeded layers: Intel cpu and H100 ratios agree within 0.5%"),
    Rule("gptq.test_quality", "gptq_over_rtn_layer_error_sum", "any", "Intel cpu 0.1385 vs H100 0.1371"),
    Rule("gptq.test_quality", "*", "kind",
         "perplexity/KLD/top-1 of the quantized rows: rtn-3bit top-1 69.4% on cpu vs 70.5% on the H100; "
         "Intel and AMD cpu agree within the tolerances (4-bit perplexity +1.1%: PPL_TOL covers it)"),
    Rule("gptq.test_library", "library_over_reference_*", "any", "geomean 1.007 on Intel cpu vs 1.005 on the H100"),
    Rule("gptq.test_library", "*", "kind", "top-1 of the library's rows: 89.1% on cpu vs 88.1% on the H100"),
    Rule("gptq.test_library_lora", "*", "kind", "LoRA losses on a GPTQ base: 3.80 -> 2.84 on cpu, 4.02 -> 3.12 on the H100"),
    Rule("gptq.test_library_speed", "*", "class", SPEED),
    # ---- QLoRA
    Rule("lora.test_adapters", "adapter_bytes", "any", "the safetensors file of the adapter: 9,823,216 bytes everywhere"),
    Rule("lora.test_merge", "merge_max_abs_dlogit", "any", "fp32 merge: 7.2e-5 on cpu vs 6.8e-5 on the H100 (abs 1e-3)"),
    Rule("lora.test_merge", "*", "kind", "4-bit compute vs dense: 0 on cpu vs 0.30 on the H100"),
    Rule("lora.test_training", "*", "kind", "losses: 3.77 -> 2.29 on cpu vs 4.01 -> 2.52 on the H100"),
    Rule("lora.test_ceilings", "peak_bytes_at_oom", "class",
         "where an out-of-memory error strikes depends on the card's total (the cap is a fraction of it): on the "
         "H200 the OOM peaks were 3.3-7.3% above the H100's (2026-12-03, N=1) while fitting peaks agreed"),
    Rule("lora.test_ceilings", "*", "kind", "allocator peaks of fitting cases: the H200 matched the H100 within 2%"),
    Rule("lora.test_speed", "*", "class", SPEED),
    # ---- the real model
    Rule("model.test_footprint", "bytes_per_param", "any", "exact arithmetic of the format: equal on cpu and the H100"),
    Rule("model.test_footprint", "*", "kind",
         "bytes held and load peaks: 4-bit held bytes 169.8 MB on cpu vs 173.1 MB on the H100 (bnb's CPU repack)"),
    Rule("model.test_quality", "dlogit_p999", "kind", "bf16 p99.9 |dlogit| 0.60 on cpu vs 0.56 on the H100 (tolerance 5%)"),
    Rule("model.test_quality", "*", "any",
         "perplexity/KLD/top-1 of all eight methods: Intel cpu and H100 agree within their tolerances"),
    Rule("model.test_attention", "*", "kind", "eager vs sdpa: each kind has its own attention kernels"),
    Rule("model.test_generation", "*", "class", SPEED),
    # ---- planner and report
    Rule("planner.test_planner", "*", "any", "deterministic arithmetic of the planner"),
    Rule("planner.test_validation", "*", "kind", "allocator peaks: the H200 matched the H100 within 2 points"),
    Rule("report.test_roofline", "*", "class", SPEED),
    Rule("throughput.test_codec_speed", "*", "class", SPEED),
    Rule("throughput.test_op_speed", "*", "class", SPEED),
)

DEFAULT = Rule("*", "*", "class", "no rule names this figure: compared only on the hardware that recorded it")


def rule_for(test_id: str, name: str) -> Rule:
    """The first rule matching the figure ``name`` of ``test_id``, else :data:`DEFAULT`."""
    module, metric = file_stem(test_id), name.split(":", 1)[0]
    for rule in RULES:
        if fnmatchcase(module, rule.module) and fnmatchcase(metric, rule.metric):
            return rule
    return DEFAULT

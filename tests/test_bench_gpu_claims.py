"""The benchmark's checks of GPU claims, run on the tiny model here: the simulated smaller card
(memory cap) is recorded, a case that runs out of memory is a result, kernels are told apart by
name, render time is split by component, and the fp8 quality guards compute what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cogvx.benchmark.cases import ISSUE17, REFERENCE_VARIANTS, Case, select
from cogvx.benchmark.profiling import RenderPhases, kernel_category, summarize_kernels
from cogvx.benchmark.suite import compare, summary_line


def test_every_issue17_case_is_a_valid_config_and_the_headline_settings_are_all_there(tmp_path):
    from cogvx.benchmark.worker import case_config

    variants = set()
    for case in ISSUE17:
        config = case_config(case, tmp_path)
        assert config.spec.key == case.variant
        if case.kind == "validate":
            variants.add(case.variant)
            assert config.train.lora.rank == 64 and (config.frames, config.height, config.width) == (config.spec.frames, config.spec.height, config.spec.width)
    assert variants == {"cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"}
    assert {case.kind for case in ISSUE17} >= {"train", "validate", "generate", "quality"}
    assert REFERENCE_VARIANTS["issue17"]["5b"] == ("compile",)


def test_kernels_are_told_apart_by_name():
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attn-cudnn"
    assert kernel_category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attn-flash"
    assert kernel_category("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at_"
                           "_tensorptrbf16gmemalign16o_1") == "attn-fa4"
    assert kernel_category("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attn-efficient"
    assert kernel_category("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "gemm-fp8"
    assert kernel_category("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN") == "gemm"
    assert kernel_category("triton_poi_fused_add_mul_0") == "triton-fused"
    # seen in a FlashAttention-4 render: inductor's rotary kernel named after the SDPA it feeds
    assert kernel_category("triton_poi_fused__scaled_dot_product_flash_attention__to_copy_add_copy_mul_"
                           "neg_slice_stack_transpose_unbind_unsqueeze_view_4") == "triton-fused"
    # seen on the H200: cuBLAS's fp8 rowwise GEMM and the patch embedding's cuDNN convolutions
    assert kernel_category("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT") == "gemm-fp8"
    assert kernel_category("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
                           "warpgroupsize1x1x1_g1_execute_segment_k_off_kernel__5x_cudnn") == "conv"
    assert kernel_category("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_256x128_"
                           "64x3_nhwc_align8>") == "conv"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attn-cudnn"
    summary = summarize_kernels([("cudnn_generated_fort_native_sdpa_sm90_x", 2.0), ("triton_red_fused_1", 0.5),
                                 ("pytorch_flash::flash_bwd", 0.25), ("nvjet_tst_1", 1.0)])
    assert summary["attention_backend_seen"] == "attn-cudnn" and summary["gpu_s"] == 3.75
    assert summary["by_category_s"]["gemm"] == 1.0 and summary["kernel_names"]["attn-flash"] == ["pytorch_flash::flash_bwd"]


def test_an_out_of_memory_case_is_a_result_and_a_case_under_the_cap_meets_its_target():
    case = Case("x", "train", "tiny-t2v", (9, 64, 96), targets={"peak_reserved_gib": 23.0})
    oom = {"case": "x", "error": "out of memory under the 23 GiB cap", "oom": True, "fits_memory_cap": False}
    assert compare(dict(oom), case, None) == oom and "FAILED (out of memory" in summary_line(oom)
    fits = compare({"case": "x", "peak_allocated_gib": 12.0, "peak_reserved_gib": 13.5, "memory_cap_gib": 23.0,
                    "fits_memory_cap": True}, case, None)
    assert fits["targets_met"] == {"peak_reserved_gib": True} and "peak_reserved_gib=13.5" in summary_line(fits)


@pytest.mark.slow
def test_a_memory_cap_asked_for_without_cuda_is_not_recorded(run_cli, tmp_path):
    """`cogvx bench case` (a tiny training case in its own process, over 10 s) with the cap set:
    on a CPU there is no CUDA memory to cap, so the result names none."""
    from cogvx.benchmark.worker import MEMORY_CAP_ENV

    done = run_cli("bench", "case", "tiny-lora", "--suite", "smoke", "--workdir", str(tmp_path / "wd"),
                   env={MEMORY_CAP_ENV: "23"})
    result = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
    assert done.returncode == 0 and result["device"] == "cpu" and "memory_cap_gib" not in result  # no CUDA: no cap


def test_compare_also_gives_the_ratio_to_the_compiled_reference():
    case = Case("x", "train", "tiny-t2v", (9, 64, 96), targets={"time_ratio": 0.6})
    result = compare({"s_per_step_median": 2.2, "peak_allocated_gib": 18.0}, case,
                     {"s_per_step_median": 3.67, "peak_gb": 18.2}, {"s_per_step_median": 2.8, "peak_gb": 17.28})
    assert result["time_ratio"] == 0.599 and result["time_ratio_vs_compiled_reference"] == 0.786
    assert result["targets_met"] == {"time_ratio": True}


def test_render_phases_split_a_tiny_render_by_component(tiny_models, tmp_path):
    from cogvx.config import load_config
    from cogvx.generate import GenerateRequest, generation_pipeline, render_request

    config = load_config(None, [f"model.path={tiny_models['tiny-t2v']}", "model.variant=tiny-t2v",
                                "validate.num_inference_steps=3", "validate.offload=none"])
    request = GenerateRequest(prompt="a red circle", out=tmp_path / "x.mp4")
    pipe, device = generation_pipeline(config, request, log=lambda *_: None)
    forward = pipe.transformer.forward
    with RenderPhases(pipe, device) as phases:
        render_request(pipe, config, request, device)
    summary = phases.summary(10.0)
    assert summary["calls"] == {"text_encoder": 2, "transformer": 3, "vae_decode": 1}, summary  # CFG: 2 prompts
    assert all(seconds > 0 for seconds in phases.seconds.values())  # unrounded: a tiny T5 call takes < 5 ms
    assert pipe.transformer.forward == forward and "decode" not in vars(pipe.vae)  # put back as it was


@pytest.mark.slow
def test_fp8_quality_guard_on_the_tiny_model(tmp_path):
    from cogvx.benchmark.quality import run_quality

    result = run_quality(Case("q", "quality", "tiny-t2v", (9, 64, 96), steps=40), tmp_path, torch.device("cpu"))
    gradients = result["gradients"]
    assert gradients["fp8_gemm_vs_bf16"]["tensors"] == 16  # 2 blocks x 4 targets x (A, B)
    assert 0 < gradients["fp8_gemm_vs_fp8_storage"]["median"] < gradients["fp8_gemm_vs_bf16"]["median"] < 0.1
    curves = result["curves"]
    assert len(curves["windowed_loss"]["bf16"]) == 2 and set(curves["loss_fell"]) == {"bf16", "fp8_storage", "fp8_gemm"}
    assert 0 < result["loss_curve_rel_diff"] < 0.1 and math.isfinite(result["grad_rel_err_median"])


def test_selecting_issue17_cases_keeps_suite_order():
    names = [case.name for case in select("issue17", ["5b-full", "5b-speed"])]
    assert names == ["5b-speed", "5b-full"]

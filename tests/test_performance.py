"""Memory and speed options on the tiny model: each builds, runs a training step and computes
the same function as the plain model (within its precision)."""

from __future__ import annotations

import math

import copy

import pytest
import torch

from cogvx.config import ConfigError, load_config
from cogvx.errors import CogvxError
from cogvx.models.build import build_transformer
from cogvx.models.specs import get_spec
from cogvx.models.lora import add_lora
from cogvx.training.objective import rotary_embeddings
from cogvx.models.performance import (
    ATTENTION_OPS,
    BackendAttnProcessor,
    Fp8ComputeLinear,
    Fp8StorageLinear,
    compile_blocks,
    enable_checkpointing,
    quantize_fp8_compute,
    set_attention_backend,
    store_base_weights_in_fp8,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_lora_model(seed: int = 0, checkpointing: bool = True, offload: bool = False, keep_attention: bool = False):
    torch.manual_seed(seed)
    model = build_transformer(get_spec("tiny-t2v"))
    if checkpointing:
        enable_checkpointing(model, offload=offload, keep_attention=keep_attention)
    add_lora(model, rank=4, alpha=4, target_modules=TARGETS)
    with torch.no_grad():  # non-zero B matrices, so every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.train()


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 3, 16, 8, 12, generator=generator)  # [B, F, C, h, w]
    text = torch.randn(1, 7, 32, generator=generator)  # [B, L, D]
    return latents, text


def forward(model, latents, text):
    rotary = rotary_embeddings(model, 64, 96, latents.shape[1], torch.device("cpu"))
    return model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                 image_rotary_emb=rotary, return_dict=False)[0]


def lora_grads(model) -> dict[str, torch.Tensor]:
    latents, text = inputs()
    forward(model, latents, text).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fp8_storage_converts_frozen_base_layers_only():
    model = tiny_lora_model()
    reference = copy.deepcopy(model)
    changed = store_base_weights_in_fp8(model, torch.float32)
    layers = dict(model.named_modules())
    assert changed > 0
    base = layers["transformer_blocks.0.attn1.to_q.base_layer"]
    assert isinstance(base, Fp8StorageLinear) and base.weight.dtype == torch.float8_e4m3fn
    assert base.weight_scale.shape == (base.out_features, 1)
    assert layers["transformer_blocks.0.attn1.to_q.lora_A.default"].weight.dtype == torch.float32
    assert type(layers["transformer_blocks.0.norm1.linear"]) is torch.nn.Linear  # norms stay as they were
    assert type(layers["proj_out"]) is torch.nn.Linear
    latents, text = inputs()
    with torch.no_grad():
        error = relative_error(forward(model, latents, text), forward(reference, latents, text))
    assert 0 < error < 0.05  # e4m3 with per-row scales: a few percent at most, never exact


@pytest.mark.slow
def test_fp8_storage_trains_the_lora_like_the_bf16_model():
    plain, fp8 = tiny_lora_model(), tiny_lora_model()
    store_base_weights_in_fp8(fp8, torch.float32)
    plain_grads, fp8_grads = lora_grads(plain), lora_grads(fp8)
    assert plain_grads.keys() == fp8_grads.keys()
    for name in plain_grads:
        assert relative_error(fp8_grads[name], plain_grads[name]) < 0.1, name


def test_fp8_storage_refuses_trainable_weights_and_full_fine_tuning():
    model = build_transformer(get_spec("tiny-t2v"))  # nothing frozen
    with pytest.raises(CogvxError, match="frozen"):
        store_base_weights_in_fp8(model)
    with pytest.raises(ConfigError, match="fp8_base_weights"):
        load_config(None, ["train.method=full", "train.fp8_base_weights=true"])
    with pytest.raises(ConfigError, match="activation_offload"):
        load_config(None, ["train.gradient_checkpointing=false", "train.activation_offload=true"])


def test_fp8_compute_multiplies_the_quantized_inputs_and_weights():
    """Fp8ComputeLinear = (x quantized per row) x (stored fp8 W) up to float32 rounding; its
    input gradient is dL/dy times the upcast W; the model's LoRA gradients stay close to the
    fp8-storage model's (the only new error is the inputs' e4m3 rounding)."""
    from cogvx.models.performance import quantize_rows

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    storage = copy.deepcopy(layer)
    store_base_weights_in_fp8(torch.nn.Sequential(layer), torch.float32, compute=False)
    x = torch.randn(2, 5, 64, requires_grad=True)
    fp8 = Fp8ComputeLinear.__new__(Fp8ComputeLinear)
    fp8.__dict__ = dict(layer.__dict__)
    y = fp8(x)
    x_fp8, x_scale = quantize_rows(x.detach().reshape(-1, 64))
    upcast = layer.weight.float() * layer.weight_scale
    expected = (x_fp8.float() * x_scale) @ upcast.t() + layer.bias
    torch.testing.assert_close(y.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    assert relative_error(y, storage(x)) < 0.1
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 48) @ upcast)


def test_fp8_compute_converts_only_the_block_linears_and_keeps_lora_gradients_close():
    storage, compute = tiny_lora_model(), tiny_lora_model()
    store_base_weights_in_fp8(storage, torch.float32)
    store_base_weights_in_fp8(compute, torch.float32, compute=True)
    layers = dict(compute.named_modules())
    assert isinstance(layers["transformer_blocks.0.attn1.to_q.base_layer"], Fp8ComputeLinear)
    assert type(layers["time_embedding.linear_1"]) is Fp8StorageLinear
    expected, actual = lora_grads(storage), lora_grads(compute)
    for name in expected:
        assert 0 < relative_error(actual[name], expected[name]) < 0.1, name


def test_keeping_attention_outputs_gives_the_same_gradients_as_plain_checkpointing():
    plain = lora_grads(tiny_lora_model())
    selective = lora_grads(tiny_lora_model(keep_attention=True))
    assert plain.keys() == selective.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], rtol=1e-5, atol=1e-7)
    assert any("cpu" in str(op) or "flash" in str(op) for op in ATTENTION_OPS)
    with pytest.raises(CogvxError, match="cannot be combined"):
        tiny_lora_model(offload=True, keep_attention=True)
    with pytest.raises(ConfigError, match="keep_attention_outputs"):
        load_config(None, ["train.gradient_checkpointing=false", "train.keep_attention_outputs=true"])
    with pytest.raises(ConfigError, match="fp8_compute"):
        load_config(None, ["train.fp8_compute=true"])


@pytest.mark.slow
def test_activation_offload_gives_the_same_gradients_as_plain_checkpointing():
    plain = lora_grads(tiny_lora_model(offload=False))
    offloaded = lora_grads(tiny_lora_model(offload=True))
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().sum() > 0, name  # the first block's LoRA is not cut off
        torch.testing.assert_close(offloaded[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_blocks_with_fp8_storage_and_checkpointing_match_eager():
    """The combination the reference trainer could not run: regional compile + fp8 storage +
    non-reentrant checkpointing; its gradients equal the eager model's."""
    eager, compiled = tiny_lora_model(), tiny_lora_model()
    for model in (eager, compiled):
        store_base_weights_in_fp8(model, torch.float32)
    assert compile_blocks(compiled) == len(compiled.transformer_blocks)
    expected, actual = lora_grads(eager), lora_grads(compiled)
    for name in expected:
        assert relative_error(actual[name], expected[name]) < 1e-3, name


def test_attention_backend_restricts_only_the_transformer():
    model = tiny_lora_model().eval()
    latents, text = inputs()
    cpu = torch.device("cpu")
    with torch.no_grad():
        expected = forward(model, latents, text)
        set_attention_backend(model, "math", cpu)
        assert all(isinstance(p, BackendAttnProcessor) for p in model.attn_processors.values())
        torch.testing.assert_close(forward(model, latents, text), expected, rtol=1e-4, atol=1e-5)
        set_attention_backend(model, "efficient", cpu)
        with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
            forward(model, latents, text)  # no memory-efficient kernel on a CPU: the processor applied it
        q = torch.randn(1, 2, 5, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # other modules: unrestricted
        set_attention_backend(model, "auto", cpu)
        torch.testing.assert_close(forward(model, latents, text), expected)  # diffusers' own processor back


@pytest.mark.slow
def test_attention_backend_holds_inside_compiled_blocks_and_the_backward_recompute():
    """The restriction is traced into compiled blocks and applies to the checkpoint recompute:
    with a kernel the CPU lacks, the compiled forward fails, and so does a backward whose
    forward ran unrestricted but whose recompute is restricted."""
    cpu = torch.device("cpu")
    model = tiny_lora_model()
    set_attention_backend(model, "efficient", cpu)
    compile_blocks(model)
    latents, text = inputs()
    with pytest.raises(Exception, match="No (available kernel|viable backend)"):
        forward(model, latents, text)
    model = tiny_lora_model()
    set_attention_backend(model, "math", cpu)
    compile_blocks(model)
    loss = forward(model, latents, text).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_gpu_only_options_fail_with_a_message_on_cpu():
    with pytest.raises(CogvxError, match="cudnn needs a CUDA device"):
        set_attention_backend(tiny_lora_model(), "cudnn", torch.device("cpu"))
    with pytest.raises(CogvxError, match="fa4 needs a CUDA GPU"):
        set_attention_backend(tiny_lora_model(), "fa4", torch.device("cpu"))
    with pytest.raises(CogvxError, match="compute capability"):
        quantize_fp8_compute(tiny_lora_model(), torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adamw8bit"])
def test_each_optimizer_runs_a_step_with_the_memory_options(optimizer, tmp_path):
    """The training code with fp8 storage + activation offload + each CPU-capable optimizer."""
    from cogvx.benchmark.cases import Case
    from cogvx.benchmark.worker import run_case

    case = Case(f"tiny-{optimizer}", "train", "tiny-t2v", (9, 64, 96),
                ("train.lora.rank=4", "train.fp8_base_weights=true", "train.activation_offload=true",
                 "train.attention_backend=math", f"train.optimizer={optimizer}"), steps=2, warmup=1)
    result = run_case(case, tmp_path)
    assert math.isfinite(result["loss"]) and len(result["step_s"]) == 2
    assert result["peak_allocated_gib"] > 0


@pytest.mark.slow
@pytest.mark.gpu
def test_real_architecture_step_with_every_option_on_gpu(tmp_path):
    """The 5b architecture at a small clip size: fp8 storage, compiled blocks, cuDNN attention,
    activation offload, 8-bit AdamW; loss finite."""
    from cogvx.benchmark.cases import Case
    from cogvx.benchmark.worker import run_case

    case = Case("gpu-5b-small", "train", "cogvideox-5b", (9, 128, 192),
                ("train.lora.rank=16", "train.fp8_base_weights=true", "train.compile=blocks",
                 "train.attention_backend=cudnn", "train.activation_offload=true", "train.optimizer=adamw8bit"),
                steps=2, warmup=1)
    result = run_case(case, tmp_path)
    assert result["device"] == "cuda" and math.isfinite(result["loss"])


def test_fa4_adapter_passes_only_the_arguments_a_release_takes():
    """torch's FA4 glue calls a module's _flash_attn_fwd/_bwd with its own keyword set: unset
    ones a flash-attn-4 release lacks are dropped, a set one it lacks is refused by name."""
    from cogvx.models.flash4 import _known_kwargs

    def release_forward(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        return q

    kwargs = {"softmax_scale": 0.125, "causal": False, "return_lse": True, "page_table": None, "num_splits": None}
    assert _known_kwargs(release_forward, kwargs) == {"softmax_scale": 0.125, "causal": False, "return_lse": True}
    with pytest.raises(CogvxError, match="does not take page_table"):
        _known_kwargs(release_forward, {**kwargs, "page_table": torch.zeros(1)})


@pytest.mark.slow
@pytest.mark.gpu
def test_fa4_backend_runs_flash_attention_4_kernels_and_matches_cudnn(tmp_path):
    """train.attention_backend=fa4 on the 5b architecture at a small size, compiled: the profiled
    step's attention kernels are FlashAttention-4's, and its loss is cuDNN's within bf16."""
    pytest.importorskip("flash_attn.cute.interface", reason="flash-attn-4 is not installed")
    from cogvx.benchmark.cases import Case
    from cogvx.benchmark.worker import run_case

    losses = {}
    for backend in ("cudnn", "fa4"):
        case = Case(f"gpu-5b-{backend}", "train", "cogvideox-5b", (9, 128, 192),
                    ("train.lora.rank=16", "train.compile=blocks", f"train.attention_backend={backend}"),
                    steps=1, warmup=1, profile=True)
        result = run_case(case, tmp_path / backend)
        losses[backend] = result["loss"]
        assert result["profile"]["attention_backend_seen"] == f"attn-{backend}"
    assert abs(losses["fa4"] - losses["cudnn"]) < 0.02 * abs(losses["cudnn"])


@pytest.mark.parametrize(("body", "expected"), [
    ("raise ImportError(\"No module named 'cutlass'\", name='cutlass')", "installed but cannot be loaded.*dsl_packages"),
    ("raise RuntimeError('No CTK flavor installed')", "installed but cannot be loaded: RuntimeError: No CTK flavor"),
])
def test_a_broken_flash_attention_4_install_is_told_apart_from_a_missing_one(tmp_path, monkeypatch, body, expected):
    """A flash_attn.cute.interface whose own dependency fails (as an install into a --target
    folder without its .pth does) gets its own message, not "pip install flash-attn-4"."""
    import sys

    from cogvx.models import flash4

    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "interface.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    flash4._interface.cache_clear()
    try:
        with pytest.raises(CogvxError, match=expected):
            flash4._interface()
    finally:
        flash4._interface.cache_clear()
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]  # the stand-in's modules; monkeypatch puts back any real ones


def test_a_missing_flash_attention_4_says_how_to_install_it(monkeypatch):
    import sys

    from cogvx.models import flash4

    for name in [n for n in sys.modules if n.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError(name='flash_attn')
    flash4._interface.cache_clear()
    try:
        with pytest.raises(CogvxError, match="needs FlashAttention-4: pip install flash-attn-4"):
            flash4._interface()
    finally:
        flash4._interface.cache_clear()

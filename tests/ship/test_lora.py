"""svdq lora apply: the quantized model with a LoRA matches the 16-bit model with the LoRA merged about as
closely as the quantized model matches the 16-bit one without it."""

import json

import torch
from safetensors.torch import save_file

from svdq_cli.formats.svdq_file import load_quantized
from svdq_cli.models.registry import ADAPTERS
from tests.conftest import svdq
from tests.stages.test_runner import export_file

QUANTIZED = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "transformer_blocks.1.ff.net.2")
SIXTEEN_BIT = "proj_out"  # kept in 16 bits by the adapter


def random_lora(transformer, gen, rank=4, strength=0.5):
    """Per layer (A, B) with ‖B·A‖ about ``strength``·‖W‖."""
    pairs = {}
    for name in (*QUANTIZED, SIXTEEN_BIT):
        module = transformer.get_submodule(name)
        weight = module.weight if hasattr(module, "weight") else module.effective_weight()
        n, k = weight.shape
        a, b = torch.randn(rank, k, generator=gen), torch.randn(n, rank, generator=gen)
        b *= strength * weight.float().norm() / (b @ a).norm()
        pairs[name] = (a, b)
    return pairs


def merged(transformer, pairs):
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            transformer.get_submodule(name).weight += b @ a
    return transformer


def step_output(transformer, inputs):
    with torch.no_grad():
        return transformer(*inputs["args"], **inputs["kwargs"])[0].float()


def relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_applied_lora_matches_the_merged_16bit_model(finished_run, tmp_path, gen):
    adapter = ADAPTERS["tiny-flux"]
    pipeline = adapter.build_tiny(0)
    inputs = {}

    def keep_inputs(_module, args, kwargs):
        inputs.setdefault("args", args)
        inputs.setdefault("kwargs", kwargs)

    handle = pipeline.transformer.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    adapter.generate(pipeline, ["a red fox in snow"], [3], 1, 3.5, 64, output_type="latent")
    handle.remove()
    reference = step_output(pipeline.transformer, inputs)

    pairs = random_lora(pipeline.transformer, gen)
    peft = {f"transformer.{n}.lora_A.weight": a for n, (a, _) in pairs.items() if n != SIXTEEN_BIT}
    peft |= {f"transformer.{n}.lora_B.weight": b for n, (_, b) in pairs.items() if n != SIXTEEN_BIT}
    kohya_name = "lora_unet_" + SIXTEEN_BIT.replace(".", "_")
    a16, b16 = pairs[SIXTEEN_BIT]
    kohya = {f"{kohya_name}.lora_down.weight": a16, f"{kohya_name}.lora_up.weight": b16 * 2,
             f"{kohya_name}.alpha": torch.tensor(2.0)}  # alpha/rank = 0.5 undoes the ×2
    save_file(peft, tmp_path / "peft.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors")

    out = tmp_path / "with-lora.safetensors"
    code, stdout, stderr = svdq("lora", "apply", export_file(finished_run), tmp_path / "peft.safetensors",
                                tmp_path / "kohya.safetensors", "--out", out, "--json")
    assert code == 0, stderr
    applied = json.loads(stdout)["applied"]
    assert [(a["joined"], a["merged"]) for a in applied] == [(3, 0), (0, 1)]

    quantized = step_output(load_quantized(export_file(finished_run)), inputs)
    quantized_lora_model = load_quantized(out)
    assert quantized_lora_model.get_submodule(QUANTIZED[0]).rank == 16 + 16  # r=4 padded to 16
    quantized_lora = step_output(quantized_lora_model, inputs)
    reference_lora = step_output(merged(pipeline.transformer, pairs), inputs)

    baseline = relative(quantized, reference)
    assert relative(reference_lora, reference) > 5 * baseline  # the LoRA really changes the output
    assert relative(quantized_lora, reference_lora) <= 1.5 * baseline + 1e-3


def test_lora_bad_input(finished_run, tmp_path, gen):
    export = export_file(finished_run)
    (tmp_path / "lora.bin").write_bytes(b"pickle")
    code, _, stderr = svdq("lora", "apply", export, tmp_path / "lora.bin")
    assert code == 2 and "only .safetensors LoRA files are read" in stderr
    save_file({"transformer.nope.lora_A.weight": torch.zeros(4, 128), "transformer.nope.lora_B.weight":
               torch.zeros(128, 4)}, tmp_path / "unknown.safetensors")
    out = tmp_path / "o.safetensors"
    code, _, stderr = svdq("lora", "apply", export, tmp_path / "unknown.safetensors", "--out", out)
    assert code == 2 and "matches no layer" in stderr
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)},
              tmp_path / "shape.safetensors")
    code, _, stderr = svdq("lora", "apply", export, tmp_path / "shape.safetensors", "--out", out)
    assert code == 2 and "do not fit a 128→128 layer" in stderr
    assert not out.exists()



def test_joined_lora_adds_exactly_its_own_product(finished_run, tmp_path, gen):
    """No re-quantization: per layer, y_with(x) − y_without(x) = s·x·Aᵀ·Bᵀ, shifted (unsigned) layers too."""
    before = load_quantized(export_file(finished_run))
    names = ("transformer_blocks.1.ff.net.2", "transformer_blocks.0.attn.to_k")  # unsigned + shift; signed
    pairs = {}
    for name in names:
        layer = before.get_submodule(name)
        pairs[name] = (torch.randn(3, layer.in_features, generator=gen),
                       torch.randn(layer.out_features, 3, generator=gen) * 0.1)
    tensors = {f"{n}.lora_A.weight": a for n, (a, _) in pairs.items()} | {
        f"{n}.lora_B.weight": b for n, (_, b) in pairs.items()}
    save_file(tensors, tmp_path / "lora.safetensors")
    out = tmp_path / "out.safetensors"
    code, _, stderr = svdq("lora", "apply", export_file(finished_run), tmp_path / "lora.safetensors",
                           "--scale", "0.7", "--out", out)
    assert code == 0, stderr
    after = load_quantized(out)
    for name, (a, b) in pairs.items():
        old, new = before.get_submodule(name), after.get_submodule(name)
        assert (old.shift is not None) == name.endswith("ff.net.2")
        x = torch.nn.functional.gelu(torch.randn(9, old.in_features, generator=gen))
        with torch.no_grad():
            delta = new(x) - old(x)
        expected = 0.7 * (x @ a.T) @ b.T
        assert relative(delta, expected) < 1e-4, name
